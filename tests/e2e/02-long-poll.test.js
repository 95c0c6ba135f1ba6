// Scenario 2: a long-poll subscriber at the tail gets a message broadcast while it waits,
// and nothing twice.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { stream, DurableStream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, BROADCAST_KEY, linkedController } from "./lib/server.js";
import { record } from "./lib/recorder.js";

describe("long-poll tail", { timeout: 30_000 }, () => {
  let server;
  before(async () => {
    // A short poll interval, so an idle round (204) comes back within a second.
    server = await startServer({ args: ["--public_streams", "--ds_poll_interval", "1"] });
  });
  after(() => server?.stop());

  test("subscribeJson receives messages broadcast while the long-poll waits, each once", { timeout: 20_000 }, async (t) => {
    const name = "lp/room-1";
    const url = server.streamUrl(name);
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    await broadcast(name, { n: 1 });
    await broadcast(name, { n: 2 });

    // Catch up first and keep the offset, as an app would.
    const first = await stream({ url, offset: "-1", live: false, signal: t.signal });
    assert.deepEqual(await first.json(), [{ n: 1 }, { n: 2 }]);
    const offset = first.offset;

    const controller = linkedController(t);
    const res = await stream({ url, offset, live: "long-poll", signal: controller.signal });
    const rec = record(res);
    try {
      // The subscriber is parked in a long-poll: broadcast now.
      await server.waitForMetric("ds_poll_clients_num", (v) => v === 1);
      await broadcast(name, { n: 3 });
      await rec.until(() => rec.items.length >= 1, "the first live message");
      assert.deepEqual(rec.items, [{ n: 3 }]);

      // Parked again: one more.
      await server.waitForMetric("ds_poll_clients_num", (v) => v === 1);
      await broadcast(name, { n: 4 });
      await rec.until(() => rec.items.length >= 2, "the second live message");

      // Then let a whole long-poll round end idle (204, an empty batch): nothing comes again.
      const nonEmpty = () => rec.batches.findLastIndex((b) => b.items.length > 0);
      await rec.until(
        () => rec.batches.slice(nonEmpty() + 1).some((b) => b.items.length === 0 && b.upToDate),
        "an idle long-poll round after the last message",
      );
      assert.deepEqual(rec.items, [{ n: 3 }, { n: 4 }]);
      assert.equal(rec.ended, false, "the session is still live");

      // Every batch is up to date (the server answered each from the tail), offsets never go
      // back, and the last one is the stream's tail.
      for (const b of rec.batches) assert.equal(b.upToDate, true);
      for (let i = 1; i < rec.batches.length; i++) {
        assert.ok(rec.batches[i].offset >= rec.batches[i - 1].offset, "offsets are monotonic");
      }
      const head = await DurableStream.head({ url, signal: t.signal });
      assert.equal(rec.batches.at(-1).offset, head.offset);

      // It really long-polled.
      const m = await server.metrics();
      assert.ok(m.ds_poll_requests_total >= 3, `long-poll requests: ${m.ds_poll_requests_total}`);
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
    // The server lets go of the aborted long-poll.
    await server.waitForMetric("ds_poll_clients_num", (v) => v === 0);
  });

  test("offset 'now' with long-poll skips the backlog and gets only new messages", { timeout: 20_000 }, async (t) => {
    const name = "lp/room-now";
    const url = server.streamUrl(name);
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    await broadcast(name, { old: 1 });
    await broadcast(name, { old: 2 });

    const controller = linkedController(t);
    const res = await stream({ url, offset: "now", live: "long-poll", signal: controller.signal });
    const rec = record(res);
    try {
      await server.waitForMetric("ds_poll_clients_num", (v) => v === 1);
      await broadcast(name, { fresh: 1 });
      await rec.until(() => rec.items.length >= 1, "the new message");
      assert.deepEqual(rec.items, [{ fresh: 1 }]);
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
  });
});
