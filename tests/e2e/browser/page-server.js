// Serves the browser test page from its own origin (http://127.0.0.1:<its port>), a different
// origin from the DS server's (same host, another port), so every read the page makes is a
// cross-origin request subject to CORS.
//
// The official @durable-streams/client is served unchanged from node_modules: its ESM build
// (dist/index.js) is one self-contained module without imports, so an import map in the page
// maps the bare specifier "@durable-streams/client" to it and no bundler is needed.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
// The "import" condition: .../@durable-streams/client/dist/index.js (ESM).
const CLIENT = fileURLToPath(import.meta.resolve("@durable-streams/client"));

const FILES = {
  "/": { path: join(here, "page", "index.html"), type: "text/html; charset=utf-8" },
  "/harness.js": { path: join(here, "page", "harness.js"), type: "text/javascript; charset=utf-8" },
  "/vendor/durable-streams-client.js": { path: CLIENT, type: "text/javascript; charset=utf-8" },
};

/** Starts the page server on a free port; resolves to { origin, url, close() }. */
export async function startPageServer() {
  // Fail early and clearly if the client grew imports that the import map cannot satisfy.
  const client = await readFile(CLIENT, "utf8");
  if (/^\s*(import\s[^(]|export\s.*\sfrom\s)/m.test(client)) {
    throw new Error(`${CLIENT} imports other modules now: bundle it (e.g. esbuild) instead of serving it as is`);
  }
  const server = createServer(async (req, res) => {
    const file = FILES[new URL(req.url, "http://x").pathname];
    if (req.method !== "GET" || !file) {
      res.writeHead(404, { "Cache-Control": "no-store" }).end();
      return;
    }
    try {
      const body = await readFile(file.path);
      res.writeHead(200, { "Content-Type": file.type, "Cache-Control": "no-store" }).end(body);
    } catch (err) {
      res.writeHead(500, { "Content-Type": "text/plain" }).end(String(err));
    }
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const origin = `http://127.0.0.1:${server.address().port}`;
  return {
    origin,
    url: `${origin}/`,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
