//! HTTPS for the ACME client: one connection per request (an order makes a dozen
//! requests, a few times a year), rustls with the webpki roots plus `ca_file`, a
//! deadline on every request and a cap on every response body. instant-acme's own
//! client has neither, and would bring a second HTTP stack into the tree.

use bytes::Bytes;
use http::{Request, header::HOST};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};
use rustls_pki_types::ServerName;
use std::{future::Future, pin::Pin, time::Duration};
use tokio_rustls::TlsConnector;

/// Budget of one request: connect, TLS, request, whole response.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body: a directory, an order or a certificate chain is a few KiB.
const MAX_BODY: usize = 1 << 20;

pub(super) struct Https {
    tls: TlsConnector,
}

impl Https {
    pub(super) fn new(tls: TlsConnector) -> Https {
        Https { tls }
    }
}

fn other(message: impl Into<String>) -> Error {
    Error::Other(message.into().into())
}

impl HttpClient for Https {
    fn request(&self, req: Request<BodyWrapper<Bytes>>) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, req)).await {
                Ok(result) => result,
                Err(_) => Err(other(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
            }
        })
    }
}

async fn send(tls: TlsConnector, req: Request<BodyWrapper<Bytes>>) -> Result<BytesResponse, Error> {
    let (mut parts, body) = req.into_parts();
    if parts.uri.scheme_str() != Some("https") {
        return Err(other("the ACME server named a URL that is not https"));
    }
    let authority = parts.uri.authority().cloned().ok_or_else(|| other("URL without a host"))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = crate::util::authority_port(authority.as_str())
        .map_err(|()| other("URL with an invalid port"))?
        .unwrap_or(443);
    let name = ServerName::try_from(host.clone()).map_err(|_| other("URL with an invalid host"))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| other(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| other(format!("TLS with {host}:{port} failed: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| other(format!("HTTP with {host}:{port} failed: {e}")))?;
    // The connection's driver ends with the exchange; the deadline bounds it regardless.
    tokio::spawn(tokio::time::timeout(REQUEST_TIMEOUT, conn));
    // Origin-form request line with a Host header, as HTTP/1.1 servers expect.
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| other("invalid request path"))?;
    let host_header = http::HeaderValue::from_str(authority.as_str()).map_err(|_| other("invalid host"))?;
    parts.headers.insert(HOST, host_header);
    let rsp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| other(format!("request to {host}:{port} failed: {e}")))?;
    let (mut parts, body) = rsp.into_parts();
    clamp_retry_after(&mut parts.headers);
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| other(format!("reading the answer failed (at most {MAX_BODY} bytes): {e}")))?
        .to_bytes();
    Ok(BytesResponse {
        parts,
        body: Box::new(body),
    })
}

/// Longest `Retry-After` passed on, in seconds. instant-acme adds the header's
/// seconds to the clock unchecked, and a huge value panics there; nothing waits
/// longer than an order may take anyway.
const MAX_RETRY_AFTER: u64 = 300;

/// Cap a `Retry-After` in seconds at [`MAX_RETRY_AFTER`]; drop one that is neither
/// seconds nor a short HTTP date.
fn clamp_retry_after(headers: &mut http::HeaderMap) {
    let Some(v) = headers.get(http::header::RETRY_AFTER) else { return };
    let text = v.to_str().unwrap_or("").trim();
    let capped = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let secs = text.parse::<u64>().unwrap_or(u64::MAX).min(MAX_RETRY_AFTER);
        Some(http::HeaderValue::from(secs))
    } else if text.len() <= 64 && httpdate_like(text) {
        return;
    } else {
        None
    };
    match capped {
        Some(value) => {
            headers.insert(http::header::RETRY_AFTER, value);
        }
        None => {
            headers.remove(http::header::RETRY_AFTER);
        }
    }
}

/// Words of letters and digits with spaces, commas and colons: the shape of an HTTP date (instant-acme
/// parses it; a date cannot overflow the clock).
fn httpdate_like(s: &str) -> bool {
    s.contains(' ') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b" ,:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_capped_so_the_acme_crate_cannot_overflow_the_clock() {
        let check = |value: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, http::HeaderValue::from_str(value).unwrap());
            clamp_retry_after(&mut h);
            h.get(http::header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(check("18446744073709551615").as_deref(), Some("300"));
        assert_eq!(check("99999999999999999999999").as_deref(), Some("300"));
        assert_eq!(check("12").as_deref(), Some("12"));
        assert_eq!(
            check("Fri, 31 Dec 1999 23:59:59 GMT").as_deref(),
            Some("Fri, 31 Dec 1999 23:59:59 GMT")
        );
        assert_eq!(check("-5"), None);
        assert_eq!(check("1e9"), None);
    }
}
