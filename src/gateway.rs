//! The gateway's shared state: the [`Runtime`] built from one config, the per-IP and
//! per-user limits that outlive reloads, metrics, and the one place that counts and
//! logs a refusal (`Gateway::refused`).
//!
//! Everything loaded from one config lives in a [`Runtime`] behind an `ArcSwap`, so a
//! reload swaps it without touching open sessions; they re-check themselves against
//! the new one when the generation token they hold is cancelled.

use crate::config::{ClientIpSource, Config, ConfigError};
use crate::error::Reject;
use crate::firewall::Firewall;
use crate::limits::{IpSlot, PerIp, UserSlots};
use crate::metrics::Metrics;
use crate::validation::Validator;
use arc_swap::ArcSwap;
use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Read buffer of the built-in echo's WebSocket. Small: most messages are small, and
/// an idle session should cost little memory. Larger messages grow it on demand.
const WS_READ_BUFFER: usize = 1024;
/// Bytes the built-in echo queues before writing; it flushes each batch anyway.
const WS_WRITE_BUFFER: usize = 16 * 1024;
/// Room for a whole message in the echo's write buffer, beyond its batch size.
const WS_WRITE_SLACK: usize = 64 * 1024;

/// Shortest admin API token.
pub const MIN_ADMIN_TOKEN: usize = 32;

/// Read the admin API token: the file's content, surrounding whitespace trimmed, at
/// least [`MIN_ADMIN_TOKEN`] bytes. Errors never show the content.
fn admin_token(f: &crate::config::Located<std::path::PathBuf>, origin: &str) -> Result<crate::keys::Secret, ConfigError> {
    let data =
        crate::fsutil::read_limited(&f.value, 4096).map_err(|e| f.error(origin, format!("cannot read {}: {e}", f.value.display())))?;
    let token = data.trim_ascii();
    // It travels in a header: one line of visible characters.
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(f.error(origin, "the admin token must be one line of visible ASCII characters"));
    }
    if token.len() < MIN_ADMIN_TOKEN {
        return Err(f.error(
            origin,
            format!("the admin token must be at least {MIN_ADMIN_TOKEN} bytes (it is {})", token.len()),
        ));
    }
    Ok(crate::keys::Secret::from(token.to_vec()))
}

/// `server.sticky_key_file`: at least this many bytes of secret.
const MIN_STICKY_KEY: usize = 32;

/// The sticky cookies' key from `server.sticky_key_file`: derived from the file's secret
/// (HMAC-SHA256 under a fixed label), so the same file used for something else gives
/// an unrelated key here.
fn sticky_key(f: &crate::config::Located<std::path::PathBuf>, origin: &str) -> Result<Arc<aws_lc_rs::hmac::Key>, ConfigError> {
    let data =
        crate::fsutil::read_limited(&f.value, 4096).map_err(|e| f.error(origin, format!("cannot read {}: {e}", f.value.display())))?;
    let secret = data.trim_ascii();
    if secret.len() < MIN_STICKY_KEY {
        return Err(f.error(
            origin,
            format!("the sticky key must be at least {MIN_STICKY_KEY} bytes (it is {})", secret.len()),
        ));
    }
    let file_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let derived = aws_lc_rs::hmac::sign(&file_key, b"wsgate sticky cookie key v1");
    Ok(Arc::new(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, derived.as_ref())))
}

