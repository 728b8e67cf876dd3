//! The gateway: shared state, the accept loops, and the three-step drain.
//!
//! [`start`] binds the listeners named in the config (port 0 works, for tests) and
//! returns a [`Running`] handle; `main` waits for a signal and calls
//! [`Running::shutdown`]. Everything loaded from one config lives in a [`Runtime`]
//! behind an `ArcSwap`, so a reload can swap it without touching open sessions.

use crate::auth::{Verifier, load_secret};
use crate::config::{AuthMode, Config, ConfigError};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Read buffer of the built-in echo's WebSocket. Small: most messages are small, and
/// an idle session should cost little memory. Larger messages grow it on demand.
const WS_READ_BUFFER: usize = 1024;
/// Bytes the built-in echo queues before writing; it flushes each batch anyway.
const WS_WRITE_BUFFER: usize = 16 * 1024;
/// Connections beyond `max_connections` that still get a 503; past this the TCP
/// connection is closed at once, so a flood cannot make the gateway do TLS work.
const OVER_CAP_SLACK: usize = 256;

/// Everything derived from one configuration.
pub struct Runtime {
    pub config: Config,
    pub tls: TlsAcceptor,
    pub verifier: Option<Verifier>,
    /// TLS connectors for `wss://` upstreams, by route index.
    pub connectors: Vec<Option<tokio_rustls::TlsConnector>>,
    /// Round-robin position, by route index.
    pub next_upstream: Vec<AtomicUsize>,
    /// Passive health, by route index and upstream index.
    pub health: Vec<Vec<crate::upstream::Health>>,
    /// WebSocket settings of the built-in echo backend, with the configured size
    /// limits. (The relay itself works on frames, see [`crate::relay`].)
    pub ws_config: WebSocketConfig,
}

impl Runtime {
    /// Load certificates and keys named by `config`. With `create_dev_files`, missing
    /// development certificates and secrets are generated when the config allows it.
    pub fn load(config: Config, create_dev_files: bool) -> Result<Runtime, ConfigError> {
        let tls = TlsAcceptor::from(crate::tls::server_config(&config, create_dev_files)?);
        let needs_jwt = config.routes.iter().any(|r| r.auth == AuthMode::Jwt);
        let verifier = if needs_jwt {
            Some(Verifier::load(&config.jwt, &config.origin, create_dev_files)?)
        } else {
            None
        };
        let connectors = config
            .routes
            .iter()
            .map(|r| crate::upstream::connector(r, &config.origin))
            .collect::<Result<_, _>>()?;
        let next_upstream = config.routes.iter().map(|_| AtomicUsize::new(0)).collect();
        let health = config
            .routes
            .iter()
            .map(|r| r.upstreams.iter().map(|_| Default::default()).collect())
            .collect();
        let l = &config.limits;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(WS_WRITE_BUFFER)
            .max_write_buffer_size(WS_WRITE_BUFFER + l.max_message_size + 64 * 1024)
            .max_message_size(Some(l.max_message_size))
            .max_frame_size(Some(l.max_frame_size));
        Ok(Runtime {
            config,
            tls,
            verifier,
            connectors,
            next_upstream,
            health,
            ws_config,
        })
    }
}

/// State shared by every connection.
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    pub metrics: Metrics,
    /// Per-IP admission state (rates, concurrency, bans); kept across reloads unless
    /// the `[limits]` that shape it change.
    admission: ArcSwap<crate::limits::Admission>,
    /// Cancelled and replaced on every successful reload; live sessions re-check then.
    generation: ArcSwap<CancellationToken>,
    /// Concurrent sessions per JWT `sub`.
    pub users: Arc<crate::limits::UserSlots>,
    /// Cancelled when sessions must close (drain).
    pub sessions: CancellationToken,
    tracker: TaskTracker,
    open: AtomicUsize,
    draining: AtomicBool,
}

impl Gateway {
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn admission(&self) -> Arc<crate::limits::Admission> {
        self.admission.load_full()
    }

    /// The current configuration generation (cancelled by the next reload).
    pub fn generation(&self) -> CancellationToken {
        (*self.generation.load_full()).clone()
    }

