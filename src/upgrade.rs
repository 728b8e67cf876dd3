//! Stage 5: the upgrade request. Who the client is (the peer, or the hop a trusted
//! proxy names), whether the path is safe to route, the WebSocket handshake headers,
//! Origin, and the responses (101, or a short error with `Connection: close`).

use crate::config::{ClientIpSource, Config};
use crate::error::Reject;
use crate::util::{escaped_byte, percent_decode};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::Full;
use std::net::IpAddr;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// What a valid upgrade request yields: the key to answer with.
#[derive(Debug)]
pub struct Upgrade {
    pub key: HeaderValue,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the request asks for a WebSocket upgrade at all (`Upgrade: websocket`):
/// the rest of it is checked by [`validate`].
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, header::UPGRADE, "websocket")
}

/// Check that `req` is a well-formed WebSocket upgrade (RFC 6455 4.2.1).
pub fn validate<B>(req: &Request<B>) -> Result<Upgrade, Reject> {
    let h = req.headers();
    if !has_token(h, header::UPGRADE, "websocket") {
        return Err(Reject::NotUpgrade);
    }
    if req.method() != Method::GET {
        return Err(Reject::BadRequest("method is not GET"));
    }
    if req.version() != Version::HTTP_11 {
        return Err(Reject::BadRequest("HTTP version is not 1.1"));
    }
    if !has_token(h, header::CONNECTION, "upgrade") {
        return Err(Reject::BadRequest("Connection header lacks upgrade"));
    }
    if !h.contains_key(header::HOST) {
        return Err(Reject::BadRequest("no Host header"));
    }
    if h.contains_key(header::TRANSFER_ENCODING) || h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0") {
        return Err(Reject::BadRequest("upgrade request with a body"));
    }
    match h.get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v.as_bytes() == b"13" => {}
        Some(_) => return Err(Reject::UnsupportedVersion),
        None => return Err(Reject::BadRequest("no Sec-WebSocket-Version")),
    }
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) if key_is_valid(k.as_bytes()) => k.clone(),
        _ => return Err(Reject::BadRequest("missing or invalid Sec-WebSocket-Key")),
    };
    Ok(Upgrade { key })
}

/// A key is 16 bytes, base64 encoded (24 characters).
fn key_is_valid(k: &[u8]) -> bool {
    use base64::Engine;
    k.len() == 24 && base64::engine::general_purpose::STANDARD.decode(k).is_ok_and(|d| d.len() == 16)
}

/// How many times a segment is percent-decoded when looking for a hidden dot segment:
/// enough for double and triple encoding (`%252e`), which some backends decode again.
const PATH_DECODE_ROUNDS: usize = 3;

/// The host the request is for, as routes and certificates compare it
/// ([`crate::config::normalize_host`]): from the one `Host` header, which an absolute
/// request target's authority must agree with. No `Host`, two of them, or a value that
/// is not a host → 400 (RFC 9112 section 3.2).
pub fn request_host<B>(req: &Request<B>) -> Result<String, Reject> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let (Some(value), None) = (hosts.next(), hosts.next()) else {
        return Err(Reject::BadRequest("exactly one Host header is required"));
    };
    let host = value
        .to_str()
        .ok()
        .and_then(crate::config::normalize_host)
        .ok_or(Reject::BadRequest("the Host header is not a host"))?;
    if let Some(authority) = req.uri().authority()
        && crate::config::normalize_host(authority.as_str()).as_deref() != Some(host.as_str())
    {
        return Err(Reject::BadRequest("the request target and Host name different hosts"));
    }
    Ok(host)
}