/// How long a reload may take to read and check its files.
const RELOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Everything derived from one configuration.
pub struct Runtime {
    pub config: Config,
    pub tls: TlsAcceptor,
    /// The certificate `tls` serves: from files, or filled by the ACME task (then the
    /// same store across reloads).
    pub certs: Arc<crate::tls::CertStore>,
    /// `[tls.acme]`: TLS for talking to the ACME server (webpki roots plus `ca_file`).
    pub acme_client: Option<Arc<rustls::ClientConfig>>,
    /// `[firewall]` compiled, rule files included.
    pub firewall: Firewall,
    /// Every authentication method of the routes (keys, client CA): admission asks
    /// it, and live sessions re-check their principal against each new one.
    pub auth: crate::auth::Methods,
    /// TLS connectors for `wss://` upstreams, by route index.
    pub connectors: Vec<Option<tokio_rustls::TlsConnector>>,
    /// Round-robin position, by route index.
    pub next_upstream: Vec<AtomicUsize>,
    /// Each upstream's state (passive and active health, drain), by route index and
    /// upstream index; carried over by a reload for the (route, upstream) pairs it keeps.
    pub health: Vec<Vec<Arc<crate::health::Health>>>,
    /// Plain HTTP connection pools (`http = true` routes), by route index and upstream
    /// index; `None` for the built-in echo. Empty for other routes. A reload starts new
    /// pools; the old ones close as their last exchange ends.
    pub http_pools: Vec<Vec<Option<Arc<crate::proxy::Pool>>>>,
    /// The upstream choice and load, by route index.
    pub balancers: Vec<crate::balance::Balancer>,
    /// WebSocket settings of the built-in echo backend, with the configured size
    /// limits. (The relay itself works on frames, see [`crate::relay`].)
    pub ws_config: WebSocketConfig,
    /// Message checks (`[routes.validate]`, schema files compiled), by route index.
    pub validators: Vec<Option<Arc<Validator>>>,
    /// Every route's `forward_claims` header names, and `Authorization` when a route has
    /// `forward_token`: removed from every client request.
    pub identity_headers: Vec<http::HeaderName>,
    /// The admin API's bearer token (`admin.token_file`); `None`: the API is off.
    pub admin_token: Option<crate::keys::Secret>,
    /// Each route's name, by route index, shared by the log fields of its requests.
    pub route_names: Vec<Arc<str>>,
    /// Each route's HTTP request series, by route index, found on the route's first
    /// plain request (not looked up by name per request).
    pub http_series: Vec<std::sync::OnceLock<Arc<crate::metrics::HttpRouteMetrics>>>,
}

impl Runtime {
    /// Load certificates and keys named by `config`. With `create_dev_files`, missing
    /// development certificates and secrets are generated when the config allows it.
    pub fn load(config: Config, create_dev_files: bool) -> Result<Runtime, ConfigError> {
        Runtime::load_with(config, create_dev_files, None)
    }

