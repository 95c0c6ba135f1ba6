// Harness: runs the real anycable-ds release binary on a free port with a temporary data
// directory, waits for its "Listening on" log line, and stops it afterwards.
import { after } from "node:test";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, "..", "..", "..");
export const BIN = process.env.ANYCABLE_DS_BIN || join(REPO, "target", "release", "anycable-ds");

export const SECRET = "e2e-app-secret";
export const BROADCAST_KEY = "e2e-broadcast-key";

const READY_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 5_000;

// Every child still alive when this process exits is killed, so a failed or timed-out test
// never leaves a server behind.
const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

// Safety net, so `node --test` never hangs on a broken server: once every test of a file has
// ended, anything still running gets a few seconds, then the file's process exits (with the
// runner's exit code). Needed because @durable-streams/client 0.2.7 ignores a signal that is
// already aborted when `stream()` is called: against a server that never says it is up to
// date, such a session polls forever. A passing run exits on its own long before.
after(() => {
  setTimeout(() => {
    process.stderr.write("e2e: still running 3 s after the last test (a client session that ignored its abort?): exiting\n");
    process.exit();
  }, 3_000).unref();
});

/**
 * The engine under test: `sled` (default) or `nats` (cluster mode) from ANYCABLE_DS_TEST_ENGINE,
 * with ANYCABLE_DS_TEST_NATS naming the NATS cluster (scripts/test starts one). In cluster mode
 * each server gets its own JetStream stream, named after its working directory, so a restart
 * on the same directory finds its history again.
 */
export const ENGINE = process.env.ANYCABLE_DS_TEST_ENGINE || "sled";

function engineArgs(cwd) {
  if (ENGINE === "sled") return [];
  if (ENGINE !== "nats") throw new Error(`ANYCABLE_DS_TEST_ENGINE=${ENGINE}: use sled or nats`);
  const servers = process.env.ANYCABLE_DS_TEST_NATS;
  if (!servers) throw new Error("ANYCABLE_DS_TEST_ENGINE=nats needs ANYCABLE_DS_TEST_NATS=<nats urls> (scripts/test starts a cluster)");
  const name = `E${cwd.split("/").pop().replace(/[^A-Za-z0-9]/g, "")}`;
  return ["--broker", "nats", "--nats_servers", servers, "--nats_stream", name];
}

/** A fresh temporary directory (the server's working directory and data parent). */
export function tempDir() {
  return mkdtemp(join(tmpdir(), "anycable-ds-e2e-"));
}

export async function removeDir(dir) {
  await rm(dir, { recursive: true, force: true });
}

/** The environment without variables that would change the server's configuration. */
function cleanEnv() {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith("ANYCABLE_") || k === "RUST_LOG" || k === "PORT") continue;
    env[k] = v;
  }
  return env;
}

/**
 * Starts the server. `dir` is its working directory (data lives in `dir/data`); without it a
 * new temporary directory is made and removed again by `stop()`. `args` are extra flags (not
 * --host, --port, --data_dir, --secret or --broadcast_key, which the harness sets). Everything
 * else runs with the defaults a user gets, retention included (history_limit 100, history_ttl
 * 300 s): a test that needs another setting passes it in `args` and says why. `port` 0
 * (default) picks a free one.
 */
