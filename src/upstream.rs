//! Stage 7: connect to an upstream and complete its WebSocket handshake, before the
//! client gets its 101. Also builds the request the upstream sees.

use crate::config::{Route, TokenSource, Upstream};
use crate::error::Reject;
use crate::util::{protocols, same_header};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use std::{net::IpAddr, sync::Arc, time::Duration};
use tokio::{io::DuplexStream, net::TcpStream};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, protocol::WebSocketConfig};

/// The transport to an upstream. An enum rather than a boxed trait object keeps the
/// relay's reads and writes statically dispatched.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The built-in echo backend, in process.
    Mem(DuplexStream),
}

crate::util::delegate_io!(UpstreamIo { Tcp, Tls, Mem });

/// What the gateway knows about the client when it builds the upstream request.
pub struct ClientFacts<'a> {
    pub ip: IpAddr,
    /// The TCP peer (the proxy, when the client is behind a trusted one).
    pub peer: IpAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-For` is kept and the peer appended.
    pub peer_trusted: bool,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The token the client authenticated with, when it is to be forwarded.
    pub forward_token: Option<&'a str>,
    /// Token sources whose copies must be removed before the request goes upstream.
    pub token_sources: &'a [TokenSource],
    /// The verified claims, and which of them go upstream as which header.
    pub claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// The verified client certificate, for `cert:fingerprint` and `cert:subject`.
    pub cert: Option<&'a crate::tls::ClientCert>,
    pub forward_claims: &'a [(String, HeaderName)],
    /// The identity headers of every route: a client's copy of any of them is removed
    /// on every route, as one upstream may serve several routes.
    pub identity_headers: &'a [HeaderName],
    /// Sent as `X-Request-Id` (a client's own copy is never forwarded).
    pub request_id: Option<&'a str>,
    /// The gateway's own cookie (`sticky_cookie`): never forwarded.
    pub gateway_cookie: Option<&'a str>,
    /// The headers a forward auth endpoint answered with (`copy_headers`): sent upstream
    /// (their names are among `identity_headers`, so client copies are gone).
    pub copied: &'a [(HeaderName, HeaderValue)],
}

/// Request headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus the
/// handshake headers the gateway generates itself for the upstream hop. `name` is a
/// `HeaderName`'s text (lower case).
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "sec-websocket-key"
            | "sec-websocket-version"
            | "sec-websocket-accept"
            | "sec-websocket-extensions"
            | "sec-websocket-protocol"
            | "x-forwarded-for"
            | "x-forwarded-proto"
    )
}

/// A query parameter name as an upstream framework would read it: percent-decoded
/// (`+` as a space). Invalid escapes stay as they are.
fn decoded_param_name(raw: &str) -> String {
    crate::util::percent_decode(&raw.replace('+', " "))
}

/// A parameter name reduced to its letters and digits, lower case: frameworks read
/// `access.token`, `access token`, `access_token[]`, `access_token%00` and
/// `ACCESS_TOKEN` as `access_token` (PHP, qs, Rack), so they all compare equal.
fn key_bytes(name: &str) -> impl Iterator<Item = u8> + '_ {
    crate::util::name_key(name)
}

/// Whether a query parameter named `raw` could be read by the upstream as the token
/// parameter `name`: the decoded name reduced by [`key_bytes`]. Every such copy is
/// removed, not only the exact one (over-matching only ever removes a parameter).
fn is_token_param(raw: &str, name: &str) -> bool {
    key_bytes(&decoded_param_name(raw)).eq(key_bytes(name))
}

/// The path and query the upstream sees: the client's, with token query parameters
/// removed, and the route prefix replaced when the upstream URL has a path.
pub fn upstream_path(route: &Route, upstream_path: Option<&str>, facts: &ClientFacts) -> String {
    let path = match (upstream_path, &route.path) {
        (None, _) => facts.path.to_string(),
        (Some(base), crate::config::PathMatch::Prefix(prefix)) => {
            let rest = facts.path.strip_prefix(prefix.as_str()).unwrap_or("");
            format!("{base}{rest}")
        }
        (Some(base), crate::config::PathMatch::Exact(_)) => base.to_string(),
    };
    let is_token = |p: &&str| {
        let name = p.split_once('=').map_or(*p, |(k, _)| k);
        facts
            .token_sources
            .iter()
            .any(|s| matches!(s, TokenSource::Query(q) if is_token_param(name, q)))
    };
    // `;` separates parameters too for some frameworks (Rack 2): a token copy behind it
    // is removed, the rest of the pair kept as sent.
    let query: Vec<String> = facts
        .query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let kept: Vec<&str> = p.split(';').filter(|sub| !is_token(sub)).collect();
            let kept = kept.join(";");
            (!kept.is_empty()).then_some(kept)
        })
        .collect();
    if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// Build the upstream handshake request from the client's.
pub fn build_request(url: &str, facts: &ClientFacts) -> Result<http::Request<()>, Reject> {
    let mut req = url.into_client_request().map_err(|_| Reject::UpstreamUnavailable)?;
    let h = req.headers_mut();
    forward_client_headers(h, facts);
    // `bearer.` in any case: an upstream may compare subprotocols without case.
    let offer: Vec<&str> = protocols(facts.headers)
        .filter(|p| !p.get(..7).is_some_and(|b| b.eq_ignore_ascii_case("bearer.")))
        .collect();
    if !offer.is_empty()
        && let Ok(v) = HeaderValue::from_str(&offer.join(", "))
    {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    Ok(req)
}

/// The head of a plain HTTP request to `upstream` (`http = true` routes): the client's
/// method, `uri` (origin form), `Host` the upstream's authority, and the
/// client's headers as an upgrade forwards them (hop-by-hop, token copies, client
/// forwarding and identity headers removed; the gateway's own set). `Expect` is
/// answered by the gateway itself, never forwarded. The body's framing is the
/// gateway's: `Content-Length` or chunked, written by hyper from the body.
pub fn http_request_head(method: &http::Method, host: &HeaderValue, uri: http::Uri, facts: &ClientFacts) -> http::request::Parts {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method.clone();
    parts.uri = uri;
    // The client's headers and the gateway's own (forwarding, request id, identity).
    parts.headers = HeaderMap::with_capacity(facts.headers.len() + 8);
    parts.headers.insert(header::HOST, host.clone());
    forward_client_headers(&mut parts.headers, facts);
    parts.headers.remove(header::EXPECT);
    parts
}

/// The `Host` an upstream is asked with: its authority (IPv6 in brackets).
pub fn host_header(upstream: &Upstream) -> HeaderValue {
    match upstream {
        Upstream::BuiltinEcho => HeaderValue::from_static("builtin.echo"),
        // A host from the config is a URL's host: always a valid header value.
        remote => HeaderValue::from_str(&target_label(remote)).unwrap_or_else(|_| HeaderValue::from_static("invalid.host")),
    }
}

/// Response headers that describe one hop (RFC 9110 7.6.1), and every header the
/// upstream's `Connection` names: removed before the answer goes to the client.
/// `Content-Length` stays (a `HEAD` answer needs it); hyper frames the rest.
pub fn strip_response_hop_by_hop(h: &mut HeaderMap) {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    // hyper read a chunked answer as chunked: a length sent beside it is not the body's.
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            if n != header::CONTENT_LENGTH {
                h.remove(n);
            }
        }
    }
    for n in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
}

/// The client's headers as they go upstream, with the gateway's own forwarding headers.
fn forward_client_headers(h: &mut HeaderMap, facts: &ClientFacts) {
    let connection_named: Vec<String> = facts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut buf = [0u8; crate::util::NAME_KEY_MAX];
    for (name, value) in facts.headers {
        let n = name.as_str();
        if is_hop_by_hop(n) || connection_named.iter().any(|c| c == n) || carries_token(n, facts.token_sources) {
            continue;
        }
        // The name reduced once ([`crate::util::name_key`]) for both lists below; a name
        // too long to reduce on the stack is compared the slow way.
        let key = crate::util::name_key_in(n, &mut buf);
        if key.is_some_and(crate::config::is_client_forwarding_key) {
            continue;
        }
        // Identity headers come from the gateway only: a client's copy, in any spelling, is dropped.
        if facts
            .forward_claims
            .iter()
            .map(|(_, h)| h)
            .chain(facts.identity_headers)
            .any(|h| match key {
                Some(k) => crate::util::name_key(h.as_str()).eq(k.iter().copied()),
                None => same_header(h.as_str(), n),
            })
        {
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    if facts.gateway_cookie.is_some() || facts.token_sources.iter().any(|s| matches!(s, TokenSource::Cookie(_))) {
        strip_token_cookies(h, facts);
    }
    for (claim, header) in facts.forward_claims {
        if let Some(v) = forwarded_value(claim, facts) {
            h.insert(header.clone(), v);
        }
    }
    for (name, v) in facts.copied {
        h.append(name.clone(), v.clone());
    }
    if let Some(token) = facts.forward_token
        && let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}"))
    {
        h.insert(header::AUTHORIZATION, v);
    }
    let prev: Vec<&str> = facts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    // The client's address, formatted once for both headers that carry it.
    let real_ip = crate::util::ip_header_value(facts.ip);
    let xff = if facts.peer_trusted && !prev.is_empty() {
        // Every hop in one form, as the gateway itself reads them (bans, `X-Real-IP`):
        // the bare address, IPv4-mapped IPv6 as IPv4, IPv6 in RFC 5952 text. A hop that
        // is no address (left of the client's, which the gateway has read) is `unknown`.
        let mut hops: Vec<String> = prev
            .iter()
            .flat_map(|line| line.split(','))
            .map(|hop| crate::upgrade::parse_hop(hop).map_or_else(|| "unknown".to_string(), |ip| ip.to_string()))
            .collect();
        hops.push(facts.peer.to_canonical().to_string());
        HeaderValue::from_str(&hops.join(", ")).ok()
    } else {
        real_ip.clone()
    };
    if let Some(v) = xff {
        h.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    h.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("https"));
    if let Some(v) = facts.request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
    if let Some(v) = real_ip {
        h.insert(HeaderName::from_static("x-real-ip"), v);
    }
}

/// The value a `forward_claims` entry sends: `cert:*` from the verified certificate only
/// (a token claim of that name is never used), anything else from the token's claims.
fn forwarded_value(claim: &str, facts: &ClientFacts) -> Option<HeaderValue> {
    match claim {
        crate::config::CERT_FINGERPRINT => facts.cert.and_then(|c| HeaderValue::from_str(&c.fingerprint_hex()).ok()),
        crate::config::CERT_SUBJECT => facts.cert.and_then(|c| c.subject_header().cloned()),
        c if c.starts_with("cert:") => None,
        c => facts.claims?.get(c).and_then(crate::auth::claim_header_value),
    }
}

fn carries_token(header: &str, sources: &[TokenSource]) -> bool {
    header == "authorization" && sources.contains(&TokenSource::Authorization)
}

/// Remove token cookies from the `Cookie` headers the upstream sees: every cookie whose
/// name an upstream could read as a token cookie's (compared as query parameter names
/// are, so `WSGATE_TOKEN`, `wsgate%5Ftoken` and `wsgate_token ` go too). A pair is
/// also removed when a name behind a `,` or whitespace inside it is one: RFC 2109
/// parsers (Tomcat's legacy one) and Python's `http.cookies` read `a=1, wsgate_token=x`
/// and `a=1 wsgate_token=x` as two cookies, so a token the gateway never saw (it splits
/// on `;` only) would reach the upstream under the token cookie's name.
fn strip_token_cookies(h: &mut HeaderMap, facts: &ClientFacts) {
    let names: Vec<&str> = facts
        .token_sources
        .iter()
        .filter_map(|s| match s {
            TokenSource::Cookie(n) => Some(n.as_str()),
            _ => None,
        })
        .chain(facts.gateway_cookie)
        .collect();
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| {
            !c.is_empty()
                && !c
                    .split([',', ' ', '\t'])
                    .chain(std::iter::once(*c))
                    .map(|piece| piece.split_once('=').map_or(piece, |(k, _)| k).trim())
                    .filter(|k| !k.is_empty())
                    .any(|k| names.iter().any(|n| is_token_param(k, n)))
        })
        .map(str::to_string)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        h.insert(header::COOKIE, v);
    }
}

/// A connected upstream: the WebSocket and the subprotocol it chose.
pub struct Connected {
    pub ws: crate::relay::Endpoint<UpstreamIo>,
    pub protocol: Option<HeaderValue>,
    /// permessage-deflate as the upstream agreed to it (`upstream_compression = true`
    /// and an upstream that accepted the gateway's offer).
    pub deflate: Option<crate::extension::Deflate>,
    /// Which upstream answered (`host:port`, `builtin:echo`), for the access log.
    pub target: Box<str>,
    /// The session counted on the upstream while this lives (and the upstream's index).
    pub load: Option<crate::balance::SessionHeld>,
    /// Watches the upstream for a drain (the session's point to close with 1012).
    pub drain: Option<Box<dyn crate::relay::Due>>,
}

/// An upstream as the access log names it: `host:port` (IPv6 in brackets), or `builtin:echo`.
pub fn target_label(upstream: &Upstream) -> String {
    match upstream {
        Upstream::BuiltinEcho => "builtin:echo".to_string(),
        Upstream::Remote { host, port, .. } if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{port}"),
        Upstream::Remote { host, port, .. } => format!("{host}:{port}"),
    }
}

/// Connect to `upstream`, send `req`, and complete the WebSocket handshake within `timeout`.
pub async fn connect(
    upstream: &Upstream,
    tls: Option<&tokio_rustls::TlsConnector>,
    req: http::Request<()>,
    ws_config: WebSocketConfig,
    timeout: Duration,
) -> Result<Connected, Reject> {
    let fut = async {
        let io = match upstream {
            Upstream::BuiltinEcho => UpstreamIo::Mem(crate::echo::spawn_in_memory(ws_config)),
            Upstream::Remote { .. } => open(upstream, tls).await?,
        };
        let mut connected = handshake(io, req).await?;
        connected.target = target_label(upstream).into_boxed_str();
        Ok(connected)
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| Reject::UpstreamTimeout)?
}

/// The transport to a remote upstream: TCP, and TLS for `wss://` (no time bound: the
/// caller's).
pub async fn open(upstream: &Upstream, tls: Option<&tokio_rustls::TlsConnector>) -> Result<UpstreamIo, Reject> {
    let Upstream::Remote {
        tls: use_tls, host, port, ..
    } = upstream
    else {
        return Err(Reject::UpstreamUnavailable);
    };
    let tcp = TcpStream::connect((host.as_str(), *port))
        .await
        .map_err(|_| Reject::UpstreamUnavailable)?;
    let _ = tcp.set_nodelay(true);
    if *use_tls {
        let connector = tls.ok_or(Reject::UpstreamUnavailable)?;
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|_| Reject::UpstreamUnavailable)?;
        let stream = connector.connect(name, tcp).await.map_err(|_| Reject::UpstreamUnavailable)?;
        Ok(UpstreamIo::Tls(Box::new(stream)))
    } else {
        Ok(UpstreamIo::Tcp(tcp))
    }
}

