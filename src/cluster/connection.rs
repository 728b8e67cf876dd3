//! Reaching Redis: one server, the master a set of Sentinels names (followed across a
//! failover), or a Redis Cluster; the one shared connection, whether Redis is up, and
//! the breaker that stops calling it on the connect path after failures in a row.
//!
//! The breaker: [`BREAK_AFTER`] connect-path failures in a row open it, and from then
//! on handshakes use the `on_failure` fallback at once, waiting for nothing. While it
//! is open, one probe (a `PING` under `cluster.timeout`, every [`BREAK_FOR`]) runs in
//! the background; the first that answers closes it, so an instance returns to
//! `shared` within about a second of Redis answering again, busy or idle.

use super::Cluster;
use crate::config::{ConfigError, Located, RedisServers};
use crate::metrics::Metrics;
use redis::IntoConnectionInfo;
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::time::Instant;

/// Budget of an admin action's Redis write (the connect path's `timeout` is for calls a
/// client waits on; an operator's action may take longer).
pub(super) const ACTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait before connecting again after Redis failed.
pub(super) const RETRY: Duration = Duration::from_secs(1);
/// Connect-path calls that fail in a row before the breaker opens.
const BREAK_AFTER: u32 = 3;
/// How often the open breaker's probe asks Redis.
pub(super) const BREAK_FOR: Duration = Duration::from_secs(1);

/// Where Redis is, as built from `[cluster]`.
// One per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Servers {
    One(redis::Client),
    /// Asked for the current master at each (re)connect.
    Sentinel(Arc<tokio::sync::Mutex<redis::sentinel::SentinelClient>>),
    /// Commands go through the cluster client (routed by key slot); pub/sub through a
    /// plain connection to one seed (a Redis Cluster delivers `PUBLISH` to every node).
    Cluster {
        client: redis::cluster::ClusterClient,
        seeds: Vec<redis::Client>,
    },
}

/// A connection to whichever kind of Redis is configured.
#[derive(Clone)]
pub(super) enum Conn {
    One(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What every Redis connection is made with: the password and the CA, read at start.
struct Credentials<'a> {
    origin: &'a str,
    password: Option<String>,
    ca_pem: Option<Vec<u8>>,
}

impl Credentials<'_> {
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        self.ca_pem.as_ref().map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        })
    }

    /// A client for one server's URL.
    fn client(&self, url: &Located<String>) -> Result<redis::Client, ConfigError> {
        let mut info = url
            .value
            .as_str()
            .into_connection_info()
            .map_err(|_| url.error(self.origin, "not a usable Redis URL"))?;
        if let Some(p) = &self.password {
            let settings = info.redis_settings().clone().set_password(p.clone());
            info = info.set_redis_settings(settings);
        }
        match self.certificates() {
            None => redis::Client::open(info),
            Some(certs) => redis::Client::build_with_tls(info, certs),
        }
        .map_err(|_| url.error(self.origin, "not a usable Redis URL (or CA file)"))
    }
}

impl Servers {
    /// The clients for `c` (password and CA read now; nothing connects yet). Also the
    /// database the keys live in (pub/sub channels are global to a server).
    pub(super) fn new(c: &crate::config::Cluster, origin: &str) -> Result<(Servers, i64), ConfigError> {
        let first = c.redis.urls()[0];
        let password = match &c.password {
            Some(source) => {
                let secret = crate::keys::load_secret(source, origin, false)?;
                let text = std::str::from_utf8(secret.bytes()).map_err(|_| first.error(origin, "the Redis password is not UTF-8 text"))?;
                Some(text.to_string())
            }
            None => None,
        };
        let ca_pem = match &c.ca {
            Some(ca) => Some(
                crate::fsutil::read_limited(&ca.value, crate::fsutil::MAX_KEY_FILE)
                    .map_err(|e| ca.error(origin, format!("cannot read {}: {e}", ca.value.display())))?,
            ),
            None => None,
        };
        let creds = Credentials { origin, password, ca_pem };
        match &c.redis {
            RedisServers::One(url) => {
                let client = creds.client(url)?;
                let db = client.get_connection_info().redis_settings().db();
                Ok((Servers::One(client), db))
            }
            RedisServers::Sentinel { sentinels, master } => Servers::sentinel(&creds, sentinels, master),
            RedisServers::Cluster(seeds) => Servers::cluster(&creds, seeds),
        }
    }

