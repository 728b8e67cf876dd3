//! One connection, stage by stage: TLS → upgrade request → auth → upstream → 101 →
//! relay. The inner functions chain the stages with `?` and return a [`Reject`]; the
//! outer [`handle`] is the one place that counts, logs and finishes a connection.

use crate::admit::{Admission, Admitted, Info, Session};
use crate::error::{CloseReason, Initiator, Reject};
use crate::gateway::{Gateway, Refused, Runtime};
use crate::relay::{self, Outcome};
use crate::util::escape;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    task::Poll,
    time::Duration,
};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::server::TlsStream;

mod io;
use io::ClientStream;

/// hyper refuses read buffers below this size.
const HYPER_MIN_BUF: usize = 8192;
/// Header lines an upgrade request may have; more → 431.
const MAX_REQUEST_HEADERS: usize = 100;
/// Longest client-controlled name (a token's user) written to a log line.
const MAX_LOGGED_NAME: usize = 256;

/// Run one accepted TCP connection to its end; logs and counts exactly once.
/// `rt` is the runtime the connection was accepted under and `admitted_under` the
/// re-check token taken just before it: a reload between then and the relay's start (a
/// `first_message` token sent after it, a slow upstream connect) has cancelled it, and
/// the relay re-checks the session at once against the new config.
pub(crate) async fn handle(
    gw: Arc<Gateway>,
    (rt, admitted_under): (Arc<Runtime>, tokio_util::sync::CancellationToken),
    tcp: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    (over_cap, plain): (bool, bool),
) {
    let peer_ip = peer.ip().to_canonical();
    // Cluster mode: the shared per-IP check of the TCP peer starts here, while TLS runs.
    let admission = Arc::new(Admission::begin(&gw, &rt, peer_ip, (over_cap, plain)));
    let result = async {
        // The handshake stages are boxed: their state (TLS accept, hyper's connection
        // and builder) is freed before the session relays, so an idle session stays small.
        let Some(admitted) = Box::pin(handshake(&rt, (tcp, plain), accepted, &admission)).await? else {
            return Ok(None);
        };
        relay_session(&gw, admitted, accepted, &admission, admitted_under).await.map(Some)
    }
    .await;
    let info = admission.info();
    let route = info.route.as_deref().unwrap_or("-");
    let client = info.client_ip.unwrap_or(peer_ip);
    match result {
        Ok(Some(done)) => log_session(&gw, &info, client, route, &done),
        // A connection of plain requests: each was counted and logged on its own.
        Ok(None) if admission.served() > 0 => {}
        Ok(None) => tracing::info!(peer = %client, "answered an ACME TLS-ALPN-01 validation"),
        Err(reject) => gw.refused(
            &reject,
            &Refused {
                peer: client,
                route: info.route.as_deref(),
                token_fingerprint: info.token_fingerprint.as_deref(),
                request_id: info.request_id.as_deref(),
            },
        ),
    }
}

/// A finished session.
struct Done {
    outcome: Outcome,
    duration: Duration,
}

fn log_session(gw: &Gateway, info: &Info, client: IpAddr, route: &str, done: &Done) {
    let o = &done.outcome;
    gw.metrics.closed(route, o.code, o.initiator.label());
    if let Some(kind) = o.reason.and_then(|r| r.error_kind()) {
        gw.metrics.error(kind);
    }
    gw.metrics.session_duration(route, done.duration.as_secs_f64());
    tracing::info!(
        request_id = info.request_id.as_deref().unwrap_or("-"),
        peer = %client,
        route,
        upstream = info.upstream.as_deref().unwrap_or("-"),
        sub = info.sub.as_deref().map(|s| escape(s, MAX_LOGGED_NAME)).as_deref().unwrap_or("-"),
        code = o.code,
        initiator = o.initiator.label(),
        reason = o.reason.map_or(if o.initiator == Initiator::Gateway { "shutdown" } else { "closed" }, |r| r.log_label()),
        duration_ms = done.duration.as_millis() as u64,
        bytes_in = o.bytes[0],
        bytes_out = o.bytes[1],
        messages_in = o.messages[0],
        messages_out = o.messages[1],
        // Last, so the fields before keep the order log searches rely on.
        provider = info.provider.as_deref().unwrap_or("-"),
        "session closed"
    );
}

