//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process
//! runs), `/readyz` (accepting traffic; 503 while draining), and, when
//! `admin.token_file` is set, the admin API under `/v1/` (DESIGN.md section 9): revoke a
//! token, kick a user, ban or unban an address range, list live sessions.

use crate::gateway::Gateway;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{convert::Infallible, sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Admin requests are tiny; a scraper that takes longer than this is cut off.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent admin connections, at most; more wait in the kernel backlog.
const MAX_ADMIN_CONNECTIONS: usize = 64;

pub(crate) async fn serve(gw: Arc<Gateway>, listener: TcpListener, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => { crate::util::accept_failed("admin", &e).await; continue; }
            },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let gw = gw.clone();
                async move {
                    let resp = if req.uri().path().starts_with("/v1/") {
                        crate::admin_api::answer(&gw, req).await
                    } else {
                        answer(&gw, &req)
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(ADMIN_TIMEOUT * 3, conn).await;
        });
    }
}

fn answer(gw: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", gw.render_metrics()),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") if gw.is_draining() => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".to_string()),
        (&Method::GET, "/readyz") if !gw.is_ready() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no reachable upstream for a route\n".to_string(),
        ),
        (&Method::GET, "/readyz") if !gw.has_cluster_state() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "cluster state not loaded yet (no Redis sync, no state file)\n".to_string(),
        ),
        (&Method::GET, "/readyz") => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    resp
}
