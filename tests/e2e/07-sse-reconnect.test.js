// Scenario 7: with a 1 s SSE lifetime, one long subscription spans several server-side closes
// and still sees every message exactly once, in order.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { stream, DurableStream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, BROADCAST_KEY, linkedController } from "./lib/server.js";
import { record } from "./lib/recorder.js";

describe("SSE reconnects", { timeout: 40_000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ["--public_streams", "--ds_sse_ttl", "1"] });
  });
  after(() => server?.stop());

  test("a subscription across at least 3 server-side SSE closes sees every message once", { timeout: 30_000 }, async (t) => {
    const name = "sse/reconnects";
    const url = server.streamUrl(name);
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    const sent = [];
    const send = async (m) => {
      await broadcast(name, m);
      sent.push(m);
    };
    await send({ n: 0, backlog: true });

    // The client warns (and gives up on SSE) after 3 connections shorter than 1 s.
    const warnings = [];
    const warn = console.warn;
    console.warn = (...args) => warnings.push(args.join(" "));

    const controller = linkedController(t);
    const res = await stream({ url, offset: "-1", live: "sse", json: true, signal: controller.signal });
    const rec = record(res);
    try {
      await rec.until(() => rec.items.length >= 1 && rec.batches.some((b) => b.upToDate), "the backlog");
      await server.waitForMetric("ds_sse_clients_num", (v) => v === 1);
      const { ds_sse_requests_total: connectionsAtStart } = await server.metrics();
      const started = Date.now();

      // Broadcast a message every ~150 ms (jittered, so some land right at a close) until the
      // client has opened 3 more SSE connections, i.e. the server closed the stream 3+ times.
      const deadline = Date.now() + 15_000;
      let n = 1;
      for (;;) {
        await send({ n: n++ });
        const { ds_sse_requests_total: connections } = await server.metrics();
        if (connections >= connectionsAtStart + 3) break;
        assert.ok(Date.now() < deadline, `only ${connections - connectionsAtStart} reconnects in 15 s`);
        // Spacing the load over time is the scenario itself, not a wait for an event.
        await sleep(100 + Math.floor(Math.random() * 100));
      }
      const elapsed = Date.now() - started;
      // The connections lived about the 1 s TTL each, not cut short.
      assert.ok(elapsed >= 1_800, `3 reconnects took only ${elapsed} ms`);
      // A last burst right after a reconnect.
      for (let i = 0; i < 3; i++) await send({ n: n++ });

      await rec.until(() => rec.items.length >= sent.length, `all ${sent.length} messages`, 10_000);
      assert.deepEqual(rec.items, sent, "every message exactly once, in order");
      assert.ok(sent.length >= 10, `${sent.length} messages spread over the reconnects`);

      // The session is still live (the client never gave up on SSE) and at the tail.
      assert.equal(rec.ended, false);
      assert.deepEqual(warnings, []);
      const head = await DurableStream.head({ url, signal: t.signal });
      await rec.until(() => rec.batches.at(-1).offset === head.offset, "the last batch to carry the tail offset");
      for (let i = 1; i < rec.batches.length; i++) {
        assert.ok(rec.batches[i].offset >= rec.batches[i - 1].offset, "offsets are monotonic");
      }
    } finally {
      console.warn = warn;
      controller.abort();
      await res.closed.catch(() => {});
    }
    await server.waitForMetric("ds_sse_clients_num", (v) => v === 0);
  });
});