    /// Validate and load `config`, then swap it in atomically. Open sessions keep
    /// running; they re-check firewall and revocations against the new config. An
    /// invalid config changes nothing. Returns notes on what needs a restart.
    pub async fn reload(&self, config: Config) -> Result<Vec<String>, ConfigError> {
        let new = match Runtime::load(config, true) {
            Ok(rt) => Arc::new(rt),
            Err(e) => {
                self.metrics.reload(false);
                return Err(e);
            }
        };
        let old = self.runtime();
        let mut notes = Vec::new();
        if new.config.server.listen != old.config.server.listen {
            notes.push("server.listen changed: the old listeners stay until a restart".to_string());
        }
        if new.config.admin.listen != old.config.admin.listen {
            notes.push("admin.listen changed: takes effect after a restart".to_string());
        }
        if new.config.log.format != old.config.log.format
            || new.config.log.level != old.config.log.level
            || new.config.log.file != old.config.log.file
        {
            notes.push("[log] changed: takes effect after a restart".to_string());
        }
        if new.config.limits.admission != old.config.limits.admission {
            let next = self.admission().reconfigured(new.config.limits.admission.clone());
            self.admission.store(Arc::new(next));
        }
        for r in &new.config.routes {
            self.metrics.register_route(&r.name);
        }
        if let (Some(n), Some(o)) = (&new.verifier, &old.verifier) {
            if n.keys().remote_url().is_some() && n.keys().remote_url() == o.keys().remote_url() {
                n.keys().adopt_jwks(o.keys());
            }
        }
        // The new key set gets its own refresh loop, which ends at the next reload; the
        // old runtime's loop ends now, even while old sessions still hold that runtime.
        let next_generation = CancellationToken::new();
        start_jwks_refresh(&new, &self.metrics, next_generation.clone()).await;
        self.runtime.store(new);
        self.generation.swap(Arc::new(next_generation)).cancel();
        self.metrics.reload(true);
        Ok(notes)
    }

    /// Ready to serve: not draining, and every route has an upstream not in back-off.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.runtime().health.iter().all(|route| route.iter().any(|h| !h.is_down()))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Connections accepted and not yet finished.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A started gateway.
pub struct Running {
    pub wss_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Begin the drain: stop accepting, close sessions with 1001, wait up to `shutdown_grace`.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Wait until the drain has finished.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Bind the config's listeners and start serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let runtime = Runtime::load(config, true)?;
    let mut listeners = Vec::new();
    for addr in &runtime.config.server.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        listeners.push(l);
    }
    let admin_addr = runtime.config.admin.listen;
    let admin = TcpListener::bind(admin_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on admin address {admin_addr}: {e}"))?;
    let wss_addrs = listeners.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;
    let admin_addr = admin.local_addr()?;
    let metrics = Metrics::new();
    for r in &runtime.config.routes {
        metrics.register_route(&r.name);
    }
    let admission = Arc::new(crate::limits::Admission::new(runtime.config.limits.admission.clone()));
    let gateway = Arc::new(Gateway {
        runtime: ArcSwap::from_pointee(runtime),
        metrics,
        admission: ArcSwap::new(admission),
        generation: ArcSwap::from_pointee(CancellationToken::new()),
        users: Arc::default(),
        sessions: CancellationToken::new(),
        tracker: TaskTracker::new(),
        open: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
    });
    start_jwks_refresh(&gateway.runtime(), &gateway.metrics, gateway.generation()).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(gateway.clone(), listeners, admin, stop.clone()));
    Ok(Running {
        wss_addrs,
        admin_addr,
        gateway,
        stop,
        task,
    })
}

async fn serve(gw: Arc<Gateway>, listeners: Vec<TcpListener>, admin: TcpListener, stop: CancellationToken) {
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(crate::admin::serve(gw.clone(), admin, admin_stop.clone()));
    let accept_tasks: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(accept_loop(gw.clone(), l, stop.clone())))
        .collect();
    let prune_task = tokio::spawn(prune_loop(gw.clone(), stop.clone()));

    stop.cancelled().await;
    // 1. Stop accepting; /readyz turns 503; handshakes still in progress get a 503.
    gw.draining.store(true, Ordering::Relaxed);
    for t in accept_tasks {
        let _ = t.await;
    }
    let _ = prune_task.await;
    let grace = gw.runtime().config.server.shutdown_grace;
    tracing::info!(open = gw.open_connections(), grace_ms = grace.as_millis() as u64, "draining");
    // 2. Tell every session (close 1001 to client and upstream).
    gw.sessions.cancel();
    // 3. Bound the wait.
    gw.tracker.close();
    if tokio::time::timeout(grace, gw.tracker.wait()).await.is_err() {
        tracing::warn!(open = gw.open_connections(), "shutdown grace expired with connections still open");
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
}

