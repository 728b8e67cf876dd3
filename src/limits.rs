//! Stage 3: per-IP admission limits, before TLS, with bounded memory.
//!
//! - new-connection rate per client IP: governor's keyed GCRA limiter;
//! - concurrent connections per client IP: a counted map whose entries disappear
//!   when their last connection ends;
//! - auth-failure bans per client IP.
//!
//! IPv6 clients are keyed by their `ipv6_prefix` so one host cannot rotate addresses
//! inside its /64 to escape limits. Every map is capped and pruned on a timer
//! ([`PerIp::prune`]): memory does not grow with the number of distinct clients.

use crate::config::{AdmissionLimits, Rate};
use crate::error::Reject;
use crate::util::lock;
use governor::{
    Quota, RateLimiter,
    clock::DefaultClock,
    nanos::Nanos,
    state::{StateStore, keyed::ShrinkableKeyedStateStore},
};
use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Distinct keys the rate limiter tracks at most. Past this, keys whose bucket is full
/// again are dropped first (free: they are as good as new); if that is not enough, the
/// coldest keys are evicted ([`EVICTION_BATCH`] at a time) and counted. Keys already
/// tracked are always served.
pub const MAX_TRACKED_KEYS: usize = 200_000;
/// Keys evicted at once when the rate limiter is full of live keys: a batch, so a flood
/// of new addresses costs one scan per batch, not one per connection.
pub const EVICTION_BATCH: usize = MAX_TRACKED_KEYS / 16;

/// A client identity for limits: the IPv4 address, or the IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpKey {
    V4(u32),
    V6(u128),
}

impl IpKey {
    /// The key as text, the same on every instance with the same `ipv6_prefix`.
    pub fn label(&self) -> String {
        match self {
            IpKey::V4(a) => format!("4:{a:08x}"),
            IpKey::V6(a) => format!("6:{a:032x}"),
        }
    }

    /// A key from its [`IpKey::label`] (from another instance or the state file).
    pub fn parse(label: &str) -> Option<IpKey> {
        let (family, hex) = label.split_once(':')?;
        match family {
            "4" if hex.len() == 8 => u32::from_str_radix(hex, 16).ok().map(IpKey::V4),
            "6" if hex.len() == 32 => u128::from_str_radix(hex, 16).ok().map(IpKey::V6),
            _ => None,
        }
    }

    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> IpKey {
        match ip.to_canonical() {
            IpAddr::V4(a) => IpKey::V4(u32::from(a)),
            IpAddr::V6(a) => {
                let bits = u32::from(ipv6_prefix.min(128));
                let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                IpKey::V6(u128::from(a) & mask)
            }
        }
    }
}

type KeyedLimiter = RateLimiter<IpKey, BoundedStore, DefaultClock>;

/// governor's keyed GCRA state (each key's theoretical arrival time), in a map that
/// never holds more than `cap` keys: a new key at the cap evicts the coldest batch (the
/// earliest arrival times, the keys furthest from their limit).
struct BoundedStore {
    map: Mutex<HashMap<IpKey, Nanos>>,
    cap: usize,
    batch: usize,
    /// Live keys evicted so far; shared with the limiter that replaces this one on a reload.
    evicted: Arc<AtomicU64>,
}

impl BoundedStore {
    fn new(cap: usize, batch: usize, evicted: Arc<AtomicU64>) -> BoundedStore {
        BoundedStore {
            map: Mutex::default(),
            cap: cap.max(1),
            batch: batch.clamp(1, cap.max(1)),
            evicted,
        }
    }
}

impl StateStore for BoundedStore {
    type Key = IpKey;

    fn measure_and_replace<T, F, E>(&self, key: &IpKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = lock(&self.map);
        let prev = map.get(key).copied();
        if prev.is_none() && map.len() >= self.cap {
            let mut tats: Vec<u64> = map.values().map(|n| n.as_u64()).collect();
            let (_, nth, _) = tats.select_nth_unstable(self.batch - 1);
            let cutoff = *nth;
            let before = map.len();
            map.retain(|_, n| n.as_u64() > cutoff);
            self.evicted.fetch_add((before - map.len()) as u64, Ordering::Relaxed);
        }
        let (out, next) = f(prev)?;
        map.insert(*key, next);
        Ok(out)
    }
}

impl ShrinkableKeyedStateStore<IpKey> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        lock(&self.map).retain(|_, n| *n >= drop_below);
    }

    fn shrink_to_fit(&self) {
        lock(&self.map).shrink_to_fit();
    }

    fn len(&self) -> usize {
        lock(&self.map).len()
    }

    fn is_empty(&self) -> bool {
        lock(&self.map).is_empty()
    }
}

