//! Forward auth (`[providers.NAME] kind = "forward"`, DESIGN.md section 15): the app's
//! own endpoint judges the client's cookie session.
//!
//! The gateway sends `GET url` with the client's `pass_headers` (only those) and the
//! forwarding headers it derives itself. A 2xx admits with the identity of
//! `identity_header` (an answer without a usable one is the endpoint's fault: 503,
//! never an admission); 401/403 are the app's refusal (passed with its
//! `WWW-Authenticate`); a redirect (a login page) is passed as it is (with its
//! `Location`) to a plain HTTP request and is a 401 for an upgrade; anything else, a timeout, an
//! answer head over [`MAX_ANSWER_HEAD`] → 503 `auth_unavailable`. The answer's body is
//! never read.
//!
//! Answers may be kept `cache` long in a bounded map keyed by SHA-256 of what was sent
//! (never the raw cookie); identical checks in flight at once are made once
//! ([`super::cache::AnswerCache`]).

use super::cache::{AnswerCache, Key, key_of};
use crate::config::Forward as ForwardConfig;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use std::{
    fmt,
    net::IpAddr,
    time::{Duration, Instant},
};

/// The largest answer head read from the auth endpoint (hyper's read buffer); more → 503.
pub const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// The longest identity taken from the answer.
pub(crate) const MAX_IDENTITY: usize = 256;

/// What the gateway asks the endpoint about one client: the client's passed headers and
/// what the gateway derived. `Debug` shows header names only (a cookie is a credential).
#[derive(Clone)]
pub struct Asked {
    passed: Vec<(HeaderName, HeaderValue)>,
    client_ip: IpAddr,
    host: HeaderValue,
    uri: HeaderValue,
    method: Method,
    /// `X-Forwarded-Proto`: `https`, or `http` for a connection on a `listen_plain` listener.
    proto: &'static str,
}

impl fmt::Debug for Asked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Asked")
            .field("passed", &self.passed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())
            .field("client_ip", &self.client_ip)
            .finish_non_exhaustive()
    }
}

/// The request an upgrade or a plain request made, as the gateway derived it.
pub struct Requested<'a> {
    pub client_ip: IpAddr,
    /// The `Host` as routed (lower case, no port).
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    /// An upgrade (a redirect is then a 401), not a plain HTTP request.
    pub upgrade: bool,
    /// The connection came over TLS (not on a `listen_plain` listener).
    pub tls: bool,
}

impl Asked {
    /// `None`: the host or path cannot be a header value (never for a routed request).
    pub fn new(cfg: &ForwardConfig, headers: &HeaderMap, req: &Requested<'_>) -> Option<Asked> {
        let mut passed = Vec::new();
        for name in &cfg.pass_headers {
            for v in headers.get_all(name) {
                passed.push((name.clone(), v.clone()));
            }
        }
        let uri = match req.query {
            Some(q) => format!("{}?{q}", req.path),
            None => req.path.to_string(),
        };
        Some(Asked {
            passed,
            client_ip: req.client_ip,
            host: HeaderValue::from_str(req.host).ok()?,
            uri: HeaderValue::from_str(&uri).ok()?,
            method: req.method.clone(),
            proto: if req.tls { "https" } else { "http" },
        })
    }

    /// SHA-256 of what was sent, each part length-prefixed: the header names and values,
    /// host, path and query, method, scheme. The client IP is not part of it.
    fn key(&self) -> Key {
        let passed = self.passed.iter().flat_map(|(n, v)| [n.as_str().as_bytes(), v.as_bytes()]);
        let derived = [
            b"\0derived".as_slice(),
            self.host.as_bytes(),
            self.uri.as_bytes(),
            self.method.as_str().as_bytes(),
            self.proto.as_bytes(),
        ];
        key_of(passed.chain(derived))
    }
}

/// The endpoint's decision.
#[derive(Clone)]
pub enum Answer {
    Allow {
        identity: String,
        /// `copy_headers` of the answer, sent upstream.
        copies: Vec<(HeaderName, HeaderValue)>,
    },
    Deny {
        /// 401, 403 or a redirect (3xx).
        status: StatusCode,
        www_authenticate: Option<HeaderValue>,
        /// A redirect's `Location`.
        location: Option<HeaderValue>,
    },
}

