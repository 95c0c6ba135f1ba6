// Scenario 11: a real browser authenticated by its cookie, over AnyCable's HTTP RPC (spec §6.1 b,
// §7). Chromium (browser/chromium.js) holds a session cookie for 127.0.0.1; the test page is
// served from its own origin (http://127.0.0.1:A) and reads the DS server on another origin
// (http://127.0.0.1:B). Cookies are not port-scoped and both origins are the same site, so the
// browser sends the (SameSite=Lax) cookie with a credentialed read; the server hands it to the
// application (serverless-js' connectHandler, lib/rpc-app.js), which decides.
//
// What only a browser checks: that the page can use a cookie-authenticated response only when
// the server names its exact origin with `Access-Control-Allow-Credentials: true` (an origin in
// --allowed_origins), and never for an unlisted origin or when --allowed_origins is empty.
//
// Chromium must be installed: without it these tests fail, they never skip.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { broadcaster } from "./lib/anycable.js";
import { startServer, BROADCAST_KEY, SECRET } from "./lib/server.js";
import { signedStream } from "./lib/tokens.js";
import { startRpcApp, callsFor } from "./lib/rpc-app.js";
import { launchChromium, openPage, until, nextResponseHeaders, WAIT_MS } from "./browser/chromium.js";
import { startPageServer } from "./browser/page-server.js";

const RPC_SECRET = "e2e-browser-rpc-secret";
const SESSION = "s3ss10n-browser-alice";
const GOOD_COOKIE = `session=${SESSION}`;




/** What the server answers `origin` for a cookie read, seen from Node (no CORS enforcement). */
async function corsHeadersFor(url, origin) {
  const res = await fetch(url, { headers: { Origin: origin, Cookie: GOOD_COOKIE } });
  await res.arrayBuffer();
  return {
    status: res.status,
    allowOrigin: res.headers.get("access-control-allow-origin"),
    allowCredentials: res.headers.get("access-control-allow-credentials"),
  };
}

const varyNames = (vary) => (vary ?? "").split(/[,\n]/).map((s) => s.trim().toLowerCase()).filter(Boolean);

/** Opens an EventSource in the page and waits until the browser gives up on it (CLOSED). */
async function failedEventSource(page, id, url) {
  await page.evaluate(([id, url]) => window.ds.eventSource(id, url, { withCredentials: true }), [id, url]);
  try {
    return await until(
      page,
      (id) => {
        const s = window.ds.eventSourceState(id);
        return s.readyState === EventSource.CLOSED && s;
      },
      id,
      `EventSource ${id} to fail`,
    );
  } finally {
    await page.evaluate((id) => window.ds.closeEventSource(id), id);
  }
}

