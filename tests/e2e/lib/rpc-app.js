// The application side of AnyCable's HTTP RPC, made with the real `connectHandler` and
// `Application` of @anycable/serverless-js 0.1.0, unchanged, behind a plain Node `http` server
// on a free loopback port, as a serverless deployment would run them (e.g. a Next.js route
// `app/api/anycable/[...path]/route.ts` that does `return Response.json(await
// connectHandler(request, app))`).
//
// The package is loaded as published, through its own entry point: `import
// "@anycable/serverless-js"` fails in plain Node ESM (its dist files import extensionless
// directories, see lib/anycable.js), so a resolve hook (lib/serverless-hook.js, registered
// below with node:module's `register()`) maps those directory imports, and only those, to
// their index.js, as TypeScript and bundlers do.
//
// The application: `connect(handle)` accepts a session cookie it knows (`session=<id>` in
// `handle.env.headers.cookie`, identifying a user) or a JWT in cookie `token` (verified with
// serverless-js' `identificator`; an expired one makes serverless-js answer FAILURE with a
// `token_expired` disconnect transmission), and rejects everything else (`handle.reject()`).
// The HTTP server checks `Authorization: Bearer <rpc secret>` itself (401 otherwise, as a real
// deployment would) and records every request it gets, so tests can assert on and count them.
import { register, createRequire } from "node:module";
import { createServer } from "node:http";
import { dirname } from "node:path";
import { pathToFileURL } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import { createHmac } from "node:crypto";

const require = createRequire(import.meta.url);
// require.resolve honours the package's `exports` ("." only) without loading anything.
const dist = pathToFileURL(dirname(require.resolve("@anycable/serverless-js"))).href + "/";
register("./serverless-hook.js", import.meta.url, { data: { dist } });

const serverless = await import("@anycable/serverless-js");
export const { Application, connectHandler, Status, identificator } = serverless;

/** The bearer AnyCable sends when no RPC secret is set: hex HMAC-SHA256(secret, "rpc-cable"). */
export function derivedRpcSecret(secret) {
  return createHmac("sha256", secret).update("rpc-cable").digest("hex");
}

/** Cookie header → { name: value } (first occurrence wins). */
export function parseCookies(header) {
  const out = {};
  for (const part of (header ?? "").split(";")) {
    const eq = part.indexOf("=");
    if (eq < 0) continue;
    const name = part.slice(0, eq).trim();
    if (name && !(name in out)) out[name] = part.slice(eq + 1).trim();
  }
  return out;
}

/** The application: who may read, decided from the cookies AnyCable passes in env.headers. */
class SessionApp extends Application {
  constructor({ sessions, jwtSecret }) {
    super();
    this.sessions = sessions;
    this.jwtSecret = jwtSecret;
  }

  async connect(handle) {
    const cookies = parseCookies(handle.env?.headers?.cookie);
    if (cookies.token && this.jwtSecret) {
      // Throws JWTExpired (code ERR_JWT_EXPIRED) for an expired token: serverless-js' own
      // handleOpen turns that into a rejection with reason "token_expired".
      const identifiers = await identificator(this.jwtSecret, "1h").verifyAndFetch(cookies.token);
      handle.identifiedBy(identifiers);
      return;
    }
    const user = this.sessions[cookies.session];
    if (user) handle.identifiedBy({ user });
    else handle.reject();
  }
}

/**
 * Starts the application on 127.0.0.1 (a free port unless `port` is given).
 *
 * - `secret`: the bearer the RPC server must send (`Authorization: Bearer <secret>`), else 401.
 * - `sessions`: session cookie value → user id.
 * - `jwtSecret`: accept a JWT in cookie `token` (made with serverless-js' identificator).
 * - `path`: the RPC prefix; `POST {path}/connect` is the only route (others: 404).
 *
 * Behaviour switches, settable at any time on the returned object:
 * - `mode`: "ok" (default, connectHandler's answer), "error" (HTTP 200 with status 0 = ERROR,
 *   what anycable-rails answers when the app raises), "http500" (a crashed route).
 * - `delayMs`: how long each call waits before answering (a slow app).
 *
 * Returns { url, port, calls, connects(), waitForCalls(), maxInFlight, stop(), start(), close() }
 * where `url` is the value for `--rpc_host` (http://127.0.0.1:PORT{path}).
 */