/// The endpoint gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    Timeout,
    /// Unreachable, a 5xx or another status, an unreadable or oversized answer.
    Error,
}

impl Unanswered {
    pub fn label(self) -> &'static str {
        match self {
            Unanswered::Timeout => "timeout",
            Unanswered::Error => "error",
        }
    }
}

/// One forward provider at run time.
pub struct Checker {
    requests: super::ProviderRequests,
    cfg: ForwardConfig,
    tls: Option<tokio_rustls::TlsConnector>,
    cache: AnswerCache<Answer>,
}

impl fmt::Debug for Checker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checker").field("name", &self.name()).finish_non_exhaustive()
    }
}

impl Checker {
    pub fn new(name: &str, cfg: &ForwardConfig, origin: &str) -> Result<Checker, crate::config::ConfigError> {
        let tls = if cfg.url.scheme_str() == Some("https") {
            Some(tokio_rustls::TlsConnector::from(crate::tls::upstream_client_config(
                cfg.ca_file.as_ref(),
                origin,
            )?))
        } else {
            None
        };
        Ok(Checker {
            requests: super::ProviderRequests::new(name),
            cfg: cfg.clone(),
            tls,
            cache: AnswerCache::default(),
        })
    }

    pub fn config(&self) -> &ForwardConfig {
        &self.cfg
    }

    pub fn name(&self) -> &str {
        self.requests.name()
    }

    /// Count into these metrics from now on (set once, when the runtime starts).
    pub fn bind_metrics(&self, metrics: &crate::metrics::Metrics) {
        self.requests.bind(metrics);
    }

    fn count(&self, result: &'static str) {
        self.requests.count(result);
    }

    /// The decision for a new client: from the cache when `cache` allows, else asked,
    /// once for identical checks in flight (with `cache = "0s"` too: they share the one
    /// answer, which is then not kept).
    pub async fn check(&self, asked: &Asked) -> Result<Answer, Unanswered> {
        let keep = |_: &Answer| (!self.cfg.cache.is_zero()).then(|| Instant::now() + self.cfg.cache);
        let (answer, shared) = self.cache.get_or_ask(asked.key(), || self.ask(asked), keep).await;
        if shared && answer.is_ok() {
            self.count("cache_hit");
        }
        answer
    }

    /// Ask the endpoint now (a recheck never reads the cache).
    pub async fn ask(&self, asked: &Asked) -> Result<Answer, Unanswered> {
        let result = match tokio::time::timeout(self.cfg.timeout, self.exchange(asked)).await {
            Err(_) => Err(Unanswered::Timeout),
            Ok(r) => r,
        };
        self.count(match &result {
            Ok(Answer::Allow { .. }) => "allow",
            Ok(Answer::Deny { .. }) => "deny",
            Err(u) => u.label(),
        });
        result
    }

