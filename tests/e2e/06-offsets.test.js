// Scenario 6: offset "now" returns no items; an offset trimmed by retention is a 410 that
// reaches the client as an error (not a hang, not a retry loop).
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { stream, DurableStream, FetchError } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, countingFetch, BROADCAST_KEY } from "./lib/server.js";

describe("special and stale offsets", { timeout: 30_000 }, () => {
  let server;
  let broadcast;
  before(async () => {
    // Keep only the last 2 messages of each stream.
    server = await startServer({ args: ["--public_streams", "--history_limit", "2"] });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
  });
  after(() => server?.stop());

  test("offset 'now' returns no items and the tail offset", { timeout: 10_000 }, async () => {
    const name = "offsets/now";
    const url = server.streamUrl(name);
    await broadcast(name, { n: 1 });
    await broadcast(name, { n: 2 });
    const head = await DurableStream.head({ url });

    for (const live of [undefined, false]) {
      const res = await stream({ url, offset: "now", live });
      assert.deepEqual(await res.json(), [], `live: ${live}`);
      assert.equal(res.upToDate, true);
      assert.equal(res.offset, head.offset);
    }

    // The tail offset it gave resumes with what comes next.
    const now = await stream({ url, offset: "now", live: false });
    await now.json();
    await broadcast(name, { n: 3 });
    const next = await stream({ url, offset: now.offset, live: false });
    assert.deepEqual(await next.json(), [{ n: 3 }]);
  });

  test("an offset trimmed by retention rejects with 410, in every live mode", { timeout: 10_000 }, async () => {
    const name = "offsets/stale";
    const url = server.streamUrl(name);
    // offsets[i] = the offset after i messages.
    const offsets = [(await DurableStream.head({ url })).offset];
    for (let n = 1; n <= 5; n++) {
      await broadcast(name, { n });
      offsets.push((await DurableStream.head({ url })).offset);
    }

    // Retained: messages 4 and 5. From the start, or from the offset just before 4: both.
    for (const offset of ["-1", offsets[3]]) {
      const res = await stream({ url, offset, live: false });
      assert.deepEqual(await res.json(), [{ n: 4 }, { n: 5 }], `from ${offset}`);
    }

    // Offsets whose next message is gone: 410, one request, whatever the live mode.
    for (const offset of [offsets[0], offsets[1], offsets[2]]) {
      for (const live of [false, true, "long-poll", "sse"]) {
        const fetch = countingFetch();
        const controller = new AbortController();
        try {
          await assert.rejects(
            async () => {
              const res = await stream({ url, offset, live, json: true, fetch, signal: controller.signal });
              await res.json();
            },
            (err) => {
              assert.ok(err instanceof FetchError, `a FetchError, got ${err}`);
              assert.equal(err.status, 410);
              assert.equal(typeof err.json?.error, "string");
              return true;
            },
            `offset ${offset}, live: ${live}`,
          );
          assert.equal(fetch.requests.length, 1, "no retries");
        } finally {
          controller.abort();
        }
      }
    }
  });

  test("a live subscriber that falls behind retention gets 410 mid-stream, not a hang", { timeout: 15_000 }, async () => {
    const name = "offsets/slow-reader";
    const url = server.streamUrl(name);
    const controller = new AbortController();
    const res = await stream({ url, offset: "now", live: "long-poll", signal: controller.signal });
    const seen = [];
    let release;
    const held = new Promise((r) => (release = r));
    let firstBatch;
    const gotFirst = new Promise((r) => (firstBatch = r));
    // An async subscriber applies backpressure: while it is busy, the client asks for nothing.
    res.subscribeJson(async (batch) => {
      seen.push(...batch.items);
      if (batch.items.length > 0) {
        firstBatch();
        await held;
      }
    });
    try {
      await server.waitForMetric("ds_poll_clients_num", (v) => v === 1);
      await broadcast(name, { n: 1 });
      await gotFirst;
      // While the subscriber is busy, 3 more arrive; only the last 2 are kept, so the
      // subscriber's next offset (before n: 2) is gone.
      for (const n of [2, 3, 4]) await broadcast(name, { n });
      release();
      await assert.rejects(
        Promise.race([
          res.closed,
          new Promise((_, reject) => setTimeout(() => reject(new Error("the session did not end within 5 s")), 5_000).unref()),
        ]),
        (err) => err instanceof FetchError && err.status === 410,
      );
      assert.deepEqual(seen, [{ n: 1 }]);
    } finally {
      release();
      controller.abort();
    }
  });

  test("an offset from another data directory (or garbage) is an error, not a hang", { timeout: 10_000 }, async () => {
    const url = server.streamUrl("offsets/foreign");
    await broadcast("offsets/foreign", { n: 1 });
    const head = await DurableStream.head({ url });
    const [epoch, seq] = head.offset.split("_");
    const foreign = `${epoch === "zzzzzzzzzz" ? "yyyyyyyyyy" : "zzzzzzzzzz"}_${seq}`;
    for (const [offset, status] of [
      [foreign, 410],
      ["not-an-offset", 400],
    ]) {
      const fetch = countingFetch();
      await assert.rejects(
        async () => (await stream({ url, offset, fetch })).json(),
        (err) => err instanceof FetchError && err.status === status,
        `offset ${offset} → ${status}`,
      );
      assert.equal(fetch.requests.length, 1);
    }
  });
});
