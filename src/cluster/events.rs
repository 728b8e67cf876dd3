//! Admin actions across instances: written to Redis and announced on the channel,
//! followed and applied from the other instances, and repaired by a periodic resync.

use super::connection::{ACTION_TIMEOUT, BREAK_FOR, RETRY};
use super::{Cluster, Host, RESYNC, timeout_error, unix_now, unix_secs, until_from_now};
use crate::incidents::{MAX_BANS, MAX_REVOCATIONS, canonical};
use crate::metrics::Metrics;
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
};
use tokio_util::sync::CancellationToken;

/// Largest event read from the channel.
const MAX_EVENT: usize = 4096;
/// Actions kept while Redis is away, at most (the oldest are dropped beyond).
const MAX_PENDING: usize = 10_000;
/// Events from other instances logged per [`RESYNC`] period, at most.
const LOGGED_EVENTS: u32 = 20;
/// Drained upstreams a resync reads at most (more: the hash is not ours, skipped).
pub(super) const MAX_DRAINS: usize = 4096;
/// Life of the drains hash; renewed by each resync of any instance.
pub(super) const DRAINS_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 86400);

/// One admin action, as announced to the other instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Ban {
        cidr: String,
        until: u64,
    },
    Unban {
        cidr: String,
    },
    /// `exp` is when the revocation may end: the token's `exp` plus the leeway any
    /// verifier may still grant it. `jti` is scoped by provider ([`crate::auth::scoped`]).
    Revoke {
        jti: String,
        exp: u64,
    },
    /// `sub` is scoped by provider ([`crate::auth::scoped`]).
    Kick {
        sub: String,
    },
    /// An address (client key, [`crate::limits::IpKey::label`]) banned for auth failures.
    AuthBan {
        key: String,
        until: u64,
    },
    /// An upstream (as configured) of a route drained: its sessions close over `over_ms`.
    Drain {
        route: String,
        upstream: String,
        over_ms: u64,
    },
    Undrain {
        route: String,
        upstream: String,
    },
}

/// The field of a drained upstream in the drains hash.
fn drain_field(route: &str, upstream: &str) -> String {
    serde_json::json!([route, upstream]).to_string()
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
            Event::Ban { .. } | Event::Unban { .. } | Event::AuthBan { .. } => "ban",
            // DESIGN section 7 counts a kick ("revoke by sub") with revocations.
            Event::Revoke { .. } | Event::Kick { .. } => "revoke",
            Event::Drain { .. } | Event::Undrain { .. } => "drain",
        }
    }
}

impl Cluster {
    /// Write `event` to Redis and announce it. Whether Redis took it (the local action has
    /// been taken either way; a ban, unban or revocation that did not reach Redis is
    /// written again at the next connect).
    pub async fn publish(&self, event: Event, metrics: &Metrics) -> bool {
        // Pending while in flight too, so a resync meanwhile does not undo it here. A kick
        // is not kept: written later it would close sessions opened since.
        let keep = !matches!(event, Event::Kick { .. }) && self.keep_pending(&event);
        self.state_changed();
        let ok = self.write(&event, metrics).await;
        if ok && keep {
            let mut pending = crate::util::lock(&self.pending);
            if let Some(i) = pending.iter().rposition(|e| *e == event) {
                pending.remove(i);
            }
        }
        ok
    }