/// Bytes of the upstream's response head hyper buffers at most.
const UPSTREAM_HEAD_BUFFER: usize = 16 * 1024;

fn handshake_failed(why: &str) -> Reject {
    tracing::debug!(reason = why, "upstream handshake failed");
    Reject::UpstreamUnavailable
}

/// The client half of the WebSocket handshake, driven by hyper: the upgraded stream
/// comes back with exactly the bytes the upstream sent after its 101, and no
/// handshake buffer stays attached to the session.
async fn handshake(io: UpstreamIo, req: http::Request<()>) -> Result<Connected, Reject> {
    let (mut parts, ()) = req.into_parts();
    let key = parts
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| handshake_failed("no key"))?;
    // The gateway's own permessage-deflate offer (`upstream_compression`), if it made one.
    let extension_offer = parts
        .headers
        .get(header::SEC_WEBSOCKET_EXTENSIONS)
        .map(|v| v.as_bytes() == crate::extension::upstream_offer(true).as_bytes());
    let offered: Vec<String> = parts
        .headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').map(|p| p.trim().to_string()).collect())
        .unwrap_or_default();
    // Origin-form request target; the Host header is already set.
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| handshake_failed("bad path"))?;
    let req = http::Request::from_parts(parts, http_body_util::Empty::<bytes::Bytes>::new());
    let mut resp = exchange(io, req).await?;
    let protocol = check_switching(&resp, &key, &offered)?;
    let deflate = crate::extension::accept_upstream(resp.headers(), extension_offer.is_some(), extension_offer == Some(true))
        .map_err(|_| handshake_failed("extension not offered or not usable"))?;
    let upgraded = hyper::upgrade::on(&mut resp).await.map_err(|_| handshake_failed("upgrade"))?;
    let parts = upgraded
        .downcast::<hyper_util::rt::TokioIo<UpstreamIo>>()
        .map_err(|_| handshake_failed("upgrade io"))?;
    let ws = crate::relay::Endpoint::upstream(parts.io.into_inner(), &parts.read_buf);
    Ok(Connected {
        ws,
        protocol,
        deflate,
        target: Box::from(""),
        load: None,
        drain: None,
    })
}

