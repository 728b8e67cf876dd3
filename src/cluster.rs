//! Cluster mode (DESIGN.md section 7), in part: admin bans, revocations and kicks reach
//! every instance that shares a Redis, and the per-user cap counts every instance.
//!
//! An admin action is applied locally first (it works with Redis down), then written to
//! Redis and announced on one pub/sub channel. Every instance keeps a local copy and
//! checks it locally (no Redis call on the connect path for these):
//! - bans: sorted set `<prefix>:bans` (member the range, score its end in Unix seconds);
//! - revocations: sorted set `<prefix>:revoked` (member the `jti`, score the token's `exp`);
//! - kicks: the channel only (they close live sessions; nothing to keep);
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

use crate::config::ConfigError;
use crate::incidents::{MAX_BANS, MAX_REVOCATIONS, canonical};
use crate::metrics::Metrics;
use futures_util::StreamExt;
use redis::{AsyncCommands, IntoConnectionInfo};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio_util::sync::CancellationToken;

/// How often the local copy is compared with Redis (and leases refreshed).
pub const RESYNC: Duration = Duration::from_secs(5);
/// How long an instance's user leases live without a refresh: a dead instance's sessions
/// stop counting after this.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// Lua: the time now in Redis (`now_us`, and `now` in ms): never the instances' clocks.
macro_rules! lua_now {
    () => {
        "local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
"
    };
}

/// Lua: take a lease on KEYS[1] (a field per instance: `<instance>` = count,
/// `<instance>:exp` = lease end in ms) if the live instances together hold fewer than
/// ARGV[2]; ARGV[1] the instance, ARGV[3] the lease ms. Dead instances' fields are removed
/// first. Returns 1 (taken) or -1 (full).
macro_rules! lua_lease {
    () => {
        "local all = redis.call('HGETALL', KEYS[1])
local dead, sum = {}, 0
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, -4) == ':exp' and (tonumber(all[i + 1]) or 0) < now then
    redis.call('HDEL', KEYS[1], f, string.sub(f, 1, -5))
    dead[string.sub(f, 1, -5)] = true
  end
end
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, -4) ~= ':exp' and not dead[f] then sum = sum + (tonumber(all[i + 1]) or 0) end
end
if sum >= tonumber(ARGV[2]) then return -1 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HSET', KEYS[1], ARGV[1] .. ':exp', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"
    };
}

/// One session of a user if all instances together hold fewer than the cap (KEYS[1] the
/// user's hash; ARGV instance, cap, lease ms): 1 taken, -1 full.
const ACQUIRE: &str = concat!(lua_now!(), lua_lease!());

/// A new connection from one client key: the shared rate (GCRA, microseconds of Redis
/// time), then the shared cap as [`ACQUIRE`]. KEYS[1] the key's lease hash, KEYS[2] its
/// rate key; ARGV instance, cap, lease ms, emission interval µs, burst tolerance µs.
/// Returns 1 (taken), 0 (rate), -1 (cap).
const ACQUIRE_IP: &str = concat!(
    lua_now!(),
    "local interval, tolerance = tonumber(ARGV[4]), tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if tat < now_us then tat = now_us end
if tat - now_us > tolerance then return 0 end
local next_tat = tat + interval
redis.call('SET', KEYS[2], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now_us) / 1000) + 1)
",
    lua_lease!()
);

/// Give one session back. KEYS[1] the user's hash; ARGV instance.
const RELEASE: &str = r#"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1], ARGV[1] .. ':exp') end
return n
"#;

/// Budget of an admin action's Redis write (the connect path's `timeout` is for calls a
/// client waits on; an operator's action may take longer).
const ACTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait before connecting again after Redis failed.
const RETRY: Duration = Duration::from_secs(1);
/// Largest event read from the channel.
const MAX_EVENT: usize = 4096;
/// Connect-path calls that fail in a row before the breaker opens.
const BREAK_AFTER: u32 = 3;
/// How long an open breaker skips Redis on the connect path before trying again.
const BREAK_FOR: Duration = Duration::from_secs(1);
/// Actions kept while Redis is away, at most (the oldest are dropped beyond).
const MAX_PENDING: usize = 10_000;
/// Events from other instances logged per [`RESYNC`] period, at most.
const LOGGED_EVENTS: u32 = 20;

