//! The one multiplexed Redis connection, whether Redis is up, and the breaker that stops
//! calling it on the connect path after failures in a row.

use super::Cluster;
use crate::metrics::Metrics;
use std::{sync::atomic::Ordering, time::Duration};

/// Budget of an admin action's Redis write (the connect path's `timeout` is for calls a
/// client waits on; an operator's action may take longer).
pub(super) const ACTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait before connecting again after Redis failed.
pub(super) const RETRY: Duration = Duration::from_secs(1);
/// Connect-path calls that fail in a row before the breaker opens.
const BREAK_AFTER: u32 = 3;
/// How long an open breaker skips Redis on the connect path before trying again.
const BREAK_FOR: Duration = Duration::from_secs(1);

impl Cluster {
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
    pub(super) fn broken(&self) -> bool {
        crate::util::lock(&self.broken_until).is_some_and(|t| std::time::Instant::now() < t)
    }

    /// A connect-path call failed: after [`BREAK_AFTER`] in a row, skip Redis for
    /// [`BREAK_FOR`] and run in the `on_failure` mode.
    pub(super) fn call_failed(&self, metrics: &Metrics) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAK_AFTER {
            *crate::util::lock(&self.broken_until) = Some(std::time::Instant::now() + BREAK_FOR);
            metrics.cluster_mode(self.on_failure.label());
            metrics.cluster_up(false); // Redis does not answer within `timeout`
        }
    }

    pub(super) fn call_ok(&self, metrics: &Metrics) {
        if self.failures.swap(0, Ordering::Relaxed) >= BREAK_AFTER {
            *crate::util::lock(&self.broken_until) = None;
            metrics.cluster_mode("shared");
            metrics.cluster_up(self.is_up());
        }
    }

    pub(super) fn set_up(&self, up: bool, metrics: &Metrics) {
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

    pub(super) async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
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

    pub(super) async fn forget_connection(&self) {
        *self.conn.lock().await = None;
    }

    /// Count a connect-path call and feed the breaker.
    pub(super) fn record(&self, failure: Option<&'static str>, metrics: &Metrics) {
        metrics.cluster_op("admit", failure.unwrap_or("ok"));
        match failure {
            None => self.call_ok(metrics),
            Some(_) => self.call_failed(metrics),
        }
    }
}
