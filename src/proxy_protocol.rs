//! Stage 1: the real client address from a PROXY protocol v1 or v2 header, sent by a
//! trusted L4 load balancer before anything else on the connection (parsed by `ppp`).
//!
//! The header is read exactly, never past its end, so the TLS handshake that follows
//! is untouched. Only peers in `trusted_proxies` may send one; anyone else is refused.

use std::net::{IpAddr, SocketAddr};
use tokio::{io::AsyncReadExt, net::TcpStream};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header (section 2.1 of the spec).
const V1_MAX: usize = 107;
/// v2 headers carrying more than this (TLVs) are refused.
const V2_MAX_PAYLOAD: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ProxyError {
    #[error("connection closed before a complete PROXY header")]
    Truncated,
    #[error("not a valid PROXY protocol header")]
    Invalid,
}

/// Read the PROXY header; returns the client address it names, or `None` for a
/// `LOCAL`/`UNKNOWN` header (a health check by the proxy itself).
pub(crate) async fn read_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    let mut buf = vec![0u8; 12];
    tcp.read_exact(&mut buf).await.map_err(|_| ProxyError::Truncated)?;
    if buf == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        tcp.read_exact(&mut fixed).await.map_err(|_| ProxyError::Truncated)?;
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if len > V2_MAX_PAYLOAD {
            return Err(ProxyError::Invalid);
        }
        buf.extend_from_slice(&fixed);
        let start = buf.len();
        buf.resize(start + len, 0);
        tcp.read_exact(&mut buf[start..]).await.map_err(|_| ProxyError::Truncated)?;
        return parse(&buf);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyError::Invalid);
    }
    // v1: text up to CRLF, read byte by byte so nothing past the header is consumed.
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Invalid);
        }
        let b = tcp.read_u8().await.map_err(|_| ProxyError::Truncated)?;
        buf.push(b);
    }
    parse(&buf)
}

/// Parse a complete header.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    match ppp::HeaderResult::parse(buf) {
        ppp::HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            _ => None,
        }),
        _ => Err(ProxyError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2() {
        assert_eq!(
            parse(b"PROXY TCP4 203.0.113.5 10.0.0.1 5555 443\r\n").unwrap(),
            Some("203.0.113.5:5555".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), None);
        assert_eq!(parse(b"PROXY TCP4 nonsense\r\n"), Err(ProxyError::Invalid));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 7, 10, 0, 0, 1, 0x1f, 0x90, 0x01, 0xbb]);
        assert_eq!(parse(&v2).unwrap(), Some("198.51.100.7:8080".parse().unwrap()));
    }
}