    /// [`Runtime::load`], serving `[tls.acme]` certificates from `acme` (the running
    /// gateway's store) instead of a new, empty store.
    pub fn load_with(config: Config, create_dev_files: bool, acme: Option<Arc<crate::tls::CertStore>>) -> Result<Runtime, ConfigError> {
        let client_auth = crate::tls::client_auth(&config)?;
        let acme_client = match &config.tls.acme {
            Some(a) => {
                // Created at start only: a reload cannot move the running task's cache.
                crate::acme::check_cache_dir(a, &config.origin, create_dev_files && acme.is_none())?;
                Some(crate::tls::upstream_client_config(a.ca_file.as_ref(), &config.origin)?)
            }
            None => None,
        };
        let (server_tls, certs) = crate::tls::server_config(&config, create_dev_files, client_auth.clone(), acme)?;
        let tls = TlsAcceptor::from(server_tls);
        let firewall = Firewall::load(&config.firewall, &config.origin)?;
        let auth = crate::auth::Methods::load(&config, client_auth, create_dev_files)?;
        let connectors: Vec<Option<tokio_rustls::TlsConnector>> = config
            .routes
            .iter()
            .map(|r| crate::upstream::connector(r, &config.origin))
            .collect::<Result<_, _>>()?;
        let validators = config
            .routes
            .iter()
            .map(|r| {
                r.validate
                    .as_ref()
                    .map(|v| Validator::load(&r.name, v, &config.origin).map(Arc::new))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let mut identity_headers: Vec<http::HeaderName> = config
            .routes
            .iter()
            .flat_map(|r| r.forward_claims.iter().map(|(_, h)| h.clone()))
            .collect();
        // A route with `forward_token` vouches for `Authorization`: a client's own copy
        // (forged, revoked, refused on that route) must not reach an upstream through
        // another route, as one upstream may serve several.
        if config.routes.iter().any(|r| r.forward_token) {
            identity_headers.push(http::header::AUTHORIZATION);
        }
        // What forward auth endpoints vouch for (`copy_headers`, `identity_header`).
        for f in config.forward_providers.values() {
            identity_headers.extend(f.copy_headers.iter().cloned());
            identity_headers.push(f.identity_header.clone());
        }
        identity_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        identity_headers.dedup();
        let admin_token = config
            .admin
            .token_file
            .as_ref()
            .map(|f| admin_token(f, &config.origin))
            .transpose()?;
        let next_upstream = config.routes.iter().map(|_| AtomicUsize::new(0)).collect();
        let sticky_key = match &config.server.sticky_key_file {
            Some(f) => sticky_key(f, &config.origin)?,
            None => crate::balance::process_key(),
        };
        let balancers = config
            .routes
            .iter()
            .map(|r| crate::balance::Balancer::new(r, sticky_key.clone()))
            .collect();
        let workers = crate::workers::count(config.server.workers);
        let http_pools = config
            .routes
            .iter()
            .zip(&connectors)
            .map(
                |(r, tls): (&crate::config::Route, &Option<tokio_rustls::TlsConnector>)| match &r.http {
                    None => Vec::new(),
                    Some(policy) => r
                        .upstreams
                        .iter()
                        .map(|u| match u {
                            crate::config::Upstream::BuiltinEcho => None,
                            remote => Some(Arc::new(crate::proxy::Pool::new(
                                remote.clone(),
                                tls.clone(),
                                policy.max_connections,
                                workers,
                            ))),
                        })
                        .collect(),
                },
            )
            .collect();
        let health = crate::health::adopt(&config.routes, None);
        // The upstream side's ceiling: the largest any route allows (each session's
        // relay holds its own route's limits).
        let (max_message, max_frame) = config
            .routes
            .iter()
            .map(|r| config.limits_of(r))
            .fold((config.limits.max_message_size, config.limits.max_frame_size), |(m, f), r| {
                (m.max(r.max_message_size), f.max(r.max_frame_size))
            });
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(WS_WRITE_BUFFER)
            .max_write_buffer_size(WS_WRITE_BUFFER + max_message + WS_WRITE_SLACK)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_frame));
        let route_names = config.routes.iter().map(|r| Arc::from(r.name.as_str())).collect();
        let http_series = config.routes.iter().map(|_| std::sync::OnceLock::new()).collect();
        Ok(Runtime {
            route_names,
            http_series,
            config,
            tls,
            certs,
            acme_client,
            firewall,
            auth,
            connectors,
            next_upstream,
            health,
            http_pools,
            balancers,
            ws_config,
            validators,
            identity_headers,
            admin_token,
        })
    }
}

/// State shared by every connection.
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    pub metrics: Metrics,
    /// Per-IP admission state (rates, concurrency, bans); kept across reloads unless
    /// the `[limits]` that shape it change.
    per_ip: ArcSwap<PerIp>,
    /// Cancelled and replaced on every successful reload (ends that config's JWKS loop).
    generation: ArcSwap<CancellationToken>,
    /// Cancelled and replaced on every reload and admin action; live sessions re-check
    /// the firewall, bans, revocations, kicks and their certificate then.
    recheck: ArcSwap<CancellationToken>,
    /// Admin bans, revocations, kicks and the live session list (admin API).
    pub incidents: Arc<crate::incidents::Incidents>,
    /// `[cluster]`: admin actions shared with the other instances through Redis.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// What validated messages being assembled may hold together
    /// (`limits.max_assembly_memory`; a reload that changes it starts a new budget).
    assembly: ArcSwap<crate::relay::AssemblyBudget>,
    /// What every session's deflate/inflate state may hold together
    /// (`limits.max_compression_memory`; a reload changes the limit in place).
    pub compression: Arc<crate::relay::deflate::CompressionBudget>,
    /// Concurrent sessions per JWT `sub`.
    pub users: Arc<UserSlots>,
    /// Cancelled when sessions must close (drain).
    pub sessions: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) open: AtomicUsize,
    pub(crate) draining: AtomicBool,
    /// Connections per worker thread, once the workers run (`server::start_workers`).
    pub(crate) workers: std::sync::OnceLock<Arc<crate::workers::Load>>,
    /// One reload at a time (SIGHUP, the config watcher, tests): two racing reloads
    /// would otherwise both load, and the older file could be stored last.
    reloading: tokio::sync::Mutex<()>,
}