/// Send the one request and read the answer's head. A 4xx is the application's answer
/// to this client: it comes back as [`Reject::UpstreamRefused`] with its body (bounded).
async fn exchange(
    io: UpstreamIo,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, Reject> {
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(UPSTREAM_HEAD_BUFFER)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|_| handshake_failed("http"))?;
    // One request only: with the sender gone, the connection ends after this response
    // (handing the stream to the upgrade when it is a 101).
    let response = sender.send_request(req);
    drop(sender);
    // The connection is driven until the response head is in; with a 101 it ends by
    // handing the stream to the upgrade, with a 4xx it goes on to deliver the body.
    let mut response = std::pin::pin!(response);
    let mut conn = std::pin::pin!(conn.with_upgrades());
    let mut conn_result = None;
    let resp = tokio::select! {
        biased;
        r = &mut response => r,
        c = &mut conn => {
            conn_result = Some(c);
            response.await
        }
    };
    let resp = resp.map_err(|_| handshake_failed("no response"))?;
    if resp.status().is_client_error() {
        let (parts, body) = resp.into_parts();
        let limited = http_body_util::Limited::new(body, crate::error::MAX_UPSTREAM_BODY);
        let collect = http_body_util::BodyExt::collect(limited);
        let body = match conn_result {
            Some(_) => collect.await,
            None => tokio::join!(collect, &mut conn).0,
        };
        return Err(Reject::UpstreamRefused(Box::new(crate::error::UpstreamAnswer {
            status: parts.status,
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            body: body.map(|b| b.to_bytes()).unwrap_or_default(),
        })));
    }
    match conn_result {
        Some(c) => c,
        None => conn.await,
    }
    .map_err(|_| handshake_failed("connection failed"))?;
    Ok(resp)
}

