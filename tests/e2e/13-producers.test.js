// Scenario 13: the official client's `IdempotentProducer` against the producer headers
// (Producer-Id, -Epoch, -Seq). The producer itself does not retry a request that failed on the
// network; an application gives it a `fetch` that does (here: one that re-sends the same
// request until it is answered). When a response is lost or the server is down (kill -9,
// restarted on the same port), every message must still end up in the stream exactly once,
// in order: a retry of an applied batch is a duplicate (204), never a second copy.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { DurableStream, IdempotentProducer, stream } from "@durable-streams/client";
import { startServer, tempDir, removeDir, BROADCAST_KEY } from "./lib/server.js";

const headers = { Authorization: `Bearer ${BROADCAST_KEY}` };
// Streams that are gone answer 404, as the protocol says (the client checks existence).
const args = ["--public_streams", "--ds_implicit_streams", "false"];

/**
 * A `fetch` that re-sends a request until it gets an answer (for at most 20 s), and throws
 * away the answer to every `dropEvery`-th producer request it sends (the server applied it;
 * the client never learns): `stats.lost` counts those. `onSent(n)` runs right after the n-th
 * producer request went out, while it is in flight.
 */
function retryingFetch(stats, dropEvery = 0, onSent = () => {}) {
  return async (input, init) => {
    const deadline = Date.now() + 20_000;
    const isProducer = init?.method === "POST" && new Headers(init.headers).has("producer-id");
    for (;;) {
      try {
        const pending = fetch(input, init);
        if (isProducer) onSent(++stats.sent);
        const response = await pending;
        if (isProducer && dropEvery > 0 && stats.sent % dropEvery === 0) {
          await response.arrayBuffer();
          stats.lost++;
          continue;
        }
        if (isProducer && response.status === 204) stats.duplicates++;
        return response;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        stats.retried++;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
  };
}

async function readAll(url, signal) {
  const res = await stream({ url, offset: "-1", live: false, signal });
  return res.json();
}

describe("idempotent producers with the official client", { timeout: 90_000 }, () => {
  let server;
  let dir;
  before(async () => {
    dir = await tempDir();
    server = await startServer({ dir, args });
  });
  after(async () => {
    await server?.stop();
    await removeDir(dir);
  });

  test("lost responses are retried and every message lands once, in order", { timeout: 30_000 }, async (t) => {
    const url = server.streamUrl("producers/lossy");
    const handle = await DurableStream.create({ url, headers, contentType: "application/json", signal: t.signal });
    // Every third producer request reaches the server, which applies it, but its answer is
    // lost: the same batch (same epoch and sequence) goes again.
    const stats = { sent: 0, lost: 0, duplicates: 0, retried: 0 };
    const errors = [];
    const producer = new IdempotentProducer(handle, "lossy-1", {
      fetch: retryingFetch(stats, 3), lingerMs: 1, maxInFlight: 1, onError: (e) => errors.push(e),
    });
    const count = 200;
    for (let i = 0; i < count; i++) {
      producer.append(JSON.stringify({ i }));
      if (i % 10 === 9) await producer.flush();
    }
    await producer.flush();
    assert.deepEqual(errors, []);
    assert.ok(stats.lost > 3, `some answers were lost (${JSON.stringify(stats)})`);
    assert.equal(stats.duplicates, stats.lost, "each resent batch was answered as a duplicate");
    const items = await readAll(url, t.signal);
    assert.deepEqual(items.map((m) => m.i), [...Array(count).keys()], "each message once, in order");
  });

  test("a producer that retries across two kill -9 restarts writes each message once", { timeout: 60_000 }, async (t) => {
    const url = server.streamUrl("producers/crash");
    const handle = await DurableStream.create({ url, headers, contentType: "text/plain", signal: t.signal });
    const errors = [];
    const stats = { sent: 0, lost: 0, duplicates: 0, retried: 0 };
    // Twice, right after a producer request went out, the server dies (kill -9) with it in
    // flight, and comes back on the same port and data; the fetch re-sends what went
    // unanswered.
    const port = server.port;
    const crashes = [];
    const crashAt = new Set([20, 45]);
    const onSent = (n) => {
      if (!crashAt.has(n)) return;
      crashAt.delete(n);
      crashes.push((async () => {
        await server.stop("SIGKILL");
        server = await startServer({ dir, args, port });
      })());
    };
    const producer = new IdempotentProducer(handle, "crash-1", {
      fetch: retryingFetch(stats, 0, onSent), lingerMs: 1, maxInFlight: 1, onError: (e) => errors.push(e),
    });
    const count = 300;
    const writing = (async () => {
      for (let i = 0; i < count; i++) {
        producer.append(`${i};`);
        if (i % 5 === 4) await producer.flush();
      }
      await producer.flush();
    })();
    await writing;
    await Promise.all(crashes);
    assert.equal(crashes.length, 2, "the server was killed twice while the producer wrote");
    assert.deepEqual(errors, []);
    assert.ok(stats.retried > 0, `requests went unanswered while the server was down (${JSON.stringify(stats)})`);
    const res = await stream({ url, offset: "-1", live: false, signal: t.signal });
    const text = await res.text();
    const expected = [...Array(count).keys()].map((i) => `${i};`).join("");
    assert.equal(text, expected, "each message once, in order");
  });
});