/// One admin action, as announced to the other instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Ban { cidr: String, until: u64 },
    Unban { cidr: String },
    Revoke { jti: String, exp: u64 },
    Kick { sub: String },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    event: Event,
}

impl Event {
    /// The `op` label of `wsgate_cluster_ops_total`.
    fn op(&self) -> &'static str {
        match self {
            Event::Ban { .. } | Event::Unban { .. } => "ban",
            // DESIGN section 7 counts a kick ("revoke by sub") with revocations.
            Event::Revoke { .. } | Event::Kick { .. } => "revoke",
        }
    }
}

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
}

/// What the shared per-IP check answered.
pub enum IpAnswer {
    Taken(Lease),
    RateLimited,
    Full,
}

/// The Lua scripts, hashed once (their SHA-1 is what Redis runs them by).
struct Scripts {
    acquire: redis::Script,
    acquire_ip: redis::Script,
    release: redis::Script,
}

pub struct Cluster {
    client: redis::Client,
    scripts: Scripts,
    prefix: String,
    /// Budget of a call on the connect path (`cluster.timeout`).
    pub timeout: Duration,
    bans: String,
    revoked: String,
    channel: String,
    /// This instance's id: its own events are not applied twice.
    instance: String,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    up: AtomicBool,
    /// Bans, unbans and revocations that did not reach Redis, written again on reconnect.
    pending: std::sync::Mutex<std::collections::VecDeque<Event>>,
    /// Remote events logged in the current period.
    logged: std::sync::atomic::AtomicU32,
    /// What connections get while Redis cannot be asked.
    pub on_failure: crate::config::OnFailure,
    /// Connect-path failures in a row, and until when the breaker skips Redis.
    failures: std::sync::atomic::AtomicU32,
    broken_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Instances that asserted their counts within [`LEASE_TTL`] (this one included), as
    /// last seen: `on_failure = "local"` divides the caps by it.
    live: std::sync::atomic::AtomicU32,
    /// The lease keys the last heartbeat asserted.
    asserted: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl Cluster {
    /// The Redis client for `[cluster]` (password read now; nothing connects yet).
    pub fn new(c: &crate::config::Cluster, origin: &str) -> Result<Cluster, ConfigError> {
        let mut info = c
            .redis
            .value
            .as_str()
            .into_connection_info()
            .map_err(|_| c.redis.error(origin, "not a usable Redis URL"))?;
        if let Some(source) = &c.password {
            let secret = crate::keys::load_secret(source, origin, false)?;
            let password = std::str::from_utf8(secret.bytes())
                .map_err(|_| c.redis.error(origin, "the Redis password is not UTF-8 text"))?
                .to_string();
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &c.ca {
            None => redis::Client::open(info),
            Some(ca) => {
                let pem = crate::fsutil::read_limited(&ca.value, crate::fsutil::MAX_KEY_FILE)
                    .map_err(|e| ca.error(origin, format!("cannot read {}: {e}", ca.value.display())))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(info, certs)
            }
        }
        .map_err(|_| c.redis.error(origin, "not a usable Redis URL (or CA file)"))?;
        let mut id = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut id);
        let p = &c.key_prefix;
        // Pub/sub channels are global to a Redis server; keys are per database.
        let db = client.get_connection_info().redis_settings().db();
        Ok(Cluster {
            client,
            scripts: Scripts {
                acquire: redis::Script::new(ACQUIRE),
                acquire_ip: redis::Script::new(ACQUIRE_IP),
                release: redis::Script::new(RELEASE),
            },
            prefix: p.clone(),
            timeout: c.timeout,
            bans: format!("{p}:bans"),
            revoked: format!("{p}:revoked"),
            channel: format!("{p}:{db}:events"),
            instance: id.iter().map(|b| format!("{b:02x}")).collect(),
            conn: tokio::sync::Mutex::new(None),
            up: AtomicBool::new(false),
            pending: std::sync::Mutex::default(),
            logged: std::sync::atomic::AtomicU32::new(0),
            on_failure: c.on_failure,
            failures: std::sync::atomic::AtomicU32::new(0),
            broken_until: std::sync::Mutex::new(None),
            live: std::sync::atomic::AtomicU32::new(1),
            asserted: std::sync::Mutex::default(),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A shared cap as this instance enforces it alone while Redis fails (`local`): its
    /// share, the cap divided by the live instances last seen (at least 1).
    pub fn local_share(&self, cap: u32) -> u32 {
        (cap / self.live.load(Ordering::Relaxed).max(1)).max(1)
    }

    /// Instances alive as last seen (at least 1).
    pub fn live_instances(&self) -> u32 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// Whether the breaker skips Redis on the connect path now.
    fn broken(&self) -> bool {
        crate::util::lock(&self.broken_until).is_some_and(|t| std::time::Instant::now() < t)
    }

    /// A connect-path call failed: after [`BREAK_AFTER`] in a row, skip Redis for
    /// [`BREAK_FOR`] and run in the `on_failure` mode.
    fn call_failed(&self, metrics: &Metrics) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAK_AFTER {
            *crate::util::lock(&self.broken_until) = Some(std::time::Instant::now() + BREAK_FOR);
            metrics.cluster_mode(self.on_failure.label());
            metrics.cluster_up(false); // Redis does not answer within `timeout`
        }
    }

    fn call_ok(&self, metrics: &Metrics) {
        if self.failures.swap(0, Ordering::Relaxed) >= BREAK_AFTER {
            *crate::util::lock(&self.broken_until) = None;
            metrics.cluster_mode("shared");
            metrics.cluster_up(self.is_up());
        }
    }

    fn set_up(&self, up: bool, metrics: &Metrics) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("cluster: Redis reachable; shared bans and revocations in sync");
            } else {
                tracing::warn!("cluster: Redis unreachable; bans and revocations work from the local copy");
            }
        }
        metrics.cluster_up(up);
        metrics.cluster_mode(if up && !self.broken() { "shared" } else { self.on_failure.label() });
    }

    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let mut cached = self.conn.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(ACTION_TIMEOUT))
            .set_response_timeout(Some(ACTION_TIMEOUT));
        let c = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        *cached = Some(c.clone());
        Ok(c)
    }

    async fn forget_connection(&self) {
        *self.conn.lock().await = None;
    }

    /// Write `event` to Redis and announce it. Whether Redis took it (the local action has
    /// been taken either way; a ban, unban or revocation that did not reach Redis is
    /// written again at the next connect).
    pub async fn publish(&self, event: Event, metrics: &Metrics) -> bool {
        // Pending while in flight too, so a resync meanwhile does not undo it here. A kick
        // is not kept: written later it would close sessions opened since.
        let keep = !matches!(event, Event::Kick { .. });
        if keep {
            let mut pending = crate::util::lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                pending.pop_front();
            }
            pending.push_back(event.clone());
        }
        let ok = self.write(&event, metrics).await;
        if ok && keep {
            let mut pending = crate::util::lock(&self.pending);
            if let Some(i) = pending.iter().rposition(|e| *e == event) {
                pending.remove(i);
            }
        }
        ok
    }

    /// Write what did not reach Redis before, oldest first; stops at the first failure.
    async fn replay(&self, metrics: &Metrics) -> redis::RedisResult<()> {
        loop {
            let Some(event) = crate::util::lock(&self.pending).front().cloned() else {
                return Ok(());
            };
            if !self.write(&event, metrics).await {
                return Err(timeout_error());
            }
            crate::util::lock(&self.pending).pop_front();
        }
    }

    async fn write(&self, event: &Event, metrics: &Metrics) -> bool {
        let event = event.clone();
        let op = event.op();
        let payload = match serde_json::to_string(&Envelope {
            from: self.instance.clone(),
            event: event.clone(),
        }) {
            Ok(p) => p,
            Err(_) => return false,
        };
        let write = async {
            let mut con = self.connection().await?;
            let mut pipe = redis::pipe();
            match &event {
                Event::Ban { cidr, until } => {
                    pipe.zadd(&self.bans, cidr, *until).ignore();
                }
                Event::Unban { cidr } => {
                    pipe.zrem(&self.bans, cidr).ignore();
                }
                Event::Revoke { jti, exp } => {
                    pipe.zadd(&self.revoked, jti, *exp).ignore();
                }
                Event::Kick { .. } => {}
            }
            pipe.publish(&self.channel, payload).ignore();
            pipe.query_async::<()>(&mut con).await
        };
        let result = match tokio::time::timeout(ACTION_TIMEOUT, write).await {
            Ok(Ok(())) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        metrics.cluster_op(op, result);
        if result != "ok" {
            self.forget_connection().await;
            tracing::warn!(
                op,
                result,
                "cluster: an admin action did not reach Redis; it holds here and is written again when Redis answers"
            );
        }
        result == "ok"
    }

    /// Follow the channel and resync until `stop`; reconnects after failures.
    pub async fn run(self: Arc<Self>, gw: Arc<dyn Host>, stop: CancellationToken) {
        let mut first_failure = true;
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.follow(gw.as_ref()) => r,
            };
            if let Err(e) = outcome {
                // The first failure of a period down is worth a line (redis-rs errors do
                // not carry the password); the retries every second are not.
                if self.is_up() || std::mem::take(&mut first_failure) {
                    tracing::warn!(error = %e, "cluster: cannot use Redis; retrying every second");
                } else {
                    tracing::debug!(error = %e, "cluster: Redis still unreachable");
                }
            }
            self.forget_connection().await;
            self.set_up(false, gw.metrics());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// One connected period: subscribe, resync, then apply events and resync on a timer.
    async fn follow(&self, gw: &dyn Host) -> redis::RedisResult<()> {
        let mut pubsub = match tokio::time::timeout(ACTION_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(r) => r?,
            Err(_) => return Err(timeout_error()),
        };
        match tokio::time::timeout(ACTION_TIMEOUT, pubsub.subscribe(&self.channel)).await {
            Ok(r) => r?,
            Err(_) => return Err(timeout_error()),
        }
        self.replay(gw.metrics()).await?;
        self.resync(gw).await?;
        self.heartbeat(&gw.user_counts(), &gw.ip_counts()).await?;
        self.set_up(true, gw.metrics());
        let mut messages = pubsub.on_message();
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now: just synced
        loop {
            tokio::select! {
                m = messages.next() => match m {
                    Some(msg) => self.apply(gw, msg.get_payload_bytes()),
                    None => return Err(redis::RedisError::from((redis::ErrorKind::Io, "subscription closed"))),
                },
                _ = tick.tick() => {
                    self.logged.store(0, Ordering::Relaxed);
                    self.replay(gw.metrics()).await?;
                    self.resync(gw).await?;
                    self.heartbeat(&gw.user_counts(), &gw.ip_counts()).await?;
                    self.set_up(true, gw.metrics()); // answering again after a hang
                }
            }
        }
    }

    /// Apply an event announced by another instance.
    fn apply(&self, gw: &dyn Host, payload: &[u8]) {
        if payload.len() > MAX_EVENT {
            return;
        }
        let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) else {
            tracing::debug!("cluster: an event that is not ours on the channel");
            return;
        };
        if envelope.from == self.instance {
            return;
        }
        let incidents = gw.incidents();
        let changed = match &envelope.event {
            Event::Ban { cidr, until } => match cidr.parse() {
                Ok(net) => incidents.ban(canonical(net), until_from_now(*until)).is_ok_and(|new| new),
                Err(_) => false,
            },
            Event::Unban { cidr } => cidr.parse().is_ok_and(|net| incidents.unban(canonical(net))),
            Event::Revoke { jti, exp } => incidents.revoke(jti, Some(*exp)).is_ok_and(|new| new),
            Event::Kick { sub } => incidents.kick(sub).is_ok(),
        };
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOGGED_EVENTS {
            let (kind, target) = match &envelope.event {
                Event::Ban { cidr, .. } => ("ban", cidr.as_str()),
                Event::Unban { cidr } => ("unban", cidr.as_str()),
                Event::Revoke { jti, .. } => ("revoke", jti.as_str()),
                Event::Kick { sub } => ("kick", sub.as_str()),
            };
            let target = crate::util::escape(target, 128);
            let from = crate::util::escape(&envelope.from, 32);
            tracing::warn!(kind, %target, %from, changed, "cluster: admin action from another instance");
        }
        if changed {
            gw.recheck_sessions();
        }
    }

    /// Compare the local copy with Redis: expired members are removed, missing ones applied.
    async fn resync(&self, gw: &dyn Host) -> redis::RedisResult<()> {
        let now = unix_now();
        let read = async {
            let mut con = self.connection().await?;
            let _: () = con.zrembyscore(&self.bans, "-inf", now).await?;
            let _: () = con.zrembyscore(&self.revoked, "-inf", now).await?;
            // Bounded reads: never more than the local caps could hold (the latest first).
            // Scores read as doubles: a member with an odd score (1e17, "inf") is skipped,
            // not a failure of the whole read.
            let bans: Vec<(String, f64)> = con.zrevrange_withscores(&self.bans, 0, MAX_BANS as isize - 1).await?;
            let revoked: Vec<(String, f64)> = con.zrevrange_withscores(&self.revoked, 0, MAX_REVOCATIONS as isize - 1).await?;
            Ok::<_, redis::RedisError>((bans, revoked))
        };
        let (bans, revoked) = match tokio::time::timeout(ACTION_TIMEOUT * 2, read).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                gw.metrics().cluster_op("sync", "error");
                return Err(e);
            }
            Err(_) => {
                gw.metrics().cluster_op("sync", "timeout");
                return Err(timeout_error());
            }
        };
        gw.metrics().cluster_op("sync", "ok");
        let mut changed = false;
        let (keep_bans, keep_revoked, lifted) = self.pending_targets();
        let mut shared_bans = HashSet::new();
        for (cidr, until) in bans {
            let (Ok(net), Some(until)) = (cidr.parse::<ipnet::IpNet>(), unix_secs(until)) else {
                continue;
            };
            let net = canonical(net);
            if lifted.contains(&net) {
                continue; // an unban on its way to Redis
            }
            shared_bans.insert(net);
            changed |= gw.incidents().ban(net, until_from_now(until)).is_ok_and(|new| new);
        }
        let mut shared_revoked = HashSet::new();
        for (jti, exp) in revoked {
            let Some(exp) = unix_secs(exp) else { continue };
            changed |= gw.incidents().revoke(&jti, Some(exp)).is_ok_and(|new| new);
            shared_revoked.insert(jti);
        }
        // What Redis no longer holds is lifted here too (an unban this instance missed),
        // unless it is still waiting to be written there.
        for net in gw.incidents().ban_list() {
            if !shared_bans.contains(&net) && !keep_bans.contains(&net) {
                gw.incidents().unban(net);
            }
        }
        for jti in gw.incidents().revoked_list() {
            if !shared_revoked.contains(&jti) && !keep_revoked.contains(&jti) {
                gw.incidents().unrevoke(&jti);
            }
        }
        if changed {
            gw.recheck_sessions();
        }
        Ok(())
    }
}

