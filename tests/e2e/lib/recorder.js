// Records the batches a `subscribeJson` subscriber gets and lets a test await a condition on
// them (an event), failing with a clear message on timeout or when the session errors.
import { deferred } from "./server.js";

export function batchRecorder() {
  const batches = [];
  const items = [];
  let waiters = [];
  let failure = null;

  const check = () => {
    waiters = waiters.filter((w) => {
      if (failure) {
        w.reject(failure);
        return false;
      }
      if (w.predicate()) {
        w.resolve();
        return false;
      }
      return true;
    });
  };

  return {
    batches,
    items,
    /** The subscriber to pass to `subscribeJson`. */
    onBatch(batch) {
      batches.push(batch);
      items.push(...batch.items);
      check();
    },
    /** Fails every pending and future wait (e.g. from `res.closed.catch(...)`). */
    fail(err) {
      failure = err instanceof Error ? err : new Error(String(err));
      check();
    },
    /** Resolves once `predicate()` holds after some batch; rejects after `timeout` ms. */
    until(predicate, what, timeout = 10_000) {
      if (failure) return Promise.reject(failure);
      if (predicate()) return Promise.resolve();
      const d = deferred(what, timeout);
      waiters.push({ predicate, resolve: d.resolve, reject: d.reject });
      return d.promise;
    },
  };
}

/**
 * Subscribes to a DS client response with a recorder. A session that ends with an error fails
 * the recorder's waits at once; one that ends without being cancelled is reported too.
 */
export function record(res) {
  const rec = batchRecorder();
  rec.ended = false;
  res.subscribeJson((batch) => rec.onBatch(batch));
  res.closed.then(
    () => {
      rec.ended = true;
    },
    (err) => {
      rec.ended = true;
      rec.fail(err);
    },
  );
  return rec;
}
