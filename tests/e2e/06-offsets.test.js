// Scenario 6: offset "now" returns no items; an offset trimmed by retention is a 410 that
// reaches the client as an error (not a hang, not a retry loop).
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { stream, DurableStream, FetchError } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, countingFetch, withTimeout, BROADCAST_KEY, linkedController } from "./lib/server.js";
import { record } from "./lib/recorder.js";

describe("special and stale offsets", { timeout: 30_000 }, () => {
  let server;
  let broadcast;
  before(async () => {
    // Keep only the last 2 messages of each stream.
    server = await startServer({ args: ["--public_streams", "--history_limit", "2"] });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
  });
  after(() => server?.stop());

  test("offset 'now' returns no items and the tail offset", { timeout: 10_000 }, async (t) => {
    const name = "offsets/now";
    const url = server.streamUrl(name);
    await broadcast(name, { n: 1 });
    await broadcast(name, { n: 2 });
    const head = await DurableStream.head({ url, signal: t.signal });

    for (const live of [undefined, false]) {
      const res = await stream({ url, offset: "now", live, signal: t.signal });
      assert.deepEqual(await res.json(), [], `live: ${live}`);
      assert.equal(res.upToDate, true);
      assert.equal(res.offset, head.offset);
    }

    // The tail offset it gave resumes with what comes next.
    const now = await stream({ url, offset: "now", live: false, signal: t.signal });
    await now.json();
    await broadcast(name, { n: 3 });
    const next = await stream({ url, offset: now.offset, live: false, signal: t.signal });
    assert.deepEqual(await next.json(), [{ n: 3 }]);
  });

  test("an offset trimmed by retention rejects with 410, in every live mode", { timeout: 10_000 }, async (t) => {
    const name = "offsets/stale";
    const url = server.streamUrl(name);
    // offsets[i] = the offset after i messages.
    const offsets = [(await DurableStream.head({ url, signal: t.signal })).offset];
    for (let n = 1; n <= 5; n++) {
      await broadcast(name, { n });
      offsets.push((await DurableStream.head({ url, signal: t.signal })).offset);
    }

    // Retained: messages 4 and 5. From the start, or from the offset just before 4: both.
    for (const offset of ["-1", offsets[3]]) {
      const res = await stream({ url, offset, live: false, signal: t.signal });
      assert.deepEqual(await res.json(), [{ n: 4 }, { n: 5 }], `from ${offset}`);
    }

    // Offsets whose next message is gone: 410, one request, whatever the live mode.
    for (const offset of [offsets[0], offsets[1], offsets[2]]) {
      for (const live of [false, true, "long-poll", "sse"]) {
        const fetch = countingFetch();
        const controller = linkedController(t);
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

  test("a live subscriber that falls behind retention gets 410 mid-stream, not a hang", { timeout: 15_000 }, async (t) => {
    const name = "offsets/slow-reader";
    const url = server.streamUrl(name);
    // A fetch that can be paused, like a client that went offline for a while: a request made
    // while the gate is closed waits until it opens.
    let gate = null;
    let openGate = () => {};
    const pausableFetch = async (input, init) => {
      if (gate) await gate;
      return fetch(input, init);
    };
    const controller = linkedController(t);
    const res = await stream({ url, offset: "now", live: "long-poll", fetch: pausableFetch, signal: controller.signal });
    const rec = record(res);
    try {
      await server.waitForMetric("ds_poll_clients_num", (v) => v === 1);
      gate = new Promise((r) => (openGate = r));
      // The parked long-poll (already sent) gets this one; the next request waits at the gate.
      await broadcast(name, { n: 1 });
      await rec.until(() => rec.items.length >= 1, "the first message");
      // Meanwhile 3 more arrive; only the last 2 are kept, so the subscriber's offset (just
      // before n: 2) is gone when it asks again.
      for (const n of [2, 3, 4]) await broadcast(name, { n });
      openGate();
      await assert.rejects(
        withTimeout(res.closed, 5_000, "the session to end"),
        (err) => err instanceof FetchError && err.status === 410,
      );
      assert.deepEqual(rec.items, [{ n: 1 }]);
    } finally {
      openGate();
      controller.abort();
    }
  });

  test("an offset from another data directory (or garbage) is an error, not a hang", { timeout: 10_000 }, async (t) => {
    const url = server.streamUrl("offsets/foreign");
    await broadcast("offsets/foreign", { n: 1 });
    const head = await DurableStream.head({ url, signal: t.signal });
    const [epoch, seq] = head.offset.split("_");
    const foreign = `${epoch === "zzzzzzzzzz" ? "yyyyyyyyyy" : "zzzzzzzzzz"}_${seq}`;
    for (const [offset, status] of [
      [foreign, 410],
      ["not-an-offset", 400],
    ]) {
      const fetch = countingFetch();
      await assert.rejects(
        async () => (await stream({ url, offset, fetch, signal: t.signal })).json(),
        (err) => err instanceof FetchError && err.status === status,
        `offset ${offset} → ${status}`,
      );
      assert.equal(fetch.requests.length, 1);
    }
  });
});
