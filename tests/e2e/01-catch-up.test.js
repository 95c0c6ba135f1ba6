// Scenario 1: serverless-js broadcaster writes; the Durable Streams client reads them back.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { stream, DurableStream } from "@durable-streams/client";
import { broadcaster } from "./lib/anycable.js";
import { startServer, BROADCAST_KEY } from "./lib/server.js";

describe("catch-up read", { timeout: 30_000 }, () => {
  let server;
  before(async () => {
    server = await startServer({ args: ["--public_streams"] });
  });
  after(() => server?.stop());

  test("broadcaster() messages come back from stream({offset: '-1'}).json() in order", { timeout: 15_000 }, async (t) => {
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    const url = server.streamUrl("chat/room-1");
    const messages = [
      { text: "hello" },
      { text: "second", n: 2 },
      "a plain string",
      42,
      [1, 2, 3],
      { unicode: "héllo ✓ 😀", nested: { list: [{ a: null }] } },
      null,
    ];
    for (const message of messages) await broadcast("chat/room-1", message);
    // Another stream must not leak into this one.
    await broadcast("chat/room-2", { text: "elsewhere" });

    const res = await stream({ url, offset: "-1", signal: t.signal });
    const items = await res.json();
    assert.deepEqual(items, messages);
    assert.equal(res.upToDate, true);
    assert.equal(typeof res.offset, "string");
    assert.notEqual(res.offset, "-1");
    // The offset is the stream's tail, as HEAD tells it.
    const head = await DurableStream.head({ url, signal: t.signal });
    assert.equal(head.exists, true);
    assert.equal(res.offset, head.offset);
  });

  test("res.offset resumes exactly after what was read (live: false)", { timeout: 15_000 }, async (t) => {
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    const url = server.streamUrl("resume/1");
    await broadcast("resume/1", { n: 1 });
    await broadcast("resume/1", { n: 2 });
    const first = await stream({ url, offset: "-1", live: false, signal: t.signal });
    assert.deepEqual(await first.json(), [{ n: 1 }, { n: 2 }]);

    await broadcast("resume/1", { n: 3 });
    const second = await stream({ url, offset: first.offset, live: false, signal: t.signal });
    assert.deepEqual(await second.json(), [{ n: 3 }]);
    assert.equal(second.upToDate, true);
    assert.ok(second.offset > first.offset, `offsets increase: ${first.offset} < ${second.offset}`);

    // Reading again at the tail gives nothing and keeps the offset.
    const third = await stream({ url, offset: second.offset, live: false, signal: t.signal });
    assert.deepEqual(await third.json(), []);
    assert.equal(third.offset, second.offset);
  });

  test("stream names with ':', spaces, '/' and non-ASCII work through both SDKs", { timeout: 15_000 }, async (t) => {
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    const names = ["chat:2021", "room 1/é ✓", "a/b/c"];
    for (const name of names) await broadcast(name, { name });
    for (const name of names) {
      // The client percent-encodes the path (new URL); the server decodes it.
      const res = await stream({ url: server.streamUrl(name), offset: "-1", signal: t.signal });
      assert.deepEqual(await res.json(), [{ name }], name);
    }
  });

  test("an unknown stream is empty, not an error", { timeout: 15_000 }, async (t) => {
    const res = await stream({ url: server.streamUrl("nobody/wrote/here"), offset: "-1", signal: t.signal });
    assert.deepEqual(await res.json(), []);
    assert.equal(res.upToDate, true);
  });
});
