//! The answers of an auth provider (forward auth, introspection), kept for a while:
//! a bounded map keyed by SHA-256 of the credential (never the credential itself), each
//! answer with its own end, the oldest evicted first; identical checks in flight at once
//! make one request (single flight, bounded, cancellation-safe): its answer, a failure
//! included, is every waiter's, so a provider that times out costs each of N identical
//! checks one `timeout`, not N of them one after another. Failures are never kept.

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

/// What the identical checks in flight share: the one answer, once it is in.
type Shared<V, E> = Arc<tokio::sync::OnceCell<Result<V, E>>>;

/// A bounded cache of answers with single flight per key.
pub(crate) struct AnswerCache<V, E = super::forward::Unanswered> {
    entries: Mutex<Entries<V>>,
    in_flight: Mutex<HashMap<Key, Shared<V, E>>>,
}

impl<V, E> Default for AnswerCache<V, E> {
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

impl<V: Clone, E: Clone> AnswerCache<V, E> {
    /// The answer for `key`, from the cache while it lasts, else from `ask`, once for
    /// identical checks in flight: the others wait for that one answer, a failure
    /// included (if the check that asks is cancelled, a waiter asks instead). `keep`
    /// says until when an answer may be reused (`None`: not at all; identical checks in
    /// flight still share it). The flag: whether this check made no request of its own
    /// (a kept answer, or one shared in flight).
    pub(crate) async fn get_or_ask<Fut>(
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
        let asked = std::sync::atomic::AtomicBool::new(false);
        let ask_and_keep = || async {
            asked.store(true, std::sync::atomic::Ordering::Relaxed);
            let answer = ask().await;
            if let Ok(v) = &answer
                && let Some(until) = keep(v)
            {
                self.store(key, v.clone(), until);
            }
            answer
        };
        let Some(flight) = Flight::join(self, key) else {
            return (ask_and_keep().await, false);
        };
        let answer = flight.shared.get_or_init(ask_and_keep).await.clone();
        (answer, !asked.load(std::sync::atomic::Ordering::Relaxed))
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

/// A place among the identical checks in flight; leaving it (even by cancellation)
/// removes their shared answer once nobody else is there, so a later check asks anew.
struct Flight<'a, V, E> {
    cache: &'a AnswerCache<V, E>,
    key: Key,
    shared: Shared<V, E>,
}

impl<'a, V, E> Flight<'a, V, E> {
    /// `None` when too many distinct checks are in flight (this one asks alone).
    fn join(cache: &'a AnswerCache<V, E>, key: Key) -> Option<Flight<'a, V, E>> {
        let mut m = lock(&cache.in_flight);
        if m.len() >= MAX_IN_FLIGHT && !m.contains_key(&key) {
            return None;
        }
        let shared = m.entry(key).or_default().clone();
        Some(Flight { cache, key, shared })
    }
}

impl<V, E> Drop for Flight<'_, V, E> {
    fn drop(&mut self) {
        let mut m = lock(&self.cache.in_flight);
        // The map's and ours: nobody else waits.
        if Arc::strong_count(&self.shared) <= 2 {
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
        let c = AnswerCache::<u8, ()>::default();
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

    type Shared = Arc<AnswerCache<u8, &'static str>>;

    /// `n` identical checks at once on `key`, each of whose requests would take `delay`
    /// and answer `answer`, kept until `keep`: what each got (with its no-request flag),
    /// and how many requests were made.
    async fn at_once(
        c: &Shared,
        n: usize,
        delay: Duration,
        answer: Result<u8, &'static str>,
        keep: Option<Instant>,
    ) -> (Vec<(Result<u8, &'static str>, bool)>, usize) {
        let asked = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (c, asked) = (c.clone(), asked.clone());
            tasks.push(tokio::spawn(async move {
                let ask = || async {
                    asked.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    answer
                };
                c.get_or_ask(key(1), ask, |_| keep).await
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        (got, asked.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn identical_checks_in_flight_share_one_failure_in_one_timeout() {
        let c = Shared::default();
        let t0 = tokio::time::Instant::now();
        let (got, asked) = at_once(&c, 8, Duration::from_millis(200), Err("timeout"), None).await;
        assert!(got.iter().all(|(r, _)| *r == Err("timeout")));
        assert_eq!(asked, 1, "one request for all");
        assert_eq!(got.iter().filter(|(_, shared)| *shared).count(), 7);
        assert!(
            t0.elapsed() < Duration::from_millis(600),
            "one timeout, not eight in a row: {:?}",
            t0.elapsed()
        );
        assert!(lock(&c.in_flight).is_empty(), "no line left behind");
        // Later checks ask anew: a failure is never kept.
        let (r, _) = c.get_or_ask(key(1), || async { Ok(3) }, |_| None).await;
        assert_eq!(r, Ok(3));
    }

    #[tokio::test]
    async fn a_cancelled_asker_leaves_the_answer_to_a_waiter() {
        let c = Arc::new(AnswerCache::<u8, ()>::default());
        let first = {
            let c = c.clone();
            tokio::spawn(async move { c.get_or_ask(key(5), std::future::pending::<Result<u8, ()>>, |_| None).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = {
            let c = c.clone();
            tokio::spawn(async move { c.get_or_ask(key(5), || async { Ok(9) }, |_| None).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let (r, no_request) = tokio::time::timeout(Duration::from_secs(2), second).await.unwrap().unwrap();
        assert_eq!((r, no_request), (Ok(9), false));
    }

    #[tokio::test]
    async fn identical_checks_in_flight_ask_once_and_failures_are_not_kept() {
        let c = Shared::default();
        let later = Instant::now() + Duration::from_secs(60);
        let (got, asked) = at_once(&c, 8, Duration::from_millis(20), Ok(7), Some(later)).await;
        assert!(got.iter().all(|(r, _)| *r == Ok(7)));
        assert_eq!(asked, 1);
        let (r, hit) = c.get_or_ask(key(2), || async { Err::<u8, _>("down") }, |_| Some(later)).await;
        assert!(r.is_err() && !hit);
        assert_eq!(c.get(&key(2)), None);
        assert!(lock(&c.in_flight).is_empty(), "no line left behind");
    }
}
