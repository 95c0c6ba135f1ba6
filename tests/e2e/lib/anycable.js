// The real `broadcaster` and `identificator` of @anycable/serverless-js 0.1.0, unchanged.
//
// `import "@anycable/serverless-js"` fails in plain Node ESM: its dist/index.js re-exports
// from extensionless directories ('./rpc', './broadcast', ...), which Node rejects with
// ERR_UNSUPPORTED_DIR_IMPORT, and its package.json `exports` has only ".", so subpaths such
// as "@anycable/serverless-js/dist/broadcast/index.js" are blocked (ERR_PACKAGE_PATH_NOT_EXPORTED).
// The two modules we need, dist/broadcast/index.js and dist/jwt/index.js, are plain ESM with no
// relative imports (jwt imports only the "jose" package), so we locate the package's entry file
// with require.resolve (which honours `exports` but does not load the file) and import those
// two files by absolute file URL.
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(import.meta.url);
const dist = dirname(require.resolve("@anycable/serverless-js")); // .../serverless-js/dist/index.js

export const { broadcaster } = await import(pathToFileURL(join(dist, "broadcast", "index.js")).href);
export const { identificator } = await import(pathToFileURL(join(dist, "jwt", "index.js")).href);
