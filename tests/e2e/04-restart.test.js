// Scenario 4: an offset saved before a server restart resumes exactly after its message.
import { test } from "node:test";
import assert from "node:assert/strict";
import { stream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, tempDir, removeDir, BROADCAST_KEY } from "./lib/server.js";

const args = ["--public_streams"];

test("resume from a saved offset across a graceful restart and a SIGKILL", { timeout: 30_000 }, async () => {
  const dir = await tempDir();
  const name = "orders/42";
  let server;
  try {
    // First life: write 4, read 3 of them (the 4th arrives after the read), stop gracefully.
    server = await startServer({ dir, args });
    let broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    for (const n of [1, 2, 3]) await broadcast(name, { n });
    const first = await stream({ url: server.streamUrl(name), offset: "-1", live: false });
    assert.deepEqual(await first.json(), [{ n: 1 }, { n: 2 }, { n: 3 }]);
    const saved = first.offset;
    await broadcast(name, { n: 4 });
    const stop = await server.stop("SIGTERM");
    assert.equal(stop.code, 0, `graceful stop exits 0 (got ${JSON.stringify(stop)})\n${server.logs()}`);

    // Second life, same data directory, new port: broadcast more, continue from the saved offset.
    server = await startServer({ dir, args });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    for (const n of [5, 6]) await broadcast(name, { n });
    const second = await stream({ url: server.streamUrl(name), offset: saved, live: false });
    assert.deepEqual(await second.json(), [{ n: 4 }, { n: 5 }, { n: 6 }]);
    assert.equal(second.upToDate, true);
    const saved2 = second.offset;

    // Killed hard right after acknowledged broadcasts: they are on disk all the same.
    await broadcast(name, { n: 7 });
    await server.stop("SIGKILL");

    server = await startServer({ dir, args });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    await broadcast(name, { n: 8 });
    const third = await stream({ url: server.streamUrl(name), offset: saved2, live: false });
    assert.deepEqual(await third.json(), [{ n: 7 }, { n: 8 }]);

    // The whole history, once each, in order; the offsets saved earlier still resume.
    const all = await stream({ url: server.streamUrl(name), offset: "-1", live: false });
    assert.deepEqual(await all.json(), [1, 2, 3, 4, 5, 6, 7, 8].map((n) => ({ n })));
    const again = await stream({ url: server.streamUrl(name), offset: saved, live: false });
    assert.deepEqual(await again.json(), [4, 5, 6, 7, 8].map((n) => ({ n })));
    assert.equal(again.offset, all.offset);
  } finally {
    await server?.stop();
    await removeDir(dir);
  }
});
