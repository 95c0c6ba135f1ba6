// The official Durable Streams conformance suite (@durable-streams/server-conformance-tests),
// against the server that run.js started. Its own command finds no test files under vitest 4
// (it hands vitest a file under node_modules), so its exported runner is called from here
// (WRITE.md §8).
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

const baseUrl = process.env.CONFORMANCE_BASE_URL;
if (!baseUrl) throw new Error("CONFORMANCE_BASE_URL is not set: run the suite with `npm test` (run.js)");

runConformanceTests({
  baseUrl,
  // The server's long-poll timeout is 1 s (--ds_poll_interval 1): within this budget.
  longPollTimeoutMs: 2000,
  // The reserved subscription API (WRITE.md §6): 6 more tests, 338 in all.
  subscriptions: true,
});