    /// Sentinels watching `master`; they and the servers share the password.
    fn sentinel(creds: &Credentials<'_>, sentinels: &[Located<String>], master: &str) -> Result<(Servers, i64), ConfigError> {
        let first = &sentinels[0];
        let origin = creds.origin;
        let mut addrs = Vec::new();
        for url in sentinels {
            let info = url
                .value
                .as_str()
                .into_connection_info()
                .map_err(|_| url.error(origin, "not a usable Redis URL"))?;
            addrs.push(info.addr().clone());
        }
        let db = first
            .value
            .as_str()
            .into_connection_info()
            .map(|i| i.redis_settings().db())
            .unwrap_or(0);
        let mut b = redis::sentinel::SentinelClientBuilder::new(addrs, master, redis::sentinel::SentinelServerType::Master)
            .map_err(|_| first.error(origin, "not usable Sentinel addresses"))?
            .set_client_to_redis_db(db);
        if let Some(p) = &creds.password {
            b = b.set_client_to_redis_password(p).set_client_to_sentinel_password(p);
        }
        if let Some(certs) = creds.certificates() {
            b = b
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs);
        }
        let sentinel = b.build().map_err(|_| first.error(origin, "not usable Sentinel settings"))?;
        Ok((Servers::Sentinel(Arc::new(tokio::sync::Mutex::new(sentinel))), db))
    }

    /// A Redis Cluster from its seed nodes.
    fn cluster(creds: &Credentials<'_>, seeds: &[Located<String>]) -> Result<(Servers, i64), ConfigError> {
        let mut b = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(|u| u.value.as_str()))
            .connection_timeout(ACTION_TIMEOUT)
            .response_timeout(ACTION_TIMEOUT)
            .retries(2);
        if let Some(p) = &creds.password {
            b = b.password(p.clone());
        }
        if let Some(certs) = creds.certificates() {
            b = b.certs(certs);
        }
        let client = b
            .build()
            .map_err(|_| seeds[0].error(creds.origin, "not usable Redis Cluster seed URLs"))?;
        let seeds = seeds.iter().map(|u| creds.client(u)).collect::<Result<_, _>>()?;
        Ok((Servers::Cluster { client, seeds }, 0))
    }

    /// A plain client for the master (Sentinel: asked now) or, for a Redis Cluster, each
    /// seed in turn.
    async fn plain_clients(&self, main: Option<&tokio::runtime::Handle>) -> redis::RedisResult<Vec<redis::Client>> {
        match self {
            Servers::One(c) => Ok(vec![c.clone()]),
            Servers::Sentinel(s) => {
                // The Sentinel client keeps its connections to the Sentinels: made on the
                // main runtime, like every connection here (see `on_main`).
                let s = s.clone();
                let ask = on_main(main, async move { s.lock().await.async_get_client().await });
                match tokio::time::timeout(ACTION_TIMEOUT, ask).await {
                    Ok(r) => Ok(vec![r?]),
                    Err(_) => Err(super::timeout_error()),
                }
            }
            Servers::Cluster { seeds, .. } => Ok(seeds.clone()),
        }
    }
}

impl Cluster {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether the breaker is open: connect-path calls get the fallback at once.
    pub(super) fn broken(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= BREAK_AFTER
    }