    /// Queue `event` to be written again at the next connect; whether it was queued. When
    /// the queue is full, auth-failure bans go first: clients cause them (one per banned
    /// address), and a flood of them must not push out an admin's ban or revocation, which
    /// the resync after the reconnect would then lift here too.
    fn keep_pending(&self, event: &Event) -> bool {
        let mut pending = crate::util::lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            match pending.iter().position(|e| matches!(e, Event::AuthBan { .. })) {
                Some(i) => {
                    pending.remove(i);
                }
                None if matches!(event, Event::AuthBan { .. }) => return false,
                None => {
                    pending.pop_front();
                }
            }
        }
        pending.push_back(event.clone());
        true
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
                Event::AuthBan { key, until } => {
                    pipe.zadd(&self.auth_bans, key, *until).ignore();
                }
                Event::Drain { route, upstream, over_ms } => {
                    pipe.hset(&self.drains, drain_field(route, upstream), *over_ms).ignore();
                    pipe.expire(&self.drains, DRAINS_TTL.as_secs() as i64).ignore();
                }
                Event::Undrain { route, upstream } => {
                    pipe.hdel(&self.drains, drain_field(route, upstream)).ignore();
                }
                Event::Kick { .. } => {}
            }
            // One round trip on a single server; on a Redis Cluster the set and the
            // channel hash to different slots, so the state is written first, then
            // announced (a pipeline would be refused as CROSSSLOT).
            if matches!(con, super::connection::Conn::Cluster(_)) && !matches!(event, Event::Kick { .. }) {
                pipe.query_async::<()>(&mut con).await?;
                pipe = redis::pipe();
            }
            pipe.publish(&self.channel, payload).ignore();
            pipe.query_async::<()>(&mut con).await
        };
        let started = tokio::time::Instant::now();
        let written = tokio::time::timeout(ACTION_TIMEOUT, write).await;
        let result = match &written {
            Ok(Ok(())) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        metrics.cluster_op(op, result, started.elapsed());
        if let Ok(Err(e)) = &written {
            tracing::debug!(op, error = %e, "cluster: Redis refused an admin action's write");
        }
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
        let _ = self.metrics.set(gw.metrics().clone());
        tokio::spawn(self.clone().keep_state_written(gw.clone(), stop.clone()));
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
        let mut pubsub = self.pubsub().await?;
        match tokio::time::timeout(ACTION_TIMEOUT, pubsub.subscribe(&self.channel)).await {
            Ok(r) => r?,
            Err(_) => return Err(timeout_error()),
        }
        self.replay(gw.metrics()).await?;
        self.resync(gw).await?;
        self.heartbeat(&gw.user_counts(), &gw.ip_counts(), gw.metrics()).await?;
        // Synced: Redis answers, whatever the connect path saw before.
        self.call_ok(gw.metrics());
        self.set_up(true, gw.metrics());
        let mut messages = pubsub.on_message();
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now: just synced
        let mut probe = tokio::time::interval(BREAK_FOR);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = probe.tick(), if self.broken() => self.probe(gw.metrics()).await,
                m = messages.next() => match m {
                    Some(msg) => self.apply(gw, msg.get_payload_bytes()),
                    None => return Err(redis::RedisError::from((redis::ErrorKind::Io, "subscription closed"))),
                },
                _ = tick.tick() => {
                    self.logged.store(0, Ordering::Relaxed);
                    self.replay(gw.metrics()).await?;
                    self.resync(gw).await?;
                    self.heartbeat(&gw.user_counts(), &gw.ip_counts(), gw.metrics()).await?;
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
            Event::AuthBan { key, until } => {
                gw.auth_ban(key, until_from_now(*until));
                false // refused at the next request; no live session to re-check
            }
            // Sessions watch their upstream themselves: no re-check needed. `over` is
            // bounded where the drain is applied (24 h at most).
            Event::Drain { route, upstream, over_ms } => {
                let over = std::time::Duration::from_millis(*over_ms);
                gw.set_drain(route, upstream, Some(over));
                false
            }
            Event::Undrain { route, upstream } => {
                gw.set_drain(route, upstream, None);
                false
            }
        };
        self.state_changed();
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOGGED_EVENTS {
            let (kind, target) = match &envelope.event {
                Event::Ban { cidr, .. } => ("ban", cidr.as_str()),
                Event::Unban { cidr } => ("unban", cidr.as_str()),
                Event::Revoke { jti, .. } => ("revoke", jti.as_str()),
                Event::Kick { sub } => ("kick", sub.as_str()),
                Event::AuthBan { key, .. } => ("auth_ban", key.as_str()),
                Event::Drain { upstream, .. } => ("drain", upstream.as_str()),
                Event::Undrain { upstream, .. } => ("undrain", upstream.as_str()),
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
            let _: () = con.zrembyscore(&self.auth_bans, "-inf", now).await?;
            // Bounded reads: never more than the local caps could hold (the latest first).
            // Scores read as doubles: a member with an odd score (1e17, "inf") is skipped,
            // not a failure of the whole read.
            let bans: Vec<(String, f64)> = con.zrevrange_withscores(&self.bans, 0, MAX_BANS as isize - 1).await?;
            let revoked: Vec<(String, f64)> = con.zrevrange_withscores(&self.revoked, 0, MAX_REVOCATIONS as isize - 1).await?;
            let auth_bans: Vec<(String, f64)> = con.zrevrange_withscores(&self.auth_bans, 0, MAX_BANS as isize - 1).await?;
            let drains: Option<Vec<(String, String)>> = self.read_drains(&mut con).await?;
            Ok::<_, redis::RedisError>((bans, revoked, auth_bans, drains))
        };
        let started = tokio::time::Instant::now();
        let (bans, revoked, auth_bans, drains) = match tokio::time::timeout(ACTION_TIMEOUT * 2, read).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                gw.metrics().cluster_op("sync", "error", started.elapsed());
                return Err(e);
            }
            Err(_) => {
                gw.metrics().cluster_op("sync", "timeout", started.elapsed());
                return Err(timeout_error());
            }
        };
        gw.metrics().cluster_op("sync", "ok", started.elapsed());
        for (key, until) in auth_bans {
            if let Some(until) = unix_secs(until) {
                gw.auth_ban(&key, until_from_now(until));
            }
        }
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
        if let Some(drains) = drains {
            self.resync_drains(gw, drains);
        }
        if changed {
            gw.recheck_sessions();
        }
        if !self.has_state.swap(true, Ordering::Relaxed) {
            tracing::info!("cluster: bans and revocations synced from Redis");
        }
        self.state_changed();
        Ok(())
    }

    /// The drains hash, renewed; `None` when it holds more than [`MAX_DRAINS`] fields
    /// (not read: the local drains stay as they are).
    async fn read_drains(&self, con: &mut super::connection::Conn) -> redis::RedisResult<Option<Vec<(String, String)>>> {
        let n: usize = con.hlen(&self.drains).await?;
        if n > MAX_DRAINS {
            return Ok(None);
        }
        if n > 0 {
            let _: () = con.expire(&self.drains, DRAINS_TTL.as_secs() as i64).await?;
        }
        let all: Vec<(String, String)> = con.hgetall(&self.drains).await?;
        Ok(Some(all))
    }

    /// Make the local drains match Redis: drained there and not here → drained here (over
    /// the `over` it was given); drained here and not there → undrained, unless a pending
    /// action is still to write it.
    fn resync_drains(&self, gw: &dyn Host, shared: Vec<(String, String)>) {
        let mut pending_drain = HashSet::new();
        let mut pending_undrain = HashSet::new();
        for e in crate::util::lock(&self.pending).iter() {
            match e {
                Event::Drain { route, upstream, .. } => {
                    pending_undrain.remove(&(route.clone(), upstream.clone()));
                    pending_drain.insert((route.clone(), upstream.clone()));
                }
                Event::Undrain { route, upstream } => {
                    pending_drain.remove(&(route.clone(), upstream.clone()));
                    pending_undrain.insert((route.clone(), upstream.clone()));
                }
                _ => {}
            }
        }
        let mut in_redis = HashSet::new();
        for (field, over) in shared {
            let Ok((route, upstream)) = serde_json::from_str::<(String, String)>(&field) else {
                continue;
            };
            let over = std::time::Duration::from_millis(over.parse().unwrap_or(0));
            let pair = (route, upstream);
            if !pending_undrain.contains(&pair) && gw.set_drain(&pair.0, &pair.1, Some(over)) == Some(true) {
                tracing::warn!(route = %crate::util::escape(&pair.0, 128), upstream = %crate::util::escape(&pair.1, 128), "cluster: upstream drained (resync)");
            }
            in_redis.insert(pair);
        }
        for pair in gw.drained() {
            if !in_redis.contains(&pair) && !pending_drain.contains(&pair) && gw.set_drain(&pair.0, &pair.1, None) == Some(true) {
                tracing::warn!(route = %crate::util::escape(&pair.0, 128), upstream = %crate::util::escape(&pair.1, 128), "cluster: upstream undrained (resync)");
            }
        }
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
                Event::Kick { .. } | Event::AuthBan { .. } | Event::Drain { .. } | Event::Undrain { .. } => {}
            }
        }
        (bans, revoked, lifted)
    }
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