async fn accept_loop(gw: Arc<Gateway>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let accepted = Instant::now();
        gw.metrics.accepted();
        let rt = gw.runtime();
        let cap = rt.config.server.max_connections;
        let open = gw.open.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = OpenGuard(gw.clone());
        if open > cap + OVER_CAP_SLACK {
            gw.metrics.rejected("global_conn_limit");
            tracing::debug!(peer = %peer, reason = "global_conn_limit", "rejected");
            drop(guard);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let over_cap = open > cap;
        if rt.config.server.client_ip_source == crate::config::ClientIpSource::ProxyProtocol {
            // The client address comes from the PROXY header, read in the connection's own task.
            if !rt
                .config
                .server
                .trusted_proxies
                .iter()
                .any(|n| n.contains(&peer.ip().to_canonical()))
            {
                gw.metrics.rejected("firewall");
                tracing::info!(peer = %peer.ip().to_canonical(), reason = "firewall", "rejected: PROXY header from an untrusted peer");
                continue;
            }
            let gw2 = gw.clone();
            gw.tracker.spawn(async move {
                let _guard = guard;
                proxied(gw2, rt, tcp, peer, accepted, over_cap).await;
            });
            continue;
        }
        // Cheap checks before any TLS work: firewall, then per-IP rate and concurrency.
        let slot = match pre_tls_checks(&gw, &rt, peer.ip().to_canonical()) {
            Ok(slot) => slot,
            Err(reject) => {
                gw.metrics.rejected(reject.label());
                tracing::info!(peer = %peer.ip().to_canonical(), reason = reject.label(), "rejected");
                continue;
            }
        };
        let gw2 = gw.clone();
        gw.tracker.spawn(async move {
            let _guard = (guard, slot);
            crate::conn::handle(gw2, rt, tcp, peer, accepted, over_cap).await;
        });
    }
}

/// A connection from a trusted L4 proxy: read its PROXY header (within the handshake
/// timeout), then run the cheap checks on the client it names, then the usual stages.
async fn proxied(gw: Arc<Gateway>, rt: Arc<Runtime>, mut tcp: tokio::net::TcpStream, peer: SocketAddr, accepted: Instant, over_cap: bool) {
    let deadline = accepted + rt.config.server.handshake_timeout;
    let client = match tokio::time::timeout_at(deadline, crate::proxy_protocol::read_header(&mut tcp)).await {
        Ok(Ok(addr)) => addr.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())).unwrap_or(peer),
        Ok(Err(e)) => {
            gw.metrics.rejected("bad_request");
            tracing::info!(peer = %peer.ip(), reason = "bad_request", detail = %e, "rejected");
            return;
        }
        Err(_) => {
            gw.metrics.rejected("handshake_timeout");
            tracing::info!(peer = %peer.ip(), reason = "handshake_timeout", "rejected: no PROXY header in time");
            return;
        }
    };
    let slot = if client.ip() == peer.ip().to_canonical() {
        None
    } else {
        let ip = client.ip();
        let check = if rt.config.firewall.allows(ip) {
            gw.admission().admit(ip).map(Some)
        } else {
            Err(crate::error::Reject::Firewall)
        };
        match check {
            Ok(s) => s,
            Err(reject) => {
                gw.metrics.rejected(reject.label());
                tracing::info!(peer = %ip, reason = reject.label(), "rejected");
                return;
            }
        }
    };
    let _slot = slot;
    crate::conn::handle(gw, rt, tcp, client, accepted, over_cap).await;
}

