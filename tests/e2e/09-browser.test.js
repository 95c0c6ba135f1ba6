// Scenario 9: a real browser. Debian's Chromium (driven by playwright-core) loads a page from
// its own origin (browser/page-server.js) and reads the DS server, on another origin, with the
// official @durable-streams/client and with the browser's native EventSource. What only a
// browser checks: CORS (allowed and refused origins, preflights for X-Signed / X-JID /
// Last-Event-ID, exposed headers), the browser's HTTP cache (a credentialed read must never be
// replayed to a request with other or no credentials) and EventSource's own reconnects.
//
// Chromium must be installed (./scripts/test installs it when run as root): without it these
// tests fail, they never skip.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { broadcaster, identificator } from "./lib/anycable.js";
import { startServer, BROADCAST_KEY, SECRET } from "./lib/server.js";
import { signedStream } from "./lib/tokens.js";
import { launchChromium, openPage, until, nextResponseHeaders, WAIT_MS } from "./browser/chromium.js";
import { startPageServer } from "./browser/page-server.js";

const JWT_SECRET = "e2e-browser-jwt-secret";
const PUBLIC_CACHE_CONTROL = "public, max-age=60, stale-while-revalidate=300";

/** The tail offset of a stream, from Node (HEAD, no Origin: not subject to CORS). */
async function tail(server, name, headers = {}) {
  const res = await fetch(server.streamUrl(name), { method: "HEAD", headers });
  assert.equal(res.status, 200, `HEAD ${name}`);
  return res.headers.get("stream-next-offset");
}

/** ds_requests_total{mode, status} as the server counts it (0 before the first one). */
async function requestCount(server, mode, status) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  let total = 0;
  for (const m of text.matchAll(/^ds_requests_total\{([^}]*)\} (\S+)$/gm)) {
    const labels = Object.fromEntries([...m[1].matchAll(/(\w+)="([^"]*)"/g)].map((l) => [l[1], l[2]]));
    if (labels.mode === mode && labels.status === String(status)) total += Number(m[2]);
  }
  return total;
}



/** The names listed by a Vary header value, lower-cased. */
const varyNames = (vary) => (vary ?? "").split(/[,\n]/).map((s) => s.trim().toLowerCase()).filter(Boolean);

