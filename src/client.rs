//! A WebSocket client over ws:// or wss://: the `wsgate client` command, the
//! benchmark, and the tests use it.

use crate::upstream::UpstreamIo;
use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use std::sync::Arc;
use tokio::{io::AsyncBufReadExt, net::TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, handshake::client::Response, protocol::WebSocketConfig},
};

/// How to connect.
#[derive(Clone, Default)]
pub struct Options {
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Offered in `Sec-WebSocket-Protocol`.
    pub protocols: Vec<String>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// TLS settings for wss:// (see [`crate::tls::cli_client_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub ws_config: Option<WebSocketConfig>,
    /// Local address to connect from (tests and benchmarks use several 127.0.0.x).
    pub source: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("protocols", &self.protocols)
            .finish_non_exhaustive()
    }
}

pub type ClientStream = WebSocketStream<UpstreamIo>;

/// Connect and complete the WebSocket handshake. A refused handshake comes back as
/// `tungstenite::Error::Http` holding the status and headers.
pub async fn connect(url: &str, opts: &Options) -> Result<(ClientStream, Response), tungstenite::Error> {
    let mut req = url.into_client_request()?;
    let uri = req.uri().clone();
    let host = uri.host().map_or("localhost", crate::util::unbracket).to_string();
    let tls = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let h = req.headers_mut();
    if let Some(t) = &opts.token {
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(http::Error::from)?,
        );
    }
    if !opts.protocols.is_empty() {
        h.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(&opts.protocols.join(", ")).map_err(http::Error::from)?,
        );
    }
    for (k, v) in &opts.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(http::Error::from)?;
        h.append(name, HeaderValue::from_str(v).map_err(http::Error::from)?);
    }
    let tcp = match opts.source {
        None => TcpStream::connect((host.as_str(), port)).await?,
        Some(src) => {
            let dest = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .find(|a| a.is_ipv4() == src.is_ipv4())
                .ok_or_else(|| std::io::Error::other("no address of the source's family"))?;
            let sock = if src.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            sock.bind(std::net::SocketAddr::new(src, 0))?;
            sock.connect(dest).await?
        }
    };
    let _ = tcp.set_nodelay(true);
    let io = if tls {
        let cc = match &opts.tls {
            Some(cc) => cc.clone(),
            None => crate::tls::cli_client_config(None, false).map_err(std::io::Error::other)?,
        };
        let name = rustls_pki_types::ServerName::try_from(host).map_err(std::io::Error::other)?;
        UpstreamIo::Tls(Box::new(tokio_rustls::TlsConnector::from(cc).connect(name, tcp).await?))
    } else {
        UpstreamIo::Tcp(tcp)
    };
    tokio_tungstenite::client_async_with_config(req, io, opts.ws_config).await
}

/// The `wsgate client` command: stdin lines go out as text messages, replies are
/// printed, and the close code is printed on exit. Returns the process exit code.
pub async fn run_cli(url: &str, opts: &Options) -> i32 {
    let (mut ws, resp) = match connect(url, opts).await {
        Ok(x) => x,
        Err(tungstenite::Error::Http(resp)) => {
            eprintln!("refused: HTTP {}", resp.status());
            return 1;
        }
        Err(e) => {
            eprintln!("cannot connect: {e}");
            return 1;
        }
    };
    if let Some(p) = resp.headers().get(http::header::SEC_WEBSOCKET_PROTOCOL) {
        eprintln!("connected (protocol {})", p.to_str().unwrap_or("?"));
    } else {
        eprintln!("connected; type a line to send it");
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(l)) => if ws.send(Message::text(l)).await.is_err() { break },
                _ => {
                    stdin_open = false;
                    let _ = ws.close(Some(tungstenite::protocol::CloseFrame { code: tungstenite::protocol::frame::coding::CloseCode::Normal, reason: "".into() })).await;
                }
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => println!("{t}"),
                Some(Ok(Message::Binary(b))) => println!("<{} bytes binary>", b.len()),
                Some(Ok(Message::Close(frame))) => {
                    match frame {
                        Some(f) => eprintln!("closed: {} {}", u16::from(f.code), f.reason),
                        None => eprintln!("closed: {}", crate::error::CLOSE_NO_STATUS),
                    }
                    while let Some(Ok(_)) = ws.next().await {}
                    return 0;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => { eprintln!("error: {e}"); return 1; }
                None => break,
            },
        }
    }
    eprintln!("closed: {} (connection lost)", crate::error::CLOSE_ABNORMAL);
    1
}