struct Failures {
    count: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
}

/// Concurrent holders per key (client IP, user). An entry exists only while its key
/// holds a slot, so the map is bounded by the open connections.
pub struct Counted<K: std::hash::Hash + Eq + Clone> {
    open: Mutex<HashMap<K, u32>>,
}

impl<K: std::hash::Hash + Eq + Clone> Default for Counted<K> {
    fn default() -> Self {
        Counted { open: Mutex::default() }
    }
}

/// One slot of a [`Counted`] map; released on drop.
pub struct Slot<K: std::hash::Hash + Eq + Clone> {
    owner: Arc<Counted<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Counted<K> {
    /// Take a slot for `key`, or `None` when it already holds `max`.
    pub fn acquire(self: &Arc<Self>, key: &K, max: u32) -> Option<Slot<K>> {
        let mut open = lock(&self.open);
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                open.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            key: key.clone(),
        })
    }

    /// Keys holding at least one slot.
    pub fn tracked(&self) -> usize {
        lock(&self.open).len()
    }

    /// Slots `key` holds now.
    pub fn count(&self, key: &K) -> u32 {
        lock(&self.open).get(key).copied().unwrap_or(0)
    }

    /// Every key holding a slot, with its count.
    pub fn snapshot(&self) -> Vec<(K, u32)> {
        lock(&self.open).iter().map(|(k, n)| (k.clone(), *n)).collect()
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = lock(&self.owner.open);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A per-IP connection slot.
pub type IpSlot = Slot<IpKey>;
/// Concurrent sessions per user (JWT `sub`).
pub type UserSlots = Counted<String>;
/// A per-user session slot.
pub type UserSlot = Slot<String>;

/// Per-IP admission state, shared by all listeners. Survives config reloads.
pub struct PerIp {
    settings: AdmissionLimits,
    rate: KeyedLimiter,
    /// Plain HTTP requests (`http = true` routes), apart from the connection rate.
    http_rate: KeyedLimiter,
    open: Arc<Counted<IpKey>>,
    /// Shared with the admission that replaces this one on a reload: bans survive it.
    failures: Arc<Mutex<HashMap<IpKey, Failures>>>,
    /// Live rate-limiter keys evicted at the key cap (carried across reloads).
    evicted: Arc<AtomicU64>,
    /// The rate limiter's key cap and eviction batch.
    cap: usize,
    batch: usize,
}

impl PerIp {
    pub fn new(settings: AdmissionLimits) -> PerIp {
        PerIp::with_capacity(settings, MAX_TRACKED_KEYS, EVICTION_BATCH, Arc::default())
    }

    /// Like [`PerIp::new`] with another rate-limiter key cap (tests use small ones).
    pub fn with_capacity(settings: AdmissionLimits, cap: usize, batch: usize, evicted: Arc<AtomicU64>) -> PerIp {
        let burst = NonZeroU32::new(settings.connection_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(settings.connection_rate.interval().max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let store = BoundedStore::new(cap, batch, evicted.clone());
        let http_burst = NonZeroU32::new(settings.http_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let http_quota = Quota::with_period(settings.http_rate.interval().max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(http_burst);
        PerIp {
            rate: RateLimiter::new(quota, store, DefaultClock::default()),
            http_rate: RateLimiter::new(http_quota, BoundedStore::new(cap, batch, evicted.clone()), DefaultClock::default()),
            settings,
            open: Arc::default(),
            failures: Arc::default(),
            evicted,
            cap,
            batch,
        }
    }

    /// The admission for new `[limits]` after a reload: a fresh rate limiter with the new
    /// quota, but the live per-IP counts and the auth-failure bans carried over, so a
    /// reload neither lifts a ban nor lets old sessions escape the per-IP cap.
    ///
    /// `ipv6_prefix` keys those carried maps, so it keeps its old value until a restart:
    /// re-keying would lift the bans of a wider prefix and orphan the live slots.
    pub fn reconfigured(&self, mut settings: AdmissionLimits) -> PerIp {
        settings.ipv6_prefix = self.settings.ipv6_prefix;
        PerIp {
            open: self.open.clone(),
            failures: self.failures.clone(),
            ..PerIp::with_capacity(settings, self.cap, self.batch, self.evicted.clone())
        }
    }

    pub fn key(&self, ip: IpAddr) -> IpKey {
        IpKey::new(ip, self.settings.ipv6_prefix)
    }

    /// The new-connection rate and the per-IP concurrency cap. On success the
    /// returned slot counts the connection until it is dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<IpSlot, Reject> {
        let key = self.key(ip);
        if self.rate.len() >= self.cap {
            // Drop the keys that are as good as new first; the store evicts live ones
            // only if that is not enough.
            self.rate.retain_recent();
        }
        if self.rate.check_key(&key).is_err() {
            return Err(Reject::RateLimited);
        }
        self.open
            .acquire(&key, self.settings.max_connections_per_ip)
            .ok_or(Reject::IpConnLimit)
    }

    /// One plain HTTP request from `ip` under `http_rate_per_ip` (each request on a
    /// kept-alive connection is charged).
    pub fn admit_http(&self, ip: IpAddr) -> Result<(), Reject> {
        let key = self.key(ip);
        if self.http_rate.len() >= self.cap {
            self.http_rate.retain_recent();
        }
        self.http_rate.check_key(&key).map_err(|_| Reject::RateLimited)
    }

    /// How long `ip` stays banned for auth failures, if it is.
    pub fn banned(&self, ip: IpAddr) -> Option<Duration> {
        let key = self.key(ip);
        let failures = lock(&self.failures);
        let until = failures.get(&key)?.banned_until?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// Count an auth failure; bans the IP once `auth_failures_per_ip` failures fall in
    /// one window. Returns the key and the ban's length when this failure starts a ban
    /// (cluster mode shares it).
    pub fn auth_failed(&self, ip: IpAddr) -> Option<(IpKey, Duration)> {
        let s = &self.settings;
        if s.auth_failures_per_ip == 0 {
            return None;
        }
        let key = self.key(ip);
        let now = Instant::now();
        let mut failures = lock(&self.failures);
        if failures.len() >= MAX_TRACKED_KEYS && !failures.contains_key(&key) {
            prune_failures(&mut failures, s, now);
            if failures.len() >= MAX_TRACKED_KEYS {
                return None; // full of live entries: still refused with 401, just not tracked
            }
        }
        let f = failures.entry(key).or_insert(Failures {
            count: 0,
            window_start: now,
            banned_until: None,
        });
        if now.duration_since(f.window_start) > s.auth_failure_window {
            f.count = 0;
            f.window_start = now;
        }
        f.count += 1;
        if f.count >= s.auth_failures_per_ip {
            f.banned_until = Some(now + s.auth_ban);
            f.count = 0;
            f.window_start = now;
            return Some((key, s.auth_ban));
        }
        None
    }

    /// Ban `key` for auth failures for `left` (a ban another instance or the state file
    /// knows of); whether it was not banned that long already. Bounded like the failures
    /// themselves.
    pub fn ban_key(&self, key: IpKey, left: Duration) -> bool {
        let now = Instant::now();
        let until = now + left.min(Duration::from_secs(365 * 24 * 3600));
        let mut failures = lock(&self.failures);
        if failures.len() >= MAX_TRACKED_KEYS && !failures.contains_key(&key) {
            prune_failures(&mut failures, &self.settings, now);
            if failures.len() >= MAX_TRACKED_KEYS {
                return false;
            }
        }
        let f = failures.entry(key).or_insert(Failures {
            count: 0,
            window_start: now,
            banned_until: None,
        });
        if f.banned_until.is_some_and(|u| u >= until) {
            return false;
        }
        f.banned_until = Some(until);
        true
    }

    /// The keys banned for auth failures now, with the time left.
    pub fn auth_bans(&self) -> Vec<(IpKey, Duration)> {
        let now = Instant::now();
        lock(&self.failures)
            .iter()
            .filter_map(|(k, f)| Some((*k, f.banned_until?.checked_duration_since(now).filter(|d| !d.is_zero())?)))
            .collect()
    }

    /// Drop state that no longer matters. Called on a timer.
    pub fn prune(&self) {
        self.rate.retain_recent();
        self.rate.shrink_to_fit();
        self.http_rate.retain_recent();
        self.http_rate.shrink_to_fit();
        let mut failures = lock(&self.failures);
        prune_failures(&mut failures, &self.settings, Instant::now());
        failures.shrink_to_fit();
        lock(&self.open.open).shrink_to_fit();
    }

    /// Live rate-limiter keys evicted at the key cap since start.
    /// Charge `ip`'s rate `extra` more cells (a connection costs `1 + extra`): with Redis
    /// away, an instance alone takes its share of the rate (cluster `on_failure = "local"`).
    /// Whether the rate allows it.
    pub fn charge_more(&self, ip: IpAddr, extra: u32) -> bool {
        // Never more than the burst can hold: a share is at least one connection per
        // emission interval.
        let extra = extra.min(self.settings.connection_burst.saturating_sub(1));
        let Some(n) = std::num::NonZeroU32::new(extra) else { return true };
        matches!(self.rate.check_key_n(&self.key(ip), n), Ok(Ok(())))
    }

    /// Live connections of `ip`'s key.
    pub fn open_count(&self, ip: IpAddr) -> u32 {
        self.open.count(&self.key(ip))
    }

    /// Live connections per client key.
    pub fn open_counts(&self) -> Vec<(IpKey, u32)> {
        self.open.snapshot()
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Keys tracked by (rate limiter, concurrency map, auth-failure map).
    pub fn tracked(&self) -> (usize, usize, usize) {
        (self.rate.len(), self.open.tracked(), lock(&self.failures).len())
    }
}

fn prune_failures(failures: &mut HashMap<IpKey, Failures>, s: &AdmissionLimits, now: Instant) {
    failures.retain(|_, f| f.banned_until.is_some_and(|u| u > now) || now.duration_since(f.window_start) <= s.auth_failure_window);
}

/// A per-connection message-rate limiter (GCRA) for client → upstream traffic.
/// Excess is delayed, never dropped: the relay stops reading until the instant [`MessageRate::take`] returns.
#[derive(Debug, Clone)]
pub struct MessageRate {
    interval: Duration,
    tolerance: Duration,
    tat: tokio::time::Instant,
}

impl MessageRate {
    pub fn new(rate: Rate, burst: u32) -> MessageRate {
        let interval = rate.interval();
        MessageRate {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            tat: tokio::time::Instant::now(),
        }
    }

    /// A new rate and burst (a reload) from now on, keeping what the client has paid so
    /// far: a reload gives no fresh burst.
    pub fn reconfigure(&mut self, rate: Rate, burst: u32) {
        self.interval = rate.interval();
        self.tolerance = self.interval * burst.max(1).saturating_sub(1);
    }

    /// Account one message at `now`; returns when the next may be read, if that is later than `now`.
    pub fn take(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.tat = self.tat.max(now) + self.interval;
        let ready = self.tat.checked_sub(self.tolerance).unwrap_or(now);
        (ready > now).then_some(ready)
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reconfigured_message_rate_gives_no_fresh_burst() {
        let now = tokio::time::Instant::now();
        let mut rate = MessageRate::new("10/s".parse().unwrap(), 3);
        assert!(rate.take(now).is_none() && rate.take(now).is_none());
        assert!(rate.take(now).is_some(), "the burst is spent");
        // A reload to a faster rate: what was paid still counts.
        rate.reconfigure("100/s".parse().unwrap(), 3);
        assert!(rate.take(now).is_some());
    }

    fn settings(max_per_ip: u32) -> AdmissionLimits {
        AdmissionLimits {
            connection_rate: "100/s".parse().unwrap(),
            connection_burst: 100,
            http_rate: crate::config::DEFAULT_HTTP_RATE,
            http_burst: 2,
            max_connections_per_ip: max_per_ip,
            ipv6_prefix: 64,
            auth_failures_per_ip: 2,
            auth_failure_window: Duration::from_secs(60),
            auth_ban: Duration::from_secs(600),
        }
    }

    #[test]
    fn a_limits_reload_keeps_bans_and_live_counts() {
        let a = PerIp::new(settings(2));
        let banned: IpAddr = "192.0.2.1".parse().unwrap();
        a.auth_failed(banned);
        a.auth_failed(banned);
        assert!(a.banned(banned).is_some());
        let ip: IpAddr = "192.0.2.2".parse().unwrap();
        let _s1 = a.admit(ip).unwrap();
        let _s2 = a.admit(ip).unwrap();
        let b = a.reconfigured(settings(3));
        assert!(b.banned(banned).is_some(), "the reload lifted a ban");
        let _s3 = b.admit(ip).unwrap();
        assert!(matches!(b.admit(ip), Err(Reject::IpConnLimit)), "old sessions no longer counted");
        drop((_s1, _s2, _s3));
        assert_eq!(b.tracked().1, 0);
    }

    #[test]
    fn a_reload_cannot_change_the_ipv6_prefix_under_live_bans() {
        let a = PerIp::new(settings(2));
        let banned: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        a.auth_failed(banned);
        a.auth_failed(banned);
        let other_host_same_64: IpAddr = "2001:db8:1:2::99".parse().unwrap();
        assert!(a.banned(other_host_same_64).is_some());
        let b = a.reconfigured(AdmissionLimits {
            ipv6_prefix: 128,
            ..settings(2)
        });
        assert_eq!(b.settings.ipv6_prefix, 64);
        assert!(
            b.banned(banned).is_some() && b.banned(other_host_same_64).is_some(),
            "the reload lifted a /64 ban"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AdmissionLimits {
        AdmissionLimits {
            connection_rate: "1000/s".parse().unwrap(),
            connection_burst: 2,
            http_rate: crate::config::DEFAULT_HTTP_RATE,
            http_burst: 2,
            max_connections_per_ip: 2,
            ipv6_prefix: 64,
            auth_failures_per_ip: 3,
            auth_failure_window: Duration::from_secs(60),
            auth_ban: Duration::from_secs(600),
        }
    }

    #[test]
    fn ipv6_hosts_share_their_prefix() {
        let a = IpKey::new("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
        let b = IpKey::new("2001:db8:1:2:bbbb::9".parse().unwrap(), 64);
        let c = IpKey::new("2001:db8:1:3::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            IpKey::new("::ffff:1.2.3.4".parse().unwrap(), 64),
            IpKey::new("1.2.3.4".parse().unwrap(), 64)
        );
    }

    #[test]
    fn concurrency_cap_and_release() {
        let adm = Arc::new(PerIp::new(AdmissionLimits {
            connection_burst: 100,
            ..settings()
        }));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = adm.admit(ip).unwrap();
        let _b = adm.admit(ip).unwrap();
        assert_eq!(adm.admit(ip).err(), Some(Reject::IpConnLimit));
        drop(a);
        assert!(adm.admit(ip).is_ok());
        assert!(adm.admit("10.0.0.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn rate_limits_bursts() {
        let adm = Arc::new(PerIp::new(AdmissionLimits {
            connection_rate: "1/min".parse().unwrap(),
            max_connections_per_ip: 100,
            ..settings()
        }));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let _a = adm.admit(ip).unwrap();
        let _b = adm.admit(ip).unwrap();
        assert_eq!(adm.admit(ip).err(), Some(Reject::RateLimited));
    }

    #[test]
    fn auth_failures_ban() {
        let adm = PerIp::new(settings());
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        adm.auth_failed(ip);
        adm.auth_failed(ip);
        assert!(adm.banned(ip).is_none());
        adm.auth_failed(ip);
        assert!(adm.banned(ip).unwrap() > Duration::from_secs(590));
        assert!(adm.banned("10.0.0.10".parse().unwrap()).is_none());
    }

    #[test]
    fn message_rate_allows_burst_then_spaces() {
        let mut r = MessageRate::new(
            Rate {
                count: 10,
                per: Duration::from_secs(1),
            },
            3,
        );
        let t = tokio::time::Instant::now();
        assert_eq!(r.take(t), None);
        assert_eq!(r.take(t), None);
        let wait = r.take(t).expect("a fourth message in the same instant waits");
        assert!(wait > t && wait <= t + Duration::from_millis(101), "{:?}", wait - t);
    }
}

#[cfg(test)]
mod key_cap_tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    /// At the key cap, keys already tracked keep their state and are served, a new key
    /// evicts the coldest one, and the eviction is counted.
    #[test]
    fn at_the_key_cap_known_keys_are_served_and_the_coldest_is_evicted() {
        let settings = AdmissionLimits {
            connection_rate: "1/h".parse().unwrap(),
            connection_burst: 3,
            http_rate: crate::config::DEFAULT_HTTP_RATE,
            http_burst: 2,
            max_connections_per_ip: 100,
            ipv6_prefix: 64,
            auth_failures_per_ip: 0,
            auth_failure_window: Duration::from_secs(60),
            auth_ban: Duration::from_secs(60),
        };
        let per_ip = PerIp::with_capacity(settings, 4, 1, Arc::default());
        // Key 1 is hot (two of its three connections used); keys 2–4 used one each, 2 first.
        for n in [1, 1, 2, 3, 4] {
            drop(per_ip.admit(ip(n)).unwrap());
        }
        assert_eq!(per_ip.tracked().0, 4);
        // The limiter is full of live keys. A known key is still served, with its state.
        drop(per_ip.admit(ip(3)).unwrap());
        // A new key gets in; the coldest key (2, the earliest use) is evicted for it.
        drop(per_ip.admit(ip(5)).unwrap());
        assert_eq!(per_ip.evicted(), 1);
        assert_eq!(per_ip.tracked().0, 4);
        // Key 1 kept its state: its third connection passes, its fourth is refused.
        drop(per_ip.admit(ip(1)).unwrap());
        assert!(matches!(per_ip.admit(ip(1)), Err(Reject::RateLimited)));
        // The evictions count survives a reload of `[limits]`.
        let next = per_ip.reconfigured(per_ip.settings.clone());
        assert_eq!(next.evicted(), 1);
    }
}