describe("browser (Chromium) authenticated by its cookie over HTTP RPC", { timeout: 150_000 }, () => {
  let pages; // the origin listed in --allowed_origins
  let otherPages; // another origin (another port), not listed
  let browser;
  let app;
  let cookie; // the session cookie as Playwright sets it
  before(async () => {
    pages = await startPageServer();
    otherPages = await startPageServer();
    browser = await launchChromium();
    app = await startRpcApp({ secret: RPC_SECRET, sessions: { [SESSION]: "alice" } });
    // Host-only cookie for 127.0.0.1: sent to every port of that host.
    cookie = { name: "session", value: SESSION, url: pages.url, sameSite: "Lax", httpOnly: true };
    await browser.context.addCookies([cookie]);
  });
  after(async () => {
    await browser?.close();
    await pages?.close();
    await otherPages?.close();
    await app?.close();
  });

  describe("--allowed_origins lists the page's origin", () => {
    let server;
    let page;
    let otherPage;
    let broadcast;
    before(async () => {
      server = await startServer({
        args: ["--public_streams", "--allowed_origins", pages.origin, "--rpc_host", app.url, "--http_rpc_secret", RPC_SECRET],
      });
      page = await openPage(browser, pages.url);
      otherPage = await openPage(browser, otherPages.url);
      broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    });
    after(async () => {
      await page?.close();
      await otherPage?.close();
      await server?.stop();
    });

    test("fetch with credentials: \"include\" reads; the answer names the exact origin and allows credentials", { timeout: 20_000 }, async () => {
      const name = "browser-rpc/fetch";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { for: "alice" });

      const headersSeen = nextResponseHeaders(page, url);
      const res = await page.evaluate((u) => window.ds.fetch(u, { credentials: "include" }), url);
      assert.equal(res.ok, true, JSON.stringify(res.error));
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.deepEqual(res.body, [{ for: "alice" }]);
      const headers = await headersSeen;
      assert.equal(headers["access-control-allow-origin"], pages.origin);
      assert.equal(headers["access-control-allow-credentials"], "true");
      assert.equal(headers["cache-control"], "no-store");
      assert.ok(varyNames(headers.vary).includes("cookie"), `Vary: ${headers.vary}`);

      // The browser sent its cookie; the app saw the URL the page read and said yes.
      const [call, ...more] = callsFor(app, name);
      assert.equal(more.length, 0);
      assert.equal(call.body.env.url, url);
      assert.equal(call.body.env.headers.cookie, GOOD_COOKIE);
      assert.equal(call.answer.status, 1);

      // Control: without credentials the browser sends no cookie cross-origin, and the app says no.
      const anonymous = await page.evaluate((u) => window.ds.fetch(u, { cache: "no-store" }), url);
      assert.equal(anonymous.ok, true, JSON.stringify(anonymous.error));
      assert.deepEqual({ status: anonymous.status, body: anonymous.body }, { status: 401, body: { error: "unauthorized" } });
      const last = callsFor(app, name).at(-1);
      assert.equal(last.body.env.headers.cookie, undefined);
      assert.equal(last.answer.status, 2);
    });

    test("the official client with credentials: catch-up, then SSE with a live broadcast", { timeout: 20_000 }, async () => {
      const name = "browser-rpc/client";
      const url = server.streamUrl(name);
      await broadcast(name, { n: 1 });
      const read = await page.evaluate((url) => window.ds.read({ url, offset: "-1", credentials: "include" }), url);
      assert.equal(read.ok, true, JSON.stringify(read.error));
      assert.deepEqual(read.items, [{ n: 1 }]);

      await page.evaluate((url) => window.ds.subscribe("rpc-sse", { url, offset: "-1", live: "sse", credentials: "include" }), url);
      try {
        await until(page, () => window.ds.subscription("rpc-sse", { check: true }).items.length >= 1, null, "the SSE backlog");
        await server.waitForMetric("ds_sse_clients_num", (v) => v >= 1);
        await broadcast(name, { n: 2 });
        await until(page, () => window.ds.subscription("rpc-sse", { check: true }).items.length >= 2, null, "the live message");
        assert.deepEqual((await page.evaluate(() => window.ds.subscription("rpc-sse"))).items, [{ n: 1 }, { n: 2 }]);
      } finally {
        await page.evaluate(() => window.ds.cancel("rpc-sse"));
      }
      const calls = callsFor(app, name);
      assert.ok(calls.some((c) => c.body.env.url.includes("live=sse")), "the SSE request was authenticated");
      assert.ok(calls.every((c) => c.body.env.headers.cookie === GOOD_COOKIE && c.answer.status === 1));
    });

    test("native EventSource with withCredentials: backlog, then a live broadcast", { timeout: 20_000 }, async () => {
      const name = "browser-rpc/event-source";
      await broadcast(name, { n: 1 });
      const url = `${server.streamUrl(name)}?offset=-1&live=sse`;
      await page.evaluate((url) => window.ds.eventSource("rpc-es", url, { withCredentials: true }), url);
      try {
        await until(page, () => window.ds.eventSourceState("rpc-es", { check: true }).messages.length >= 1, null, "the backlog");
        await server.waitForMetric("ds_sse_clients_num", (v) => v >= 1);
        await broadcast(name, { n: 2 });
        await until(page, () => window.ds.eventSourceState("rpc-es", { check: true }).messages.length >= 2, null, "the live message");
        assert.deepEqual((await page.evaluate(() => window.ds.eventSourceState("rpc-es"))).messages, [{ n: 1 }, { n: 2 }]);
      } finally {
        await page.evaluate(() => window.ds.closeEventSource("rpc-es"));
      }
      const [call] = callsFor(app, name);
      assert.equal(call.body.env.url, url);
      assert.equal(call.body.env.headers.cookie, GOOD_COOKIE);
    });

    test("a credentialed read that needs a preflight (X-Signed): allowed, and only the read asks the app", { timeout: 20_000 }, async () => {
      const name = "browser-rpc/preflighted";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { n: 1 });
      // Playwright does not report preflights; Chromium's DevTools protocol does.
      const cdp = await browser.context.newCDPSession(page);
      const methods = [];
      cdp.on("Network.requestWillBeSent", (e) => e.request.url === url && methods.push(e.request.method));
      await cdp.send("Network.enable");
      const res = await page.evaluate(
        ([u, signed]) => window.ds.fetch(u, { credentials: "include", headers: { "X-Signed": signed } }),
        [url, signedStream(name, SECRET)],
      );
      assert.equal(res.ok, true, JSON.stringify(res.error));
      assert.equal(res.status, 200);
      assert.deepEqual(res.body, [{ n: 1 }]);
      await cdp.detach();
      // (DevTools reports the GET when the page makes it, before the preflight goes out.)
      assert.deepEqual(methods.sort(), ["GET", "OPTIONS"], "a preflight and the read");
      const calls = callsFor(app, name);
      assert.equal(calls.length, 1, `the preflight did not ask the app: ${calls.length} calls`);
      assert.equal(calls[0].body.env.headers.cookie, GOOD_COOKIE);
    });

    test("a page on an unlisted origin cannot read, though the browser sent the cookie and the app said yes", { timeout: 30_000 }, async () => {
      const name = "browser-rpc/other-origin";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { secret: "not for that page" });

      // The server's side: a listed origin gets itself and credentials, the other neither.
      assert.deepEqual(await corsHeadersFor(url, pages.origin), { status: 200, allowOrigin: pages.origin, allowCredentials: "true" });
      const other = await corsHeadersFor(url, otherPages.origin);
      assert.notEqual(other.allowOrigin, otherPages.origin, `Access-Control-Allow-Origin for an unlisted origin: ${other.allowOrigin}`);
      assert.notEqual(other.allowCredentials, "true", "no Access-Control-Allow-Credentials for an unlisted origin");
      const before = callsFor(app, name).length;

      // fetch: a network error (TypeError) in the page...
      const res = await otherPage.evaluate((u) => window.ds.fetch(u, { credentials: "include" }), url);
      assert.equal(res.ok, false, `the page got the response: ${JSON.stringify(res)}`);
      assert.equal(res.error.name, "TypeError", JSON.stringify(res.error));
      // ...though its request went out with the cookie and was authenticated.
      const fetchCalls = callsFor(app, name).slice(before);
      assert.equal(fetchCalls.length, 1, "the browser's request reached the server");
      assert.equal(fetchCalls[0].body.env.headers.cookie, GOOD_COOKIE, "the browser sent the cookie");
      assert.equal(fetchCalls[0].answer.status, 1, "the app accepted it: CORS withheld the answer");

      // The official client: a network error too, never the data.
      const read = await otherPage.evaluate(
        (url) => window.ds.read({ url, offset: "-1", credentials: "include", maxRetries: 1 }),
        server.streamUrl(name),
      );
      assert.equal(read.ok, false, `the page got: ${JSON.stringify(read)}`);
      assert.equal(read.error.fetchError, false, JSON.stringify(read.error));

      // A native EventSource with credentials: no data, no open, given up.
      const afterFetch = callsFor(app, name).length;
      const es = await failedEventSource(otherPage, "other-es", `${url}&live=sse`);
      assert.deepEqual(es.messages, []);
      assert.equal(es.opens, 0);
      const esCalls = callsFor(app, name).slice(afterFetch);
      assert.ok(esCalls.length >= 1, "the EventSource's request reached the server");
      assert.ok(esCalls.every((c) => c.body.env.headers.cookie === GOOD_COOKIE && c.answer.status === 1));
    });

    test("the listed page without the cookie, or with a wrong one: 401, which the page can read", { timeout: 30_000 }, async () => {
      const name = "browser-rpc/no-cookie";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { secret: "alice only" });
      const cases = [
        ["no cookie", null],
        ["a wrong session cookie", { ...cookie, value: "forged-session" }],
      ];
      try {
        for (const [label, jar] of cases) {
          await browser.context.clearCookies();
          if (jar) await browser.context.addCookies([jar]);
          const expectedCookie = jar ? `session=${jar.value}` : undefined;

          const res = await page.evaluate((u) => window.ds.fetch(u, { credentials: "include" }), url);
          assert.equal(res.ok, true, `${label}: ${JSON.stringify(res.error)}`);
          assert.deepEqual({ status: res.status, body: res.body }, { status: 401, body: { error: "unauthorized" } }, label);
          const call = callsFor(app, name).at(-1);
          assert.equal(call.body.env.headers.cookie, expectedCookie, label);
          assert.equal(call.answer.status, 2, label);

          const read = await page.evaluate((url) => window.ds.read({ url, offset: "-1", credentials: "include" }), server.streamUrl(name));
          assert.equal(read.ok, false, `${label}: the page got ${JSON.stringify(read)}`);
          assert.equal(read.error.status, 401, label);
          assert.deepEqual(read.error.json, { error: "unauthorized" }, label);

          const es = await failedEventSource(page, `no-cookie-${label}`, `${url}&live=sse`);
          assert.deepEqual(es.messages, [], label);
          assert.equal(es.opens, 0, label);
        }
      } finally {
        await browser.context.clearCookies();
        await browser.context.addCookies([cookie]);
      }
      // Control: with the cookie back, the same page reads.
      const ok = await page.evaluate((u) => window.ds.fetch(u, { credentials: "include" }), url);
      assert.equal(ok.status, 200, JSON.stringify(ok));
      assert.deepEqual(ok.body, [{ secret: "alice only" }]);
    });
  });

  describe("--allowed_origins empty (any origin): never credentials", () => {
    let server;
    let page;
    let broadcast;
    before(async () => {
      server = await startServer({ args: ["--public_streams", "--rpc_host", app.url, "--http_rpc_secret", RPC_SECRET] });
      page = await openPage(browser, pages.url);
      broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    });
    after(async () => {
      await page?.close();
      await server?.stop();
    });

    test("a credentialed read fails in the page though the app accepted the cookie; without credentials, 401", { timeout: 30_000 }, async () => {
      const name = "browser-rpc/any-origin";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { secret: "alice only" });

      const seen = await corsHeadersFor(url, pages.origin);
      assert.equal(seen.status, 200);
      assert.notEqual(seen.allowCredentials, "true", "no Access-Control-Allow-Credentials when any origin is allowed");

      const before = callsFor(app, name).length;
      const res = await page.evaluate((u) => window.ds.fetch(u, { credentials: "include" }), url);
      assert.equal(res.ok, false, `the page got the response: ${JSON.stringify(res)}`);
      assert.equal(res.error.name, "TypeError", JSON.stringify(res.error));
      const calls = callsFor(app, name).slice(before);
      assert.equal(calls.length, 1);
      assert.equal(calls[0].body.env.headers.cookie, GOOD_COOKIE, "the browser sent the cookie");
      assert.equal(calls[0].answer.status, 1, "the app accepted it: CORS withheld the answer");

      const es = await failedEventSource(page, "any-origin-es", `${url}&live=sse`);
      assert.deepEqual(es.messages, []);
      assert.equal(es.opens, 0);

      // Without credentials the page can read the answer, and it is a 401 (no cookie was sent).
      const anonymous = await page.evaluate((u) => window.ds.fetch(u, { cache: "no-store" }), url);
      assert.equal(anonymous.ok, true, JSON.stringify(anonymous.error));
      assert.deepEqual({ status: anonymous.status, body: anonymous.body }, { status: 401, body: { error: "unauthorized" } });
    });
  });
});
