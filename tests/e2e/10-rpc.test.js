// Scenario 10: readers authenticated by the application over AnyCable's HTTP RPC (spec §6.1 b).
// The application is the real `connectHandler` + `Application` of @anycable/serverless-js
// 0.1.0 (lib/rpc-app.js): it accepts a known session cookie and rejects anything else. The
// readers are the official @durable-streams/client (cookie passed as a header, as a server-side
// client would) and plain fetch; the data is written with serverless-js' `broadcaster`.
import http from "node:http";
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { stream, FetchError } from "@durable-streams/client";
import { broadcaster, identificator } from "./lib/anycable.js";
import { startServer, countingFetch, withTimeout, linkedController, BROADCAST_KEY, SECRET } from "./lib/server.js";
import { startRpcApp, derivedRpcSecret, parseCookies, callsFor } from "./lib/rpc-app.js";
import { signedStream } from "./lib/tokens.js";
import { record } from "./lib/recorder.js";

const RPC_SECRET = "e2e-rpc-secret";
const JWT_SECRET = "e2e-rpc-jwt-secret"; // the DS server's JWT secret (X-JID / ?jid=)
const APP_JWT_SECRET = "e2e-app-cookie-jwt-secret"; // the app's own tokens, in cookie `token`
const SESSION = "s3ss10n-alice-7f3a";
const SESSIONS = { [SESSION]: "alice" };
const GOOD_COOKIE = `session=${SESSION}`;


/** A plain read from Node: { status, headers, body (parsed JSON when it is JSON) }. */
async function rawRead(url, { method = "GET", headers = {} } = {}) {
  const res = await fetch(url, { method, headers });
  const text = await res.text();
  let body = text;
  try {
    body = JSON.parse(text);
  } catch {}
  return { status: res.status, headers: Object.fromEntries(res.headers), body };
}

/** The names listed by a Vary header value, lower-cased. */
const varyNames = (vary) => (vary ?? "").split(",").map((s) => s.trim().toLowerCase()).filter(Boolean);

/** Retry-After as spec'd by HTTP: delta-seconds or an HTTP date. */
function assertRetryAfter(value) {
  assert.ok(value !== undefined && value !== null, "a Retry-After header");
  assert.ok(/^\d+$/.test(value) || !Number.isNaN(Date.parse(value)), `Retry-After: ${value}`);
}

/** Asserts that `promise` rejects with the client's FetchError `status` and JSON `json`. */
async function rejectsWith(promise, status, json, message) {
  await assert.rejects(
    promise,
    (err) => {
      assert.ok(err instanceof FetchError, `a FetchError, got ${err}`);
      assert.equal(err.status, status);
      assert.deepEqual(err.json, json);
      return true;
    },
    message,
  );
}