    /// A connect-path call failed: after [`BREAK_AFTER`] in a row the breaker opens and
    /// the `on_failure` mode is in force until a probe or a sync gets an answer.
    pub(super) fn call_failed(&self, metrics: &Metrics) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 == BREAK_AFTER {
            tracing::warn!(
                mode = self.on_failure.label(),
                "cluster: Redis does not answer on the connect path; the breaker is open"
            );
            metrics.cluster_mode(self.on_failure.label());
            metrics.cluster_up(false); // Redis does not answer within `timeout`
        }
    }

    /// Redis answered: the breaker closes.
    pub(super) fn call_ok(&self, metrics: &Metrics) {
        if self.failures.swap(0, Ordering::Relaxed) >= BREAK_AFTER {
            tracing::info!("cluster: Redis answers again; the breaker is closed");
            metrics.cluster_mode(if self.is_up() { "shared" } else { self.on_failure.label() });
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
        metrics.cluster_up(up && !self.broken());
        metrics.cluster_mode(if up && !self.broken() { "shared" } else { self.on_failure.label() });
    }

    /// The shared connection, made on first use (and after [`Cluster::forget_connection`]):
    /// with Sentinel, to the master the Sentinels name now.
    pub(super) async fn connection(&self) -> redis::RedisResult<Conn> {
        let mut cached = self.conn.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(ACTION_TIMEOUT))
            .set_response_timeout(Some(ACTION_TIMEOUT));
        let main = self.main.as_ref();
        let c = match &self.servers {
            Servers::Cluster { client, .. } => {
                let client = client.clone();
                let connect = on_main(main, async move { client.get_async_connection().await });
                match tokio::time::timeout(ACTION_TIMEOUT * 2, connect).await {
                    Ok(c) => Conn::Cluster(c?),
                    Err(_) => return Err(super::timeout_error()),
                }
            }
            servers => {
                let client = servers.plain_clients(main).await?.remove(0);
                let connect = async move { client.get_multiplexed_async_connection_with_config(&config).await };
                Conn::One(on_main(main, connect).await?)
            }
        };
        *cached = Some(c.clone());
        Ok(c)
    }

    pub(super) async fn forget_connection(&self) {
        *self.conn.lock().await = None;
    }

    /// A subscriber connection: to the master (Sentinel: as named now), or to the first
    /// Redis Cluster seed that answers.
    pub(super) async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut last = super::timeout_error();
        for client in self.servers.plain_clients(self.main.as_ref()).await? {
            match tokio::time::timeout(ACTION_TIMEOUT, client.get_async_pubsub()).await {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(e)) => last = e,
                Err(_) => last = super::timeout_error(),
            }
        }
        Err(last)
    }

    /// The open breaker's probe: one `PING` under `cluster.timeout`; an answer closes it.
    pub(super) async fn probe(&self, metrics: &Metrics) {
        if !self.broken() {
            return;
        }
        let started = Instant::now();
        let ping = async {
            let mut con = self.connection().await?;
            redis::cmd("PING").query_async::<String>(&mut con).await
        };
        let result = match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        metrics.cluster_op("probe", result, started.elapsed());
        if result == "ok" {
            self.call_ok(metrics);
        }
    }

    /// Count a connect-path call (`started` when it began) and feed the breaker.
    pub(super) fn record(&self, failure: Option<&'static str>, started: Instant, metrics: &Metrics) {
        metrics.cluster_op("admit", failure.unwrap_or("ok"), started.elapsed());
        match failure {
            None => self.call_ok(metrics),
            Some(_) => self.call_failed(metrics),
        }
    }
}

/// Run `connect` on the main runtime (`main`: captured when the cluster was made) and
/// wait for it. redis-rs spawns a connection's driver task on the runtime that makes
/// it; made from a connection's worker thread (`server.workers`), the one shared
/// connection would be driven by that worker (delayed by its TLS handshakes) and would
/// die with the worker's runtime at the drain.
async fn on_main<T, F>(main: Option<&tokio::runtime::Handle>, connect: F) -> redis::RedisResult<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
{
    match main {
        Some(main) => main.spawn(connect).await.unwrap_or_else(|_| Err(super::timeout_error())),
        None => connect.await,
    }
}