impl crate::cluster::Host for Gateway {
    fn incidents(&self) -> &crate::incidents::Incidents {
        &self.incidents
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn recheck_sessions(&self) {
        Gateway::recheck_sessions(self);
    }
    fn user_counts(&self) -> Vec<(String, u32)> {
        self.users.snapshot()
    }
    fn ip_counts(&self) -> Vec<(String, u32)> {
        self.per_ip().open_counts().into_iter().map(|(k, n)| (k.label(), n)).collect()
    }
    fn auth_ban(&self, key: &str, left: Duration) -> bool {
        crate::limits::IpKey::parse(key).is_some_and(|k| self.per_ip().ban_key(k, left))
    }
    fn auth_bans(&self) -> Vec<(String, Duration)> {
        self.per_ip().auth_bans().into_iter().map(|(k, d)| (k.label(), d)).collect()
    }
    fn set_drain(&self, route: &str, upstream: &str, over: Option<Duration>) -> Option<bool> {
        Gateway::set_drain(self, route, upstream, over)
    }
    fn drained(&self) -> Vec<(String, String)> {
        Gateway::drained(self)
    }
}

impl Gateway {
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Per-IP limits and bans.
    pub fn per_ip(&self) -> Arc<PerIp> {
        self.per_ip.load_full()
    }

    /// The current configuration generation (cancelled by the next reload).
    pub fn generation(&self) -> CancellationToken {
        (*self.generation.load_full()).clone()
    }

    /// The budget new sessions assemble validated messages under.
    pub fn assembly_budget(&self) -> Arc<crate::relay::AssemblyBudget> {
        self.assembly.load_full()
    }

    /// Cancelled at the next reload or admin action: live sessions re-check then.
    pub fn recheck_token(&self) -> CancellationToken {
        (*self.recheck.load_full()).clone()
    }

    /// Make every live session re-check its admission now.
    pub fn recheck_sessions(&self) {
        self.recheck.swap(Arc::new(CancellationToken::new())).cancel();
    }

