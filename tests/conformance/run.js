// Runs the official conformance suite against the release binary and compares the per-test
// results with the checked-in list of expected failures (expected-failures.txt, and
// expected-failures-nats.txt in cluster mode): an unlisted failure, or a listed test that passes, fails the run, so the
// list can only shrink. `node run.js --update` rewrites the list instead.
//
// The server runs as the suite assumes (WRITE.md §8): streams under /v1/stream, no
// authentication, unlimited retention, a 1 s long-poll timeout. ANYCABLE_DS_TEST_ENGINE=nats
// with ANYCABLE_DS_TEST_NATS puts it on a NATS JetStream cluster (scripts/test starts one).
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.ANYCABLE_DS_BIN || resolve(here, "..", "..", "target", "release", "anycable-ds");
const ENGINE = process.env.ANYCABLE_DS_TEST_ENGINE || "sled";
// Both engines pass and fail the same tests: one list.
// One list per engine while cluster mode lacks idempotent producers (issue 21); they converge.
const LIST = join(here, ENGINE === "sled" ? "expected-failures.txt" : `expected-failures-${ENGINE}.txt`);
/** Tests the suite runs with `subscriptions: true` (332 without). */
const EXPECTED_TESTS = 338;
const update = process.argv.includes("--update");

function engineArgs(dir) {
  if (ENGINE === "sled") return [];
  if (ENGINE !== "nats") throw new Error(`ANYCABLE_DS_TEST_ENGINE=${ENGINE}: use sled or nats`);
  const servers = process.env.ANYCABLE_DS_TEST_NATS;
  if (!servers) throw new Error("ANYCABLE_DS_TEST_ENGINE=nats needs ANYCABLE_DS_TEST_NATS=<nats urls>");
  return ["--broker", "nats", "--nats_servers", servers, "--nats_stream", `C${dir.split("/").pop().replace(/[^A-Za-z0-9]/g, "")}`];
}

/** Starts the server; resolves with its base URL and the child process. */
function startServer(dir) {
  if (!existsSync(BIN)) throw new Error(`no binary at ${BIN}: cargo build --release (or set ANYCABLE_DS_BIN)`);
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("ANYCABLE_") && k !== "PORT"));
  const args = [
    "--host", "127.0.0.1", "--port", "0", "--data_dir", join(dir, "data"),
    "--ds_path", "/v1/stream", "--public_streams",
    "--history_limit", "0", "--history_ttl", "0",
    "--ds_poll_interval", "1",
    // The protocol's behaviour: a stream that was never created (or is gone) is a 404.
    "--ds_implicit_streams", "false",
    // The subscription tests' webhook receivers listen on 127.0.0.1.
    "--ds_webhooks_allow_loopback",
    ...engineArgs(dir),
  ];
  const child = spawn(BIN, args, { cwd: dir, env, stdio: ["ignore", "ignore", "pipe"] });
  const logs = [];
  return new Promise((resolveReady, rejectReady) => {
    const timer = setTimeout(() => rejectReady(new Error(`server did not start:\n${logs.join("\n")}`)), 20_000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      for (const line of chunk.split("\n")) {
        if (logs.length < 200) logs.push(line);
        const m = /Listening on (http:\/\/\S+)/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolveReady({ url: m[1].replace(/\/$/, ""), child });
        }
      }
    });
    child.on("exit", (code) => rejectReady(new Error(`server exited (${code}):\n${logs.join("\n")}`)));
  });
}

function readList() {
  if (!existsSync(LIST)) return [];
  return readFileSync(LIST, "utf8").split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
}

const dir = mkdtempSync(join(tmpdir(), "anycable-ds-conformance-"));
const { url, child } = await startServer(dir);
const results = join(dir, "results.json");
let code = 1;
try {
  const vitest = spawnSync(
    join(here, "node_modules", ".bin", "vitest"),
    ["run", "conformance.test.js", "--reporter=json", `--outputFile=${results}`],
    { cwd: here, env: { ...process.env, CONFORMANCE_BASE_URL: url }, stdio: ["ignore", "ignore", "inherit"] },
  );
  if (!existsSync(results)) throw new Error(`vitest wrote no results (exit ${vitest.status})`);
  const report = JSON.parse(readFileSync(results, "utf8"));
  const tests = report.testResults.flatMap((file) => file.assertionResults).filter((t) => !["skipped", "pending", "todo"].includes(t.status));
  const failed = tests.filter((t) => t.status !== "passed").map((t) => t.fullName).sort();
  console.log(`conformance (${ENGINE}): ${tests.length - failed.length} of ${tests.length} passed`);
  if (tests.length !== EXPECTED_TESTS) {
    console.error(`expected ${EXPECTED_TESTS} tests, the suite ran ${tests.length}`);
  } else if (update) {
    writeFileSync(
      LIST,
      `# Conformance tests expected to fail, on both engines (tests/conformance/run.js).\n` +
        `# One full test name per line; the list may only shrink.\n${failed.join("\n")}\n`,
    );
    console.log(`wrote ${failed.length} expected failures to ${LIST}`);
    code = 0;
  } else {
    const expected = new Set(readList());
    const unexpected = failed.filter((name) => !expected.has(name));
    const passing = [...expected].filter((name) => !failed.includes(name));
    for (const name of unexpected) console.error(`FAILED, not in the list: ${name}`);
    for (const name of passing) console.error(`PASSED, remove it from the list: ${name}`);
    code = unexpected.length || passing.length ? 1 : 0;
  }
} finally {
  child.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
}
process.exit(code);