/// Check the upstream's 101 (RFC 6455 4.2.2 from the client side): upgrade headers,
/// the accept key, a subprotocol we offered. Returns the subprotocol; extensions are
/// checked against the gateway's offer by [`crate::extension::accept_upstream`].
fn check_switching<B>(resp: &http::Response<B>, key: &HeaderValue, offered: &[String]) -> Result<Option<HeaderValue>, Reject> {
    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(handshake_failed("status"));
    }
    let h = resp.headers();
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(handshake_failed("not a websocket upgrade"));
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if h.get(header::SEC_WEBSOCKET_ACCEPT).map(|v| v.as_bytes()) != Some(accept.as_bytes()) {
        return Err(handshake_failed("bad accept key"));
    }
    let protocol = h.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
    if let Some(p) = &protocol
        && !offered.iter().any(|o| p.as_bytes() == o.as_bytes())
    {
        return Err(handshake_failed("protocol not offered"));
    }
    Ok(protocol)
}

/// The URL for the upstream request.
pub fn url_for(upstream: &Upstream, path_and_query: &str) -> String {
    match upstream {
        Upstream::BuiltinEcho => format!("ws://builtin.echo{path_and_query}"),
        Upstream::Remote { tls, host, port, .. } => {
            let scheme = if *tls { "wss" } else { "ws" };
            let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
            format!("{scheme}://{host}:{port}{path_and_query}")
        }
    }
}

