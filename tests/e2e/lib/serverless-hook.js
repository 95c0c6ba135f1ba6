// A module resolve hook (registered by lib/rpc-app.js with node:module's `register()`) that
// lets plain Node ESM load @anycable/serverless-js 0.1.0 as published, through its own entry
// point, without patching it.
//
// The package's dist files import their siblings as extensionless directories
// (`export { Status } from './rpc'`, `import { Status } from '../rpc'`), which a bundler or
// TypeScript resolves to './rpc/index.js' but Node's ESM resolver refuses
// (ERR_UNSUPPORTED_DIR_IMPORT). For relative specifiers without an extension imported by a file
// inside that package's dist directory (and only there), this hook adds '/index.js', as those
// tools do. Every other import resolves as usual.

let dist = null; // file URL of .../@anycable/serverless-js/dist/, ending in "/"

export async function initialize(data) {
  dist = data.dist;
}

const RELATIVE_WITHOUT_EXTENSION = /^\.{1,2}\/(?:[^/]+\/)*[^/.]+$/;

export async function resolve(specifier, context, nextResolve) {
  if (dist && context.parentURL?.startsWith(dist) && RELATIVE_WITHOUT_EXTENSION.test(specifier)) {
    return nextResolve(`${specifier}/index.js`, context);
  }
  return nextResolve(specifier, context);
}