/// The request path must mean the same to routing and to the upstream (DESIGN.md
/// section 5): dot segments (`.`, `..`, percent-encoded in any case, also double
/// encoded), encoded slashes and backslashes (`%2f`, `%5c`), raw backslashes and
/// empty segments (`//`) are refused with 400 before routing.
pub fn check_path(path: &str) -> Result<(), Reject> {
    if !path.starts_with('/') {
        return Err(Reject::BadRequest("the path must start with '/'"));
    }
    if path.contains('\\') {
        return Err(Reject::BadRequest("backslash in the path"));
    }
    if path.contains("//") {
        return Err(Reject::BadRequest("empty path segment"));
    }
    // Raw bytes outside visible ASCII are not a valid request target (RFC 3986); they
    // would also fail later, at the upstream request, and must not count against it.
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Reject::BadRequest("invalid character in the path"));
    }
    if let Some(i) = path.find('%') {
        // An encoded unreserved character (`%61` for `a`) means the same as the
        // character itself to the upstream but not to routing: refused (RFC 3986 6.2.2.2).
        if has_encoded_unreserved(&path[i..]) {
            return Err(Reject::BadRequest("percent-encoded unreserved character in the path"));
        }
    }
    for segment in path[1..].split('/') {
        let mut s = std::borrow::Cow::Borrowed(segment);
        for round in 0..=PATH_DECODE_ROUNDS + 1 {
            // `..;x` is `..` to Tomcat and Spring (path parameters), `..%00` to C code,
            // `..%3f` and `..%23` to a backend that decodes before splitting off the
            // query; Windows drops trailing dots and spaces (`..%20`, `...`).
            let name = s.split([';', '\0', '?', '#']).next().unwrap_or("");
            if name.contains('.') && name.chars().all(|c| c == '.' || c == ' ') {
                return Err(Reject::BadRequest("dot segment in the path"));
            }
            if s.contains(['/', '\\']) {
                return Err(Reject::BadRequest("encoded slash or backslash in the path"));
            }
            if s.chars().any(char::is_control) {
                return Err(Reject::BadRequest("encoded control character in the path"));
            }
            // `%u002e` (IIS) and other broken escapes: a lenient decoder guesses.
            if has_broken_escape(&s) {
                return Err(Reject::BadRequest("malformed percent escape in the path"));
            }
            // Characters that Unicode normalization (NFKC) or Windows best-fit mapping
            // turn into a dot, a slash or a backslash on the way to a file system.
            if s.chars().any(|c| LOOKALIKES.contains(&c)) {
                return Err(Reject::BadRequest("a look-alike of '.', '/' or '\\' in the path"));
            }
            if !s.contains('%') {
                // Nothing to decode: decoding would give the same text back.
                break;
            }
            let next = percent_decode(&s);
            // Escapes whose bytes are not UTF-8 (`%C0%AE`, an overlong `.`) are a dot or
            // a slash to lenient decoders (CVE-2008-2938): refused, not replaced.
            if next.contains('\u{FFFD}') {
                return Err(Reject::BadRequest("percent-encoded bytes that are not UTF-8 in the path"));
            }
            if next == *s {
                break;
            }
            if round > PATH_DECODE_ROUNDS {
                return Err(Reject::BadRequest("path encoded too many times"));
            }
            s = std::borrow::Cow::Owned(next);
        }
    }
    Ok(())
}

/// Look-alikes of `.`, `/` and `\`: fullwidth, small and one-dot-leader forms (NFKC maps
/// them to the ASCII character) and the division, fraction and big solidus.
const LOOKALIKES: [char; 9] = [
    '\u{FF0E}', '\u{FE52}', '\u{2024}', '\u{FF0F}', '\u{2215}', '\u{2044}', '\u{29F8}', '\u{FF3C}', '\u{FE68}',
];

/// Whether a `%` in `s` does not start a `%XX` escape.
fn has_broken_escape(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| b[i] == b'%' && escaped_byte(b, i).is_none())
}

/// Whether `s` holds `%XX` for an unreserved character (letters, digits, `-`, `.`, `_`, `~`).
/// `%2e` is left to the dot-segment check, which reads it in context.
fn has_encoded_unreserved(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| escaped_byte(b, i).is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'~'))
}

/// Check the `Origin` header against the route's `allowed_origins`.
pub fn check_origin(route: &crate::config::Route, headers: &HeaderMap) -> Result<(), Reject> {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (origin, None) => origin_allowed(route, origin),
        _ => Err(Reject::Origin),
    }
}

