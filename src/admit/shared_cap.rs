//! Caps held locally and, in cluster mode, across instances. [`SharedCap::hold`] is
//! the one place `cluster.on_failure` is applied: a new shared limit is one call to it
//! with its Redis operation and its share for `local` mode.

use crate::cluster::{Cluster, IpAnswer, Lease, Unanswered};
use crate::config::{ClientIpSource, Config, OnFailure};
use crate::error::Reject;
use crate::gateway::{Gateway, Runtime};
use crate::limits::UserSlot;
use std::{future::Future, net::IpAddr, sync::Arc};

/// A shared per-IP check in flight.
pub(crate) type SharedIpCheck = tokio::task::JoinHandle<Result<IpAnswer, Unanswered>>;

/// One session of a user, held for the session: the local count and, in cluster mode,
/// the lease that counts it across instances (both given back when dropped).
pub(crate) struct UserHold {
    _local: UserSlot,
    _lease: Option<Lease>,
}

/// A cap across instances, after its local part has passed.
pub(super) struct SharedCap<'a> {
    cluster: &'a Arc<Cluster>,
}

impl SharedCap<'_> {
    /// Run `op`, the cap's Redis call (`Ok(Ok)`: a place taken; `Ok(Err)`: refused).
    /// When Redis does not answer, `on_failure` decides: `local` runs `local_share`
    /// (this instance alone holds its share of the cap; while the number of instances
    /// is not known, no sync and no state file yet, it refuses with 503 rather than
    /// grant the whole cap), `open` admits on the local limits, `closed` refuses with 503.
    pub(super) async fn hold(
        &self,
        op: impl Future<Output = Result<Result<Lease, Reject>, Unanswered>>,
        local_share: impl FnOnce(&Cluster) -> Result<(), Reject>,
    ) -> Result<Option<Lease>, Reject> {
        match op.await {
            Ok(answer) => answer.map(Some),
            Err(Unanswered) => match self.cluster.on_failure {
                OnFailure::Local => local_share(self.cluster).map(|()| None),
                OnFailure::Open => Ok(None),
                OnFailure::Closed => Err(Reject::GlobalConnLimit),
            },
        }
    }
}

/// In cluster mode, start the shared per-IP check of `peer` now, so that it runs while
/// TLS is negotiated; the request stage waits for its answer before the 101. `None`
/// without a cluster, or when the client is named later by `X-Forwarded-For`. (A task
/// whose answer is never read, after a failed handshake, drops its lease: given back.)
pub(super) fn start_ip_check(gw: &Arc<Gateway>, rt: &Runtime, peer: IpAddr) -> Option<SharedIpCheck> {
    let cluster = gw.cluster.clone()?;
    let server = &rt.config.server;
    if server.client_ip_source == ClientIpSource::XForwardedFor && server.is_trusted_proxy(peer) {
        return None;
    }
    let a = rt.config.limits.admission.clone();
    let label = gw.per_ip().key(peer).label();
    let gw = gw.clone();
    Some(tokio::spawn(async move {
        cluster
            .acquire_ip(&label, a.max_connections_per_ip, a.connection_rate, a.connection_burst, &gw.metrics)
            .await
    }))
}

/// In cluster mode, the per-IP rate and cap across instances for `ip` (the local ones
/// have passed): one Redis call within `cluster.timeout`, before the 101 (`started`:
/// begun at accept).
pub(super) async fn hold_ip(gw: &Gateway, config: &Config, ip: IpAddr, started: Option<SharedIpCheck>) -> Result<Option<Lease>, Reject> {
    let Some(cluster) = &gw.cluster else { return Ok(None) };
    let a = &config.limits.admission;
    let op = async {
        let answer = match started {
            // Started with the TLS handshake: usually answered by now.
            Some(task) => task.await.unwrap_or(Err(Unanswered)),
            None => {
                let label = gw.per_ip().key(ip).label();
                cluster
                    .acquire_ip(&label, a.max_connections_per_ip, a.connection_rate, a.connection_burst, &gw.metrics)
                    .await
            }
        };
        answer.map(|a| match a {
            IpAnswer::Taken(lease) => Ok(lease),
            IpAnswer::RateLimited => Err(Reject::RateLimited),
            IpAnswer::Full => Err(Reject::IpConnLimit),
        })
    };
    // Alone, this instance holds its share of the cap (this connection counted) and of
    // the rate (a connection costs as many cells as there are instances).
    let share = |c: &Cluster| {
        let (Some(share), Some(live)) = (c.local_share(a.max_connections_per_ip), c.live_instances()) else {
            return Err(Reject::GlobalConnLimit); // how many share the cap is not known yet
        };
        if gw.per_ip().open_count(ip) > share {
            return Err(Reject::IpConnLimit);
        }
        if !gw.per_ip().charge_more(ip, live - 1) {
            return Err(Reject::RateLimited);
        }
        Ok(())
    };
    // Boxed: the Redis exchange is some 14 KB of future, which would otherwise be part of
    // every request's future (and copied with it) even without a cluster.
    SharedCap { cluster }.hold(Box::pin(op), share).await
}

/// Take one of `sub`'s sessions: the local cap first (no Redis call when it is full),
/// then, in cluster mode, the cap across instances.
pub(super) async fn hold_user(gw: &Gateway, max: u32, sub: &str) -> Result<UserHold, Reject> {
    let key = sub.to_string();
    let local = gw.users.acquire(&key, max).ok_or(Reject::UserConnLimit)?;
    let lease = match &gw.cluster {
        None => None,
        Some(cluster) => {
            let op = async {
                let answer = cluster.acquire_user(sub, max, &gw.metrics).await?;
                Ok(answer.ok_or(Reject::UserConnLimit))
            };
            // Alone, this instance holds its share of the cap (this session counted).
            let share = |c: &Cluster| match c.local_share(max) {
                Some(share) if gw.users.count(&key) > share => Err(Reject::UserConnLimit),
                Some(_) => Ok(()),
                None => Err(Reject::GlobalConnLimit), // how many share the cap is not known yet
            };
            SharedCap { cluster }.hold(Box::pin(op), share).await?
        }
    };
    Ok(UserHold {
        _local: local,
        _lease: lease,
    })
}