export async function startServer({ dir, args = [], port = 0 } = {}) {
  if (!existsSync(BIN)) {
    throw new Error(
      `anycable-ds binary not found at ${BIN}: build it with \`cargo build --release\` or set ANYCABLE_DS_BIN`,
    );
  }
  const ownDir = !dir;
  const cwd = dir ?? (await tempDir());
  const dataDir = join(cwd, "data");
  const argv = [
    "--host", "127.0.0.1",
    "--port", String(port),
    "--data_dir", dataDir,
    "--secret", SECRET,
    "--broadcast_key", BROADCAST_KEY,
    ...engineArgs(cwd),
    ...args,
  ];
  const child = spawn(BIN, argv, { cwd, env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);

  const logs = [];
  const exited = new Promise((resolveExit) => {
    child.on("exit", (code, signal) => {
      children.delete(child);
      resolveExit({ code, signal });
    });
  });

  // Drain both pipes for the whole life of the process, so it never blocks on a full pipe.
  child.stdout.on("data", () => {});
  let buffer = "";
  let onLine = () => {};
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (chunk) => {
    buffer += chunk;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      logs.push(line);
      if (logs.length > 500) logs.shift();
      onLine(line);
    }
  });

  let url;
  try {
    url = await new Promise((resolveReady, rejectReady) => {
      const timer = setTimeout(
        () => rejectReady(new Error(`no "Listening on" line within ${READY_TIMEOUT_MS} ms`)),
        READY_TIMEOUT_MS,
      );
      onLine = (line) => {
        const m = /Listening on (http:\/\/\S+)/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolveReady(m[1].replace(/\/$/, ""));
        }
      };
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        rejectReady(new Error(`server exited before it was ready (code ${code}, signal ${signal})`));
      });
    });
  } catch (err) {
    child.kill("SIGKILL");
    await exited;
    if (ownDir) await removeDir(cwd);
    err.message += `\n  ${BIN} ${argv.join(" ")}\n  log:\n${logs.join("\n")}`;
    throw err;
  } finally {
    onLine = () => {};
  }

  let stopped = null;
  const server = {
    url,
    port: Number(new URL(url).port),
    dir: cwd,
    dataDir,
    args: argv,
    broadcastUrl: `${url}/_broadcast`,
    /** URL of a stream for the Durable Streams client. */
    streamUrl: (name) => `${url}/ds/${name}`,
    logs: () => logs.join("\n"),
    exited,
    /**
     * Stops the server: SIGTERM (graceful) by default, SIGKILL after a timeout or when asked.
     * Removes its temporary directory if the harness made it. Returns { code, signal }.
     */
    stop(signal = "SIGTERM") {
      if (!stopped) {
        stopped = (async () => {
          if (child.exitCode === null && child.signalCode === null) child.kill(signal);
          const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
          const result = await exited;
          clearTimeout(timer);
          if (ownDir) await removeDir(cwd);
          return result;
        })();
      }
      return stopped;
    },
    /** The Prometheus metrics as a map name → number (unlabelled series only). */
    async metrics() {
      const res = await fetch(`${url}/metrics`);
      const text = await res.text();
      const out = {};
      for (const line of text.split("\n")) {
        const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$/.exec(line);
        if (m) out[m[1]] = Number(m[2]);
      }
      return out;
    },
    /** Polls /metrics until `predicate(value of name)` holds. */
    async waitForMetric(name, predicate, { timeout = 5_000, signal } = {}) {
      const deadline = Date.now() + timeout;
      let last;
      for (;;) {
        signal?.throwIfAborted();
        last = (await server.metrics())[name];
        if (predicate(last)) return last;
        if (Date.now() > deadline) {
          throw new Error(`metric ${name} did not reach the expected value within ${timeout} ms (last: ${last})`);
        }
        await sleep(20);
      }
    },
  };
  return server;
}

/**
 * A promise with its resolve/reject exposed, plus a timeout that rejects it with `what`
 * so a test waiting on an event fails with a clear message instead of hanging.
 */
export function deferred(what, timeoutMs) {
  let resolveFn;
  let rejectFn;
  const promise = new Promise((res, rej) => {
    resolveFn = res;
    rejectFn = rej;
  });
  const timer = setTimeout(() => rejectFn(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  timer.unref();
  promise.then(() => clearTimeout(timer), () => clearTimeout(timer));
  return { promise, resolve: resolveFn, reject: rejectFn };
}

/** A `fetch` that counts the requests the client makes (to check it does not retry). */
export function countingFetch() {
  const requests = [];
  const f = (input, init) => {
    requests.push({ url: String(input instanceof Request ? input.url : input), method: init?.method ?? "GET" });
    return fetch(input, init);
  };
  f.requests = requests;
  return f;
}

/** `promise`, or a rejection naming `what` after `ms` ms (the timer does not keep Node alive). */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    timer.unref();
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * An AbortController that is also aborted when the test ends (passed, failed or timed out:
 * node:test aborts `t.signal` then), so a client session never outlives its test.
 */
export function linkedController(t) {
  const controller = new AbortController();
  if (t.signal.aborted) controller.abort(t.signal.reason);
  else t.signal.addEventListener("abort", () => controller.abort(t.signal.reason), { once: true });
  return controller;
}
