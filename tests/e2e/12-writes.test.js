// Scenario 12: the official client writes. `DurableStream.create()`, `append()`, `close()`
// and `delete()` of @durable-streams/client against the write API (PUT, POST, DELETE), with
// the broadcast key as its bearer token, read back by the same client in every mode.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { DurableStream, stream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, BROADCAST_KEY } from "./lib/server.js";

const headers = { Authorization: `Bearer ${BROADCAST_KEY}` };
describe("writes with the official client", { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ["--public_streams", "--ds_implicit_streams", "false"] });
  });
  after(() => server?.stop());

  test("a JSON stream: create, append, close, read to the end in every mode", { timeout: 20_000 }, async (t) => {
    const url = server.streamUrl("writes/json");
    const handle = await DurableStream.create({ url, headers, contentType: "application/json", signal: t.signal });
    await handle.append(JSON.stringify({ n: 1 }));
    await handle.append(JSON.stringify([2, 3])); // one message: the client wraps it
    const closed = await handle.close({ body: JSON.stringify({ n: 4 }) });
    assert.ok(closed.finalOffset, "close returns the final offset");

    for (const live of [false, "long-poll", "sse"]) {
      const res = await stream({ url, offset: "-1", live, signal: t.signal });
      assert.deepEqual(await res.json(), [{ n: 1 }, [2, 3], { n: 4 }], `live: ${live}`);
      assert.equal(res.streamClosed, true, `live: ${live}`);
    }
    const head = await DurableStream.head({ url, signal: t.signal });
    assert.equal(head.streamClosed, true);
    await assert.rejects(handle.append(JSON.stringify({ n: 5 })), "appending to a closed stream fails");
  });

  test("a text stream with a TTL, then deleted and created again", { timeout: 20_000 }, async (t) => {
    const url = server.streamUrl("writes/text");
    const handle = await DurableStream.create({
      url, headers, contentType: "text/plain", ttlSeconds: 3600, body: "hello ", signal: t.signal,
    });
    await handle.append("world");
    const res = await stream({ url, offset: "-1", live: false, signal: t.signal });
    assert.equal(await res.text(), "hello world");
    const head = await DurableStream.head({ url, signal: t.signal });
    assert.equal(head.contentType, "text/plain");

    await DurableStream.delete({ url, headers, signal: t.signal });
    assert.equal((await DurableStream.head({ url, signal: t.signal })).exists, false, "gone after delete");
    await DurableStream.create({ url, headers, contentType: "text/plain", body: "again", signal: t.signal });
    const fresh = await stream({ url, offset: "-1", live: false, signal: t.signal });
    assert.equal(await fresh.text(), "again");
  });

  test("a live reader gets appends and the close, then its session ends", { timeout: 20_000 }, async (t) => {
    const url = server.streamUrl("writes/live");
    const handle = await DurableStream.create({ url, headers, contentType: "application/json", signal: t.signal });
    const reader = await stream({ url, offset: "-1", live: "sse", signal: t.signal });
    const writes = (async () => {
      await handle.append(JSON.stringify("first"));
      await handle.close({ body: JSON.stringify("last") });
    })();
    // Every item until the session ends: it ends by itself once the stream is closed.
    const received = [];
    for await (const item of reader.jsonStream()) received.push(item);
    await writes;
    assert.deepEqual(received, ["first", "last"]);
    assert.equal(reader.streamClosed, true);
  });

  test("broadcasts and client appends share one JSON stream; a closed stream refuses broadcasts", { timeout: 20_000 }, async (t) => {
    const name = "writes/mixed";
    const url = server.streamUrl(name);
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    const handle = await DurableStream.create({ url, headers, contentType: "application/json", signal: t.signal });
    await broadcast(name, { from: "broadcast" });
    await handle.append(JSON.stringify({ from: "client" }));
    await handle.close();
    await assert.rejects(broadcast(name, { from: "late" }), "409 after the close");
    const res = await stream({ url, offset: "-1", live: false, signal: t.signal });
    assert.deepEqual(await res.json(), [{ from: "broadcast" }, { from: "client" }]);
  });
});
