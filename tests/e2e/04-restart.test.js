// Scenario 4: an offset saved before a server restart resumes exactly after its message.
import { test } from "node:test";
import assert from "node:assert/strict";
import { stream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, tempDir, removeDir, BROADCAST_KEY, linkedController } from "./lib/server.js";
import { record } from "./lib/recorder.js";

const args = ["--public_streams"];

test("resume from a saved offset across a graceful restart and a SIGKILL", { timeout: 30_000 }, async (t) => {
  const dir = await tempDir();
  const name = "orders/42";
  let server;
  try {
    // First life: write 4, read 3 of them (the 4th arrives after the read), stop gracefully.
    server = await startServer({ dir, args });
    let broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    for (const n of [1, 2, 3]) await broadcast(name, { n });
    const first = await stream({ url: server.streamUrl(name), offset: "-1", live: false, signal: t.signal });
    assert.deepEqual(await first.json(), [{ n: 1 }, { n: 2 }, { n: 3 }]);
    const saved = first.offset;
    await broadcast(name, { n: 4 });
    const stop = await server.stop("SIGTERM");
    assert.equal(stop.code, 0, `graceful stop exits 0 (got ${JSON.stringify(stop)})\n${server.logs()}`);

    // Second life, same data directory, new port: broadcast more, continue from the saved offset.
    server = await startServer({ dir, args });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    for (const n of [5, 6]) await broadcast(name, { n });
    const second = await stream({ url: server.streamUrl(name), offset: saved, live: false, signal: t.signal });
    assert.deepEqual(await second.json(), [{ n: 4 }, { n: 5 }, { n: 6 }]);
    assert.equal(second.upToDate, true);
    const saved2 = second.offset;

    // Killed hard right after acknowledged broadcasts: they are on disk all the same.
    await broadcast(name, { n: 7 });
    await server.stop("SIGKILL");

    server = await startServer({ dir, args });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    await broadcast(name, { n: 8 });
    const third = await stream({ url: server.streamUrl(name), offset: saved2, live: false, signal: t.signal });
    assert.deepEqual(await third.json(), [{ n: 7 }, { n: 8 }]);

    // The whole history, once each, in order; the offsets saved earlier still resume.
    const all = await stream({ url: server.streamUrl(name), offset: "-1", live: false, signal: t.signal });
    assert.deepEqual(await all.json(), [1, 2, 3, 4, 5, 6, 7, 8].map((n) => ({ n })));
    const again = await stream({ url: server.streamUrl(name), offset: saved, live: false, signal: t.signal });
    assert.deepEqual(await again.json(), [4, 5, 6, 7, 8].map((n) => ({ n })));
    assert.equal(again.offset, all.offset);
  } finally {
    await server?.stop();
    await removeDir(dir);
  }
});

for (const live of ["long-poll", "sse"]) {
  test(`a live ${live} subscription carries on through a restart on the same port`, { timeout: 30_000 }, async (t) => {
    const dir = await tempDir();
    const name = `through-restart/${live}`;
    let server;
    const controller = linkedController(t);
    let res;
    try {
      server = await startServer({ dir, args });
      const port = server.port;
      await broadcaster(server.broadcastUrl, BROADCAST_KEY)(name, { n: 1 });
      res = await stream({ url: server.streamUrl(name), offset: "-1", live, json: true, signal: controller.signal });
      const rec = record(res);
      await rec.until(() => rec.items.length >= 1, "the first message");
      const gauge = live === "sse" ? "ds_sse_clients_num" : "ds_poll_clients_num";
      await server.waitForMetric(gauge, (v) => v === 1);

      // The server goes away under the live request; the client retries until it is back.
      const stop = await server.stop("SIGTERM");
      assert.equal(stop.code, 0);
      server = await startServer({ dir, args, port });
      await server.waitForMetric(gauge, (v) => v === 1, { timeout: 10_000 });
      const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
      await broadcast(name, { n: 2 });
      await broadcast(name, { n: 3 });
      await rec.until(() => rec.items.length >= 3, "the messages after the restart");
      assert.deepEqual(rec.items, [{ n: 1 }, { n: 2 }, { n: 3 }]);
      assert.equal(rec.ended, false);
    } finally {
      controller.abort();
      await res?.closed.catch(() => {});
      await server?.stop();
      await removeDir(dir);
    }
  });
}