    /// Validate and load `config`, then swap it in atomically. Open sessions keep
    /// running; they re-check firewall and revocations against the new config. An
    /// invalid config changes nothing. Returns notes on what needs a restart.
    pub async fn reload(&self, config: Config) -> Result<Vec<String>, ConfigError> {
        // Files are read on a blocking thread, under a deadline: a slow file system never
        // stalls the runtime or the signal loop (SIGTERM is still served).
        let _one_at_a_time = self.reloading.lock().await;
        let origin = config.origin.clone();
        let old = self.runtime();
        if config.tls.acme.is_some() != old.config.tls.acme.is_some() {
            self.metrics.reload(false);
            return Err(ConfigError {
                file: origin,
                line: None,
                key: "tls.acme".into(),
                message: "switching between certificate files and [tls.acme] needs a restart".into(),
            });
        }
        let acme = old.config.tls.acme.as_ref().map(|_| old.certs.acme_store());
        let loading = tokio::task::spawn_blocking(move || Runtime::load_with(config, true, acme));
        let loaded = match tokio::time::timeout(RELOAD_TIMEOUT, loading).await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(_)) | Err(_) => Err(ConfigError {
                file: origin,
                line: None,
                key: "(file)".into(),
                message: format!("loading the files took longer than {} s", RELOAD_TIMEOUT.as_secs()),
            }),
        };
        let new = match loaded {
            Ok(mut rt) => {
                // Drains and health verdicts of the upstreams the new config keeps stay.
                rt.health = crate::health::adopt(&rt.config.routes, Some((&old.config.routes, &old.health)));
                Arc::new(rt)
            }
            Err(e) => {
                self.metrics.reload(false);
                return Err(e);
            }
        };
        let mut notes = Vec::new();
        if new.config.tls.acme != old.config.tls.acme {
            notes.push("[tls.acme] changed: takes effect after a restart (the running ACME task keeps its settings)".to_string());
        }
        if new.config.server.listen_plain != old.config.server.listen_plain {
            notes.push("server.listen_plain changed: the old listeners stay until a restart".to_string());
        }
        if new.config.server.listen != old.config.server.listen {
            notes.push("server.listen changed: the old listeners stay until a restart".to_string());
        }
        if new.config.admin.listen != old.config.admin.listen {
            notes.push("admin.listen changed: takes effect after a restart".to_string());
        }
        if new.config.server.workers != old.config.server.workers {
            notes.push("server.workers changed: takes effect after a restart".to_string());
        }
        if new.config.log.format != old.config.log.format
            || new.config.log.level != old.config.log.level
            || new.config.log.file != old.config.log.file
        {
            notes.push("[log] changed: takes effect after a restart".to_string());
        }
        let cluster_key = |c: &Config| {
            c.cluster
                .as_ref()
                .map(|c| (c.redis.clone(), c.key_prefix.clone(), c.timeout, c.state_file.clone()))
        };
        if cluster_key(&new.config) != cluster_key(&old.config) {
            notes.push("[cluster] changed: takes effect after a restart".to_string());
        }
        if new.config.limits.admission.ipv6_prefix != old.config.limits.admission.ipv6_prefix {
            notes.push("limits.ipv6_prefix changed: takes effect after a restart (live counts and bans are keyed by it)".to_string());
        }
        let (nl, ol) = (&new.config.limits, &old.config.limits);
        if (nl.max_assembly_memory, nl.max_assembly_memory_per_client) != (ol.max_assembly_memory, ol.max_assembly_memory_per_client) {
            // Sessions keep the budget they started with; new ones share a new one.
            let budget = crate::relay::AssemblyBudget::new(nl.max_assembly_memory, nl.max_assembly_memory_per_client);
            self.assembly.store(Arc::new(budget));
        }
        self.compression.set_limit(nl.max_compression_memory);
        if new.config.limits.admission != old.config.limits.admission {
            let next = self.per_ip().reconfigured(new.config.limits.admission.clone());
            self.per_ip.store(Arc::new(next));
        }
        for r in &new.config.routes {
            self.metrics.register_route(&r.name, r.validate.is_some());
        }
        // Discovery again: a provider whose issuer no longer answers (or answers with
        // another `issuer`) keeps the keys it had; a new one has none to keep.
        for (provider, n) in new.auth.verifiers() {
            if let Err(e) = discover_one(&new, provider, n).await {
                let kept = old
                    .auth
                    .verifier(provider)
                    .is_some_and(|o| o.keys().remote_url() == n.keys().remote_url());
                if !kept {
                    self.metrics.reload(false);
                    return Err(e);
                }
                tracing::error!(error = %e, "reload: OIDC discovery failed; the provider keeps its last good keys");
                notes.push(format!("{e}: the last good keys stay"));
            }
        }
        for (provider, n) in new.auth.verifiers() {
            if let Some(o) = old.auth.verifier(provider)
                && !n.keys().fetched_within(crate::keys::JWKS_MIN_REFETCH)
                && n.keys().remote_url().is_some()
                && n.keys().remote_url() == o.keys().remote_url()
            {
                n.keys().adopt_jwks(o.keys());
            }
        }
        // The new key set gets its own refresh loop, which ends at the next reload; the
        // old runtime's loop ends now, even while old sessions still hold that runtime.
        let next_generation = CancellationToken::new();
        start_jwks_refresh(&new, &self.metrics, next_generation.clone()).await;
        // The old generation's health checkers end with it; the new config's start.
        crate::health::start_checkers(&new.config.routes, &new.connectors, &new.health, &self.metrics, &next_generation);
        self.runtime.store(new);
        self.generation.swap(Arc::new(next_generation)).cancel();
        self.recheck_sessions();
        self.metrics.connections_max(self.runtime().config.server.max_connections);
        self.metrics.reload(true);
        Ok(notes)
    }

    /// The Prometheus text of every metric, with the limiter's running totals brought up to date.
    pub fn render_metrics(&self) -> String {
        self.metrics.limiter_evictions(self.per_ip().evicted());
        self.certificate_expiries();
        let rt = self.runtime();
        for (r, route) in rt.config.routes.iter().enumerate() {
            for i in 0..route.upstreams.len() {
                let sessions = rt.balancers[r].load(i).map_or(0, |l| l.sessions());
                let health = &rt.health[r][i];
                self.metrics
                    .upstream_state(&route.name, i, sessions, (health.is_available(), health.is_drained()));
            }
        }
        if let Some(load) = self.workers.get() {
            self.metrics.worker_connections(&load.open());
        }
        self.metrics.render()
    }

    /// The expiry gauge: the soonest certificate unlabelled (0 while ACME has none), and
    /// with `[[tls.certificates]]` one series per certificate.
    fn certificate_expiries(&self) {
        let rt = self.runtime();
        let current = rt.certs.current().map(|c| c.not_after);
        let acme = rt.config.tls.acme.is_some();
        let files: Vec<i64> = rt
            .certs
            .all()
            .iter()
            .map(|c| c.not_after)
            .take(rt.config.tls.certificates.len())
            .collect();
        let soonest = files.iter().copied().chain(current).min();
        self.metrics
            .certificate_expiry(if acme && current.is_none() { None } else { soonest });
        if !rt.config.tls.certificates.is_empty() {
            self.metrics.certificate_expiries(&files, acme.then_some(current));
        }
    }

    /// Ready to serve: not draining, and every route has an upstream that is not down.
    /// A drained upstream counts as present: a drain is an operator's choice, applied
    /// on every instance in cluster mode, and must not take the whole fleet (and its
    /// other routes) out of the load balancer.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.runtime().health.iter().all(|route| route.iter().any(|h| !h.is_down()))
    }

    /// Drain (`Some(over)`) or undrain (`None`) upstream `url` (as configured) of route
    /// `route`. `None` when the running config has no such pair; else whether it changed.
    pub fn set_drain(&self, route: &str, url: &str, over: Option<Duration>) -> Option<bool> {
        let rt = self.runtime();
        let r = rt.config.routes.iter().position(|x| x.name == route)?;
        let i = rt.config.routes[r]
            .upstreams
            .iter()
            .position(|u| crate::balance::configured_url(u) == url)?;
        let h = &rt.health[r][i];
        Some(match over {
            Some(over) => h.drain(over),
            None => h.undrain(),
        })
    }

    /// Every drained upstream: (route, upstream as configured).
    pub fn drained(&self) -> Vec<(String, String)> {
        let rt = self.runtime();
        let mut out = Vec::new();
        for (r, route) in rt.config.routes.iter().enumerate() {
            for (i, u) in route.upstreams.iter().enumerate() {
                if rt.health[r][i].is_drained() {
                    out.push((route.name.clone(), crate::balance::configured_url(u)));
                }
            }
        }
        out
    }

    /// Cluster mode: whether the local copy holds the cluster's bans and revocations (a
    /// Redis sync, or the state file); until then `/readyz` answers 503.
    pub fn has_cluster_state(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.has_state())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Connections accepted and not yet finished.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Gateway {
    /// Shared state for a gateway serving `runtime`.
    pub(crate) fn new(runtime: Runtime, cluster: Option<Arc<crate::cluster::Cluster>>) -> Gateway {
        let metrics = Metrics::new();
        metrics.connections_max(runtime.config.server.max_connections);
        for r in &runtime.config.routes {
            metrics.register_route(&r.name, r.validate.is_some());
        }
        let per_ip = PerIp::new(runtime.config.limits.admission.clone());
        let l = &runtime.config.limits;
        let assembly = crate::relay::AssemblyBudget::new(l.max_assembly_memory, l.max_assembly_memory_per_client);
        let compression = Arc::new(crate::relay::deflate::CompressionBudget::new(l.max_compression_memory));
        Gateway {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            per_ip: ArcSwap::from_pointee(per_ip),
            generation: ArcSwap::from_pointee(CancellationToken::new()),
            recheck: ArcSwap::from_pointee(CancellationToken::new()),
            incidents: Arc::default(),
            cluster,
            assembly: ArcSwap::from_pointee(assembly),
            compression,
            users: Arc::default(),
            sessions: CancellationToken::new(),
            tracker: TaskTracker::new(),
            open: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            workers: std::sync::OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Stages 2–3 for a TCP peer, before any TLS work: firewall, then per-IP rate and
    /// concurrency. A trusted proxy whose clients are named by `X-Forwarded-For` passes
    /// here; each client it names is checked with [`Gateway::check_client`] at the
    /// request stage instead.
    pub(crate) fn pre_tls(&self, rt: &Runtime, peer: IpAddr) -> Result<Option<IpSlot>, Reject> {
        let server = &rt.config.server;
        if server.client_ip_source == ClientIpSource::XForwardedFor && server.is_trusted_proxy(peer) {
            return Ok(None);
        }
        self.check_client(rt, peer).map(Some)
    }

    /// Firewall, then per-IP limits, for one client address: the one pre-TLS check,
    /// also run on a client named by a PROXY header or by `X-Forwarded-For`.
    pub(crate) fn check_client(&self, rt: &Runtime, ip: IpAddr) -> Result<IpSlot, Reject> {
        if !rt.firewall.allows(ip) || self.incidents.is_banned(ip) {
            return Err(Reject::Firewall);
        }
        self.per_ip().admit(ip)
    }

    /// A plain HTTP request from `ip` (each on a kept-alive connection): the firewall and
    /// admin bans (which may have changed since the connection was accepted), then
    /// `http_rate_per_ip`.
    pub(crate) fn check_http(&self, rt: &Runtime, ip: IpAddr) -> Result<(), Reject> {
        if !rt.firewall.allows(ip) || self.incidents.is_banned(ip) {
            return Err(Reject::Firewall);
        }
        self.per_ip().admit_http(ip)
    }

    /// The one place a refusal is counted and logged, before TLS or after it. (Its
    /// HTTP status, close code and label come from [`Reject`]; the answer on the wire
    /// is written by the stage that refused.) An auth failure also counts toward the
    /// client's ban and is logged with the token's fingerprint, never the token.
    pub(crate) fn refused(&self, reject: &Reject, who: &Refused<'_>) {
        self.metrics.rejected(reject.label());
        let route = who.route.unwrap_or("-");
        let peer = who.peer;
        let request_id = who.request_id.unwrap_or("-");
        let status = reject.status().map(|s| s.as_u16());
        if let Some(failure) = reject.auth_failure() {
            if let (Some((key, ban)), Some(cluster)) = (self.per_ip().auth_failed(peer), &self.cluster) {
                // Shared: the address is refused on every instance, not only here.
                let event = crate::cluster::Event::AuthBan {
                    key: key.label(),
                    until: crate::cluster::unix_now() + ban.as_secs(),
                };
                let (c, metrics) = (cluster.clone(), self.metrics.clone());
                cluster.spawn(async move {
                    c.publish(event, &metrics).await;
                });
            }
            self.metrics.auth_failure(route, failure.label());
            let token = who.token_fingerprint.unwrap_or("-");
            tracing::warn!(request_id, %peer, route, status, reason = failure.label(), token, "authentication failed");
        } else if reject.is_warning() {
            tracing::warn!(request_id, %peer, route, status, reason = reject.label(), detail = %reject, "rejected");
        } else {
            tracing::info!(request_id, %peer, route, status, reason = reject.label(), detail = %reject, "rejected");
        }
    }
}

/// Who was refused, for [`Gateway::refused`].
pub(crate) struct Refused<'a> {
    /// The client address (the TCP peer until a PROXY header or `X-Forwarded-For` names another).
    pub(crate) peer: IpAddr,
    pub(crate) route: Option<&'a str>,
    pub(crate) token_fingerprint: Option<&'a str>,
    /// Known once the request head was read.
    pub(crate) request_id: Option<&'a str>,
}

impl Refused<'_> {
    /// A refusal before any route is known.
    pub(crate) fn peer(peer: IpAddr) -> Refused<'static> {
        Refused {
            peer,
            route: None,
            token_fingerprint: None,
            request_id: None,
        }
    }
}