    async fn exchange(&self, asked: &Asked) -> Result<Answer, Unanswered> {
        let url = &self.cfg.url;
        let host = url.host().map(crate::util::unbracket).ok_or(Unanswered::Error)?;
        let port = url.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|_| Unanswered::Error)?;
        let _ = tcp.set_nodelay(true);
        let req = self.request(asked)?;
        let resp = match &self.tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|_| Unanswered::Error)?;
                let stream = tls.connect(name, tcp).await.map_err(|_| Unanswered::Error)?;
                send(stream, req).await?
            }
            None => send(tcp, req).await?,
        };
        self.judge(resp.status(), resp.headers())
    }

    fn request(&self, asked: &Asked) -> Result<http::Request<http_body_util::Empty<bytes::Bytes>>, Unanswered> {
        let mut req = endpoint_request(&self.cfg.url, Method::GET, http_body_util::Empty::new())?;
        let h = req.headers_mut();
        for (n, v) in &asked.passed {
            h.append(n.clone(), v.clone());
        }
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_str(&asked.client_ip.to_string()).map_err(|_| Unanswered::Error)?,
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static(asked.proto));
        h.insert("x-forwarded-host", asked.host.clone());
        h.insert("x-forwarded-uri", asked.uri.clone());
        h.insert(
            "x-original-method",
            HeaderValue::from_str(asked.method.as_str()).map_err(|_| Unanswered::Error)?,
        );
        Ok(req)
    }

    /// The decision an answer head carries.
    fn judge(&self, status: StatusCode, headers: &HeaderMap) -> Result<Answer, Unanswered> {
        if status.is_success() {
            // Named twice, the answer is ambiguous: frameworks may join the copies or take
            // the last, while the gateway would log and cap the first.
            let mut copies = headers.get_all(&self.cfg.identity_header).iter();
            let found = match (copies.next(), copies.next()) {
                (Some(v), None) => Some(usable_identity(v)),
                (Some(_), Some(_)) => Some(Err("named twice")),
                (None, _) => None,
            };
            let identity = match found {
                Some(Ok(identity)) => identity,
                problem => {
                    tracing::warn!(
                        provider = %self.name(),
                        header = %self.cfg.identity_header,
                        problem = problem.map_or("missing", |p| p.err().unwrap_or_default()),
                        "the forward auth endpoint admitted a client without a usable identity header: refused (503)"
                    );
                    return Err(Unanswered::Error);
                }
            };
            let copies = self
                .cfg
                .copy_headers
                .iter()
                .flat_map(|n| headers.get_all(n).iter().map(move |v| (n.clone(), v.clone())))
                .collect();
            return Ok(Answer::Allow { identity, copies });
        }
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Ok(Answer::Deny {
                status,
                www_authenticate: headers.get(header::WWW_AUTHENTICATE).cloned(),
                location: None,
            }),
            s if s.is_redirection() => Ok(Answer::Deny {
                status: s,
                www_authenticate: None,
                location: headers.get(header::LOCATION).cloned(),
            }),
            _ => Err(Unanswered::Error),
        }
    }
}

/// An identity: visible ASCII/UTF-8 without control characters, not empty, bounded; else
/// what is wrong with it (for the log; never the value). Bytes that are not UTF-8 are not
/// guessed at: a Latin-1 reading would make two users of one app the same identity (the
/// Latin-1 bytes of "Ã©" are the UTF-8 of "é"). Django, for one, writes a name that fits
/// Latin-1 in Latin-1: the endpoint should send names percent-encoded (README).
fn usable_identity(v: &HeaderValue) -> Result<String, &'static str> {
    let s = std::str::from_utf8(v.as_bytes())
        .map_err(|_| "not UTF-8 (send non-ASCII names percent-encoded)")?
        .trim();
    match s {
        "" => Err("empty"),
        s if s.len() > MAX_IDENTITY => Err("longer than 256 bytes"),
        s if s.chars().any(char::is_control) => Err("control characters"),
        s => Ok(s.to_string()),
    }
}

/// One exchange on a fresh connection: the answer's head only. The connection task is
/// ended once the head is in (the body is never read).
async fn send<IO>(io: IO, req: http::Request<http_body_util::Empty<bytes::Bytes>>) -> Result<http::Response<()>, Unanswered>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_ANSWER_HEAD)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|_| Unanswered::Error)?;
    let task = tokio::spawn(conn);
    let _end = AbortOnDrop(task);
    let resp = sender.send_request(req).await.map_err(|_| Unanswered::Error)?;
    let (parts, _body) = resp.into_parts();
    Ok(http::Response::from_parts(parts, ()))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a session waits before asking again after the endpoint could not answer.
pub fn retry_after(recheck: Duration) -> Duration {
    recheck.min(Duration::from_secs(10))
}