/// TLS, then the upgrade request served by hyper up to the 101: the admitted session.
/// A plain connection (`listen_plain`) skips TLS: no client certificate, no ACME.
async fn handshake(
    rt: &Runtime,
    (tcp, plain): (TcpStream, bool),
    accepted: Instant,
    admission: &Arc<Admission>,
) -> Result<Option<Box<Admitted>>, Reject> {
    let server = &rt.config.server;
    let deadline = accepted + server.handshake_timeout;
    let stream = if plain {
        ClientStream::Plain(tcp)
    } else {
        let Some((tls, cert)) = accept_tls(rt, tcp, deadline).await? else {
            return Ok(None);
        };
        admission.set_cert(cert);
        // With SNI, every request on this connection must be for a name of the certificate
        // the handshake chose for it (no domain fronting): the same choice, made again.
        admission.set_sni_certificate(tls.get_ref().1.server_name().and_then(|sni| rt.certs.for_sni(Some(sni))));
        ClientStream::Tls(tls)
    };
    let ctx = admission.clone();
    let heads = admission.heads();
    let answer_heads = heads.clone();
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let heads = answer_heads.clone();
        async move {
            let resp = ctx.answer(req).await;
            Ok::<_, Infallible>(resp.map(|body| crate::framing::Answering::new(body, heads)))
        }
    });
    // Keep-alive stays on so hyper does not add `close` to the 101's `Connection`
    // header, and so plain requests on `http = true` routes can follow each other;
    // every refusal carries `Connection: close`, so hyper closes after it and never
    // reads a pipelined second request.
    let mut builder = http1::Builder::new();
    let max_head = server.max_request_head.max(HYPER_MIN_BUF);
    // The wait for each request head is bounded below (the watchdog), not by hyper's
    // `header_read_timeout`, which made and dropped a timer per request.
    builder
        .header_read_timeout(None)
        .max_buf_size(max_head)
        .max_headers(MAX_REQUEST_HEADERS)
        .half_close(false);
    // The request stage itself is bounded (head timeout, upstream timeout, an
    // exchange's `http_timeout`); this watchdog also bounds a client that stops reading
    // its answer: no byte either way on the connection for this long ends it (plus the
    // `http_timeout` of the route of its last plain request).
    let quiet_base =
        server.handshake_timeout + server.upstream_timeout * rt.config.routes.iter().map(|r| r.upstreams.len()).max().unwrap_or(1) as u32;
    let io = crate::framing::Guarded::new(stream, heads.clone(), max_head);
    let mut serve = Box::pin(builder.serve_connection(TokioIo::new(io), service).with_upgrades());
    // The watchdog's two limits, one timer for both: the next request head whole within
    // `handshake_timeout` of the end of the last answer (the first one by `deadline`; a
    // request in progress has none), and no byte either way for `quiet_limit`. The
    // alarm is never set further than `head_within` ahead: a request in progress that
    // ends later makes the next head due later than that, so an alarm set while it ran
    // never rings past that head's due time (and the end of an answer need not move it).
    // Activity is dated when the alarm rings (reads and writes only flag it), so the
    // quiet limit holds to within `head_within` more.
    let head_within = deadline.saturating_duration_since(heads.start()).max(Duration::from_millis(1));
    let mut last_active = heads.start();
    let mut due = || {
        let now = Instant::now();
        if heads.take_activity() {
            last_active = now;
        }
        let quiet = last_active + quiet_base + admission.http_timeout();
        heads.head_due(head_within).unwrap_or(now + head_within).min(quiet)
    };
    let mut alarm = std::pin::pin!(tokio::time::sleep_until(due()));
    // The waker the alarm holds: while it is this task's and the alarm has not rung, the
    // alarm is not polled again on every wake of the connection.
    let mut armed: Option<std::task::Waker> = None;
    let served = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = serve.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        if armed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) && !alarm.is_elapsed() {
            return Poll::Pending;
        }
        loop {
            if alarm.as_mut().poll(cx).is_pending() {
                armed = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let next = due();
            if next <= Instant::now() {
                return Poll::Ready(Err(()));
            }
            alarm.as_mut().reset(next);
        }
    })
    .await;
    let plain_requests = admission.served();

    let admission = match (admission.verdict(), served) {
        (Some(Err(reject)), _) => return Err(reject),
        (Some(Ok(admission)), Ok(Ok(()))) => admission,
        (Some(Ok(mut admission)), _) => {
            // Admitted, but the 101 never reached the client: let the upstream know.
            if let Some(u) = admission.upstream_mut() {
                let _ = tokio::time::timeout(server.close_timeout, u.ws.close(None)).await;
            }
            return Err(Reject::BadRequest("client left before the upgrade completed"));
        }
        (None, Ok(Err(e))) if e.is_parse_too_large() => return Err(Reject::HeadTooLarge),
        (None, Ok(Err(e))) if e.is_parse() || e.is_parse_status() => return Err(Reject::BadRequest("unparsable request head")),
        // Plain requests were answered; the connection ended (the client left, kept it
        // idle past the head timeout, or an exchange failed midway).
        (None, _) if plain_requests > 0 => return Ok(None),
        (None, Ok(Err(e))) if e.is_timeout() => return Err(Reject::HandshakeTimeout),
        (None, Ok(_)) => return Err(Reject::BadRequest("connection closed without a request")),
        (None, Err(())) => return Err(Reject::HandshakeTimeout),
    };
    Ok(Some(admission))
}

