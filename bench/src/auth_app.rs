//! `auth-app` (hidden): the forward-auth endpoint behind the forward-auth rows of
//! `scripts/bench.sh`. A real HTTP/1.1 server (hyper): a request whose `Cookie` carries
//! `--cookie` (as one of its `name=value` pairs) gets `200` with `x-user-id: --user`,
//! anything else `401`. No body either way. It counts the requests it answered, allowed and
//! refused, and prints the counts on SIGTERM/Ctrl-C (so a run can show that the no-cache
//! route asked once per connection and the cached one almost never).

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

#[derive(Default)]
struct Counts {
    allowed: AtomicU64,
    refused: AtomicU64,
}

/// Whether one of the request's `Cookie` headers holds the pair `cookie` (`name=value`).
fn carries(req: &Request<Incoming>, cookie: &str) -> bool {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|pair| pair.trim() == cookie)
}

pub async fn serve(listen: SocketAddr, cookie: String, user: String) -> anyhow::Result<()> {
    anyhow::ensure!(cookie.contains('='), "--cookie must be name=value");
    let user = HeaderValue::from_str(&user)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let counts = Arc::new(Counts::default());
    let cookie: Arc<str> = cookie.into();
    let report = counts.clone();
    let accept = async move {
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let (cookie, user, counts) = (cookie.clone(), user.clone(), counts.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let mut resp = Response::new(Empty::<bytes::Bytes>::new());
                    if carries(&req, &cookie) {
                        counts.allowed.fetch_add(1, Ordering::Relaxed);
                        resp.headers_mut().insert("x-user-id", user.clone());
                    } else {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                        *resp.status_mut() = StatusCode::UNAUTHORIZED;
                    }
                    std::future::ready(Ok::<_, Infallible>(resp))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = accept => r?,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!(
        "auth-app: {} allowed, {} refused",
        report.allowed.load(Ordering::Relaxed),
        report.refused.load(Ordering::Relaxed)
    );
    Ok(())
}