/// A request to a provider's endpoint `url` (origin form, `Host` its authority).
pub(super) fn endpoint_request<B>(url: &http::Uri, method: Method, body: B) -> Result<http::Request<B>, Unanswered> {
    let mut req = http::Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| Unanswered::Error)?;
    let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_str(authority).map_err(|_| Unanswered::Error)?);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cache: Duration) -> ForwardConfig {
        ForwardConfig {
            url: "http://127.0.0.1:9/auth".parse().unwrap(),
            pass_headers: vec![header::COOKIE],
            identity_header: HeaderName::from_static("x-user"),
            copy_headers: vec![HeaderName::from_static("x-roles")],
            cache,
            recheck: None,
            timeout: Duration::from_secs(1),
            ca_file: None,
        }
    }

    fn asked(cookie: &str) -> Asked {
        asked_on(cookie, true)
    }

    fn asked_on(cookie: &str, tls: bool) -> Asked {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        let req = Requested {
            client_ip: "127.0.0.1".parse().unwrap(),
            host: "a.example",
            path: "/ws",
            query: None,
            method: &Method::GET,
            upgrade: true,
            tls,
        };
        Asked::new(&cfg(Duration::ZERO), &h, &req).unwrap()
    }

    #[test]
    fn only_pass_headers_are_sent_and_debug_hides_values() {
        let a = asked("session=secret");
        assert_eq!(a.passed.len(), 1);
        assert!(!format!("{a:?}").contains("secret"));
    }

    #[test]
    fn keys_differ_by_cookie() {
        assert_ne!(asked("s=1").key(), asked("s=2").key());
        assert_eq!(asked("s=1").key(), asked("s=1").key());
    }

    #[test]
    fn identities_must_be_utf8_text() {
        let v = |b: &[u8]| usable_identity(&HeaderValue::from_bytes(b).unwrap());
        assert_eq!(v(b" jos%C3%A9 "), Ok("jos%C3%A9".to_string()));
        assert_eq!(v("josé".as_bytes()), Ok("josé".to_string()));
        // Django's "josé" (Latin-1) is not guessed at; nor is its RFC 2047 form decoded.
        assert!(v(b"jos\xe9").unwrap_err().starts_with("not UTF-8"));
        assert_eq!(v(b"=?utf-8?b?0JTQuNC80LA=?="), Ok("=?utf-8?b?0JTQuNC80LA=?=".to_string()));
        assert_eq!(v(b"  "), Err("empty"));
        assert_eq!(v(b"a\tb"), Err("control characters"));
        assert_eq!(v(&[b'a'; 257]), Err("longer than 256 bytes"));
    }

    #[test]
    fn the_scheme_is_what_the_client_connected_with() {
        let c = Checker::new("app", &cfg(Duration::ZERO), "<inline>").unwrap();
        let proto = |tls| c.request(&asked_on("s=1", tls)).unwrap().headers()["x-forwarded-proto"].clone();
        assert_eq!(proto(true), "https");
        assert_eq!(proto(false), "http", "a listen_plain connection");
        assert_ne!(asked_on("s=1", true).key(), asked_on("s=1", false).key());
    }

    #[test]
    fn judging_answers() {
        let c = Checker::new("app", &cfg(Duration::ZERO), "<inline>").unwrap();
        let mut h = HeaderMap::new();
        assert!(c.judge(StatusCode::OK, &h).is_err(), "no identity: never admitted");
        h.insert("x-user", HeaderValue::from_static("  "));
        assert!(c.judge(StatusCode::OK, &h).is_err());
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.append("x-roles", HeaderValue::from_static("a"));
        match c.judge(StatusCode::NO_CONTENT, &h) {
            Ok(Answer::Allow { identity, copies }) => {
                assert_eq!(identity, "alice");
                assert_eq!(copies.len(), 1);
            }
            _ => panic!("admitted"),
        }
        let mut twice = h.clone();
        twice.append("x-user", HeaderValue::from_static("admin"));
        assert_eq!(
            c.judge(StatusCode::OK, &twice).err(),
            Some(Unanswered::Error),
            "an identity named twice is ambiguous: never admitted"
        );
        h.insert(header::LOCATION, HeaderValue::from_static("/login"));
        assert!(matches!(
            c.judge(StatusCode::FOUND, &h),
            Ok(Answer::Deny {
                status: StatusCode::FOUND,
                location: Some(_),
                ..
            })
        ));
        assert!(matches!(
            c.judge(StatusCode::FORBIDDEN, &h),
            Ok(Answer::Deny {
                status: StatusCode::FORBIDDEN,
                ..
            })
        ));
        assert_eq!(c.judge(StatusCode::BAD_GATEWAY, &h).err(), Some(Unanswered::Error));
        assert_eq!(c.judge(StatusCode::NOT_FOUND, &h).err(), Some(Unanswered::Error));
    }
}