/// The TLS handshake (stage 4) under the handshake deadline, and the client certificate
/// rustls verified against `tls.client_ca` (and the CRLs), if any.
async fn accept_tls(
    rt: &Runtime,
    tcp: TcpStream,
    deadline: Instant,
) -> Result<Option<(TlsStream<TcpStream>, Option<Arc<crate::tls::ClientCert>>)>, Reject> {
    let tls = match tokio::time::timeout_at(deadline, Box::pin(rt.tls.accept(tcp))).await {
        Err(_) => return Err(Reject::HandshakeTimeout),
        Ok(Err(_)) => return Err(Reject::TlsHandshake),
        Ok(Ok(tls)) => tls,
    };
    // A TLS-ALPN-01 validation (`[tls.acme]`): the handshake was the whole exchange; the
    // connection ends without HTTP (RFC 8737 section 3).
    if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN) {
        // A resumed session carries no certificate: it cannot be a validation.
        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            return Err(Reject::TlsHandshake);
        }
        return Ok(None);
    }
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(crate::tls::ClientCert::from_verified)
        .map(Arc::new);
    // A resumed session carries the certificate verified when its ticket was issued: verify
    // it again now, so one that expired since is not served (revocations come with a reload,
    // which starts a new ticket key and session cache).
    if let (Some(c), Some(v)) = (&cert, rt.auth.client_certs())
        && tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        && !c.still_trusted(v.as_ref())
    {
        return Err(Reject::TlsHandshake);
    }
    Ok(Some((tls, cert)))
}

/// The client side after the 101: the TLS (or plain) stream, boxed so it is allocated
/// once and moved by pointer.
type ClientIo = Box<ClientStream>;

async fn relay_session(
    gw: &Arc<Gateway>,
    admitted: Box<Admitted>,
    accepted: Instant,
    admission: &Admission,
    admitted_under: tokio_util::sync::CancellationToken,
) -> Result<Done, Reject> {
    // The runtime the request was admitted under (the newest when it came, not
    // necessarily the connection's at accept): its route index points into that config.
    let rt = &admission.rt();
    // Opening is boxed: its state (hyper's upgrade, the first-message exchange) is freed
    // before the long relay phase, so an idle session holds only what it needs.
    let (mut client, mut session) = Box::pin(open_session(rt, admitted, admission)).await?;
    gw.metrics.handshake_done(accepted.elapsed().as_secs_f64());
    run_session(gw, rt, &mut client, &mut session, accepted, admission, admitted_under).await
}

/// The 101 written: take the connection back from hyper, then let admission complete
/// the session (the `first_message` token and the upstream, when the route waits).
async fn open_session(
    rt: &Runtime,
    admitted: Box<Admitted>,
    admission: &Admission,
) -> Result<(relay::Endpoint<ClientIo>, Session), Reject> {
    let mut admitted = *admitted;
    let upgraded = match admitted.take_upgrade() {
        Some(on_upgrade) => on_upgrade.await,
        None => return Err(Reject::BadRequest("upgrade failed")),
    };
    let upgraded = match upgraded {
        Ok(u) => u,
        Err(_) => {
            if let Some(u) = admitted.upstream_mut() {
                let _ = tokio::time::timeout(rt.config.server.close_timeout, u.ws.close(None)).await;
            }
            return Err(Reject::BadRequest("upgrade failed"));
        }
    };
    // Unwrap hyper's boxed IO back to the TLS stream: the relay then reads and writes it
    // directly, with whatever the client sent right behind its request head.
    let parts = upgraded
        .downcast::<TokioIo<crate::framing::Guarded<ClientStream>>>()
        .map_err(|_| Reject::BadRequest("upgrade failed"))?;
    let io: ClientIo = Box::new(parts.io.into_inner().into_inner());
    let mut client = relay::Endpoint::client(io, &parts.read_buf);
    let session = admitted.complete(admission, &mut client).await?;
    Ok((client, session))
}

