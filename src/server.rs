//! Stage 1 and the drain: bind the listeners, accept connections, hand each to
//! `conn`, and stop in three steps.
//!
//! [`start`] binds the listeners named in the config (port 0 works, for tests) and
//! returns a [`Running`] handle; `main` waits for a signal and calls
//! [`Running::shutdown`].

use crate::config::Config;
use crate::error::Reject;
use crate::gateway::{Gateway, Refused, Runtime};
use crate::workers::Load;
use anyhow::Context;
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::sync::oneshot;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tokio_util::sync::DropGuard;

/// Connections beyond `max_connections` that still get a 503; past this the TCP
/// connection is closed at once, so a flood cannot make the gateway do TLS work.
const OVER_CAP_SLACK: usize = 256;
/// How often per-IP limiter state is pruned.
pub(crate) const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// A started gateway.
pub struct Running {
    pub wss_addrs: Vec<SocketAddr>,
    /// `listen_plain`: ws:// listeners behind a TLS-terminating balancer.
    pub plain_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    /// Copies of the listening sockets, for `run --takeover` (`wss`, `plain`, `admin`).
    pub handover: Vec<(&'static str, std::os::fd::OwnedFd)>,
    stop: CancellationToken,
    /// Set by [`Running::hand_over`]: the drain keeps `/readyz` ready and lets handshakes
    /// in progress complete (the new process serves the same listeners).
    handing_over: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Begin the drain: stop accepting, close sessions with 1001, wait up to `shutdown_grace`.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// After a takeover: stop accepting (the new process accepts on the same sockets),
    /// then drain the sessions as [`Running::shutdown`] does, without refusing the
    /// handshakes already in progress or turning `/readyz` to 503.
    pub fn hand_over(&self) {
        self.handing_over.store(true, Ordering::SeqCst);
        self.stop.cancel();
    }

    /// Wait until the drain has finished.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Listening sockets: bound by [`start`], or handed over by a running wsgate
/// (`run --takeover`) to [`start_on`].
pub struct Listeners {
    pub wss: Vec<std::net::TcpListener>,
    pub plain: Vec<std::net::TcpListener>,
    pub admin: std::net::TcpListener,
}

/// Bind the config's listeners and start serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let runtime = Runtime::load(config, true)?;
    let bind = |addr: SocketAddr, what: &'static str| async move {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {what}{addr}: {e}"))?;
        anyhow::Ok(l.into_std()?)
    };
    let mut listeners = Listeners {
        wss: Vec::new(),
        plain: Vec::new(),
        admin: bind(runtime.config.admin.listen, "admin address ").await?,
    };
    for addr in &runtime.config.server.listen {
        listeners.wss.push(bind(*addr, "").await?);
    }
    for addr in &runtime.config.server.listen_plain {
        listeners.plain.push(bind(*addr, "(listen_plain) ").await?);
    }
    serve_on(runtime, listeners).await
}

/// Start serving on listeners handed over by a running wsgate; the config's addresses
/// are not bound (changing them needs a restart).
pub async fn start_on(config: Config, listeners: Listeners) -> anyhow::Result<Running> {
    serve_on(Runtime::load(config, true)?, listeners).await
}