export async function startRpcApp({ secret, sessions = {}, jwtSecret = null, path = "/_anycable", port = 0 } = {}) {
  if (!secret) throw new Error("startRpcApp: the RPC bearer secret is required");
  const application = new SessionApp({ sessions, jwtSecret });
  const calls = [];
  let waiters = [];
  let sockets = new Set();

  const notify = () => {
    waiters = waiters.filter((w) => {
      if (w.predicate()) {
        w.resolve();
        return false;
      }
      return true;
    });
  };

  const app = {
    url: null,
    port: null,
    mode: "ok",
    delayMs: 0,
    inFlight: 0,
    maxInFlight: 0,
    /** Every request received, in arrival order (see `record` below for the fields). */
    calls,
    /** The calls that reached connectHandler (right path, right bearer). */
    connects: () => calls.filter((c) => c.handled),
    /** Resolves once `predicate(calls)` holds; rejects after `timeout` ms naming `what`. */
    waitFor(predicate, what, timeout = 5_000) {
      if (predicate(calls)) return Promise.resolve();
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiters = waiters.filter((w) => w.resolve !== done);
          reject(new Error(`timed out after ${timeout} ms waiting for ${what} (app calls: ${calls.length})`));
        }, timeout);
        timer.unref();
        const done = () => {
          clearTimeout(timer);
          resolve();
        };
        waiters.push({ predicate: () => predicate(calls), resolve: done });
      });
    },
  };

  const server = createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const raw = Buffer.concat(chunks);
    const record = {
      at: Date.now(),
      method: req.method,
      path: new URL(req.url, "http://x").pathname,
      url: req.url,
      headers: { ...req.headers }, // lower-case names, as Node gives them
      rawBody: raw.toString("utf8"),
      body: null,
      authorized: req.headers.authorization === `Bearer ${secret}`,
      handled: false,
      status: null, // HTTP status the app answered
      answer: null, // JSON the app answered
      answeredAt: null,
    };
    try {
      record.body = JSON.parse(record.rawBody);
    } catch {}
    calls.push(record);
    notify();

    const answer = (status, json) => {
      record.status = status;
      record.answer = json;
      record.answeredAt = Date.now();
      if (!res.destroyed) {
        res.writeHead(status, { "Content-Type": "application/json" }).end(JSON.stringify(json));
      }
      notify();
    };

    app.inFlight++;
    app.maxInFlight = Math.max(app.maxInFlight, app.inFlight);
    try {
      if (req.method !== "POST" || record.path !== `${path}/connect`) return answer(404, { error: "not found" });
      if (!record.authorized) return answer(401, { error: "unauthorized" });
      if (app.delayMs > 0) await sleep(app.delayMs);
      if (app.mode === "http500") return answer(500, { error: "internal error" });
      if (app.mode === "error") return answer(200, { status: Status.ERROR, error_msg: "the application raised" });

      // The incoming request as a Fetch Request, for serverless-js.
      const headers = new Headers();
      for (let i = 0; i < req.rawHeaders.length; i += 2) headers.append(req.rawHeaders[i], req.rawHeaders[i + 1]);
      const request = new Request(`http://${req.headers.host}${req.url}`, { method: req.method, headers, body: raw });
      record.handled = true;
      answer(200, await connectHandler(request, application));
    } catch (err) {
      record.error = String(err?.stack ?? err);
      answer(500, { error: String(err?.message ?? err) });
    } finally {
      app.inFlight--;
    }
  });
  server.on("connection", (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });

  const listen = (p) =>
    new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(p, "127.0.0.1", () => {
        server.off("error", reject);
        resolve();
      });
    });

  await listen(port);
  app.port = server.address().port;
  app.url = `http://127.0.0.1:${app.port}${path}`;

  /** Stops listening and drops every connection (the app is down; `start()` brings it back). */
  app.stop = () =>
    new Promise((resolve) => {
      if (!server.listening) return resolve();
      server.close(() => resolve());
      for (const socket of sockets) socket.destroy();
    });
  /** Listens again on the same port. */
  app.start = () => listen(app.port);
  app.close = app.stop;
  return app;
}

/** The app's calls for reads of stream `name` (by the path of env.url). */
export function callsFor(app, name) {
  return app.calls.filter((c) => {
    try {
      return new URL(c.body?.env?.url).pathname === `/ds/${name}`;
    } catch {
      return false;
    }
  });
}
