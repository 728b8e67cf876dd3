//! The answers of an auth provider (forward auth, introspection), kept for a while:
//! a bounded map keyed by SHA-256 of the credential (never the credential itself), each
//! answer with its own end, the oldest evicted first; identical checks in flight at once
//! make one request (single flight, bounded, cancellation-safe). Failures are never kept.

use crate::util::lock;
use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex},
    time::Instant,
};

/// SHA-256 of what identifies one check.
pub(crate) type Key = [u8; 32];

/// Answers kept at most (the oldest go first).
pub(crate) const MAX_CACHED: usize = 10_000;
/// Distinct checks in flight that share one request; beyond this each asks on its own.
const MAX_IN_FLIGHT: usize = 10_000;

/// SHA-256 of `parts`, each length-prefixed (no two lists of parts share a key).
pub(crate) fn key_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Key {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

struct Entries<V> {
    map: HashMap<Key, (Instant, V)>,
    /// Insertion order: (key, its end), for evicting the oldest.
    order: VecDeque<(Key, Instant)>,
}

/// A bounded cache of answers with single flight per key.
pub(crate) struct AnswerCache<V> {
    entries: Mutex<Entries<V>>,
    in_flight: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl<V> Default for AnswerCache<V> {
    fn default() -> Self {
        AnswerCache {
            entries: Mutex::new(Entries {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone> AnswerCache<V> {
    /// The answer for `key`, from the cache while it lasts, else from `ask` (once for
    /// identical checks in flight; the others wait and read what it stored). `keep`
    /// says until when an answer may be reused (`None`: not at all). The flag: whether
    /// the answer came from the cache.
    pub(crate) async fn get_or_ask<E, Fut>(
        &self,
        key: Key,
        ask: impl FnOnce() -> Fut,
        keep: impl FnOnce(&V) -> Option<Instant>,
    ) -> (Result<V, E>, bool)
    where
        Fut: Future<Output = Result<V, E>>,
    {
        if let Some(v) = self.get(&key) {
            return (Ok(v), true);
        }
        let flight = Flight::join(self, key);
        let _turn = match &flight {
            Some(f) => Some(f.gate.lock().await),
            None => None,
        };
        if let Some(v) = self.get(&key) {
            return (Ok(v), true);
        }
        let answer = ask().await;
        if let Ok(v) = &answer
            && let Some(until) = keep(v)
        {
            self.store(key, v.clone(), until);
        }
        (answer, false)
    }

    /// The answer kept for `key`, while it lasts.
    pub(crate) fn get(&self, key: &Key) -> Option<V> {
        let mut e = lock(&self.entries);
        match e.map.get(key) {
            Some((until, v)) if Instant::now() < *until => Some(v.clone()),
            Some(_) => {
                e.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keep `value` for `key` until `until` (an end already past keeps nothing).
    pub(crate) fn store(&self, key: Key, value: V, until: Instant) {
        if until <= Instant::now() {
            return;
        }
        let mut e = lock(&self.entries);
        while e.map.len() >= MAX_CACHED || e.order.len() >= 2 * MAX_CACHED {
            let Some((old, end)) = e.order.pop_front() else { break };
            // Only the entry this order record is about (a key stored again is newer).
            if e.map.get(&old).is_some_and(|(u, _)| *u == end) {
                e.map.remove(&old);
            }
        }
        e.map.insert(key, (until, value));
        e.order.push_back((key, until));
    }

    #[cfg(test)]
    pub(crate) fn sizes(&self) -> (usize, usize) {
        let e = lock(&self.entries);
        (e.map.len(), e.order.len())
    }
}

/// A place in the line of identical checks; leaving it (even by cancellation) removes
/// the line once nobody else is in it.
struct Flight<'a, V> {
    cache: &'a AnswerCache<V>,
    key: Key,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a, V> Flight<'a, V> {
    /// `None` when too many distinct checks are in flight (this one asks alone).
    fn join(cache: &'a AnswerCache<V>, key: Key) -> Option<Flight<'a, V>> {
        let mut m = lock(&cache.in_flight);
        if m.len() >= MAX_IN_FLIGHT && !m.contains_key(&key) {
            return None;
        }
        let gate = m.entry(key).or_default().clone();
        Some(Flight { cache, key, gate })
    }
}

impl<V> Drop for Flight<'_, V> {
    fn drop(&mut self) {
        let mut m = lock(&self.cache.in_flight);
        // The map's and ours: nobody else waits.
        if Arc::strong_count(&self.gate) <= 2 {
            m.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    fn key(i: usize) -> Key {
        key_of([(i as u64).to_be_bytes().as_slice()])
    }

    #[test]
    fn bounded_and_expiring() {
        let c = AnswerCache::<u8>::default();
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..(MAX_CACHED + 50) {
            c.store(key(i), 1, later);
        }
        let (map, order) = c.sizes();
        assert!(map <= MAX_CACHED && order <= 2 * MAX_CACHED);
        assert_eq!(c.get(&key(0)), None, "the oldest went first");
        assert_eq!(c.get(&key(MAX_CACHED + 49)), Some(1));
        c.store(key(1), 2, Instant::now());
        assert_eq!(c.get(&key(1)), None, "an end already past keeps nothing");
    }

    #[test]
    fn keys_of_different_parts_differ() {
        assert_ne!(key_of([b"ab".as_slice(), b"c"]), key_of([b"a".as_slice(), b"bc"]));
    }

    #[tokio::test]
    async fn identical_checks_in_flight_ask_once_and_failures_are_not_kept() {
        let c = Arc::new(AnswerCache::<u8>::default());
        let asked = Arc::new(AtomicUsize::new(0));
        let later = Instant::now() + Duration::from_secs(60);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, asked) = (c.clone(), asked.clone());
            tasks.push(tokio::spawn(async move {
                let ask = || async {
                    asked.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<u8, ()>(7)
                };
                c.get_or_ask(key(1), ask, |_| Some(later)).await.0
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(7));
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        let (r, hit) = c.get_or_ask(key(2), || async { Err::<u8, &str>("down") }, |_| Some(later)).await;
        assert!(r.is_err() && !hit);
        assert_eq!(c.get(&key(2)), None);
        assert!(lock(&c.in_flight).is_empty(), "no line left behind");
    }
}
