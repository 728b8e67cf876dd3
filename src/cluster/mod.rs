//! Cluster mode (DESIGN.md section 7): admin bans, revocations and kicks reach
//! every instance that shares a Redis, and the per-user cap counts every instance.
//!
//! An admin action is applied locally first (it works with Redis down), then written to
//! Redis and announced on one pub/sub channel. Every instance keeps a local copy and
//! checks it locally (no Redis call on the connect path for these):
//! - bans: sorted set `<prefix>:bans` (member the range, score its end in Unix seconds);
//! - revocations: sorted set `<prefix>:revoked` (member the `jti`, score the token's `exp`);
//! - kicks: the channel only (they close live sessions; nothing to keep);
//! - drains (admin API `/v1/upstreams/drain`): hash `<prefix>:drains` (field the JSON
//!   `[route, upstream]`, value `over` in ms); an undrain removes the field. The key's
//!   TTL ([`events::DRAINS_TTL`]) is renewed by every resync, so it outlives no cluster;
//!   a resync reads at most [`events::MAX_DRAINS`] fields;
//! - channel `<prefix>:events`: one JSON event per action, with the sender's instance id.
//!
//! Redis holds the shared state while it is reachable. A lost message is repaired by a
//! resync every [`RESYNC`] and at each reconnect: both sets are read (expired members
//! removed first) and the local copy is made to match them, removals included. An
//! action that could not reach Redis is kept (bounded) and written again at the next
//! connect, before that resync, so an unban made while Redis was away is not undone.
//! Every key has a bound: members expire with their score and are removed at each resync;
//! a resync reads at most what the local caps hold. Redis restarted empty loses the
//! shared bans: run it with persistence if they must outlive it (lasting bans belong in
//! `[firewall]`). The channel name holds the database number, so clusters on one Redis
//! with different databases do not hear each other.
//!
//! The per-user cap is shared too: after the local cap, one Lua call on the user's hash
//! (`<prefix>:{u:<hash of sub>}`, a field per instance with its count and lease end in
//! Redis time) takes a lease or refuses; each instance asserts its live counts every
//! [`RESYNC`] and at each reconnect, and an instance that stops asserting stops counting
//! after [`LEASE_TTL`].
//!
//! The per-IP rate and cap likewise: one Lua call per new connection (GCRA on Redis time
//! for the rate, then a lease as for users), keyed by the client key with a hash tag.
//!
//! Connect-path calls have `cluster.timeout`; after [`BREAK_AFTER`] failures in a row a
//! breaker skips Redis for [`BREAK_FOR`] at a time, and `on_failure` decides meanwhile.
//!
//! With `on_failure = "local"` an instance alone holds its share of each shared cap and
//! of the per-IP rate: divided by the live instances (a sorted set each heartbeat
//! refreshes). The per-IP call for the TCP peer runs while TLS is negotiated.
//!
//! # Layout
//!
//! - `mod.rs` (this file): [`Cluster`] (built from `[cluster]`), the [`Host`] trait it
//!   reaches the gateway through, and [`Unanswered`].
//! - `connection.rs`: the one multiplexed Redis connection, the `up` state and the
//!   breaker on the connect path.
//! - `events.rs`: admin actions: publish, follow the channel, apply, resync.
//! - `leases.rs`: the shared caps and the per-IP rate: Lua scripts, leases, heartbeat.

mod connection;
mod events;
mod leases;
mod state_file;

pub use events::Event;
pub use leases::{IpAnswer, Lease};