/// Whether `route` allows a client with this one `Origin` (or none): also asked of a
/// live session when the route's policy changes.
pub fn origin_allowed(route: &crate::config::Route, origin: Option<&HeaderValue>) -> Result<(), Reject> {
    let Some(origin) = origin else {
        return if route.allow_missing_origin { Ok(()) } else { Err(Reject::Origin) };
    };
    if route.allowed_origins.iter().any(|a| a == "*") {
        return Ok(());
    }
    let normal = origin
        .to_str()
        .ok()
        .and_then(crate::config::normalize_origin)
        .ok_or(Reject::Origin)?;
    if route.allowed_origins.contains(&normal) {
        Ok(())
    } else {
        Err(Reject::Origin)
    }
}

/// The 101 answer, carrying the subprotocol the upstream chose.
pub fn switching_protocols(up: &Upgrade, protocol: Option<HeaderValue>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(up.key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    resp
}

/// The answer to a refused upgrade: status, short body, `Connection: close`.
pub fn refusal(reject: &Reject) -> Response<Full<Bytes>> {
    // Checks that normally close TCP before TLS can also run here, for clients behind a
    // trusted proxy (`client_ip_source = "x_forwarded_for"`): answer them in HTTP.
    let status = reject.status().unwrap_or(match reject {
        Reject::Firewall => StatusCode::FORBIDDEN,
        Reject::RateLimited | Reject::IpConnLimit => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_REQUEST,
    });
    let (body, content_type) = match reject {
        Reject::UpstreamRefused(a) => (
            a.body.clone(),
            a.content_type
                .clone()
                .unwrap_or(HeaderValue::from_static("text/plain; charset=utf-8")),
        ),
        _ => (
            Bytes::from_static(reject.body().as_bytes()),
            HeaderValue::from_static("text/plain; charset=utf-8"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match reject {
        Reject::Auth(crate::error::AuthFailure::Forbidden) => {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
            );
        }
        Reject::Auth(_) => {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
        }
        Reject::Denied(d) => {
            if let Some(w) = &d.www_authenticate {
                h.insert(header::WWW_AUTHENTICATE, w.clone());
            }
            if let Some(l) = &d.location {
                h.insert(header::LOCATION, l.clone());
            }
        }
        Reject::NotUpgrade => {
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        Reject::UnsupportedVersion => {
            h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        _ => {}
    }
    if let Some(after) = reject.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
    }
    resp
}

/// The client's IP: the peer, or with `client_ip_source = "x_forwarded_for"` and a
/// trusted peer, the right-most `X-Forwarded-For` hop that is not a trusted proxy. Every
/// header line counts (joined in order); a hop may be `ip`, `ip:port`, `[v6]` or
/// `[v6]:port`. An unparsable right-most untrusted hop (`unknown`, garbage) is a 400,
/// never skipped, and a trusted proxy's own address is never taken as the client's: a
/// trusted peer that names no untrusted hop is refused too.
pub fn client_ip(config: &Config, peer: IpAddr, headers: &HeaderMap) -> Result<IpAddr, Reject> {
    if config.server.client_ip_source != ClientIpSource::XForwardedFor || !config.server.is_trusted_proxy(peer) {
        return Ok(peer);
    }
    let mut lines = headers.get_all("x-forwarded-for").iter().peekable();
    if lines.peek().is_none() {
        return Err(Reject::BadRequest("no X-Forwarded-For from a trusted proxy"));
    }
    let mut hops = Vec::new();
    for line in lines {
        let line = line.to_str().map_err(|_| Reject::BadRequest("unreadable X-Forwarded-For"))?;
        hops.extend(line.split(','));
    }
    for hop in hops.iter().rev() {
        let ip = parse_hop(hop).ok_or(Reject::BadRequest("unparsable X-Forwarded-For hop"))?;
        if !config.server.is_trusted_proxy(ip) {
            return Ok(ip);
        }
    }
    Err(Reject::BadRequest("X-Forwarded-For names only trusted proxies"))
}

/// Longest `X-Request-Id` kept from a trusted proxy.
pub const MAX_REQUEST_ID: usize = 128;

/// The request id of a connection (DESIGN.md section 17): a trusted proxy's one
/// `X-Request-Id` when it is 1–128 characters of `A-Za-z0-9._-`, else a new one (32 hex
/// digits). A client's own value is never kept: it could forge another request's id in
/// the logs, or smuggle text into them.
pub fn request_id(peer_trusted: bool, headers: &HeaderMap) -> std::sync::Arc<str> {
    let mut given = headers.get_all("x-request-id").iter();
    if peer_trusted
        && let (Some(v), None) = (given.next(), given.next())
        && (1..=MAX_REQUEST_ID).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && let Ok(v) = v.to_str()
    {
        return v.into();
    }
    // One shared copy: the log fields and the upstream header of the request all point at it.
    std::str::from_utf8(&hex(new_request_id())).unwrap_or("0").into()
}

/// A new request id: 128 bits of SipHash, under per-process random keys, of a random
/// per-process prefix and a counter, so ids neither repeat in practice nor tell how
/// many requests came before. Asking the system's random generator per request cost
/// about 2% of a plain request's CPU.
fn new_request_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<(std::collections::hash_map::RandomState, u64)> = std::sync::OnceLock::new();
    let (keys, prefix) = KEYS.get_or_init(|| {
        let mut p = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut p);
        (std::collections::hash_map::RandomState::new(), u64::from_ne_bytes(p))
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut a = keys.build_hasher();
    a.write_u64(*prefix);
    a.write_u64(n);
    let mut b = a.clone();
    a.write_u8(0);
    b.write_u8(1);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.finish().to_be_bytes());
    id[8..].copy_from_slice(&b.finish().to_be_bytes());
    id
}

/// Lower-case hex of a request id, on the stack (this runs once per request).
fn hex(id: [u8; 16]) -> [u8; 32] {
    let mut text = [0u8; 32];
    crate::util::hex_into(&id, &mut text);
    text
}

/// One `X-Forwarded-For` hop: `ip`, `ip:port`, `[v6]` or `[v6]:port`, canonical.
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim();
    let ip = h
        .parse::<IpAddr>()
        .ok()
        .or_else(|| h.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| crate::util::unbracket(h).parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod path_tests {
    use super::check_path;

    #[test]
    fn paths_that_could_mean_something_else_upstream_are_refused() {
        for bad in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2e/admin",
            "/public/.%2E/admin",
            "/chat/../../x",
            "/chat/./x",
            "/chat/.",
            "/chat/..",
            "/a/%252e%252e/b",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a%255Cb",
            "/a\\b",
            "/%61dmin/x",
            "/public/..;/admin",
            "/public/%2e%2e;/admin",
            "/public/..%00",
            "/a/%2525252e%2525252e/b",
            "/%C0%AE",
            "/public/%u002e%u002e/admin",
            "/public/..%20/admin",
            "/public/%2e%2e%20%20/admin",
            "/public/.../admin",
            "/public/%2e%2e%3f/admin",
            "/public/..%23/admin",
            "/public/%252e%252e%253f/admin",
            "/public/%25u002e%25u002e/admin",
            "/a%zz",
            "/a%2",
            "/a%",
            "/public/%EF%BC%8E%EF%BC%8E/admin",
            "/public/%ef%bc%8f",
            "/a%E2%88%95b",
            "/a%EF%B9%92%EF%B9%92",
            "/public/%c0%ae%c0%ae/admin",
            "/a%c0%afb",
            "/a/%25c0%25ae",
            "/%ff",
            "/public/\u{e9}",
            "/a b",
            "/a%00b",
            "//a",
            "/a//b",
            "a/b",
            "",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} passed");
        }
        for good in [
            "/",
            "/echo",
            "/chat/room",
            "/chat/room/",
            "/a.b/..c/.d/d.",
            "/%20x",
            "/a;v=1",
            "/%E2%82%AC",
        ] {
            assert!(check_path(good).is_ok(), "{good:?} refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(f: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Request<()> {
        let b = Request::get("/echo")
            .header("host", "x")
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        f(b).body(()).unwrap()
    }

    #[test]
    fn valid_upgrade_and_accept_key() {
        let up = validate(&req(|b| b)).unwrap();
        let resp = switching_protocols(&up, Some(HeaderValue::from_static("chat")));
        assert_eq!(resp.headers()["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    }

    #[test]
    fn malformed_upgrades() {
        let mut plain = req(|b| b);
        plain.headers_mut().remove("upgrade");
        assert_eq!(validate(&plain).unwrap_err(), Reject::NotUpgrade);
        let mut post = req(|b| b);
        *post.method_mut() = Method::POST;
        assert!(matches!(validate(&post).unwrap_err(), Reject::BadRequest(_)));
        let bad_key = req(|b| b.header("sec-websocket-key", "second"));
        assert!(matches!(validate(&bad_key).unwrap_err(), Reject::BadRequest(_)));
        let mut v8 = req(|b| b);
        v8.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(validate(&v8).unwrap_err(), Reject::UnsupportedVersion);
        let body = req(|b| b.header("content-length", "5"));
        assert!(matches!(validate(&body).unwrap_err(), Reject::BadRequest(_)));
    }
}

#[cfg(test)]
mod client_ip_tests {
    use super::*;
    use crate::config::Config;

    fn config() -> Config {
        Config::from_toml_str(
            "[server]\nclient_ip_source = \"x_forwarded_for\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1/128\"]\n",
            "t",
        )
        .unwrap()
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", l.parse().unwrap());
        }
        h
    }

    #[test]
    fn generated_request_ids_differ() {
        let ids: std::collections::HashSet<std::sync::Arc<str>> = (0..10_000).map(|_| request_id(false, &HeaderMap::new())).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|i| i.len() == 32 && i.bytes().all(|b| b.is_ascii_hexdigit())));
    }

    #[test]
    fn hex_is_two_lower_case_digits_per_byte() {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&[0x00, 0x0f, 0xa5, 0xff]);
        id[15] = 0x9c;
        assert_eq!(&hex(id), b"000fa5ff00000000000000000000009c");
    }

    #[test]
    fn a_request_id_is_kept_only_from_a_trusted_proxy_and_only_when_plain() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-request-id", HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let generated = |id: &str| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        assert_eq!(&*request_id(true, &with(&["abc.DEF_1-2"])), "abc.DEF_1-2");
        let longest = "a".repeat(MAX_REQUEST_ID);
        assert_eq!(*request_id(true, &with(&[&longest])), *longest);
        // A client's own value is replaced, however well-formed.
        assert!(generated(&request_id(false, &with(&["abc"]))));
        for bad in [&"a".repeat(MAX_REQUEST_ID + 1), "", "a b", "a\"b", "{\"x\":1}", "a/b", "é"] {
            let h = HeaderMap::from_iter([(
                http::HeaderName::from_static("x-request-id"),
                HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )]);
            assert!(generated(&request_id(true, &h)), "{bad:?} kept");
        }
        // Two copies: which one is meant is unclear, so neither.
        assert!(generated(&request_id(true, &with(&["a", "b"]))));
        assert!(generated(&request_id(true, &HeaderMap::new())));
        assert_ne!(request_id(false, &HeaderMap::new()), request_id(false, &HeaderMap::new()));
    }

    #[test]
    fn forwarded_for_hops_are_parsed_joined_and_never_skipped() {
        let c = config();
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let ip = |lines: &[&str]| client_ip(&c, proxy, &xff(lines));
        assert_eq!(ip(&["198.51.100.7"]).unwrap(), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            ip(&["198.51.100.7:4711, 10.0.0.2"]).unwrap(),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(ip(&["[2001:db8::1]:443"]).unwrap(), "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(ip(&["[2001:db8::2]"]).unwrap(), "2001:db8::2".parse::<IpAddr>().unwrap());
        assert_eq!(ip(&["::ffff:198.51.100.9"]).unwrap(), "198.51.100.9".parse::<IpAddr>().unwrap());
        // A proxy that appends a second line: the right-most untrusted hop is on it.
        assert_eq!(ip(&["6.6.6.6", "198.51.100.8"]).unwrap(), "198.51.100.8".parse::<IpAddr>().unwrap());
        for bad in [
            &["unknown"][..],
            &["198.51.100.7, garbage"],
            &["10.0.0.3"],
            &[""],
            &["1.2.3.4, unknown, 10.0.0.2"],
        ] {
            assert!(matches!(ip(bad), Err(Reject::BadRequest(_))), "{bad:?}");
        }
        assert!(matches!(client_ip(&c, proxy, &HeaderMap::new()), Err(Reject::BadRequest(_))));
        // An untrusted peer's header is ignored.
        let direct: IpAddr = "192.0.2.5".parse().unwrap();
        assert_eq!(client_ip(&c, direct, &xff(&["unknown"])).unwrap(), direct);
    }
}