/// TLS connector for a route's `wss://` upstreams, if it has any.
pub fn connector(route: &Route, origin: &str) -> Result<Option<tokio_rustls::TlsConnector>, crate::config::ConfigError> {
    if !route.upstreams.iter().any(|u| matches!(u, Upstream::Remote { tls: true, .. })) {
        return Ok(None);
    }
    let cc: Arc<rustls::ClientConfig> = crate::tls::upstream_client_config(route.upstream_ca.as_ref(), origin)?;
    Ok(Some(tokio_rustls::TlsConnector::from(cc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(headers: &'a HeaderMap, query: Option<&'a str>, sources: &'a [TokenSource]) -> ClientFacts<'a> {
        ClientFacts {
            ip: "203.0.113.7".parse().unwrap(),
            peer: "203.0.113.7".parse().unwrap(),
            peer_trusted: false,
            path: "/echo",
            query,
            headers,
            forward_token: None,
            token_sources: sources,
            claims: None,
            cert: None,
            forward_claims: &[],
            identity_headers: &[],
            request_id: None,
            gateway_cookie: None,
            copied: &[],
        }
    }

    #[test]
    fn the_request_id_goes_upstream_and_a_clients_copy_in_any_spelling_does_not() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("forged"));
        headers.insert("x_request_id", HeaderValue::from_static("forged2"));
        let mut f = facts(&headers, None, &[]);
        let req = build_request("ws://127.0.0.1:1/echo", &f).unwrap();
        assert!(req.headers().get("x-request-id").is_none());
        assert!(req.headers().get("x_request_id").is_none());
        f.request_id = Some("abc-123");
        let req = build_request("ws://127.0.0.1:1/echo", &f).unwrap();
        let ids: Vec<_> = req.headers().get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["abc-123"]);
        let label = |u: &str| {
            target_label(&crate::config::Upstream::Remote {
                tls: false,
                host: u.into(),
                port: 9,
                path: None,
            })
        };
        assert_eq!(label("10.0.0.1"), "10.0.0.1:9");
        assert_eq!(label("::1"), "[::1]:9");
        assert_eq!(target_label(&crate::config::Upstream::BuiltinEcho), "builtin:echo");
    }

    #[test]
    fn every_copy_of_a_query_token_is_stripped() {
        let cfg = crate::Config::from_toml_str(
            "[[routes]]\nname=\"a\"\npath=\"/echo\"\nupstreams=[\"builtin:echo\"]\nauth=\"none\"\n",
            "t",
        )
        .unwrap();
        let sources = [TokenSource::Query("access_token".into())];
        let h = HeaderMap::new();
        let q = "access_token=a&ACCESS_TOKEN=b&access%5Ftoken=c&Access%5ftoken=d&access_token%20=e&keep=1&x=%zz\
                 &access.token=f&access_token[]=g&x=1;access_token=h&access+token=i&access_token%00=j\
                 &access_token%5B%5D=k&access%2Etoken=l&access_token.=m";
        let out = upstream_path(&cfg.routes[0], None, &facts(&h, Some(q), &sources));
        assert_eq!(out, "/echo?keep=1&x=%zz&x=1");
        assert_eq!(decoded_param_name("a%2"), "a%2");
        assert_eq!(decoded_param_name("%"), "%");
        assert_eq!(decoded_param_name("a+b%41"), "a bA");
    }

    #[test]
    fn identity_headers_of_any_route_in_any_spelling_never_come_from_the_client() {
        let mut h = HeaderMap::new();
        for n in [
            "x.wsgate.sub",
            "X~Wsgate~Sub",
            "x-client-cert-subject",
            "x_client.cert~subject",
            "x-app",
        ] {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_static("root"));
        }
        let identity = [
            HeaderName::from_static("x-wsgate-sub"),
            HeaderName::from_static("x-client-cert-subject"),
        ];
        let mut f = facts(&h, None, &[]);
        f.identity_headers = &identity;
        let req = build_request("ws://127.0.0.1:1/echo", &f).unwrap();
        let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
        assert!(names.contains(&"x-app"), "{names:?}");
        for n in ["x.wsgate.sub", "x~wsgate~sub", "x-client-cert-subject", "x_client.cert~subject"] {
            assert!(!names.contains(&n), "{n} reached the upstream: {names:?}");
        }
    }

    #[test]
    fn every_copy_of_a_cookie_or_subprotocol_token_is_stripped() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("wsgate_token=a; WSGATE_TOKEN=b; keep=1"));
        h.append(
            header::COOKIE,
            HeaderValue::from_static("wsgate%5Ftoken=c;wsgate_token =d; wsgate.token=e; other=2"),
        );
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, bearer.x, Bearer.y, BEARER.z"),
        );
        let sources = [TokenSource::Cookie("wsgate_token".into()), TokenSource::Protocol];
        let req = build_request("ws://127.0.0.1:1/echo", &facts(&h, None, &sources)).unwrap();
        let got = req.headers();
        assert_eq!(got.get_all(header::COOKIE).iter().collect::<Vec<_>>(), vec!["keep=1; other=2"]);
        assert_eq!(got.get(header::SEC_WEBSOCKET_PROTOCOL).unwrap(), "chat");
    }

    #[test]
    fn client_forwarding_headers_never_reach_the_upstream() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "1"),
            ("x-forwarded-prefix", "/admin"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x_real_ip", "1.2.3.4"),
            ("x.forwarded~host", "evil.example"),
            ("x-app", "kept"),
        ] {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_static(v));
        }
        let req = build_request("ws://127.0.0.1:1/echo", &facts(&h, None, &[])).unwrap();
        let got = req.headers();
        for n in [
            "forwarded",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-original-url",
            "x-rewrite-url",
            "x_real_ip",
            "x.forwarded~host",
        ] {
            assert!(got.get(n).is_none(), "{n} reached the upstream");
        }
        assert_eq!(got.get_all("x-real-ip").iter().collect::<Vec<_>>(), vec!["203.0.113.7"]);
        assert_eq!(got.get("x-forwarded-for").unwrap(), "203.0.113.7");
        assert_eq!(got.get("x-app").unwrap(), "kept");
    }
}
