//! The optional cache of successful authentications (`rpc.cache_ttl`, off by default).
//!
//! Long-poll readers reconnect every `ds.poll_interval` and SSE readers every `ds.sse_ttl`;
//! each reconnect is otherwise one call to the application. With the cache on, a success is
//! reused for the same credentials for `cache_ttl` seconds.
//!
//! What it keeps: a keyed hash (HMAC-SHA256 under a random per-process key) of what the
//! application was shown, never the cookie itself, and the connection identifiers for logs.
//! Failures and errors are never cached: a rejected client asks again, and a client that was
//! refused while the application was down is not refused for longer than that.
//!
//! The key covers the proxied headers, `REMOTE_ADDR` and the request URL without the
//! parameters that change at every reconnect of one reader (`offset`, `live`, `cursor`): the
//! application may authenticate by a token in the URL or look at the stream's path, so those
//! stay in. The cost of the cache is the usual one: a session that ends in the application
//! (logout) still reads for at most `cache_ttl` seconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Env;

/// Most entries kept; a full cache first drops expired ones, then stops adding until some
/// expire (a burst of new sessions then simply asks the application, as without a cache).
const MAX_ENTRIES: usize = 100_000;
/// Query parameters that move at every reconnect and carry no credentials.
const VOLATILE_PARAMS: [&str; 3] = ["offset", "live", "cursor"];

pub type Key = [u8; 32];

pub struct Cache {
    ttl: Duration,
    key: [u8; 32],
    entries: Mutex<Entries>,
}

struct Entries {
    map: HashMap<Key, Entry>,
    last_sweep: Instant,
}

struct Entry {
    expires: Instant,
    identifiers: Option<String>,
}

impl Cache {
    pub fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            key: rand::random(),
            entries: Mutex::new(Entries { map: HashMap::new(), last_sweep: Instant::now() }),
        }
    }

    /// The cache key of what the application would be shown.
    pub fn key(&self, env: &Env) -> Key {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        let (path, query) = env.url.split_once('?').unwrap_or((&env.url, ""));
        mac.update(path.as_bytes());
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            if !VOLATILE_PARAMS.contains(&name) {
                // Length-prefixed, so no two different inputs hash the same bytes.
                mac.update(&(pair.len() as u64).to_be_bytes());
                mac.update(pair.as_bytes());
            }
        }
        mac.update(b"\0headers");
        for (name, value) in &env.headers {
            for part in [name, value] {
                mac.update(&(part.len() as u64).to_be_bytes());
                mac.update(part.as_bytes());
            }
        }
        mac.finalize().into_bytes().into()
    }

    /// A live success for `key`: `Some(identifiers)`.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Option<String>> {
        let mut entries = self.lock();
        match entries.map.get(key) {
            Some(entry) if entry.expires > now => Some(entry.identifiers.clone()),
            Some(_) => {
                entries.map.remove(key);
                crate::metrics::get().rpc_cache_entries.set(entries.map.len() as i64);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, key: Key, identifiers: Option<String>, now: Instant) {
        let mut entries = self.lock();
        if entries.map.len() >= MAX_ENTRIES && now.duration_since(entries.last_sweep) >= Duration::from_secs(1) {
            entries.map.retain(|_, entry| entry.expires > now);
            entries.last_sweep = now;
        }
        if entries.map.len() < MAX_ENTRIES || entries.map.contains_key(&key) {
            entries.map.insert(key, Entry { expires: now + self.ttl, identifiers });
        }
        crate::metrics::get().rpc_cache_entries.set(entries.map.len() as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters (entries are independent): keep using it.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env(url: &str, cookie: &str) -> Env {
        Env { url: url.into(), headers: BTreeMap::from([("cookie".to_string(), cookie.to_string())]), client: None }
    }

    #[test]
    fn key_ignores_the_reader_position_but_not_credentials_or_stream() {
        let cache = Cache::new(Duration::from_secs(60));
        let base = cache.key(&env("http://h/ds/a?offset=-1&live=sse", "s=1"));
        assert_eq!(base, cache.key(&env("http://h/ds/a?offset=000_17&live=sse&cursor=9", "s=1")));
        assert_ne!(base, cache.key(&env("http://h/ds/a?offset=-1&live=sse", "s=2")));
        assert_ne!(base, cache.key(&env("http://h/ds/b?offset=-1&live=sse", "s=1")));
        assert_ne!(base, cache.key(&env("http://h/ds/a?offset=-1&live=sse&token=x", "s=1")));
        // Another process (another random key) gives other keys: nothing to precompute.
        assert_ne!(base, Cache::new(Duration::from_secs(60)).key(&env("http://h/ds/a?offset=-1&live=sse", "s=1")));
    }

    #[test]
    fn entries_expire() {
        let cache = Cache::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let key = cache.key(&env("http://h/ds/a", "s=1"));
        assert_eq!(cache.get(&key, t0), None);
        cache.put(key, Some("{\"user\":1}".into()), t0);
        assert_eq!(cache.get(&key, t0 + Duration::from_secs(4)), Some(Some("{\"user\":1}".into())));
        assert_eq!(cache.get(&key, t0 + Duration::from_secs(5)), None);
    }
}