async fn serve_on(runtime: Runtime, given: Listeners) -> anyhow::Result<Running> {
    let tokio_listener = |l: std::net::TcpListener| -> std::io::Result<TcpListener> {
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    let mut handover = Vec::new();
    let mut listeners = Vec::new();
    for (list, plain) in [(given.wss, false), (given.plain, true)] {
        for l in list {
            handover.push((if plain { "plain" } else { "wss" }, l.try_clone()?.into()));
            listeners.push((tokio_listener(l)?, plain));
        }
    }
    handover.push(("admin", given.admin.try_clone()?.into()));
    let admin = tokio_listener(given.admin)?;
    let addrs = |plain: bool| {
        listeners
            .iter()
            .filter(|(_, p)| *p == plain)
            .map(|(l, _)| l.local_addr())
            .collect::<Result<Vec<_>, _>>()
    };
    let (wss_addrs, plain_addrs) = (addrs(false)?, addrs(true)?);
    let admin_addr = admin.local_addr()?;
    let cluster = match &runtime.config.cluster {
        Some(c) => Some(Arc::new(crate::cluster::Cluster::new(c, &runtime.config.origin)?)),
        None => None,
    };
    let acme = match (&runtime.config.tls.acme, &runtime.acme_client) {
        (Some(a), Some(tls)) => Some(
            crate::acme::AcmeTask::new(a.clone(), runtime.certs.acme_store(), tls.clone())
                .map_err(|e| a.cache_dir.error(&runtime.config.origin, e))?,
        ),
        _ => None,
    };
    // OIDC discovery: a provider without keys is a config error at start.
    crate::gateway::discover(&runtime).await?;
    let gateway = Arc::new(Gateway::new(runtime, cluster.clone()));
    crate::gateway::start_jwks_refresh(&gateway.runtime(), &gateway.metrics, gateway.generation()).await;
    {
        let rt = gateway.runtime();
        crate::health::start_checkers(
            &rt.config.routes,
            &rt.connectors,
            &rt.health,
            &gateway.metrics,
            &gateway.generation(),
        );
    }
    let stop = CancellationToken::new();
    if let Some(c) = cluster {
        gateway.metrics.cluster_up(false);
        c.load_state(gateway.as_ref());
        tokio::spawn(c.run(gateway.clone(), stop.clone()));
    }
    if let Some(acme) = acme {
        gateway.metrics.acme_order(None);
        let gw = gateway.clone();
        tokio::spawn(acme.run(move |issued| gw.metrics.acme_order(Some(issued)), stop.clone()));
    }
    let handing_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepting = start_workers(&gateway, listeners, &stop)?;
    let task = tokio::spawn(serve(gateway.clone(), accepting, admin, (stop.clone(), handing_over.clone())));
    Ok(Running {
        wss_addrs,
        plain_addrs,
        handover,
        admin_addr,
        gateway,
        stop,
        handing_over,
        task,
    })
}

async fn serve(
    gw: Arc<Gateway>,
    (accepting, _stop_accepting_if_dropped): (Vec<oneshot::Receiver<()>>, DropGuard),
    admin: TcpListener,
    (stop, handing_over): (CancellationToken, Arc<std::sync::atomic::AtomicBool>),
) {
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(crate::admin::serve(gw.clone(), admin, admin_stop.clone()));
    let prune_task = tokio::spawn(prune_loop(gw.clone(), stop.clone()));

    stop.cancelled().await;
    // 1. Stop accepting; /readyz turns 503; handshakes still in progress get a 503.
    //    After a takeover the new process serves: handshakes in progress complete (a
    //    session that starts after step 2 gets its 1001 at once) and /readyz stays 200.
    let handed_over = handing_over.load(Ordering::SeqCst);
    if !handed_over {
        gw.draining.store(true, Ordering::Relaxed);
    }
    for worker in accepting {
        let _ = worker.await;
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
    // The config generation's tasks (health checkers, key refresh) end with the server.
    gw.generation().cancel();
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
}

/// Start the worker threads (`[server] workers`), each accepting from its own copy of
/// every listener. Returns, per worker, a receiver that completes once it accepts no
/// more, and a guard that stops the accepting if the server task is dropped without a
/// drain (a test's runtime ending): the workers then end with their connections.
fn start_workers(
    gw: &Arc<Gateway>,
    listeners: Vec<(TcpListener, bool)>,
    stop: &CancellationToken,
) -> anyhow::Result<(Vec<oneshot::Receiver<()>>, DropGuard)> {
    let count = crate::workers::count(gw.runtime().config.server.workers);
    let listeners = listeners
        .into_iter()
        .map(|(l, plain)| Ok((l.into_std()?, plain)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut each = Vec::with_capacity(count);
    for _ in 0..count {
        let copies = listeners
            .iter()
            .map(|(l, plain)| Ok((l.try_clone()?, *plain)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("copying the listening sockets for the workers")?;
        each.push(copies);
    }
    drop(listeners);
    // Made first: if starting fails, dropping the guard stops the workers that started.
    let accepting = stop.child_token();
    let guard = accepting.clone().drop_guard();
    let load = Load::new(count);
    let _ = gw.workers.set(load.clone());
    let (gw, token) = (gw.clone(), accepting);
    let open = |copies: Vec<(std::net::TcpListener, bool)>| {
        copies
            .into_iter()
            .map(|(l, plain)| Ok((TcpListener::from_std(l)?, plain)))
            .collect::<std::io::Result<Vec<_>>>()
    };
    let done = crate::workers::start(each, open, move |me, listeners: Vec<(TcpListener, bool)>| {
        let (gw, stop, load) = (gw.clone(), token.clone(), load.clone());
        async move {
            // However the loops end (stopped, or a panic): the others stop waiting for it.
            let _retire = load.retire_on_drop(me);
            let loops: Vec<_> = listeners
                .into_iter()
                .map(|(l, plain)| tokio::spawn(accept_loop(gw.clone(), (l, load.clone()), plain, stop.clone())))
                .collect();
            for l in loops {
                let _ = l.await;
            }
        }
    })
    .context("starting the worker threads")?;
    tracing::debug!(workers = count, "worker threads accepting");
    Ok((done, guard))
}

/// `plain`: a `listen_plain` listener (no TLS).
async fn accept_loop(gw: Arc<Gateway>, (listener, load): (TcpListener, Arc<Load>), plain: bool, stop: CancellationToken) {
    let me = crate::workers::current();
    loop {
        // Far ahead of another worker: let it take the next connections.
        if load.ahead(me) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = load.wait_turn(me) => {}
            }
        }
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { crate::util::accept_failed("wss", &e).await; continue; }
            },
        };
        let accepted = Instant::now();
        gw.metrics.accepted();
        // The re-check token before the runtime: a reload that swaps the runtime after
        // this cancels the token, so a connection admitted under the old config is
        // re-checked against the new one (the other order could miss that reload).
        let admitted_under = gw.recheck_token();
        let rt = gw.runtime();
        let cap = rt.config.server.max_connections;
        let open = gw.open.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = OpenGuard(gw.clone());
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if open > cap + OVER_CAP_SLACK {
            gw.refused(&Reject::GlobalConnLimit, &Refused::peer(peer.ip()));
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let over_cap = open > cap;
        if rt.config.server.client_ip_source == crate::config::ClientIpSource::ProxyProtocol {
            // The client address comes from the PROXY header, read in the connection's own task.
            if !rt.config.server.is_trusted_proxy(peer.ip()) {
                gw.refused(&Reject::Firewall, &Refused::peer(peer.ip()));
                continue;
            }
            let (gw2, on_worker) = (gw.clone(), load.hold(me));
            crate::workers::spawn(gw.tracker.track_future(async move {
                let _guard = (guard, on_worker);
                proxied(gw2, (rt, admitted_under), tcp, peer, accepted, (over_cap, plain)).await;
            }));
            continue;
        }
        // Cheap checks before any TLS work: firewall, then per-IP rate and concurrency.
        let slot = match gw.pre_tls(&rt, peer.ip()) {
            Ok(slot) => slot,
            Err(reject) => {
                gw.refused(&reject, &Refused::peer(peer.ip()));
                continue;
            }
        };
        let (gw2, on_worker) = (gw.clone(), load.hold(me));
        crate::workers::spawn(gw.tracker.track_future(async move {
            let _guard = (guard, slot, on_worker);
            crate::conn::handle(gw2, (rt, admitted_under), tcp, peer, accepted, (over_cap, plain)).await;
        }));
    }
}

/// A connection from a trusted L4 proxy: read its PROXY header (within the handshake
/// timeout), then run the pre-TLS checks on the client it names, then the usual stages.
async fn proxied(
    gw: Arc<Gateway>,
    (rt, admitted_under): (Arc<Runtime>, CancellationToken),
    mut tcp: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    flags: (bool, bool),
) {
    let deadline = accepted + rt.config.server.handshake_timeout;
    let client = match tokio::time::timeout_at(deadline, crate::proxy_protocol::read_header(&mut tcp)).await {
        Ok(Ok(addr)) => addr.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())).unwrap_or(peer),
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer.ip(), error = %e, "unreadable PROXY header");
            gw.refused(&Reject::BadRequest("unreadable PROXY header"), &Refused::peer(peer.ip()));
            return;
        }
        Err(_) => {
            gw.refused(&Reject::HandshakeTimeout, &Refused::peer(peer.ip()));
            return;
        }
    };
    // A LOCAL or UNKNOWN header (the proxy's own health check) names no client: the
    // proxy itself is the client, under the same firewall and limits as any other, so a
    // proxy that forwards real clients as UNKNOWN cannot lift their per-IP limits.
    let _slot = match gw.check_client(&rt, client.ip()) {
        Ok(s) => s,
        Err(reject) => {
            gw.refused(&reject, &Refused::peer(client.ip()));
            return;
        }
    };
    crate::conn::handle(gw, (rt, admitted_under), tcp, client, accepted, flags).await;
}

/// Prune per-IP limiter state on a timer so it does not grow with distinct clients.
async fn prune_loop(gw: Arc<Gateway>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => gw.per_ip().prune(),
        }
    }
}

/// Decrements the open-connection count when a connection ends, however it ends.
struct OpenGuard(Arc<Gateway>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