/// One session of a user counted in Redis; given back when dropped.
pub struct Lease {
    cluster: Arc<Cluster>,
    key: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (cluster, key) = (self.cluster.clone(), std::mem::take(&mut self.key));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let release = async {
                    let mut con = cluster.connection().await?;
                    cluster
                        .scripts
                        .release
                        .key(&key)
                        .arg(&cluster.instance)
                        .invoke_async::<i64>(&mut con)
                        .await
                };
                // A release that does not arrive: the next heartbeat asserts this
                // instance's true count for the key (0 when it holds none any more).
                let _ = tokio::time::timeout(ACTION_TIMEOUT, release).await;
            });
        }
    }
}

impl Cluster {
    /// The user's hash key: a hash tag of the SHA-256 of `sub` (any length, any bytes).
    fn user_key(&self, sub: &str) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, sub.as_bytes());
        let hex: String = d.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:{{u:{hex}}}", self.prefix)
    }

    /// Take one of `sub`'s `max` sessions across every instance, within `timeout`.
    /// `Ok(None)`: all taken; `Err`: Redis did not answer in time (the caller decides).
    pub async fn acquire_user(self: &Arc<Self>, sub: &str, max: u32, metrics: &Metrics) -> Result<Option<Lease>, ()> {
        let (_, lease) = self
            .take_lease(&self.scripts.acquire, self.user_key(sub), false, max, &[], metrics)
            .await?;
        Ok(lease)
    }

    /// Run a lease script (`1` = taken) on `key` (and `key:rate` with `rate_key`) within
    /// `timeout`, feeding the breaker. Returns the script's answer and, when it took one,
    /// the lease. A call that timed out gets a late release queued behind it.
    async fn take_lease(
        self: &Arc<Self>,
        script: &redis::Script,
        key: String,
        rate_key: bool,
        max: u32,
        extra: &[u64],
        metrics: &Metrics,
    ) -> Result<(i64, Option<Lease>), ()> {
        if self.broken() {
            return Err(());
        }
        let call = async {
            let mut con = self.connection().await?;
            let mut invocation = script.key(&key);
            if rate_key {
                invocation.key(format!("{key}:rate"));
            }
            invocation.arg(&self.instance).arg(max).arg(LEASE_TTL.as_millis() as u64);
            for a in extra {
                invocation.arg(*a);
            }
            invocation.invoke_async::<i64>(&mut con).await
        };
        let answer = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(1)) => Ok((
                1,
                Some(Lease {
                    cluster: self.clone(),
                    key,
                }),
            )),
            Ok(Ok(code)) => Ok((code, None)),
            Ok(Err(_)) => Err("error"),
            Err(_) => {
                self.release_late(key);
                Err("timeout")
            }
        };
        self.record(answer.as_ref().err().copied(), metrics);
        answer.map_err(|_| ())
    }

    /// A call that timed out may still run in Redis and take a lease nobody holds: give
    /// one back behind it (same connection, so after it). If it never ran, this count is
    /// one short until the next heartbeat asserts the true one.
    fn release_late(self: &Arc<Self>, key: String) {
        drop(Lease {
            cluster: self.clone(),
            key,
        });
    }

    /// Count a connect-path call and feed the breaker.
    fn record(&self, failure: Option<&'static str>, metrics: &Metrics) {
        metrics.cluster_op("admit", failure.unwrap_or("ok"));
        match failure {
            None => self.call_ok(metrics),
            Some(_) => self.call_failed(metrics),
        }
    }

    /// Re-assert this instance's count of every user with live sessions (heartbeat): a
    /// restarted Redis learns them again, and the leases do not expire while held.
    async fn heartbeat(&self, users: &[(String, u32)], ips: &[(String, u32)]) -> redis::RedisResult<()> {
        let mut con = self.connection().await?;
        // The live instances: each asserts itself with its lease end.
        let instances = format!("{}:instances", self.prefix);
        let now = unix_now();
        let (_, _, live, (secs, micros)): ((), (), u32, (u64, u64)) = redis::pipe()
            .zadd(&instances, &self.instance, now + LEASE_TTL.as_secs())
            .zrembyscore(&instances, "-inf", now)
            .zcard(&instances)
            .cmd("TIME")
            .query_async(&mut con)
            .await?;
        self.live.store(live.max(1), Ordering::Relaxed);
        // Every key's count in one pipeline, lease ends in Redis time; keys this instance
        // asserted last time and holds no more are asserted at 0 (a release that never
        // arrived, or a lease a timed-out call took, stops counting now).
        let lease_end = secs * 1000 + micros / 1000 + LEASE_TTL.as_millis() as u64;
        let ttl_ms = (LEASE_TTL.as_millis() * 2) as i64;
        let mut now_held = HashSet::new();
        let mut pipe = redis::pipe();
        let keys = users.iter().map(|(sub, n)| (self.user_key(sub), *n));
        for (key, n) in keys.chain(ips.iter().map(|(ip, n)| (self.ip_key(ip), *n))) {
            pipe.hset_multiple(
                &key,
                &[(self.instance.clone(), n as u64), (format!("{}:exp", self.instance), lease_end)],
            )
            .ignore()
            .pexpire(&key, ttl_ms)
            .ignore();
            now_held.insert(key);
        }
        let gone: Vec<String> = crate::util::lock(&self.asserted).difference(&now_held).cloned().collect();
        for key in &gone {
            pipe.hdel(key, &[self.instance.clone(), format!("{}:exp", self.instance)]).ignore();
        }
        if !now_held.is_empty() || !gone.is_empty() {
            pipe.query_async::<()>(&mut con).await?;
        }
        *crate::util::lock(&self.asserted) = now_held;
        Ok(())
    }

    /// A client key's lease hash (its rate key adds `:rate`), one Redis Cluster slot.
    fn ip_key(&self, label: &str) -> String {
        format!("{}:{{ip:{label}}}", self.prefix)
    }

    /// The shared rate and cap for a new connection from client key `label`, within
    /// `timeout`. `Err`: Redis did not answer in time (the local limits decide).
    pub async fn acquire_ip(
        self: &Arc<Self>,
        label: &str,
        max: u32,
        rate: crate::config::Rate,
        burst: u32,
        metrics: &Metrics,
    ) -> Result<IpAnswer, ()> {
        let interval = (rate.per.as_micros() / u128::from(rate.count.max(1))).max(1) as u64;
        let tolerance = interval.saturating_mul(u64::from(burst.max(1) - 1));
        let (code, lease) = self
            .take_lease(
                &self.scripts.acquire_ip,
                self.ip_key(label),
                true,
                max,
                &[interval, tolerance],
                metrics,
            )
            .await?;
        Ok(match (code, lease) {
            (_, Some(lease)) => IpAnswer::Taken(lease),
            (0, None) => IpAnswer::RateLimited,
            (_, None) => IpAnswer::Full,
        })
    }

    /// Ranges and token ids that pending actions will write to Redis: bans, revocations,
    /// and ranges to unban.
    fn pending_targets(&self) -> (HashSet<ipnet::IpNet>, HashSet<String>, HashSet<ipnet::IpNet>) {
        let (mut bans, mut revoked, mut lifted) = (HashSet::new(), HashSet::new(), HashSet::new());
        for e in crate::util::lock(&self.pending).iter() {
            match e {
                Event::Ban { cidr, .. } => {
                    if let Ok(net) = cidr.parse() {
                        bans.insert(canonical(net));
                    }
                }
                Event::Revoke { jti, .. } => {
                    revoked.insert(jti.clone());
                }
                Event::Unban { cidr } => {
                    if let Ok(net) = cidr.parse() {
                        lifted.insert(canonical(net));
                        bans.remove(&canonical(net));
                    }
                }
                Event::Kick { .. } => {}
            }
        }
        (bans, revoked, lifted)
    }
}

/// A score as Unix seconds, when it is one.
fn unix_secs(score: f64) -> Option<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_tagged_json() {
        let e = Envelope {
            from: "a1".into(),
            event: Event::Ban {
                cidr: "203.0.113.0/24".into(),
                until: 42,
            },
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"from":"a1","kind":"ban","cidr":"203.0.113.0/24","until":42}"#);
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.event, e.event);
        assert!(serde_json::from_str::<Envelope>(r#"{"from":"x","kind":"format_disk"}"#).is_err());
    }
}