/// OIDC discovery of every verifier in use that has it, now: the document (its
/// `issuer` exactly the configured one), then the JWKS at its `jwks_uri`. At start (no
/// keys: no start) and in `wsgate check`. The error names the provider's `issuer` key
/// and what failed.
pub async fn discover(rt: &Runtime) -> Result<(), ConfigError> {
    for (name, v) in rt.auth.verifiers() {
        discover_one(rt, name, v).await?;
    }
    Ok(())
}

async fn discover_one(rt: &Runtime, name: Option<&str>, v: &crate::auth::Verifier) -> Result<(), ConfigError> {
    if !v.keys().discovers() {
        return Ok(());
    }
    let cfg = match name {
        None => Some(&rt.config.jwt),
        Some(n) => rt.config.providers.get(n),
    };
    let at = cfg.and_then(|c| c.jwks_url.as_ref()).and_then(|u| u.discovery.as_ref());
    v.keys().refresh().await.map(|_| ()).map_err(|e| {
        let message = format!("OIDC discovery failed: {e}");
        match at {
            Some(at) => at.error(&rt.config.origin, message),
            None => ConfigError {
                file: rt.config.origin.clone(),
                line: None,
                key: name.map_or_else(|| "jwt".to_string(), |n| format!("providers.{n}")),
                message,
            },
        }
    })
}

/// Fetch the JWKS URL once now, then keep it fresh until `until` is cancelled (the next
/// reload) or the runtime is gone: one refresh loop per live key set.
pub(crate) async fn start_jwks_refresh(rt: &Arc<Runtime>, metrics: &Metrics, until: CancellationToken) {
    rt.auth.bind_metrics(metrics);
    if let Some(every) = rt.config.jwt.jwks_url.as_ref().map(|u| u.refresh) {
        let metrics = metrics.clone();
        let report = move |ok| metrics.jwks_refresh(ok);
        crate::keys::keep_fresh(rt, |rt: &Runtime| rt.auth.jwt().map(|v| v.keys()), every, report, until.clone()).await;
    }
    for (name, cfg) in &rt.config.providers {
        let Some(every) = cfg.jwks_url.as_ref().map(|u| u.refresh) else {
            continue;
        };
        let metrics = metrics.clone();
        let report = move |ok| metrics.jwks_refresh(ok);
        let name = name.clone();
        crate::keys::keep_fresh(
            rt,
            move |rt: &Runtime| rt.auth.verifier(Some(&name)).map(|v| v.keys()),
            every,
            report,
            until.clone(),
        )
        .await;
    }
}
