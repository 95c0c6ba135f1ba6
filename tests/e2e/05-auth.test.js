// Scenario 5: access control with real tokens — a JWT made by serverless-js' identificator and
// a signed stream name — and wrong tokens rejected with 401 (no retry by the client).
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { stream, FetchError } from "@durable-streams/client";
import { broadcaster, identificator } from "./lib/anycable.js";
import { startServer, countingFetch, withTimeout, BROADCAST_KEY, linkedController } from "./lib/server.js";
import { signedStream } from "./lib/tokens.js";
import { record } from "./lib/recorder.js";

const JWT_SECRET = "e2e-jwt-secret";
const STREAMS_SECRET = "e2e-streams-secret";
const NAME = "private/room-7";

describe("access control", { timeout: 40_000 }, () => {
  let server;
  let url;
  let jwt;
  let signed;
  before(async () => {
    server = await startServer({
      args: [
        "--jwt_secret", JWT_SECRET,
        "--streams_secret", STREAMS_SECRET,
        "--enforce_jwt",
        "--ds_poll_interval", "1",
      ],
    });
    url = server.streamUrl(NAME);
    jwt = await identificator(JWT_SECRET, "1h").generateToken({ user_id: "42", role: "reader" });
    signed = signedStream(NAME, STREAMS_SECRET);
    const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    await broadcast(NAME, { secret: 1 });
    await broadcast(NAME, { secret: 2 });
  });
  after(() => server?.stop());

  const ok = [
    ["JWT in X-JID, signed name in X-Signed", () => ({ headers: { "X-JID": jwt, "X-Signed": signed } })],
    ["JWT in X-JID, signed name in ?signed=", () => ({ headers: { "X-JID": jwt }, params: { signed } })],
    ["JWT in ?jid=, signed name in ?signed=", () => ({ params: { jid: jwt, signed } })],
  ];
  for (const [label, opts] of ok) {
    test(`valid tokens: ${label}`, { timeout: 10_000 }, async (t) => {
      const res = await stream({ url, offset: "-1", ...opts(), signal: t.signal });
      assert.deepEqual(await res.json(), [{ secret: 1 }, { secret: 2 }]);
      assert.equal(res.upToDate, true);
    });
  }

  test("valid tokens keep working on every live request (long-poll)", { timeout: 15_000 }, async (t) => {
    const controller = linkedController(t);
    // Header values may be functions: the client evaluates them for each request.
    let calls = 0;
    const res = await stream({
      url,
      offset: "-1",
      live: "long-poll",
      headers: { "X-JID": () => (calls++, jwt) },
      params: { signed },
      signal: controller.signal,
    });
    const rec = record(res);
    try {
      await rec.until(() => rec.items.length >= 2, "the backlog");
      await server.waitForMetric("ds_poll_clients_num", (v) => v === 1);
      await broadcaster(server.broadcastUrl, BROADCAST_KEY)(NAME, { secret: 3 });
      await rec.until(() => rec.items.length >= 3, "the live message");
      assert.deepEqual(rec.items, [{ secret: 1 }, { secret: 2 }, { secret: 3 }]);
      assert.ok(calls >= 2, `the JWT was sent on ${calls} requests`);
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
  });

  test("valid tokens on an SSE subscription", { timeout: 15_000 }, async (t) => {
    const controller = linkedController(t);
    const res = await stream({
      url,
      offset: "-1",
      live: "sse",
      json: true,
      headers: { "X-JID": jwt, "X-Signed": signed },
      signal: controller.signal,
    });
    const rec = record(res);
    try {
      await rec.until(() => rec.items.length >= 3, "the backlog");
      await server.waitForMetric("ds_sse_clients_num", (v) => v === 1);
      await broadcaster(server.broadcastUrl, BROADCAST_KEY)(NAME, { secret: 4 });
      await rec.until(() => rec.items.length >= 4, "the live message");
      assert.deepEqual(rec.items.at(-1), { secret: 4 });
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
  });

  // Each wrong credential: the client rejects with FetchError 401 after exactly one request,
  // in every live mode (the first request is a catch-up, so no live request is ever made).
  // The server answers `forbidden_stream` only for a genuine signature of another stream; a
  // missing or invalid signature is `unauthorized`.
  const bad = [
    ["no JWT at all (enforced)", "unauthorized", async () => ({ headers: { "X-Signed": signed } })],
    [
      "JWT signed with another secret",
      "unauthorized",
      async () => ({
        headers: { "X-JID": await identificator("not-the-secret", "1h").generateToken({ user_id: "42" }), "X-Signed": signed },
      }),
    ],
    ["garbage JWT", "unauthorized", async () => ({ headers: { "X-JID": "not.a.jwt", "X-Signed": signed } })],
    [
      "expired JWT",
      "token_expired",
      async () => ({
        // A number is an absolute `exp` for serverless-js (jose): a minute ago.
        headers: {
          "X-JID": await identificator(JWT_SECRET, Math.floor(Date.now() / 1000) - 60).generateToken({ user_id: "42" }),
          "X-Signed": signed,
        },
      }),
    ],
    ["no signed stream name (streams are not public)", "unauthorized", async () => ({ headers: { "X-JID": jwt } })],
    [
      "signed name of another stream",
      "forbidden_stream",
      async () => ({ headers: { "X-JID": jwt, "X-Signed": signedStream("private/room-8", STREAMS_SECRET) } }),
    ],
    [
      "signed name made with the wrong secret",
      "unauthorized",
      async () => ({ headers: { "X-JID": jwt }, params: { signed: signedStream(NAME, "wrong-secret") } }),
    ],
    [
      "tampered signature in ?signed=",
      "unauthorized",
      async () => ({ headers: { "X-JID": jwt }, params: { signed: signed.slice(0, -1) + (signed.endsWith("0") ? "1" : "0") } }),
    ],
  ];
  for (const [label, error, opts] of bad) {
    test(`rejected with 401 ${error}: ${label}`, { timeout: 10_000 }, async (t) => {
      for (const live of [false, true, "long-poll", "sse"]) {
        const fetch = countingFetch();
        const controller = linkedController(t);
        try {
          await assert.rejects(
            async () => {
              const res = await stream({ url, offset: "-1", live, json: true, fetch, signal: controller.signal, ...(await opts()) });
              await res.json();
            },
            (err) => {
              assert.ok(err instanceof FetchError, `a FetchError, got ${err}`);
              assert.equal(err.status, 401);
              assert.deepEqual(err.json, { error });
              return true;
            },
            `live: ${live}`,
          );
          assert.equal(fetch.requests.length, 1, `live: ${live}: one request, no retries`);
        } finally {
          controller.abort();
        }
      }
    });
  }

  test("a JWT that expires during a long-poll subscription ends it with 401 token_expired", { timeout: 15_000 }, async (t) => {
    // exp is absolute (seconds): the token is valid for one to two more seconds.
    const shortLived = await identificator(JWT_SECRET, Math.floor(Date.now() / 1000) + 2).generateToken({ user_id: "42" });
    const fetch = countingFetch();
    const controller = linkedController(t);
    const res = await stream({
      url,
      offset: "-1",
      live: "long-poll",
      headers: { "X-JID": shortLived, "X-Signed": signed },
      fetch,
      signal: controller.signal,
    });
    const rec = record(res);
    try {
      await rec.until(() => rec.items.length >= 2, "the backlog");
      // Idle long-polls (1 s each) go on until the token expires; then the session errors.
      await assert.rejects(
        withTimeout(res.closed, 8_000, "the session to end"),
        (err) => {
          assert.ok(err instanceof FetchError, `a FetchError, got ${err}`);
          assert.equal(err.status, 401);
          assert.deepEqual(err.json, { error: "token_expired" });
          return true;
        },
      );
      // It was refused on a live request, after at least one accepted one.
      assert.ok(fetch.requests.length >= 2);
      assert.ok(fetch.requests.at(-1).url.includes("live=long-poll"), fetch.requests.at(-1).url);
    } finally {
      controller.abort();
    }
  });

  test("serverless-js broadcaster with a wrong key throws", { timeout: 10_000 }, async (t) => {
    await assert.rejects(broadcaster(server.broadcastUrl, "wrong-key")(NAME, { evil: true }), /Error broadcasting to private\/room-7/);
    await assert.rejects(broadcaster(server.broadcastUrl, undefined)(NAME, { evil: true }), /Error broadcasting/);
    const res = await stream({ url, offset: "-1", headers: { "X-JID": jwt, "X-Signed": signed }, signal: t.signal });
    assert.ok(!(await res.json()).some((m) => m && m.evil), "nothing was stored");
  });
});
