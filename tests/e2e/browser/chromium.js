// Launches Debian's Chromium (/usr/bin/chromium, package `chromium`) through playwright-core,
// headless, with a fresh profile directory and its HTTP cache ON (what the cache tests are
// about). Playwright never downloads a browser here: it drives the system one.
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.E2E_CHROMIUM || "/usr/bin/chromium";

// --disable-background-networking etc.: this machine's network is closed, and Chromium's own
// background connections would otherwise fail (many at a time) on every start.
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * Starts Chromium with a new, empty --user-data-dir (Playwright's persistent context: a real
 * on-disk profile, disk cache included). Resolves to { context, version, close() }. Throws (so
 * the tests fail, never skip) when Chromium is missing or does not start.
 */
export async function launchChromium() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `Chromium not found at ${CHROMIUM}: install Debian's package (apt-get install chromium; ` +
        `./scripts/test does it when run as root) or set E2E_CHROMIUM`,
    );
  }
  const profile = await mkdtemp(join(tmpdir(), "anycable-ds-chromium-"));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ARGS,
      timeout: 30_000,
    });
  } catch (err) {
    await rm(profile, { recursive: true, force: true });
    throw err;
  }
  return {
    context,
    version: context.browser()?.version() ?? "unknown",
    async close() {
      await context.close().catch(() => {});
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/**
 * Opens the test page in a new tab and waits for its harness (window.ds). Page errors and
 * console messages are kept in `page.diagnostics` for failure messages.
 */
export async function openPage(browser, url) {
  const page = await browser.context.newPage();
  const diagnostics = [];
  page.on("pageerror", (err) => diagnostics.push(`pageerror: ${err.message}`));
  page.on("console", (msg) => diagnostics.push(`console.${msg.type()}: ${msg.text()}`));
  page.on("requestfailed", (req) => diagnostics.push(`requestfailed: ${req.url()} ${req.failure()?.errorText}`));
  page.diagnostics = diagnostics;
  await page.goto(url);
  try {
    await page.waitForFunction(() => window.dsReady === true, null, { timeout: 10_000 });
  } catch (err) {
    err.message += `\n  page diagnostics:\n  ${diagnostics.join("\n  ")}`;
    throw err;
  }
  return page;
}

/** How long the page-side waits of the browser suites wait. */
export const WAIT_MS = 10_000;

/**
 * Waits in the page until `fn(arg)` returns something truthy (evaluated every 20 ms, an event
 * poll, not a sleep); `fn` may throw to fail at once. On timeout the error names `what` and
 * carries the page's console and errors.
 */
export async function until(page, fn, arg, what, timeout = WAIT_MS) {
  try {
    return await (await page.waitForFunction(fn, arg, { timeout, polling: 20 })).jsonValue();
  } catch (err) {
    err.message = `waiting for ${what}: ${err.message}\n  page diagnostics:\n  ${page.diagnostics.slice(-30).join("\n  ")}`;
    throw err;
  }
}

/** Resolves with the headers of the next network response (as Chromium got it) for `url`. */
export function nextResponseHeaders(page, url) {
  return page
    .waitForResponse((res) => res.url() === url && res.request().method() === "GET", { timeout: WAIT_MS })
    .then((res) => res.allHeaders());
}
