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
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body: a directory, an order or a certificate chain is a few KiB.
const MAX_BODY: usize = 1 << 20;

pub struct Https {
    tls: TlsConnector,
}

impl Https {
    pub fn new(tls: TlsConnector) -> Https {
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
    let port = authority.port_u16().unwrap_or(443);
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
    let (parts, body) = rsp.into_parts();
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