describe("HTTP RPC authentication (serverless-js connectHandler)", { timeout: 90_000 }, () => {
  let app;
  let server;
  let broadcast;
  before(async () => {
    app = await startRpcApp({ secret: RPC_SECRET, sessions: SESSIONS, jwtSecret: APP_JWT_SECRET });
    server = await startServer({
      args: [
        "--public_streams",
        "--rpc_host", app.url,
        "--http_rpc_secret", RPC_SECRET,
        "--jwt_secret", JWT_SECRET,
        "--ds_poll_interval", "1",
      ],
    });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
  });
  after(async () => {
    await server?.stop();
    await app?.close();
  });

  test("catch-up with the session cookie: the data, after one RPC call carrying what AnyCable sends", { timeout: 10_000 }, async (t) => {
    const name = "rpc/catch-up";
    await broadcast(name, { n: 1 });
    await broadcast(name, { n: 2 });
    const fetch = countingFetch();
    const before = app.calls.length;
    const res = await stream({ url: server.streamUrl(name), offset: "-1", headers: { Cookie: GOOD_COOKIE }, fetch, signal: t.signal });
    assert.deepEqual(await res.json(), [{ n: 1 }, { n: 2 }]);
    assert.equal(res.upToDate, true);

    const calls = app.calls.slice(before);
    assert.equal(calls.length, 1, `one call per read: ${JSON.stringify(calls.map((c) => c.path))}`);
    const [call] = calls;
    assert.equal(call.method, "POST");
    assert.equal(call.path, "/_anycable/connect");
    assert.match(call.headers["content-type"] ?? "", /^application\/json\b/);
    assert.equal(call.headers.authorization, `Bearer ${RPC_SECRET}`);
    assert.ok(call.headers["x-anycable-meta-sid"], `X-Anycable-Meta-Sid: ${JSON.stringify(call.headers)}`);
    assert.equal(call.headers["x-anycable-meta-protov"], "v1");
    assert.equal(fetch.requests.length, 1);
    assert.equal(call.body?.env?.url, fetch.requests[0].url, "env.url is the full URL of the read");
    assert.deepEqual(call.body.env.headers, { cookie: GOOD_COOKIE, REMOTE_ADDR: "127.0.0.1" });
    assert.equal(call.answer?.status, 1, "connectHandler said SUCCESS");
    assert.deepEqual(JSON.parse(call.answer.identifiers), { user: "alice" });
  });

  test("a cookie-authenticated response is not reusable: Cache-Control no-store, Vary: Cookie; HEAD too", { timeout: 10_000 }, async () => {
    const name = "rpc/no-store";
    await broadcast(name, { private: true });
    const url = `${server.streamUrl(name)}?offset=-1`;
    const ok = await rawRead(url, { headers: { Cookie: GOOD_COOKIE } });
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.deepEqual(ok.body, [{ private: true }]);
    assert.equal(ok.headers["cache-control"], "no-store");
    assert.ok(varyNames(ok.headers.vary).includes("cookie"), `Vary: ${ok.headers.vary}`);

    // Two reads, two calls, two session ids (a fresh sid per request).
    const again = await rawRead(url, { headers: { Cookie: GOOD_COOKIE } });
    assert.equal(again.status, 200);
    const calls = callsFor(app, name);
    assert.equal(calls.length, 2);
    assert.notEqual(calls[0].headers["x-anycable-meta-sid"], calls[1].headers["x-anycable-meta-sid"]);

    // HEAD is a DS read like the others.
    const head = await rawRead(server.streamUrl(name), { method: "HEAD", headers: { Cookie: GOOD_COOKIE } });
    assert.equal(head.status, 200);
    assert.ok(head.headers["stream-next-offset"]);
    const headRefused = await rawRead(server.streamUrl(name), { method: "HEAD" });
    assert.equal(headRefused.status, 401);
    assert.equal(callsFor(app, name).length, 4, "both HEADs asked the app");
  });

  test("long-poll with the session cookie: backlog, then a live message; every request asked the app", { timeout: 15_000 }, async (t) => {
    const name = "rpc/long-poll";
    await broadcast(name, { n: 1 });
    const fetch = countingFetch();
    const controller = linkedController(t);
    const res = await stream({
      url: server.streamUrl(name),
      offset: "-1",
      live: "long-poll",
      headers: { Cookie: GOOD_COOKIE },
      fetch,
      signal: controller.signal,
    });
    const rec = record(res);
    try {
      await rec.until(() => rec.items.length >= 1, "the backlog");
      await server.waitForMetric("ds_poll_clients_num", (v) => v === 1);
      await broadcast(name, { n: 2 });
      await rec.until(() => rec.items.length >= 2, "the live message");
      assert.deepEqual(rec.items, [{ n: 1 }, { n: 2 }]);
      // Each request the client made reached the app first (one call each, same URL, in order).
      await app.waitFor(
        () => callsFor(app, name).length === fetch.requests.length && callsFor(app, name).every((c) => c.answer),
        "one answered call per request",
      );
      const calls = callsFor(app, name);
      assert.ok(calls.length >= 2, `${calls.length} calls`);
      assert.deepEqual(calls.map((c) => c.body.env.url), fetch.requests.slice(0, calls.length).map((r) => r.url));
      assert.ok(calls.some((c) => new URL(c.body.env.url).searchParams.get("live") === "long-poll"), "a live request was authenticated");
      assert.ok(calls.every((c) => c.body.env.headers.cookie === GOOD_COOKIE && c.answer?.status === 1));
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
  });

  test("SSE with the session cookie: backlog, then a live message", { timeout: 15_000 }, async (t) => {
    const name = "rpc/sse";
    await broadcast(name, { n: 1 });
    await broadcast(name, { n: 2 });
    const fetch = countingFetch();
    const controller = linkedController(t);
    const res = await stream({
      url: server.streamUrl(name),
      offset: "-1",
      live: "sse",
      json: true,
      headers: { Cookie: GOOD_COOKIE },
      fetch,
      signal: controller.signal,
    });
    const rec = record(res);
    try {
      await rec.until(() => rec.items.length >= 2, "the backlog");
      await server.waitForMetric("ds_sse_clients_num", (v) => v === 1);
      await broadcast(name, { n: 3 });
      await rec.until(() => rec.items.length >= 3, "the live message");
      assert.deepEqual(rec.items, [{ n: 1 }, { n: 2 }, { n: 3 }]);
      const calls = callsFor(app, name);
      assert.ok(calls.length >= 1);
      const sseCall = calls.find((c) => new URL(c.body.env.url).searchParams.get("live") === "sse");
      assert.ok(sseCall, `the SSE request was authenticated: ${JSON.stringify(calls.map((c) => c.body.env.url))}`);
      assert.equal(sseCall.body.env.url, fetch.requests.find((r) => r.url.includes("live=sse")).url);
      assert.equal(sseCall.body.env.headers.cookie, GOOD_COOKIE);
    } finally {
      controller.abort();
      await res.closed.catch(() => {});
    }
  });

  // Refused: the client rejects with FetchError 401 after exactly one request, in every mode,
  // and the app was asked (with what the reader sent) and said FAILURE.
  const refused = [
    ["no cookie", undefined],
    ["a wrong session cookie", "session=forged-session"],
    ["the right value under another cookie name", `sessionid=${SESSION}`],
    ["other cookies only", "theme=dark; locale=fr"],
  ];
  for (const [label, cookie] of refused) {
    test(`refused with 401 unauthorized: ${label}`, { timeout: 15_000 }, async (t) => {
      const name = `rpc/refused-${label.replace(/\W+/g, "-")}`;
      await broadcast(name, { secret: "never seen" });
      for (const live of [false, "long-poll", "sse"]) {
        const fetch = countingFetch();
        const controller = linkedController(t);
        const before = callsFor(app, name).length;
        const items = [];
        try {
          await rejectsWith(
            (async () => {
              const res = await stream({
                url: server.streamUrl(name),
                offset: "-1",
                live,
                json: true,
                headers: cookie ? { Cookie: cookie } : {},
                fetch,
                signal: controller.signal,
              });
              res.subscribeJson((batch) => items.push(...batch.items));
              await res.closed;
            })(),
            401,
            { error: "unauthorized" },
            `live: ${live}`,
          );
          assert.deepEqual(items, [], `live: ${live}: no data`);
          assert.equal(fetch.requests.length, 1, `live: ${live}: one request, no retries`);
          const calls = callsFor(app, name).slice(before);
          assert.equal(calls.length, 1, `live: ${live}: the app was asked once`);
          assert.equal(calls[0].body.env.headers.cookie, cookie, "the app got the reader's cookie (or none)");
          assert.equal(calls[0].answer?.status, 2, "connectHandler said FAILURE");
        } finally {
          controller.abort();
        }
      }
    });
  }

  test("an expired app token in a cookie: serverless-js says token_expired, the reader gets 401 token_expired", { timeout: 10_000 }, async (t) => {
    const name = "rpc/app-token";
    await broadcast(name, { n: 1 });
    const valid = await identificator(APP_JWT_SECRET, "1h").generateToken({ user: "bob" });
    const expired = await identificator(APP_JWT_SECRET, Math.floor(Date.now() / 1000) - 60).generateToken({ user: "bob" });

    const ok = await stream({ url: server.streamUrl(name), offset: "-1", headers: { Cookie: `token=${valid}` }, signal: t.signal });
    assert.deepEqual(await ok.json(), [{ n: 1 }]);

    const fetch = countingFetch();
    await rejectsWith(
      stream({ url: server.streamUrl(name), offset: "-1", headers: { Cookie: `token=${expired}` }, fetch, signal: t.signal }).then((r) => r.json()),
      401,
      { error: "token_expired" },
    );
    assert.equal(fetch.requests.length, 1);
    const last = callsFor(app, name).at(-1);
    assert.equal(last.answer.status, 2);
    assert.ok(
      last.answer.transmissions.some((m) => JSON.parse(m).reason === "token_expired"),
      `the app's transmissions: ${JSON.stringify(last.answer.transmissions)}`,
    );
  });

  test("a valid JWT (X-JID or ?jid=) authenticates without asking the app; a bad one is 401 even with the cookie", { timeout: 10_000 }, async (t) => {
    const name = "rpc/jwt";
    await broadcast(name, { n: 1 });
    const jwt = await identificator(JWT_SECRET, "1h").generateToken({ user_id: "42" });

    const byHeader = await stream({ url: server.streamUrl(name), offset: "-1", headers: { "X-JID": jwt }, signal: t.signal });
    assert.deepEqual(await byHeader.json(), [{ n: 1 }]);
    const byParam = await stream({ url: server.streamUrl(name), offset: "-1", params: { jid: jwt }, signal: t.signal });
    assert.deepEqual(await byParam.json(), [{ n: 1 }]);
    assert.equal(callsFor(app, name).length, 0, "the app was never asked");

    // Spec §6.1 a: a JWT that is present but bad is refused; it does not fall through to the app.
    const forged = await identificator("not-the-jwt-secret", "1h").generateToken({ user_id: "42" });
    await rejectsWith(
      stream({ url: server.streamUrl(name), offset: "-1", headers: { "X-JID": forged, Cookie: GOOD_COOKIE }, signal: t.signal }).then((r) => r.json()),
      401,
      { error: "unauthorized" },
    );
    assert.equal(callsFor(app, name).length, 0, "a bad JWT is not handed to the app");
  });

  test("a CORS preflight never asks the app", { timeout: 10_000 }, async () => {
    const name = "rpc/preflight";
    const before = app.calls.length;
    const res = await fetch(`${server.streamUrl(name)}?offset=-1`, {
      method: "OPTIONS",
      headers: {
        Origin: "http://127.0.0.1:1",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "x-jid",
        Cookie: GOOD_COOKIE,
      },
    });
    await res.arrayBuffer();
    assert.ok(res.status >= 200 && res.status < 300, `preflight status ${res.status}`);
    assert.match(res.headers.get("access-control-allow-methods") ?? "", /GET/);
    // A read right after, so that a call the preflight made would have arrived by then.
    assert.equal((await rawRead(`${server.streamUrl(name)}?offset=-1`, { headers: { Cookie: GOOD_COOKIE } })).status, 200);
    assert.deepEqual(app.calls.slice(before).map((c) => c.body?.env?.url), [`${server.streamUrl(name)}?offset=-1`]);
  });
});

describe("HTTP RPC: derived secret, --headers, --proxy-cookies, signed streams", { timeout: 40_000 }, () => {
  let app;
  let server;
  let broadcast;
  before(async () => {
    // No --http_rpc_secret: the bearer is hex HMAC-SHA256(--secret, "rpc-cable").
    app = await startRpcApp({ secret: derivedRpcSecret(SECRET), sessions: SESSIONS });
    server = await startServer({
      args: ["--rpc_host", app.url, "--headers", "cookie,x-tenant", "--proxy-cookies", "session,locale"],
    });
    broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
  });
  after(async () => {
    await server?.stop();
    await app?.close();
  });

  test("the bearer is derived from --secret; only the named headers and cookies reach the app", { timeout: 10_000 }, async (t) => {
    const name = "rpc2/filtered";
    await broadcast(name, { n: 1 });
    const fetch = countingFetch();
    const res = await stream({
      url: server.streamUrl(name),
      offset: "-1",
      headers: {
        Cookie: `theme=dark; ${GOOD_COOKIE};tracking=abc123;  locale=fr`,
        "X-Tenant": "acme",
        "X-Other": "not proxied",
        "X-Signed": signedStream(name, SECRET),
      },
      fetch,
      signal: t.signal,
    });
    assert.deepEqual(await res.json(), [{ n: 1 }]);
    const [call, ...rest] = callsFor(app, name);
    assert.equal(rest.length, 0);
    assert.equal(call.headers.authorization, `Bearer ${derivedRpcSecret(SECRET)}`);
    assert.equal(call.body.env.url, fetch.requests[0].url);
    const { cookie, ...others } = call.body.env.headers;
    assert.deepEqual(others, { "x-tenant": "acme", REMOTE_ADDR: "127.0.0.1" });
    assert.deepEqual(parseCookies(cookie), { session: SESSION, locale: "fr" }, `cookie sent to the app: ${cookie}`);
  });

  test("stream authorization still applies after the app said yes (streams are not public)", { timeout: 10_000 }, async (t) => {
    const name = "rpc2/signed";
    await broadcast(name, { n: 1 });
    // The app would accept this reader (whether it is asked first is the server's business:
    // spec §6 orders client authentication first, a server may refuse the stream before).
    const unsigned = await rawRead(`${server.streamUrl(name)}?offset=-1`, { headers: { Cookie: GOOD_COOKIE } });
    assert.equal(unsigned.status, 401, JSON.stringify(unsigned.body));
    assert.deepEqual(unsigned.body, { error: "unauthorized" });
    assert.ok(callsFor(app, name).every((c) => c.answer?.status === 1), "if the app was asked, it said yes");

    const noCookie = await rawRead(`${server.streamUrl(name)}?offset=-1&signed=${encodeURIComponent(signedStream(name, SECRET))}`);
    assert.equal(noCookie.status, 401, "a signed name does not replace the app's authentication");
    assert.equal(callsFor(app, name).at(-1)?.answer?.status, 2);

    const both = await stream({
      url: server.streamUrl(name),
      offset: "-1",
      headers: { Cookie: GOOD_COOKIE },
      params: { signed: signedStream(name, SECRET) },
      signal: t.signal,
    });
    assert.deepEqual(await both.json(), [{ n: 1 }]);
  });
});

describe("HTTP RPC: --norpc", { timeout: 20_000 }, () => {
  test("--norpc wins over --rpc_host: the app is never asked, public streams read without a cookie", { timeout: 10_000 }, async () => {
    const app = await startRpcApp({ secret: RPC_SECRET, sessions: SESSIONS });
    const server = await startServer({ args: ["--public_streams", "--rpc_host", app.url, "--http_rpc_secret", RPC_SECRET, "--norpc"] });
    try {
      const name = "rpc/norpc";
      await broadcaster(server.broadcastUrl, BROADCAST_KEY)(name, { n: 1 });
      const res = await rawRead(`${server.streamUrl(name)}?offset=-1`);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.deepEqual(res.body, [{ n: 1 }]);
      assert.equal(app.calls.length, 0);
    } finally {
      await server.stop();
      await app.close();
    }
  });
});

describe("HTTP RPC: --rpc_cache_ttl", { timeout: 30_000 }, () => {
  test("a successful answer is reused for the same cookie until the TTL ends; refusals never are", { timeout: 20_000 }, async () => {
    const app = await startRpcApp({ secret: RPC_SECRET, sessions: { ...SESSIONS, "s3ss10n-bob": "bob" } });
    const server = await startServer({
      // poll interval 1 s: the long-poll read below waits that long for its 204.
      args: [
        "--public_streams",
        "--rpc_host", app.url,
        "--http_rpc_secret", RPC_SECRET,
        "--rpc_cache_ttl", "2",
        "--ds_poll_interval", "1",
      ],
    });
    try {
      const name = "rpc/cached";
      await broadcaster(server.broadcastUrl, BROADCAST_KEY)(name, { n: 1 });
      const url = `${server.streamUrl(name)}?offset=-1`;
      const read = (cookie, u = url) => rawRead(u, { headers: cookie ? { Cookie: cookie } : {} });

      const first = await read(GOOD_COOKIE);
      assert.equal(first.status, 200);
      assert.equal(app.calls.length, 1);
      const cached = await read(GOOD_COOKIE);
      assert.equal(cached.status, 200);
      assert.deepEqual(cached.body, [{ n: 1 }]);
      assert.equal(cached.headers["cache-control"], "no-store", "a cached authentication is still a credentialed read");
      const live = await read(GOOD_COOKIE, `${server.streamUrl(name)}?offset=now&live=long-poll`);
      assert.equal(live.status, 204);
      assert.equal(app.calls.length, 1, "the same cookie within the TTL did not ask the app again");

      // Other credentials are asked about; refusals and anonymous reads are never cached.
      assert.equal((await read("session=s3ss10n-bob")).status, 200);
      assert.equal(app.calls.length, 2);
      for (const cookie of ["session=forged", "session=forged", null, null]) {
        const before = app.calls.length;
        assert.equal((await read(cookie)).status, 401, `cookie ${cookie}`);
        assert.equal(app.calls.length, before + 1, `cookie ${cookie}: asked again`);
      }

      // Once the TTL is over, the app is asked again (polled, 2 s TTL, 6 s deadline).
      const before = app.calls.length;
      const deadline = Date.now() + 6_000;
      while (app.calls.length === before && Date.now() < deadline) {
        assert.equal((await read(GOOD_COOKIE)).status, 200);
        if (app.calls.length === before) await sleep(100);
      }
      assert.equal(app.calls.length, before + 1, "the app was asked again after the TTL");
      assert.equal(app.calls.at(-1).body.env.headers.cookie, GOOD_COOKIE);
    } finally {
      await server.stop();
      await app.close();
    }
  });
});

describe("HTTP RPC: the application fails", { timeout: 120_000 }, () => {
  /** A fresh app and DS server for one test (the server's back-off state is per server). */
  async function setup(t, { appOptions = {}, args = [] } = {}) {
    const app = await startRpcApp({ secret: RPC_SECRET, sessions: SESSIONS, ...appOptions });
    const server = await startServer({
      args: [
        "--public_streams",
        "--rpc_host", app.url,
        ...(args.includes("--http_rpc_secret") ? [] : ["--http_rpc_secret", RPC_SECRET]),
        ...args,
      ],
    });
    t.after(async () => {
      await server.stop();
      await app.close();
    });
    const name = "rpc/failing";
    await broadcaster(server.broadcastUrl, BROADCAST_KEY)(name, { n: 1 });
    return { app, server, name, url: `${server.streamUrl(name)}?offset=-1` };
  }

  /** A 503 auth_unavailable with Retry-After, as plain fetch sees it. */
  async function assertUnavailable(url, what) {
    const res = await rawRead(url, { headers: { Cookie: GOOD_COOKIE } });
    assert.equal(res.status, 503, `${what}: ${res.status} ${JSON.stringify(res.body)}`);
    assert.deepEqual(res.body, { error: "auth_unavailable" }, what);
    assertRetryAfter(res.headers["retry-after"]);
    return res;
  }

  test("status 0 (ERROR) from the app: 503 auth_unavailable with Retry-After, also for the official client", { timeout: 15_000 }, async (t) => {
    const { app, server, name, url } = await setup(t);
    app.mode = "error";
    await assertUnavailable(url, "ERROR answer");
    assert.equal(app.calls.at(-1).answer.status, 0, "the app answered ERROR");
    // The client sees a 503 it could retry (here: no retries, to see the error).
    await rejectsWith(
      stream({
        url: server.streamUrl(name),
        offset: "-1",
        headers: { Cookie: GOOD_COOKIE },
        backoffOptions: { initialDelay: 10, maxDelay: 10, multiplier: 1, maxRetries: 0 },
        signal: t.signal,
      }).then((r) => r.json()),
      503,
      { error: "auth_unavailable" },
    );
  });

  test("a non-200 answer (HTTP 500) from the app: 503", { timeout: 15_000 }, async (t) => {
    const { app, url } = await setup(t);
    app.mode = "http500";
    await assertUnavailable(url, "HTTP 500");
    assert.equal(app.calls.at(-1).status, 500);
  });

  test("the app refuses the RPC bearer (wrong --http_rpc_secret): 503, not 401", { timeout: 15_000 }, async (t) => {
    const { app, url } = await setup(t, { args: ["--http_rpc_secret", "not-the-app-secret"] });
    await assertUnavailable(url, "app answered 401 to the bearer");
    assert.equal(app.calls.length, 1);
    assert.equal(app.calls[0].headers.authorization, "Bearer not-the-app-secret");
    assert.equal(app.calls[0].status, 401);
  });

  test("an app slower than --rpc_request_timeout: 503 before the app answers", { timeout: 15_000 }, async (t) => {
    const { app, url } = await setup(t, { args: ["--rpc_request_timeout", "300"] });
    app.delayMs = 3_000;
    const started = Date.now();
    await assertUnavailable(url, "timeout");
    const took = Date.now() - started;
    assert.ok(took < 2_000, `answered after ${took} ms (timeout 300 ms, the app takes 3000 ms)`);
    assert.equal(app.calls.length, 1, "the app was asked");
    assert.equal(app.calls[0].answeredAt, null, "and had not answered yet");
  });

  test("the app down: 503; back up on the same port: a waiting official client gets the data", { timeout: 40_000 }, async (t) => {
    const { app, server, name, url } = await setup(t);
    assert.equal((await rawRead(url, { headers: { Cookie: GOOD_COOKIE } })).status, 200, "control: the app is up");
    await app.stop();
    await assertUnavailable(url, "app down");

    // The official client retries 503 (honouring Retry-After) until the app is back. Its
    // fetch records the statuses it got, so the app comes back only after a refused attempt.
    const statuses = [];
    let refused;
    const gotRefused = new Promise((resolve) => (refused = resolve));
    const fetch = async (input, init) => {
      const res = await globalThis.fetch(input, init);
      statuses.push(res.status);
      if (res.status === 503) refused();
      return res;
    };
    const controller = linkedController(t);
    const reading = stream({ url: server.streamUrl(name), offset: "-1", headers: { Cookie: GOOD_COOKIE }, fetch, signal: controller.signal }).then(
      (r) => r.json(),
    );
    reading.catch(() => {});
    await withTimeout(gotRefused, 10_000, "the client's first attempt to be refused");
    const before = app.calls.length;
    await app.start();
    try {
      assert.deepEqual(await withTimeout(reading, 30_000, "the read after the app came back"), [{ n: 1 }]);
    } finally {
      controller.abort();
    }
    assert.equal(statuses[0], 503);
    assert.equal(statuses.at(-1), 200, `the client retried until it got the data: ${statuses.join(", ")}`);
    assert.equal(app.calls.slice(before).at(-1)?.answer?.status, 1);
  });

  /** A GET of `url` from loopback address `localAddress`: the server sees another client. */
  function readFrom(url, localAddress, headers) {
    return new Promise((resolve, reject) => {
      const req = http.get(url, { localAddress, headers }, (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (piece) => (text += piece));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: JSON.parse(text || "null") }));
      });
      req.on("error", reject);
    });
  }

  test("a failing app is not stampeded, and is used again soon after it recovers", { timeout: 40_000 }, async (t) => {
    const { app, url } = await setup(t);
    app.mode = "http500";
    const reads = 30;
    // Each read from an address of its own: HTTP 500 to many clients is the app failing (one
    // client's 500s may be about its own cookie, and do not pause everyone's reads).
    for (let i = 0; i < reads; i++) {
      const res = await readFrom(url, `127.0.0.${i + 2}`, { Cookie: GOOD_COOKIE });
      assert.equal(res.status, 503, `read ${i + 1} while the app fails: ${res.status} ${JSON.stringify(res.body)}`);
      assert.deepEqual(res.body, { error: "auth_unavailable" });
      assertRetryAfter(res.headers["retry-after"]);
    }
    const callsWhileFailing = app.calls.length;
    assert.ok(callsWhileFailing >= 1, "the app was asked at all");
    assert.ok(callsWhileFailing < reads, `${reads} failing reads made ${callsWhileFailing} calls: no back-off`);

    app.mode = "ok";
    const recovered = Date.now();
    let status;
    while (Date.now() - recovered < 15_000) {
      status = (await rawRead(url, { headers: { Cookie: GOOD_COOKIE } })).status;
      if (status === 200) break;
      await sleep(200);
    }
    assert.equal(status, 200, "reads work again within 15 s of the app recovering");
    assert.equal(app.calls.at(-1).answer.status, 1);
  });

  test("--rpc_concurrency 2: at most two calls at once, the others wait for a slot", { timeout: 15_000 }, async (t) => {
    const { app, url } = await setup(t, { args: ["--rpc_concurrency", "2"] });
    app.delayMs = 300;
    const results = await Promise.all(Array.from({ length: 6 }, () => rawRead(url, { headers: { Cookie: GOOD_COOKIE } })));
    assert.deepEqual(results.map((r) => r.status), [200, 200, 200, 200, 200, 200], JSON.stringify(results.map((r) => r.body)));
    assert.equal(app.calls.length, 6);
    assert.equal(app.maxInFlight, 2, `at most ${app.maxInFlight} calls ran at once`);
  });
});
