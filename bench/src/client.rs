//! Opening benchmark connections: TCP (optionally bound to a source address, round
//! robin), TLS with a shared client config, and the WebSocket upgrade.

use anyhow::{Context, bail};
use rustls::pki_types::ServerName;
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        client::IntoClientRequest,
        http::{HeaderName, HeaderValue, header::AUTHORIZATION},
        protocol::WebSocketConfig,
    },
};
use wsgate::upstream::UpstreamIo;

pub type Ws = WebSocketStream<UpstreamIo>;

/// Where and how to connect; shared by every subcommand that opens connections.
#[derive(clap::Args, Clone, Debug)]
pub struct ConnArgs {
    /// ws:// or wss:// URL of the target.
    #[arg(long)]
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    #[arg(long)]
    pub token: Option<String>,
    /// An extra request header, `NAME: VALUE` (repeatable), e.g. `--header 'cookie: session=x'`
    /// for a forward-auth route; sent on every upgrade and plain HTTP request.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Trust this CA (PEM) for wss://.
    #[arg(long, conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Do not verify the server certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Client certificate (PEM chain) for mTLS routes; needs `--key`.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `--cert`.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Local source addresses, used round robin (e.g. 127.0.0.1,127.0.0.2): each one
    /// has its own ephemeral port range.
    #[arg(long, value_delimiter = ',')]
    pub sources: Vec<IpAddr>,
    /// Allow TLS session resumption. By default every connection makes a full
    /// handshake, as a new client would.
    #[arg(long)]
    pub resume: bool,
    /// KEY=VALUE copied into the RESULT line (repeatable), e.g. target=nginx.
    #[arg(long = "tag", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Server process whose CPU time (with its children's) is measured over the window
    /// (repeatable); reported as percent of a core and µs per message or handshake.
    #[arg(long = "cpu-pid")]
    pub cpu_pids: Vec<u32>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| "use NAME: VALUE".to_string())
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "use KEY=VALUE".to_string())
}

pub struct Connector {
    url: String,
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    auth: Option<HeaderValue>,
    headers: Vec<(HeaderName, HeaderValue)>,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    ws_config: WebSocketConfig,
}

impl Connector {
    pub async fn new(a: &ConnArgs) -> anyhow::Result<Arc<Self>> {
        let req = a.url.as_str().into_client_request().context("bad --url")?;
        let uri = req.uri();
        let tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => bail!("--url must be ws:// or wss://"),
        };
        let host = uri
            .host()
            .context("--url has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        let tls = if tls {
            let cert = a.cert.as_deref().zip(a.key.as_deref());
            let base = wsgate::tls::cli_client_config_with_cert(a.ca.as_deref(), a.insecure, cert).map_err(anyhow::Error::msg)?;
            let mut cc = (*base).clone();
            if !a.resume {
                cc.resumption = rustls::client::Resumption::disabled();
            }
            Some((
                TlsConnector::from(Arc::new(cc)),
                ServerName::try_from(host).context("bad TLS server name")?,
            ))
        } else {
            None
        };
        let auth = match &a.token {
            Some(t) => Some(HeaderValue::from_str(&format!("Bearer {t}")).context("bad --token")?),
            None => None,
        };
        let headers = a
            .headers
            .iter()
            .map(|(k, v)| {
                let name = HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("bad --header name {k:?}"))?;
                let value = HeaderValue::from_str(v).with_context(|| format!("bad --header value for {k}"))?;
                anyhow::Ok((name, value))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if a.sources.iter().any(|s| s.is_ipv4() != addr.is_ipv4()) {
            bail!("--sources must be of the same address family as the target");
        }
        Ok(Arc::new(Connector {
            url: a.url.clone(),
            addr,
            tls,
            auth,
            headers,
            sources: a.sources.clone(),
            next_source: AtomicUsize::new(0),
            // Small buffers: the idle test holds thousands of these in one process.
            ws_config: WebSocketConfig::default().read_buffer_size(16 * 1024),
        }))
    }

    async fn tcp(&self) -> std::io::Result<TcpStream> {
        let sock = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.sources.is_empty() {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            sock.bind(SocketAddr::new(self.sources[i], 0))?;
        }
        let tcp = sock.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// TCP connect and TLS handshake (wss): the stream a WebSocket upgrade or plain
    /// HTTP requests go over.
    pub async fn connect_io(&self) -> anyhow::Result<UpstreamIo> {
        let tcp = self.tcp().await.context("TCP connect")?;
        Ok(match &self.tls {
            Some((c, name)) => UpstreamIo::Tls(Box::new(c.connect(name.clone(), tcp).await.context("TLS handshake")?)),
            None => UpstreamIo::Tcp(tcp),
        })
    }

    /// The `Authorization` header value from `--token`, if any.
    pub fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// The `--header` pairs.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// The path and query of `--url`.
    pub fn path(&self) -> String {
        self.url
            .as_str()
            .into_client_request()
            .ok()
            .and_then(|r| r.uri().path_and_query().map(|p| p.as_str().to_string()))
            .unwrap_or_else(|| "/".into())
    }

    /// TCP connect, TLS handshake (wss), WebSocket upgrade.
    pub async fn connect(&self) -> anyhow::Result<Ws> {
        let io = self.connect_io().await?;
        let mut req = self.url.as_str().into_client_request()?;
        if let Some(v) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, v.clone());
        }
        for (k, v) in &self.headers {
            req.headers_mut().append(k.clone(), v.clone());
        }
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(self.ws_config))
            .await
            .context("WebSocket upgrade")?;
        Ok(ws)
    }
}

/// "TLSv1_3 X25519MLKEM768": what the handshake negotiated, for the RESULT line.
/// Whether the connection's TLS handshake resumed an earlier session.
pub fn resumed(ws: &Ws) -> bool {
    match ws.get_ref() {
        UpstreamIo::Tls(s) => s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        _ => false,
    }
}

pub fn tls_info(ws: &Ws) -> Option<String> {
    match ws.get_ref() {
        UpstreamIo::Tls(s) => {
            let c = s.get_ref().1;
            let version = c.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
            let group = c
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
                .unwrap_or_default();
            let suite = c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
            Some(format!("{version} {group} {suite}"))
        }
        _ => None,
    }
}
