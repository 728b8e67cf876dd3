//! `tls-echo`: the "direct" target, an echo that speaks wss itself. rustls with the
//! same settings as wsgate's listener, tokio-tungstenite with the same buffers as
//! `wsgate echo`, and wsgate's own echo loop (replies batched: every message
//! already readable is queued before one flush).

use anyhow::Context;
use rustls::{
    ServerConfig,
    crypto::aws_lc_rs,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub async fn run(listen: SocketAddr, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad certificate in {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("cannot read the key {}", key.display()))?;
    let mut sc = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    sc.ticketer = aws_lc_rs::Ticketer::new()?;
    sc.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    let acceptor = TlsAcceptor::from(Arc::new(sc));
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(8 * 1024);

    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("tls-echo listening on wss://{}", listener.local_addr()?);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("tls-echo: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let ws = tokio::time::timeout(Duration::from_secs(10), async {
                let tls = acceptor.accept(tcp).await.ok()?;
                tokio_tungstenite::accept_async_with_config(tls, Some(config)).await.ok()
            })
            .await;
            if let Ok(Some(ws)) = ws {
                wsgate::echo::serve(ws).await;
            }
        });
    }
}
