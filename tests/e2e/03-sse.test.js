// Scenario 3: an SSE subscription gets the backlog, sees upToDate, then live messages.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { stream, DurableStream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, BROADCAST_KEY, linkedController } from "./lib/server.js";
import { record } from "./lib/recorder.js";

describe("SSE", { timeout: 30_000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ["--public_streams"] });
  });
  after(() => server?.stop());

  test("stream({live: 'sse', json: true}).subscribeJson: backlog, upToDate, then live", { timeout: 20_000 }, async (t) => {
    const name = "sse/room-1";
    const url = server.streamUrl(name);
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    const backlog = [{ n: 1 }, { n: 2, text: "two" }, [3, "three"]];
    for (const m of backlog) await broadcast(name, m);

    const controller = linkedController(t);
    const res = await stream({ url, offset: "-1", live: "sse", json: true, signal: controller.signal });
    const rec = record(res);
    try {
      await rec.until(
        () => rec.items.length >= backlog.length && rec.batches.some((b) => b.upToDate),
        "the backlog and upToDate",
      );
      assert.deepEqual(rec.items, backlog);
      const upToDateAt = rec.batches.findIndex((b) => b.upToDate);
      const backlogDone = rec.batches.length;

      // The SSE response is open: broadcast live messages, first one alone, then three back to back.
      await server.waitForMetric("ds_sse_clients_num", (v) => v === 1);
      const live = [{ live: 1 }, { live: 2 }, "three", { live: 4 }];
      await broadcast(name, live[0]);
      await rec.until(() => rec.items.length >= backlog.length + 1, "the first live message");
      // The rest back to back, without waiting in between: they may share a batch.
      for (const m of live.slice(1)) await broadcast(name, m);
      await rec.until(() => rec.items.length >= backlog.length + live.length, "the live messages");
      assert.deepEqual(rec.items, [...backlog, ...live]);
      assert.ok(upToDateAt < backlogDone, "upToDate was seen before any live message");
      const liveBatches = rec.batches.slice(backlogDone).filter((b) => b.items.length > 0);
      assert.ok(liveBatches.length >= 1);
      for (const b of liveBatches) assert.equal(b.upToDate, true, "live SSE batches are up to date");

      // The last batch's offset is the tail.
      const head = await DurableStream.head({ url, signal: t.signal });
      assert.equal(rec.batches.at(-1).offset, head.offset);
      assert.equal(res.offset, head.offset);

      // Exactly one SSE connection so far (no reconnects within the default 60 s TTL).
      const m = await server.metrics();
      assert.equal(m.ds_sse_requests_total, 1);
      assert.equal(rec.ended, false);
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
    await server.waitForMetric("ds_sse_clients_num", (v) => v === 0);
  });
});
