//! The client's transport: TLS, or plain TCP from a `listen_plain` listener. An enum
//! rather than a boxed trait object keeps the relay's reads and writes statically
//! dispatched.

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

// Boxed as a whole after the 101 (`conn::ClientIo`); boxing the TLS variant as well
// would cost every TLS session a second allocation to save a plain one 1 KiB.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ClientStream {
    Tls(TlsStream<TcpStream>),
    Plain(TcpStream),
}

crate::util::delegate_io!(ClientStream { Tls, Plain });