/// Firewall and per-IP limits on the TCP peer. A trusted proxy whose clients are
/// identified by `X-Forwarded-For` is checked per client at the request stage instead.
fn pre_tls_checks(gw: &Arc<Gateway>, rt: &Runtime, ip: std::net::IpAddr) -> Result<Option<crate::limits::IpSlot>, crate::error::Reject> {
    let server = &rt.config.server;
    if server.client_ip_source == crate::config::ClientIpSource::XForwardedFor && server.trusted_proxies.iter().any(|n| n.contains(&ip)) {
        return Ok(None);
    }
    if !rt.config.firewall.allows(ip) {
        return Err(crate::error::Reject::Firewall);
    }
    gw.admission().admit(ip).map(Some)
}

/// Fetch the JWKS URL once now, then keep it fresh until `until` is cancelled (the next
/// reload) or the runtime is gone: one refresh loop per live key set.
pub async fn start_jwks_refresh(rt: &Arc<Runtime>, metrics: &Metrics, until: CancellationToken) {
    let Some(v) = rt.verifier.as_ref().filter(|v| v.keys().has_remote()) else {
        return;
    };
    let Some(every) = rt.config.jwt.jwks_url.as_ref().map(|u| u.refresh) else {
        return;
    };
    match v.keys().refresh().await {
        Ok(n) => {
            metrics.jwks_refresh(true);
            tracing::info!(keys = n, "JWKS loaded");
        }
        Err(e) => {
            metrics.jwks_refresh(false);
            tracing::error!(error = %e, "JWKS fetch failed; tokens needing it are refused until a fetch succeeds");
        }
    }
    let weak = Arc::downgrade(rt);
    let metrics = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = until.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let Some(rt) = weak.upgrade() else { return };
            if let Some(v) = &rt.verifier {
                match v.keys().refresh().await {
                    Ok(_) => metrics.jwks_refresh(true),
                    Err(e) => {
                        metrics.jwks_refresh(false);
                        tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good key set");
                    }
                }
            }
        }
    });
}

/// Prune per-IP limiter state on a timer so it does not grow with distinct clients.
async fn prune_loop(gw: Arc<Gateway>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => gw.admission().prune(),
        }
    }
}

/// How often per-IP limiter state is pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// Decrements the open-connection count when a connection ends, however it ends.
struct OpenGuard(Arc<Gateway>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Insecure settings worth a warning from `wsgate check` (they are allowed, not errors).
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.tls.self_signed_if_missing {
        w.push("tls.self_signed_if_missing = true: a self-signed development certificate may be served".to_string());
    }
    if let crate::config::SecretSource::File {
        generate_if_missing: true, ..
    } = config.jwt.secret
    {
        w.push("jwt.generate_secret_if_missing = true: development only".to_string());
    }
    if let Ok(secret) = load_secret(&config.jwt.secret, &config.origin, false) {
        if secret.len() < 32 && config.jwt.algorithms.iter().any(|a| format!("{a:?}").starts_with("HS")) {
            w.push(format!("jwt secret is {} bytes; use at least 32", secret.len()));
        }
    }
    if !config.admin.listen.ip().is_loopback() {
        w.push(format!(
            "admin.listen = {}: metrics are reachable beyond this host",
            config.admin.listen
        ));
    }
    let jwt_routes = config.routes.iter().any(|r| r.auth == AuthMode::Jwt);
    let exp_required = config.jwt.required_claims.iter().any(|c| c == "exp");
    if jwt_routes && !exp_required {
        w.push("jwt.required_claims does not hold \"exp\": tokens that never expire are accepted".to_string());
    }
    if jwt_routes && exp_required && !config.jwt.close_on_expiry {
        w.push("jwt.close_on_expiry = false: sessions outlive their token's exp".to_string());
    }
    if config.jwt.leeway > Duration::from_secs(300) {
        w.push("jwt.leeway is over 5 minutes".to_string());
    }
    let public = config.server.listen.iter().any(|a| !a.ip().is_loopback());
    if public && config.firewall.default == crate::firewall::Default_::Allow && !config.firewall.has_deny_rules() {
        w.push("firewall default = \"allow\" with no deny rules on a public listener".to_string());
    }
    for r in &config.routes {
        if r.auth == AuthMode::None && public {
            w.push(format!("route {:?} has auth = \"none\" on a public listener", r.name));
        }
        if r.allowed_origins.iter().any(|o| o == "*") {
            w.push(format!(
                "route {:?} has allowed_origins = [\"*\"]: any web page may open sockets",
                r.name
            ));
        }
    }
    w
}
