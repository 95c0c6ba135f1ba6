// Extra: a backlog larger than one response (--ds_max_chunk_bytes) comes in several chunks;
// the client stitches catch-up chunks and SSE data/control pairs back together.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { stream, DurableStream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, countingFetch, linkedController, BROADCAST_KEY } from "./lib/server.js";
import { record } from "./lib/recorder.js";

const pad = "x".repeat(40);

describe("chunked reads", { timeout: 30_000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ["--public_streams", "--ds_max_chunk_bytes", "100"] });
  });
  after(() => server?.stop());

  test("stream().json() follows catch-up chunks to the tail; live: false stops after one", { timeout: 15_000 }, async (t) => {
    const name = "chunks/catch-up";
    const url = server.streamUrl(name);
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    const messages = Array.from({ length: 8 }, (_, n) => ({ n, pad }));
    for (const m of messages) await broadcast(name, m);

    const fetch = countingFetch();
    const res = await stream({ url, offset: "-1", fetch, signal: t.signal });
    assert.deepEqual(await res.json(), messages);
    assert.ok(fetch.requests.length > 1, `${fetch.requests.length} requests`);
    assert.equal(res.upToDate, true);
    assert.equal(res.offset, (await DurableStream.head({ url, signal: t.signal })).offset);

    // live: false makes a single request: the first chunk only, not up to date; its offset
    // continues exactly where it stopped.
    const one = await stream({ url, offset: "-1", live: false, signal: t.signal });
    const part = await one.json();
    assert.ok(part.length >= 1 && part.length < messages.length, `${part.length} items in the first chunk`);
    assert.deepEqual(part, messages.slice(0, part.length));
    assert.equal(one.upToDate, false);
    const rest = await stream({ url, offset: one.offset, signal: t.signal });
    assert.deepEqual(await rest.json(), messages.slice(part.length));
  });

  test("a batch broadcast (array body) reaches an SSE subscriber in chunks, in order", { timeout: 15_000 }, async (t) => {
    const name = "chunks/sse";
    const url = server.streamUrl(name);
    const controller = linkedController(t);
    const res = await stream({ url, offset: "now", live: "sse", json: true, signal: controller.signal });
    const rec = record(res);
    try {
      await server.waitForMetric("ds_sse_clients_num", (v) => v === 1);
      // serverless-js sends one message per request; the broadcast API also takes an array.
      const messages = Array.from({ length: 8 }, (_, n) => ({ n, pad }));
      messages.push([1, 2], "last");
      const body = messages.map((m) => ({ stream: name, data: JSON.stringify(m) }));
      const post = await fetch(server.broadcastUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${BROADCAST_KEY}` },
        body: JSON.stringify(body),
      });
      assert.equal(post.status, 201);
      await rec.until(() => rec.items.length >= messages.length, "the whole batch");
      assert.deepEqual(rec.items, messages);
      const nonEmpty = rec.batches.filter((b) => b.items.length > 0);
      assert.ok(nonEmpty.length > 1, `${nonEmpty.length} SSE batches`);
      assert.equal(nonEmpty.at(-1).upToDate, true);
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
  });
});