use crate::config::ConfigError;
use crate::metrics::Metrics;
use std::{
    collections::HashSet,
    sync::atomic::AtomicBool,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// How often the local copy is compared with Redis (and leases refreshed).
pub const RESYNC: Duration = Duration::from_secs(5);
/// How long an instance's user leases live without a refresh: a dead instance's sessions
/// stop counting after this.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// Redis did not answer a connect-path call within `cluster.timeout` (or the breaker
/// skipped it): the caller's `on_failure` decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Redis did not answer in time")]
pub struct Unanswered;

/// What the cluster needs of the gateway: a trait, so that `cluster` does not import
/// `gateway` (which holds the cluster).
pub trait Host: Send + Sync {
    fn incidents(&self) -> &crate::incidents::Incidents;
    fn metrics(&self) -> &Metrics;
    /// Make live sessions re-check their admission (a ban or revocation arrived).
    fn recheck_sessions(&self);
    /// Live sessions per user on this instance.
    fn user_counts(&self) -> Vec<(String, u32)>;
    /// Live connections per client key ([`crate::limits::IpKey::label`]) on this instance.
    fn ip_counts(&self) -> Vec<(String, u32)>;
    /// Ban client key `key` for auth failures for `left` (from another instance, or the
    /// state file); whether it was not banned that long already.
    fn auth_ban(&self, key: &str, left: Duration) -> bool;
    /// This instance's auth-failure bans: client key and time left.
    fn auth_bans(&self) -> Vec<(String, Duration)>;
    /// Drain (`Some(over)`) or undrain (`None`) an upstream (route, upstream as
    /// configured); `None` when this instance's config has no such pair, else whether
    /// it changed.
    fn set_drain(&self, route: &str, upstream: &str, over: Option<Duration>) -> Option<bool>;
    /// The upstreams drained here: (route, upstream as configured).
    fn drained(&self) -> Vec<(String, String)>;
}

pub struct Cluster {
    servers: connection::Servers,
    scripts: leases::Scripts,
    prefix: String,
    /// Budget of a call on the connect path (`cluster.timeout`).
    pub timeout: Duration,
    bans: String,
    revoked: String,
    /// Auth-failure bans: member the client key's label, score the ban's end.
    auth_bans: String,
    /// Drained upstreams: a hash, field `[route, upstream]` (JSON), value `over` in ms.
    drains: String,
    channel: String,
    /// This instance's id: its own events are not applied twice.
    instance: String,
    conn: tokio::sync::Mutex<Option<connection::Conn>>,
    /// The runtime the cluster was made on (the main one): Redis connections are made,
    /// and background calls from connections spawned, there (`connection::on_main`).
    main: Option<tokio::runtime::Handle>,
    up: AtomicBool,
    /// Bans, unbans and revocations that did not reach Redis, written again on reconnect.
    pending: std::sync::Mutex<std::collections::VecDeque<events::Event>>,
    /// Remote events logged in the current period.
    logged: std::sync::atomic::AtomicU32,
    /// What connections get while Redis cannot be asked.
    pub on_failure: crate::config::OnFailure,
    /// Connect-path failures in a row (the breaker is open from `BREAK_AFTER` on).
    failures: std::sync::atomic::AtomicU32,
    /// Instances that asserted their counts within [`LEASE_TTL`] (this one included), as
    /// last seen (or as the state file remembers them): `on_failure = "local"` divides
    /// the caps by it. 0 until known: no share can be granted then.
    live: std::sync::atomic::AtomicU32,
    /// `state_file`: where the last synced state is kept, and whether it changed since
    /// it was last written.
    state_file: Option<std::path::PathBuf>,
    state_dirty: AtomicBool,
    /// A Redis sync has completed or the state file was loaded: the local copy holds the
    /// cluster's bans and revocations (`/readyz` waits for it).
    has_state: AtomicBool,
    /// The gateway's metrics, for calls made where no host is at hand (a lease given
    /// back); set when [`Cluster::run`] starts.
    metrics: std::sync::OnceLock<Metrics>,
    /// The lease keys the last heartbeat asserted.
    asserted: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl Cluster {
    /// The Redis clients for `[cluster]` (password read now; nothing connects yet).
    pub fn new(c: &crate::config::Cluster, origin: &str) -> Result<Cluster, ConfigError> {
        let (servers, db) = connection::Servers::new(c, origin)?;
        let mut id = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut id);
        let p = &c.key_prefix;
        // Pub/sub channels are global to a Redis server; keys are per database.
        Ok(Cluster {
            servers,
            scripts: leases::Scripts::new(),
            prefix: p.clone(),
            timeout: c.timeout,
            bans: format!("{p}:bans"),
            revoked: format!("{p}:revoked"),
            auth_bans: format!("{p}:auth_bans"),
            drains: format!("{p}:drains"),
            channel: format!("{p}:{db}:events"),
            instance: crate::util::hex(&id),
            conn: tokio::sync::Mutex::new(None),
            main: tokio::runtime::Handle::try_current().ok(),
            up: AtomicBool::new(false),
            pending: std::sync::Mutex::default(),
            logged: std::sync::atomic::AtomicU32::new(0),
            on_failure: c.on_failure,
            failures: std::sync::atomic::AtomicU32::new(0),
            live: std::sync::atomic::AtomicU32::new(0),
            asserted: std::sync::Mutex::default(),
            state_file: c.state_file.as_ref().map(|f| f.value.clone()),
            state_dirty: AtomicBool::new(false),
            has_state: AtomicBool::new(false),
            metrics: std::sync::OnceLock::new(),
        })
    }
}

impl Cluster {
    /// Spawn a background call (a lease's release, an event's publish) on the main
    /// runtime: it outlives the connection and the worker thread that asked for it.
    pub(crate) fn spawn<F>(&self, call: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // Made outside any runtime (a unit test) and called outside one: nothing to run on.
        if let Some(rt) = self.main.clone().or_else(|| tokio::runtime::Handle::try_current().ok()) {
            drop(rt.spawn(call));
        }
    }
}

/// A score as Unix seconds, when it is one.
pub(crate) fn unix_secs(score: f64) -> Option<u64> {
    (0.0..1e15).contains(&score).then_some(score as u64)
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out"))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The time left until Unix second `until`.
fn until_from_now(until: u64) -> Duration {
    Duration::from_secs(until.saturating_sub(unix_now()))
}
