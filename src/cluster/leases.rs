//! The shared caps and the per-IP rate: one Lua call per admission takes a lease (or
//! refuses), a heartbeat asserts this instance's counts, and a dropped [`Lease`] is
//! given back.

use super::connection::ACTION_TIMEOUT;
use super::{Cluster, LEASE_TTL, Unanswered, unix_now};
use crate::metrics::Metrics;
use futures_util::StreamExt;
use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
};

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

/// The Lua scripts, hashed once (their SHA-1 is what Redis runs them by).
pub(super) struct Scripts {
    acquire: redis::Script,
    acquire_ip: redis::Script,
    release: redis::Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            acquire: redis::Script::new(ACQUIRE),
            acquire_ip: redis::Script::new(ACQUIRE_IP),
            release: redis::Script::new(RELEASE),
        }
    }
}

/// What the shared per-IP check answered.
pub enum IpAnswer {
    Taken(Lease),
    RateLimited,
    Full,
}

/// One session of a user counted in Redis; given back when dropped.
pub struct Lease {
    cluster: Arc<Cluster>,
    key: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (cluster, key) = (self.cluster.clone(), std::mem::take(&mut self.key));
        self.cluster.spawn(async move {
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
            let started = tokio::time::Instant::now();
            let result = match tokio::time::timeout(ACTION_TIMEOUT, release).await {
                Ok(Ok(_)) => "ok",
                Ok(Err(_)) => "error",
                Err(_) => "timeout",
            };
            if let Some(m) = cluster.metrics.get() {
                m.cluster_op("release", result, started.elapsed());
            }
        });
    }
}

impl Cluster {
    /// A shared cap as this instance enforces it alone while Redis fails (`local`): its
    /// share, the cap divided by the live instances last seen (at least 1). `None` while
    /// the number of instances is unknown (no sync and no state file yet): no share can
    /// be granted then, never the whole cap.
    pub fn local_share(&self, cap: u32) -> Option<u32> {
        let live = self.live.load(Ordering::Relaxed);
        (live > 0).then(|| (cap / live).max(1))
    }

    /// Instances alive as last seen (`None`: not known yet).
    pub fn live_instances(&self) -> Option<u32> {
        Some(self.live.load(Ordering::Relaxed)).filter(|n| *n > 0)
    }

    /// The user's hash key: a hash tag of the SHA-256 of `sub` (any length, any bytes).
    fn user_key(&self, sub: &str) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, sub.as_bytes());
        let hex = crate::util::hex(&d.as_ref()[..16]);
        format!("{}:{{u:{hex}}}", self.prefix)
    }

    /// Take one of `sub`'s `max` sessions across every instance, within `timeout`.
    /// `Ok(None)`: all taken; `Err(Unanswered)`: Redis did not answer in time (the caller decides).
    pub async fn acquire_user(self: &Arc<Self>, sub: &str, max: u32, metrics: &Metrics) -> Result<Option<Lease>, Unanswered> {
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
    ) -> Result<(i64, Option<Lease>), Unanswered> {
        // An open breaker: the fallback at once; its probe runs in the background.
        if self.broken() {
            return Err(Unanswered);
        }
        let started = tokio::time::Instant::now();
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
        self.record(answer.as_ref().err().copied(), started, metrics);
        answer.map_err(|_| Unanswered)
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

    /// Re-assert this instance's count of every user with live sessions (heartbeat): a
    /// restarted Redis learns them again, and the leases do not expire while held.
    pub(super) async fn heartbeat(&self, users: &[(String, u32)], ips: &[(String, u32)], metrics: &Metrics) -> redis::RedisResult<()> {
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(ACTION_TIMEOUT * 2, self.assert_counts(users, ips)).await;
        let label = match &result {
            Ok(Ok(())) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        metrics.cluster_op("heartbeat", label, started.elapsed());
        result.unwrap_or_else(|_| Err(super::timeout_error()))
    }

    async fn assert_counts(&self, users: &[(String, u32)], ips: &[(String, u32)]) -> redis::RedisResult<()> {
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
        if self.live.swap(live.max(1), Ordering::Relaxed) != live.max(1) {
            self.state_changed();
        }
        // Every key's count, lease ends in Redis time; keys this instance asserted last
        // time and holds no more are asserted at 0 (a release that never arrived, or a
        // lease a timed-out call took, stops counting now). One pipeline per key: each
        // touches one Redis Cluster slot (one pipeline for all on a single server).
        let lease_end = secs * 1000 + micros / 1000 + LEASE_TTL.as_millis() as u64;
        let ttl_ms = (LEASE_TTL.as_millis() * 2) as i64;
        let fields = [self.instance.clone(), format!("{}:exp", self.instance)];
        let mut now_held = HashSet::new();
        let mut pipes = Vec::new();
        let keys = users.iter().map(|(sub, n)| (self.user_key(sub), *n));
        for (key, n) in keys.chain(ips.iter().map(|(ip, n)| (self.ip_key(ip), *n))) {
            let mut pipe = redis::pipe();
            pipe.hset_multiple(&key, &[(fields[0].clone(), n as u64), (fields[1].clone(), lease_end)])
                .ignore()
                .pexpire(&key, ttl_ms)
                .ignore();
            pipes.push(pipe);
            now_held.insert(key);
        }
        let gone: Vec<String> = crate::util::lock(&self.asserted).difference(&now_held).cloned().collect();
        for key in &gone {
            let mut pipe = redis::pipe();
            pipe.hdel(key, &fields).ignore();
            pipes.push(pipe);
        }
        if matches!(con, super::connection::Conn::One(_)) && pipes.len() > 1 {
            let mut one = redis::pipe();
            for p in &pipes {
                for cmd in p.cmd_iter() {
                    one.add_command(cmd.clone()).ignore();
                }
            }
            pipes = vec![one];
        }
        let sends = pipes.into_iter().map(|p| {
            let mut con = con.clone();
            async move { p.query_async::<()>(&mut con).await }
        });
        let results: Vec<redis::RedisResult<()>> = futures_util::stream::iter(sends).buffer_unordered(32).collect().await;
        results.into_iter().collect::<redis::RedisResult<Vec<()>>>()?;
        *crate::util::lock(&self.asserted) = now_held;
        Ok(())
    }

    /// A client key's lease hash (its rate key adds `:rate`), one Redis Cluster slot.
    fn ip_key(&self, label: &str) -> String {
        format!("{}:{{ip:{label}}}", self.prefix)
    }

    /// The shared rate and cap for a new connection from client key `label`, within
    /// `timeout`. `Err(Unanswered)`: Redis did not answer in time (the local limits decide).
    pub async fn acquire_ip(
        self: &Arc<Self>,
        label: &str,
        max: u32,
        rate: crate::config::Rate,
        burst: u32,
        metrics: &Metrics,
    ) -> Result<IpAnswer, Unanswered> {
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
}