describe("browser (Chromium, page on another origin)", { timeout: 110_000 }, () => {
  let pages;
  let browser;
  before(async () => {
    pages = await startPageServer();
    browser = await launchChromium();
  });
  after(async () => {
    await browser?.close();
    await pages?.close();
  });

  describe("allowed origin", () => {
    let server;
    let page;
    let broadcast;
    before(async () => {
      server = await startServer({ args: ["--public_streams", "--allowed_origins", pages.origin] });
      page = await openPage(browser, pages.url);
      broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    });
    after(async () => {
      await page?.close();
      await server?.stop();
    });

    test("catch-up with the official client; the page reads Stream-Next-Offset and the other headers", { timeout: 20_000 }, async () => {
      const name = "browser/catch-up";
      const url = server.streamUrl(name);
      const messages = [{ text: "hello" }, { text: "héllo ✓ 😀" }, "plain", 42, null];
      for (const m of messages) await broadcast(name, m);
      const tailOffset = await tail(server, name);

      const read = await page.evaluate((url) => window.ds.read({ url, offset: "-1" }), url);
      assert.equal(read.ok, true, JSON.stringify(read.error));
      assert.deepEqual(read.items, messages);
      assert.equal(read.upToDate, true);
      assert.equal(read.offset, tailOffset);

      // The raw response as the page sees it: only CORS-exposed and safelisted headers.
      const raw = await page.evaluate((u) => window.ds.fetch(u), `${url}?offset=-1`);
      assert.equal(raw.ok, true, JSON.stringify(raw.error));
      assert.equal(raw.status, 200);
      assert.deepEqual(raw.body, messages);
      assert.equal(raw.headers["stream-next-offset"], tailOffset);
      assert.equal(raw.headers["stream-up-to-date"], "true");
      assert.match(raw.headers["stream-cursor"] ?? "", /^\d+$/);
      assert.ok(raw.headers.etag, `an ETag the page can read: ${JSON.stringify(raw.headers)}`);
      assert.match(raw.headers["content-type"] ?? "", /application\/json/);
      assert.equal(raw.headers["cache-control"], PUBLIC_CACHE_CONTROL, "a public read stays cacheable");

      // The offset the page got resumes right after what it read.
      await broadcast(name, { text: "after" });
      const next = await page.evaluate(([url, offset]) => window.ds.read({ url, offset }), [url, read.offset]);
      assert.equal(next.ok, true, JSON.stringify(next.error));
      assert.deepEqual(next.items, [{ text: "after" }]);
    });

    test("control: the browser's HTTP cache is on (a repeated public read is answered from it)", { timeout: 20_000 }, async () => {
      // Without this, the no-store tests below could pass for the wrong reason.
      const name = "browser/cache-on";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { cached: true });
      const before = await requestCount(server, "catchup", 200);
      const first = await page.evaluate((u) => window.ds.fetch(u), url);
      const second = await page.evaluate((u) => window.ds.fetch(u), url);
      assert.equal(first.status, 200, JSON.stringify(first));
      assert.deepEqual(second, first);
      assert.equal(await requestCount(server, "catchup", 200), before + 1, "the second read never reached the server");
    });

    test("long-poll with the official client: a broadcast made while it waits arrives", { timeout: 20_000 }, async () => {
      const name = "browser/long-poll";
      const url = server.streamUrl(name);
      await broadcast(name, { n: 1 });
      await page.evaluate((url) => window.ds.subscribe("lp", { url, offset: "-1", live: "long-poll" }), url);
      try {
        await until(page, () => window.ds.subscription("lp", { check: true }).items.length >= 1, null, "the backlog");
        // The page's long-poll is now waiting on the server.
        await server.waitForMetric("ds_poll_clients_num", (v) => v >= 1);
        await broadcast(name, { n: 2 });
        await until(page, () => window.ds.subscription("lp", { check: true }).items.length >= 2, null, "the live message");
        const sub = await page.evaluate(() => window.ds.subscription("lp"));
        assert.deepEqual(sub.items, [{ n: 1 }, { n: 2 }]);
        assert.equal(sub.error, null);
        assert.ok(sub.batches.filter((b) => b.count > 0).length >= 2, "the live message came in its own batch");
      } finally {
        await page.evaluate(() => window.ds.cancel("lp"));
      }
    });

    test("SSE with the official client: backlog, then a live broadcast", { timeout: 20_000 }, async () => {
      const name = "browser/sse";
      const url = server.streamUrl(name);
      await broadcast(name, { n: 1 });
      await broadcast(name, { n: 2 });
      await page.evaluate((url) => window.ds.subscribe("sse", { url, offset: "-1", live: "sse" }), url);
      try {
        await until(
          page,
          () => {
            const s = window.ds.subscription("sse", { check: true });
            return s.items.length >= 2 && s.batches.some((b) => b.upToDate);
          },
          null,
          "the backlog",
        );
        await server.waitForMetric("ds_sse_clients_num", (v) => v >= 1);
        await broadcast(name, { n: 3 });
        await until(page, () => window.ds.subscription("sse", { check: true }).items.length >= 3, null, "the live message");
        const sub = await page.evaluate(() => window.ds.subscription("sse"));
        assert.deepEqual(sub.items, [{ n: 1 }, { n: 2 }, { n: 3 }]);
        assert.equal(sub.batches.at(-1).offset, await tail(server, name));
      } finally {
        await page.evaluate(() => window.ds.cancel("sse"));
      }
    });
  });

  describe("refused origin", () => {
    let server;
    let page;
    let broadcast;
    const name = "browser/refused";
    before(async () => {
      server = await startServer({ args: ["--public_streams", "--allowed_origins", "https://app.example.com"] });
      page = await openPage(browser, pages.url);
      broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
      await broadcast(name, { secret: "not for this page" });
    });
    after(async () => {
      await page?.close();
      await server?.stop();
    });

    test("a plain fetch fails in the page, though the server answered", { timeout: 20_000 }, async () => {
      const url = `${server.streamUrl(name)}?offset=-1`;
      // The data is there (Node sends no Origin).
      assert.deepEqual(await (await fetch(url)).json(), [{ secret: "not for this page" }]);
      const before = await requestCount(server, "catchup", 200);
      const res = await page.evaluate((u) => window.ds.fetch(u), url);
      assert.equal(res.ok, false, `the page got the response: ${JSON.stringify(res)}`);
      assert.equal(res.error.name, "TypeError", JSON.stringify(res.error));
      // The browser, not the server, withheld it: the request was answered.
      assert.ok((await requestCount(server, "catchup", 200)) > before, "the browser's request reached the server");
    });

    test("the official client errors instead of returning the data", { timeout: 20_000 }, async () => {
      // maxRetries: the client retries network errors (a CORS refusal is one) forever.
      const read = await page.evaluate((url) => window.ds.read({ url, offset: "-1", maxRetries: 1 }), server.streamUrl(name));
      assert.equal(read.ok, false, `the page got: ${JSON.stringify(read)}`);
      assert.equal(read.error.fetchError, false, "a network error, not an HTTP status the page could read");
      assert.equal(read.error.name, "TypeError", JSON.stringify(read.error));
    });

    test("a native EventSource gets no data and gives up", { timeout: 20_000 }, async () => {
      const url = `${server.streamUrl(name)}?offset=-1&live=sse`;
      await page.evaluate((url) => window.ds.eventSource("refused", url), url);
      const state = await until(
        page,
        () => {
          const s = window.ds.eventSourceState("refused");
          return s.readyState === EventSource.CLOSED && s;
        },
        null,
        "the EventSource to fail",
      );
      assert.equal(state.events, 0);
      assert.deepEqual(state.messages, []);
      assert.equal(state.opens, 0);
    });
  });

  describe("signed streams (--secret, streams not public)", () => {
    let server;
    let page;
    let broadcast;
    before(async () => {
      // allowed_origins is empty: any origin may read (with a valid signed name).
      server = await startServer();
      page = await openPage(browser, pages.url);
      broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
    });
    after(async () => {
      await page?.close();
      await server?.stop();
    });

    test("a signed name in ?signed= or X-Signed reads, in catch-up and SSE", { timeout: 20_000 }, async () => {
      const name = "browser/signed";
      const url = server.streamUrl(name);
      const signed = signedStream(name, SECRET);
      await broadcast(name, { n: 1 });

      const byQuery = await page.evaluate(([url, signed]) => window.ds.read({ url, params: { signed } }), [url, signed]);
      assert.equal(byQuery.ok, true, JSON.stringify(byQuery.error));
      assert.deepEqual(byQuery.items, [{ n: 1 }]);

      // A custom header: a preflight first, which must allow X-Signed.
      const byHeader = await page.evaluate(
        ([url, signed]) => window.ds.read({ url, offset: "-1", headers: { "X-Signed": signed } }),
        [url, signed],
      );
      assert.equal(byHeader.ok, true, JSON.stringify(byHeader.error));
      assert.deepEqual(byHeader.items, [{ n: 1 }]);

      await page.evaluate(
        ([url, signed]) => window.ds.subscribe("signed-sse", { url, offset: "-1", live: "sse", headers: { "X-Signed": signed } }),
        [url, signed],
      );
      try {
        await until(page, () => window.ds.subscription("signed-sse", { check: true }).items.length >= 1, null, "the SSE backlog");
        await server.waitForMetric("ds_sse_clients_num", (v) => v >= 1);
        await broadcast(name, { n: 2 });
        await until(page, () => window.ds.subscription("signed-sse", { check: true }).items.length >= 2, null, "the live message");
        assert.deepEqual((await page.evaluate(() => window.ds.subscription("signed-sse"))).items, [{ n: 1 }, { n: 2 }]);
      } finally {
        await page.evaluate(() => window.ds.cancel("signed-sse"));
      }
    });

    test("without a signed name the page sees 401", { timeout: 20_000 }, async () => {
      const name = "browser/signed-missing";
      const url = server.streamUrl(name);
      await broadcast(name, { n: 1 });
      const read = await page.evaluate((url) => window.ds.read({ url }), url);
      assert.equal(read.ok, false, `the page got: ${JSON.stringify(read)}`);
      assert.equal(read.error.fetchError, true, JSON.stringify(read.error));
      assert.equal(read.error.status, 401);
      assert.deepEqual(read.error.json, { error: "unauthorized" });
      // The error response carries CORS headers, so the page can read its status and body.
      const raw = await page.evaluate((u) => window.ds.fetch(u), `${url}?offset=-1`);
      assert.equal(raw.ok, true, JSON.stringify(raw.error));
      assert.equal(raw.status, 401);
      assert.deepEqual(raw.body, { error: "unauthorized" });
    });

    test("after a read with X-Signed, the same URL without it gets 401, not the browser's cached copy", { timeout: 20_000 }, async () => {
      const name = "browser/signed-cache";
      const url = `${server.streamUrl(name)}?offset=-1`;
      const signed = signedStream(name, SECRET);
      await broadcast(name, { private: true });

      const headersSeen = nextResponseHeaders(page, url);
      const first = await page.evaluate(([u, signed]) => window.ds.fetch(u, { headers: { "X-Signed": signed } }), [url, signed]);
      assert.equal(first.status, 200, JSON.stringify(first));
      assert.deepEqual(first.body, [{ private: true }]);
      const headers = await headersSeen;

      const second = await page.evaluate((u) => window.ds.fetch(u), url);
      assert.equal(second.ok, true, JSON.stringify(second.error));
      assert.deepEqual({ status: second.status, body: second.body }, { status: 401, body: { error: "unauthorized" } });

      // What makes it so (spec §5): no-store, and Vary naming the credential header.
      assert.equal(headers["cache-control"], "no-store");
      assert.ok(varyNames(headers.vary).includes("x-signed"), `Vary: ${headers.vary}`);

      // The official client, on another stream's URL, the same way round.
      const other = "browser/signed-cache-client";
      await broadcast(other, { private: 2 });
      const ok = await page.evaluate(
        ([url, signed]) => window.ds.read({ url, headers: { "X-Signed": signed } }),
        [server.streamUrl(other), signedStream(other, SECRET)],
      );
      assert.deepEqual(ok.items, [{ private: 2 }], JSON.stringify(ok));
      const refused = await page.evaluate((url) => window.ds.read({ url }), server.streamUrl(other));
      assert.equal(refused.ok, false, `the page got: ${JSON.stringify(refused)}`);
      assert.equal(refused.error.status, 401);
    });
  });

  describe("enforced JWT (--enforce_jwt)", () => {
    let server;
    let page;
    let broadcast;
    let valid;
    let expired;
    before(async () => {
      server = await startServer({
        args: ["--jwt_secret", JWT_SECRET, "--enforce_jwt", "--public_streams", "--allowed_origins", pages.origin],
      });
      page = await openPage(browser, pages.url);
      broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
      valid = await identificator(JWT_SECRET, "1h").generateToken({ user_id: "42" });
      // A number is an absolute `exp` for serverless-js: a minute ago.
      expired = await identificator(JWT_SECRET, Math.floor(Date.now() / 1000) - 60).generateToken({ user_id: "42" });
    });
    after(async () => {
      await page?.close();
      await server?.stop();
    });

    test("a valid X-JID reads; the same URL with an expired one gets token_expired, not the cached data", { timeout: 20_000 }, async () => {
      const name = "browser/jwt-expired";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { for: "user 42" });

      const headersSeen = nextResponseHeaders(page, url);
      const first = await page.evaluate(([u, jwt]) => window.ds.fetch(u, { headers: { "X-JID": jwt } }), [url, valid]);
      assert.equal(first.status, 200, JSON.stringify(first));
      assert.deepEqual(first.body, [{ for: "user 42" }]);
      const headers = await headersSeen;

      const second = await page.evaluate(([u, jwt]) => window.ds.fetch(u, { headers: { "X-JID": jwt } }), [url, expired]);
      assert.equal(second.ok, true, JSON.stringify(second.error));
      assert.deepEqual({ status: second.status, body: second.body }, { status: 401, body: { error: "token_expired" } });

      assert.equal(headers["cache-control"], "no-store");
      assert.equal(first.headers["cache-control"], "no-store", "the page sees no-store too");
      assert.ok(varyNames(headers.vary).includes("x-jid"), `Vary: ${headers.vary}`);
    });

    test("a valid X-JID reads; the same URL with no token gets 401, not the cached data", { timeout: 20_000 }, async () => {
      const name = "browser/jwt-none";
      const url = `${server.streamUrl(name)}?offset=-1`;
      await broadcast(name, { for: "user 42" });
      const first = await page.evaluate(([u, jwt]) => window.ds.fetch(u, { headers: { "X-JID": jwt } }), [url, valid]);
      assert.equal(first.status, 200, JSON.stringify(first));
      assert.deepEqual(first.body, [{ for: "user 42" }]);
      const second = await page.evaluate((u) => window.ds.fetch(u), url);
      assert.equal(second.ok, true, JSON.stringify(second.error));
      assert.deepEqual({ status: second.status, body: second.body }, { status: 401, body: { error: "unauthorized" } });
    });

    test("the official client: valid, then expired, then no token on the same stream", { timeout: 20_000 }, async () => {
      const name = "browser/jwt-client";
      const url = server.streamUrl(name);
      await broadcast(name, { n: 1 });
      const read = (jwt) =>
        page.evaluate(([url, jwt]) => window.ds.read({ url, offset: "-1", headers: jwt ? { "X-JID": jwt } : {} }), [url, jwt]);

      const ok = await read(valid);
      assert.equal(ok.ok, true, JSON.stringify(ok.error));
      assert.deepEqual(ok.items, [{ n: 1 }]);

      const late = await read(expired);
      assert.equal(late.ok, false, `an expired token got: ${JSON.stringify(late)}`);
      assert.equal(late.error.status, 401);
      assert.deepEqual(late.error.json, { error: "token_expired" });

      const none = await read(null);
      assert.equal(none.ok, false, `no token got: ${JSON.stringify(none)}`);
      assert.equal(none.error.status, 401);
      assert.deepEqual(none.error.json, { error: "unauthorized" });
    });
  });

  describe("native EventSource (--ds_sse_ttl 1)", () => {
    let server;
    let page;
    before(async () => {
      server = await startServer({ args: ["--public_streams", "--ds_sse_ttl", "1", "--allowed_origins", pages.origin] });
      page = await openPage(browser, pages.url);
    });
    after(async () => {
      await page?.close();
      await server?.stop();
    });

    test("one EventSource across 3 server-side TTL ends gets every message exactly once, in order", { timeout: 60_000 }, async () => {
      const name = "browser/event-source";
      const broadcast = broadcaster(server.broadcastUrl, BROADCAST_KEY);
      const sent = [];
      let n = 0;
      const send = async () => {
        const m = { n: ++n };
        await broadcast(name, m);
        sent.push(m);
      };
      // A wait on the EventSource's record: `field` of it reaches `min`; fails at once if the
      // browser gave up on the EventSource (readyState CLOSED).
      const esUntil = (field, min, what) =>
        until(
          page,
          ([field, min]) => {
            const s = window.ds.eventSourceState("es", { check: true });
            return (field === "messages" ? s.messages.length : s[field]) >= min;
          },
          [field, min],
          what,
        );

      for (let i = 0; i < 3; i++) await send();
      await page.evaluate((url) => window.ds.eventSource("es", url), `${server.streamUrl(name)}?offset=-1&live=sse`);
      try {
        await esUntil("messages", sent.length, "the backlog");
        for (let end = 1; end <= 3; end++) {
          await send(); // while connected (or just as the TTL ends)
          await esUntil("errors", end, `server-side TTL end #${end} (EventSource error event)`);
          // The browser waits before it reconnects (3 s in Chromium): these land in the gap.
          await send();
          await send();
          await esUntil("opens", end + 1, `the browser's reconnection #${end}`);
          await send(); // right after the reconnection
        }
        await esUntil("messages", sent.length, `all ${sent.length} messages`);
        const state = await page.evaluate(() => window.ds.eventSourceState("es"));
        assert.ok(state.opens >= 4, `${state.opens} connections`);
        const ns = (list) => list.map((m) => m?.n ?? JSON.stringify(m)).join(",");
        assert.deepEqual(
          state.messages,
          sent,
          `every message exactly once, in order (no loss, no duplicate): the page got n = ${ns(state.messages)} ` +
            `for n = ${ns(sent)} sent (connections: ${state.log.join("; ")})`,
        );

        // Every data event carried `id: <offset>`, increasing; the last one is the tail.
        assert.ok(state.ids.every((id) => id !== ""), `data events without id: ${JSON.stringify(state.ids)}`);
        for (let i = 1; i < state.ids.length; i++) {
          assert.ok(state.ids[i] > state.ids[i - 1], `ids increase: ${state.ids[i - 1]} then ${state.ids[i]}`);
        }
        assert.equal(state.ids.at(-1), await tail(server, name));
      } finally {
        await page.evaluate(() => window.ds.closeEventSource("es"));
      }
    });
  });
});
