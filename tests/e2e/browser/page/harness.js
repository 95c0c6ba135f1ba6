// Runs inside Chromium, on the page origin (not the DS server's origin). The Node test drives
// it through Playwright's page.evaluate / page.waitForFunction; every function here returns
// plain data (results or described errors), never throws across that boundary.
import { stream, FetchError, BackoffDefaults } from "@durable-streams/client";

/** An error as plain data: what the page could see of it. */
function describe(err) {
  return {
    name: err?.name ?? typeof err,
    message: String(err?.message ?? err),
    fetchError: err instanceof FetchError,
    status: err?.status ?? null,
    json: err?.json ?? null,
  };
}

function options({ url, offset = "-1", live = false, headers, params, maxRetries, signal, credentials }) {
  return {
    url,
    offset,
    live,
    json: true,
    headers,
    params,
    signal,
    warnOnHttp: false,
    // The client retries network errors forever by default; a CORS refusal is one.
    backoffOptions: maxRetries === undefined ? undefined : { ...BackoffDefaults, maxRetries },
    // `credentials: "include"`: the client's requests carry the page's cookies cross-origin
    // (the client has no such option; its `fetch` option is the way in).
    ...(credentials ? { fetch: (input, init) => fetch(input, { ...init, credentials }) } : {}),
  };
}

const subscriptions = {};
const eventSources = {};

window.ds = {
  /** One read with the official client: `json()` of `stream()` (live: false by default). */
  async read(opts) {
    try {
      const res = await stream(options(opts));
      const items = await res.json();
      return { ok: true, items, offset: res.offset, upToDate: res.upToDate, cursor: res.cursor ?? null };
    } catch (err) {
      return { ok: false, error: describe(err) };
    }
  },

  /**
   * A plain `fetch` (default cache mode: the browser's HTTP cache is in play; `credentials`
   * as fetch's, e.g. "include" to send the page's cookies cross-origin).
   */
  async fetch(url, { headers, cache, credentials } = {}) {
    try {
      const res = await fetch(url, { headers, cache, credentials });
      const text = await res.text();
      let body = text;
      try {
        body = JSON.parse(text);
      } catch {}
      // Only what CORS lets the page see: safelisted and exposed headers.
      return { ok: true, status: res.status, headers: Object.fromEntries(res.headers), body };
    } catch (err) {
      return { ok: false, error: describe(err) };
    }
  },

  /** Starts a live subscription (`live`: "long-poll" or "sse") with the official client. */
  subscribe(id, opts) {
    const controller = new AbortController();
    const state = { items: [], batches: [], error: null, ended: false, cancelled: false, controller };
    subscriptions[id] = state;
    stream(options({ ...opts, signal: controller.signal })).then(
      (res) => {
        res.subscribeJson((batch) => {
          state.batches.push({ count: batch.items.length, offset: batch.offset, upToDate: batch.upToDate });
          state.items.push(...batch.items);
        });
        res.closed.then(
          () => (state.ended = true),
          (err) => {
            state.ended = true;
            if (!state.cancelled) state.error = describe(err);
          },
        );
      },
      (err) => {
        state.ended = true;
        state.error = describe(err);
      },
    );
  },

  /** The subscription's state as plain data; `check` fails (throws) if it errored. */
  subscription(id, { check = false } = {}) {
    const { items, batches, error, ended } = subscriptions[id];
    if (check && error) throw new Error(`subscription ${id} failed: ${JSON.stringify(error)}`);
    return { items, batches, error, ended };
  },

  cancel(id) {
    const state = subscriptions[id];
    state.cancelled = true;
    state.controller.abort();
  },

  /**
   * Opens a native EventSource and records its `data` events, opens and errors. `init` is
   * EventSource's, e.g. { withCredentials: true } to send the page's cookies cross-origin.
   */
  eventSource(id, url, init) {
    const es = new EventSource(url, init);
    const state = { es, messages: [], ids: [], events: 0, opens: 0, errors: 0, controls: 0, log: [] };
    eventSources[id] = state;
    es.addEventListener("open", () => {
      state.opens++;
      state.log.push(`open ${state.opens}`);
    });
    es.addEventListener("error", () => {
      state.errors++;
      state.log.push(`error ${state.errors} (readyState ${es.readyState})`);
    });
    es.addEventListener("data", (e) => {
      state.events++;
      state.ids.push(e.lastEventId);
      try {
        state.messages.push(...JSON.parse(e.data));
      } catch (err) {
        state.log.push(`bad data event ${JSON.stringify(e.data)}: ${err}`);
        state.messages.push({ unparsable: e.data });
      }
    });
    es.addEventListener("control", () => state.controls++);
  },

  /**
   * The EventSource's record as plain data (readyState 2 = CLOSED: given up for good); `check`
   * throws once it is closed, so a wait on it fails at once instead of timing out.
   */
  eventSourceState(id, { check = false } = {}) {
    const { es, messages, ids, events, opens, errors, controls, log } = eventSources[id];
    if (check && es.readyState === EventSource.CLOSED) throw new Error(`EventSource ${id} gave up: ${log.join("; ")}`);
    return { readyState: es.readyState, messages, ids, events, opens, errors, controls, log };
  },

  closeEventSource(id) {
    eventSources[id].es.close();
  },
};
window.dsReady = true;