async fn run_session(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    client: &mut relay::Endpoint<ClientIo>,
    session: &mut Session,
    accepted: Instant,
    admission: &Admission,
    admitted_under: tokio_util::sync::CancellationToken,
) -> Result<Done, Reject> {
    let route = &rt.config.routes[session.route_index];
    let mut session_metrics = gw.metrics.session(&route.name);
    // Listed by the admin API while it runs; a kick closes the sessions accepted before it.
    let (client_ip, sub) = admission.with_info(|i| (i.client_ip, i.sub.clone()));
    let provider = session.principal.as_ref().and_then(|p| p.provider.clone());
    let registered = gw
        .incidents
        .register(route.name.as_str().into(), (sub.clone(), provider), client_ip, accepted.into_std());
    session_metrics.live = Some(registered.counters.clone());
    let validator = rt.validators[session.route_index].clone();
    if validator.is_some() {
        session_metrics.rejected = Some(gw.metrics.rejections(&route.name));
    }
    session_metrics.active.increment(1.0);
    let started = Instant::now();
    // Only a validated route assembles messages: its client gets a share of the budget.
    let share = validator.is_some().then(|| {
        let address = client_ip.map(|ip| gw.per_ip().key(ip));
        let timeout = rt.config.limits.assembly_timeout;
        let user = session.principal.as_ref().and_then(|p| p.user_key());
        Arc::new(relay::AssemblyShare::new(gw.assembly_budget(), address, user.as_deref(), timeout))
    });
    let mut settings = relay::Settings::from_config(&rt.config, route, validator, share);
    let hops = [session.deflate, session.upstream.deflate];
    if hops.iter().any(Option::is_some) {
        settings.compression = Some(Box::new(relay::Compression {
            hops,
            level: route.compression.level,
            min_size: route.compression.min_size,
            budget: Some(gw.compression.clone()),
            message_timeout: Some(rt.config.limits.assembly_timeout),
        }));
        session_metrics.compressed = Some(Box::new(gw.metrics.compressed(&route.name)));
    }
    let expires_at = session.principal.as_ref().and_then(|p| p.expires_at);
    let deadline = crate::admit::token_deadline(&rt.config, route, expires_at).map(|at| (at, CloseReason::TokenExpired));
    let policy = session.policy(gw, route, admitted_under, client_ip, registered.started_at);
    let request_id = admission.with_info(|i| i.request_id.clone()).unwrap_or_default();
    let mut control = relay::Control {
        shutdown: &gw.sessions,
        drain_spread: rt.config.server.shutdown_grace / 2,
        upstream_drain: session.upstream.drain.take(),
        deadline,
        policy: Some(&policy),
        progress: rt.config.log.progress_interval,
        log_as: (&request_id, &route.name),
    };
    let span = tracing::info_span!(
        "session",
        request_id = %request_id,
        peer = %client_ip.map_or_else(|| "-".to_string(), |i| i.to_string()),
        route = %route.name,
        sub = %sub.as_deref().map(|s| escape(s, MAX_LOGGED_NAME)).unwrap_or_else(|| "-".into()),
    );
    let outcome = tracing::Instrument::instrument(
        relay::run(client, &mut session.upstream.ws, &mut settings, &session_metrics, &mut control),
        span,
    )
    .await;
    session_metrics.active.decrement(1.0);
    Ok(Done {
        outcome,
        duration: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    /// Idle memory per session is dominated by the connection's future: keep it small
    /// (the handshake stages are boxed and freed before the relay phase).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let cfg = crate::Config::from_toml_str(
            "[server]\nlisten=[\"127.0.0.1:0\"]\n[admin]\nlisten=\"127.0.0.1:0\"\n[[routes]]\nname=\"a\"\npath=\"/a\"\nupstreams=[\"builtin:echo\"]\nauth=\"none\"\n",
            "t",
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cfg;
        cfg.tls.cert.value = dir.path().join("c.pem");
        cfg.tls.key.value = dir.path().join("k.pem");
        cfg.tls.self_signed_if_missing = true;
        let r = crate::start(cfg).await.unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        let gw = r.gateway.clone();
        let f = super::handle(
            gw.clone(),
            (gw.runtime(), gw.recheck_token()),
            s,
            peer,
            tokio::time::Instant::now(),
            (false, false),
        );
        let size = std::mem::size_of_val(&f);
        // 2560 until issue 29; +64 for the request id and route that progress lines carry
        // (flat JSON lines have no span to take them from); +64 for permessage-deflate
        // (issue 26: what each hop agreed to, and the reservation of their state; the
        // codecs and settings themselves are boxed); +64 for the upstream's drain watch
        // (issue 23: one boxed watch, passed from the upstream connect to the relay's timers).
        assert!(size <= 2752, "connection future is {size} bytes");
    }
}
