//! Why a connection ends: one mapping from a reason to its outcome.
//!
//! Before the 101 a [`Reject`] becomes an HTTP status, a `reason` metric label and
//! a log level; after it a [`CloseReason`] becomes a close code, an `errors_total`
//! kind and the initiator label. Both tables are pinned by the tests below.

use http::StatusCode;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// `Retry-After` when the gateway is full or draining.
const RETRY_AFTER_BUSY: Duration = Duration::from_secs(1);
/// `Retry-After` when the user has too many sessions.
const RETRY_AFTER_USER_LIMIT: Duration = Duration::from_secs(5);

/// Close code: policy violation (RFC 6455 7.4.1).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: the server hit an unexpected condition.
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// Close code when a token's `exp` passes during the session (`close_on_expiry`).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// Close code recorded when a close frame carried no code (never sent on the wire).
pub const CLOSE_NO_STATUS: u16 = 1005;
/// Close code recorded when a connection ended without a close frame (never sent).
pub const CLOSE_ABNORMAL: u16 = 1006;

/// Why a connection was refused before the 101.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("refused by the firewall")]
    Firewall,
    #[error("new-connection rate per IP exceeded")]
    RateLimited,
    #[error("concurrent connections per IP exceeded")]
    IpConnLimit,
    #[error("origin not allowed")]
    Origin,
    #[error("too many auth failures from this IP")]
    AuthBanned(Duration),
    #[error("too many sessions for this user")]
    UserConnLimit,
    #[error("global connection cap reached")]
    GlobalConnLimit,
    #[error("gateway is draining")]
    Draining,
    #[error("TLS handshake failed")]
    TlsHandshake,
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("malformed upgrade request: {0}")]
    BadRequest(&'static str),
    #[error("request head too large")]
    HeadTooLarge,
    #[error("WebSocket version not supported")]
    UnsupportedVersion,
    #[error("not a WebSocket upgrade")]
    NotUpgrade,
    /// A plain request whose method is not in the route's `http_methods`.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// A plain request whose body is larger than the route's `max_body`.
    #[error("request body too large")]
    BodyTooLarge,
    #[error("no route for path")]
    NotFound,
    /// The client sent SNI and a `Host` that is not a name of the certificate its TLS
    /// session used (domain fronting).
    #[error("Host is not a name of the TLS session's certificate")]
    Misdirected,
    #[error("authentication failed: {0}")]
    Auth(AuthFailure),
    /// The forward auth endpoint refused the client (401/403, or a redirect to a login
    /// page: 401): its status and `WWW-Authenticate` go back to the client.
    #[error("refused by the auth provider ({})", .0.status)]
    Denied(Box<Denied>),
    /// An auth provider gave no usable answer (timeout, 5xx, garbage): never an admission.
    #[error("auth provider unavailable")]
    AuthUnavailable,
    /// A route that needs a client certificate (`mtls`, `jwt+mtls`) got none, or one
    /// that names no usable identity (`client_auth = "optional"`).
    #[error("no usable client certificate")]
    ClientCert,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    /// Every upstream of the route is out (down, in back-off or drained): nothing was
    /// tried. 503 with `Retry-After`, as for a gateway that cannot take the request now.
    #[error("no upstream available (all down or drained)")]
    NoUpstream,
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The application answered the upgrade with a well-formed 4xx: its answer to this
    /// client, passed through (status and a bounded body), with no failover and no
    /// effect on the upstream's health.
    #[error("upstream refused the upgrade with {}", .0.status)]
    UpstreamRefused(Box<UpstreamAnswer>),
}

/// A forward auth endpoint's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// 401, 403, or a redirect to a plain HTTP request (an upgrade gets 401 instead).
    pub status: StatusCode,
    pub www_authenticate: Option<http::HeaderValue>,
    /// The redirect's `Location`, passed as it is.
    pub location: Option<http::HeaderValue>,
}

/// A 4xx the upstream answered to the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAnswer {
    pub status: StatusCode,
    pub content_type: Option<http::HeaderValue>,
    /// At most [`MAX_UPSTREAM_BODY`] bytes.
    pub body: bytes::Bytes,
}

/// The largest body of an upstream refusal passed to the client; the rest is cut.
pub const MAX_UPSTREAM_BODY: usize = 4096;

/// Why a token was refused; the label of `wsgate_auth_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    BadIssuer,
    #[error("wrong audience")]
    BadAudience,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("required claim missing")]
    MissingClaim,
    #[error("unknown key id")]
    UnknownKid,
    #[error("claims do not grant this route")]
    Forbidden,
    #[error("token revoked")]
    Revoked,
    /// The token is bound to a certificate (`cnf`, RFC 8705) other than the one presented,
    /// or to none the gateway can check.
    #[error("token not bound to this client certificate")]
    CertBinding,
    /// The forward auth endpoint answered 401/403 (or a redirect).
    #[error("refused by the auth provider")]
    Denied,
    /// The introspection endpoint said the token is not active (RFC 7662).
    #[error("token not active")]
    Inactive,
}

impl AuthFailure {
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::BadIssuer => "bad_issuer",
            AuthFailure::BadAudience => "bad_audience",
            AuthFailure::Algorithm => "algorithm",
            AuthFailure::MissingClaim => "missing_claim",
            AuthFailure::UnknownKid => "unknown_kid",
            AuthFailure::Forbidden => "forbidden",
            AuthFailure::Revoked => "revoked",
            AuthFailure::CertBinding => "cert_binding",
            AuthFailure::Denied => "denied",
            AuthFailure::Inactive => "inactive",
        }
    }
}

/// Why a live refresh (`refresh = true`, DESIGN.md section 15) was refused: the
/// `result` label of `wsgate_token_refreshes_total` (beside `ok`). The session then
/// closes with 1008 ([`CloseReason::RefreshRefused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshRefusal {
    /// The token fails as it would at admission (signature, expiry, issuer, audience,
    /// claims, revocation, certificate binding).
    Auth(AuthFailure),
    /// A valid token for someone else (or a session without an identity to compare).
    OtherIdentity,
    /// The session's route no longer allows refreshes (a reload turned `refresh` off,
    /// moved the route to another provider, or removed it).
    NotAllowed,
}

impl RefreshRefusal {
    pub fn label(self) -> &'static str {
        match self {
            RefreshRefusal::Auth(f) => f.label(),
            RefreshRefusal::OtherIdentity => "other_identity",
            RefreshRefusal::NotAllowed => "not_allowed",
        }
    }
}

impl Reject {
    /// The auth failure this refusal counts as (metric, ban), if it is one.
    pub fn auth_failure(&self) -> Option<AuthFailure> {
        match self {
            Reject::Auth(f) => Some(*f),
            Reject::Denied(_) => Some(AuthFailure::Denied),
            _ => None,
        }
    }

    /// The HTTP status answered to the client, or `None` when the TCP connection is
    /// simply closed (no HTTP exchange is possible or wanted).
    pub fn status(&self) -> Option<StatusCode> {
        Some(match self {
            Reject::Firewall | Reject::RateLimited | Reject::IpConnLimit | Reject::TlsHandshake | Reject::HandshakeTimeout => return None,
            Reject::Origin => StatusCode::FORBIDDEN,
            Reject::AuthBanned(_) | Reject::UserConnLimit => StatusCode::TOO_MANY_REQUESTS,
            Reject::GlobalConnLimit | Reject::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::UnsupportedVersion | Reject::NotUpgrade => StatusCode::UPGRADE_REQUIRED,
            Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reject::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Reject::Auth(AuthFailure::Forbidden) => StatusCode::FORBIDDEN,
            Reject::Auth(_) => StatusCode::UNAUTHORIZED,
            Reject::Denied(d) => d.status,
            Reject::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Reject::ClientCert => StatusCode::FORBIDDEN,
            Reject::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Reject::NoUpstream => StatusCode::SERVICE_UNAVAILABLE,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::UpstreamRefused(a) => a.status,
        })
    }

    /// The `wsgate_connections_rejected_total{reason}` label, also the log `reason` field.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::Firewall => "firewall",
            Reject::RateLimited => "rate_limited",
            Reject::IpConnLimit => "ip_conn_limit",
            Reject::Origin => "origin",
            Reject::AuthBanned(_) => "auth_banned",
            Reject::UserConnLimit => "user_conn_limit",
            Reject::GlobalConnLimit | Reject::Draining => "global_conn_limit",
            Reject::TlsHandshake => "tls_handshake",
            Reject::HandshakeTimeout => "handshake_timeout",
            Reject::BadRequest(_) | Reject::HeadTooLarge | Reject::UnsupportedVersion | Reject::NotUpgrade => "bad_request",
            Reject::NotFound => "not_found",
            Reject::MethodNotAllowed => "method_not_allowed",
            Reject::BodyTooLarge => "body_too_large",
            Reject::Misdirected => "misdirected",
            Reject::Auth(_) | Reject::Denied(_) => "auth",
            Reject::AuthUnavailable => "auth_unavailable",
            Reject::ClientCert => "client_cert",
            Reject::UpstreamUnavailable | Reject::NoUpstream => "upstream_unavailable",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::UpstreamRefused(_) => "upstream_refused",
        }
    }

    /// Short response body; never echoes input.
    pub fn body(&self) -> &'static str {
        match self {
            Reject::GlobalConnLimit => "server busy\n",
            Reject::Draining => "server shutting down\n",
            Reject::Firewall | Reject::RateLimited | Reject::IpConnLimit | Reject::TlsHandshake | Reject::HandshakeTimeout => "",
            Reject::Origin => "origin not allowed\n",
            Reject::AuthBanned(_) => "too many failed attempts\n",
            Reject::UserConnLimit => "too many sessions for this user\n",
            Reject::BadRequest(_) => "bad websocket upgrade request\n",
            Reject::HeadTooLarge => "request head too large\n",
            Reject::UnsupportedVersion => "websocket version 13 required\n",
            Reject::NotUpgrade => "websocket upgrade required\n",
            Reject::NotFound => "not found\n",
            Reject::MethodNotAllowed => "method not allowed\n",
            Reject::BodyTooLarge => "request body too large\n",
            Reject::Misdirected => "misdirected request\n",
            Reject::Auth(_) | Reject::Denied(_) => "unauthorized\n",
            Reject::AuthUnavailable => "authentication unavailable\n",
            Reject::ClientCert => "client certificate required\n",
            Reject::UpstreamUnavailable => "upstream unavailable\n",
            Reject::NoUpstream => "no upstream available\n",
            Reject::UpstreamTimeout => "upstream timeout\n",
            Reject::UpstreamRefused(_) => "",
        }
    }

    /// Whether the rejection is worth a WARN (someone may be attacking or misconfigured) or INFO.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Reject::Auth(_)
                | Reject::Denied(_)
                | Reject::AuthUnavailable
                | Reject::AuthBanned(_)
                | Reject::ClientCert
                | Reject::Origin
                | Reject::UpstreamUnavailable
                | Reject::NoUpstream
                | Reject::UpstreamTimeout
        )
    }

    /// `Retry-After` to send, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Reject::GlobalConnLimit | Reject::Draining | Reject::NoUpstream => Some(RETRY_AFTER_BUSY),
            Reject::AuthBanned(left) => Some(*left),
            Reject::UserConnLimit => Some(RETRY_AFTER_USER_LIMIT),
            _ => None,
        }
    }

    /// The close code and reason for a refusal after the 101 (a `first_message` token
    /// that fails, an upstream that cannot be reached once it verified).
    pub fn close_after_upgrade(&self) -> (u16, &'static str) {
        match self {
            Reject::UpstreamUnavailable | Reject::UpstreamTimeout | Reject::NoUpstream => (CLOSE_INTERNAL_ERROR, "upstream unavailable"),
            Reject::AuthUnavailable => (CLOSE_INTERNAL_ERROR, "authentication unavailable"),
            Reject::UpstreamRefused(_) => (CLOSE_POLICY, "refused by the application"),
            Reject::UserConnLimit => (CLOSE_POLICY, "too many sessions for this user"),
            _ => (CLOSE_POLICY, "authentication failed"),
        }
    }
}

/// Who closed a session, the `initiator` label of `wsgate_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    Client,
    Upstream,
    Gateway,
}

impl Initiator {
    pub fn label(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Upstream => "upstream",
            Initiator::Gateway => "gateway",
        }
    }
}

/// Why the gateway itself ended a session after the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// SIGTERM/SIGINT drain.
    Shutdown,
    /// The session's upstream is drained (admin API): 1012, reconnect elsewhere.
    UpstreamDrained,
    /// No data frame either way for `idle_timeout`.
    IdleTimeout,
    /// The client did not answer the gateway's ping within `ping_interval`.
    PingTimeout,
    /// The client broke the protocol.
    ClientProtocol,
    /// The client sent text that is not UTF-8.
    ClientInvalidUtf8,
    /// The client sent a frame or message over the limit.
    ClientTooBig,
    /// The client's connection failed without a close frame.
    ClientIo,
    /// The upstream's connection failed without a close frame.
    UpstreamReset,
    /// The upstream broke the protocol.
    UpstreamProtocol,
    /// The upstream sent text that is not UTF-8.
    UpstreamInvalidUtf8,
    /// The upstream sent a frame or message over the limit.
    UpstreamTooBig,
    /// The client's token expired during the session (`close_on_expiry`).
    TokenExpired,
    /// The client kept pushing beyond `message_rate` for `rate_abuse_timeout`.
    RateAbuse,
    /// After a reload the client is denied by the firewall or its token is revoked.
    AccessRevoked,
    /// A client message failed validation on a route with `on_invalid = "close"`.
    InvalidMessage(MessageRejection),
    /// The gateway-wide budget for messages being assembled for validation is used up,
    /// or the client's share of it.
    Overloaded,
    /// A message being assembled for validation was not complete within `assembly_timeout`.
    MessageStalled,
    /// A live refresh token (`refresh = true`) was bad, expired or someone else's.
    RefreshRefused,
}

/// Why a client message was refused on a route with `[routes.validate]`: the `reason`
/// label of `wsgate_messages_rejected_total` and of the log event, and the close code
/// with `on_invalid = "close"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRejection {
    /// Text that is not JSON (syntax, a number out of range, a duplicate key): 1007.
    NotJson,
    /// Nested deeper than `max_depth`: 1008.
    TooDeep,
    /// Valid JSON that fails the route's schema: 1008.
    Schema,
    /// A binary message on a route with `binary = false`: 1003 (RFC 6455 7.4.1,
    /// a type of data the endpoint cannot accept).
    Binary,
}

impl MessageRejection {
    /// Every reason, in the order of [`MessageRejection::index`].
    pub const ALL: [MessageRejection; 4] = [
        MessageRejection::NotJson,
        MessageRejection::TooDeep,
        MessageRejection::Schema,
        MessageRejection::Binary,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            MessageRejection::NotJson => "not_json",
            MessageRejection::TooDeep => "too_deep",
            MessageRejection::Schema => "schema",
            MessageRejection::Binary => "binary",
        }
    }

    /// The close code with `on_invalid = "close"`, to both peers.
    pub fn close_code(self) -> CloseCode {
        match self {
            MessageRejection::NotJson => CloseCode::Invalid,
            MessageRejection::TooDeep | MessageRejection::Schema => CloseCode::Policy,
            MessageRejection::Binary => CloseCode::Unsupported,
        }
    }
}

impl CloseReason {
    /// Close codes sent to (client, upstream).
    pub fn codes(self) -> (CloseCode, CloseCode) {
        use CloseCode::*;
        match self {
            CloseReason::Shutdown | CloseReason::IdleTimeout | CloseReason::PingTimeout | CloseReason::MessageStalled => (Away, Away),
            CloseReason::ClientProtocol => (Protocol, Protocol),
            CloseReason::ClientInvalidUtf8 => (Invalid, Invalid),
            CloseReason::ClientTooBig => (Size, Size),
            CloseReason::ClientIo => (Away, Away),
            CloseReason::UpstreamReset => (Error, Error),
            CloseReason::UpstreamProtocol => (Error, Protocol),
            CloseReason::UpstreamInvalidUtf8 => (Error, Invalid),
            CloseReason::UpstreamTooBig => (Size, Size),
            CloseReason::TokenExpired => (Library(CLOSE_TOKEN_EXPIRED), Library(CLOSE_TOKEN_EXPIRED)),
            CloseReason::RateAbuse | CloseReason::AccessRevoked | CloseReason::RefreshRefused => (Policy, Policy),
            CloseReason::InvalidMessage(r) => (r.close_code(), r.close_code()),
            CloseReason::Overloaded => (Again, Again),
            CloseReason::UpstreamDrained => (Restart, Restart),
        }
    }

    /// Reason text in the close frames; says who caused it, never echoes input.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Shutdown => "gateway shutting down",
            CloseReason::UpstreamDrained => "upstream drained, reconnect",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::PingTimeout => "client did not answer ping",
            CloseReason::ClientProtocol => "client protocol violation",
            CloseReason::ClientInvalidUtf8 => "client sent invalid utf-8",
            CloseReason::ClientTooBig => "client message too big",
            CloseReason::ClientIo => "client connection lost",
            CloseReason::UpstreamReset => "upstream connection lost",
            CloseReason::UpstreamProtocol => "upstream protocol violation",
            CloseReason::UpstreamInvalidUtf8 => "upstream sent invalid utf-8",
            CloseReason::UpstreamTooBig => "upstream message too big",
            CloseReason::TokenExpired => "token expired",
            CloseReason::RateAbuse => "client exceeded the message rate",
            CloseReason::AccessRevoked => "access revoked",
            CloseReason::InvalidMessage(MessageRejection::NotJson) => "client message is not json",
            CloseReason::InvalidMessage(MessageRejection::TooDeep) => "client message nested too deeply",
            CloseReason::InvalidMessage(MessageRejection::Schema) => "client message does not match the schema",
            CloseReason::InvalidMessage(MessageRejection::Binary) => "binary messages not allowed",
            CloseReason::Overloaded => "gateway busy, try again later",
            CloseReason::MessageStalled => "client message not completed in time",
            CloseReason::RefreshRefused => "token refresh refused",
        }
    }

    /// The `wsgate_errors_total{kind}` label, or `None` for an orderly end.
    /// What the session's log line names as the reason: the error kind, else what
    /// ended it (`access_revoked` for a kick, revocation, ban or tightened policy).
    pub fn log_label(self) -> &'static str {
        match self {
            CloseReason::Shutdown => "shutdown",
            CloseReason::UpstreamDrained => "upstream_drained",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::AccessRevoked => "access_revoked",
            CloseReason::RefreshRefused => "refresh_refused",
            CloseReason::InvalidMessage(_) => "invalid_message",
            CloseReason::Overloaded => "overloaded",
            other => other.error_kind().unwrap_or("closed"),
        }
    }

    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            // Counted by reason in `wsgate_messages_rejected_total` instead.
            // Overload is the gateway's state, not a fault of either peer: seen in
            // `wsgate_closes_total{code="1013"}`.
            CloseReason::Shutdown
            | CloseReason::UpstreamDrained
            | CloseReason::TokenExpired
            | CloseReason::AccessRevoked
            | CloseReason::RefreshRefused
            | CloseReason::InvalidMessage(_)
            | CloseReason::Overloaded => None,
            CloseReason::IdleTimeout | CloseReason::MessageStalled => Some("idle_timeout"),
            CloseReason::PingTimeout => Some("ping_timeout"),
            CloseReason::ClientProtocol | CloseReason::ClientInvalidUtf8 => Some("protocol"),
            CloseReason::ClientTooBig | CloseReason::UpstreamTooBig => Some("message_too_big"),
            CloseReason::ClientIo => Some("io"),
            CloseReason::UpstreamReset => Some("upstream_reset"),
            CloseReason::UpstreamProtocol | CloseReason::UpstreamInvalidUtf8 => Some("upstream_protocol"),
            CloseReason::RateAbuse => Some("protocol"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_table() {
        let rows: &[(Reject, Option<u16>, &str)] = &[
            (Reject::Firewall, None, "firewall"),
            (Reject::RateLimited, None, "rate_limited"),
            (Reject::IpConnLimit, None, "ip_conn_limit"),
            (Reject::Origin, Some(403), "origin"),
            (Reject::AuthBanned(Duration::from_secs(5)), Some(429), "auth_banned"),
            (Reject::UserConnLimit, Some(429), "user_conn_limit"),
            (Reject::GlobalConnLimit, Some(503), "global_conn_limit"),
            (Reject::Draining, Some(503), "global_conn_limit"),
            (Reject::TlsHandshake, None, "tls_handshake"),
            (Reject::HandshakeTimeout, None, "handshake_timeout"),
            (Reject::BadRequest("x"), Some(400), "bad_request"),
            (Reject::HeadTooLarge, Some(431), "bad_request"),
            (Reject::UnsupportedVersion, Some(426), "bad_request"),
            (Reject::NotUpgrade, Some(426), "bad_request"),
            (Reject::NotFound, Some(404), "not_found"),
            (Reject::Misdirected, Some(421), "misdirected"),
            (Reject::MethodNotAllowed, Some(405), "method_not_allowed"),
            (Reject::BodyTooLarge, Some(413), "body_too_large"),
            (Reject::Auth(AuthFailure::Expired), Some(401), "auth"),
            (Reject::Auth(AuthFailure::Forbidden), Some(403), "auth"),
            (Reject::Auth(AuthFailure::CertBinding), Some(401), "auth"),
            (Reject::Auth(AuthFailure::Inactive), Some(401), "auth"),
            (Reject::ClientCert, Some(403), "client_cert"),
            (Reject::UpstreamUnavailable, Some(502), "upstream_unavailable"),
            (Reject::NoUpstream, Some(503), "upstream_unavailable"),
            (Reject::UpstreamTimeout, Some(504), "upstream_timeout"),
            (
                Reject::UpstreamRefused(Box::new(UpstreamAnswer {
                    status: StatusCode::FORBIDDEN,
                    content_type: None,
                    body: bytes::Bytes::new(),
                })),
                Some(403),
                "upstream_refused",
            ),
        ];
        for (r, status, label) in rows {
            assert_eq!(r.status().map(|s| s.as_u16()), *status, "{r:?}");
            assert_eq!(r.label(), *label, "{r:?}");
        }
        assert_eq!(AuthFailure::CertBinding.label(), "cert_binding");
        assert_eq!(Reject::ClientCert.body(), "client certificate required\n");
    }

    #[test]
    fn close_table() {
        let rows: &[(CloseReason, u16, u16, Option<&str>)] = &[
            (CloseReason::Shutdown, 1001, 1001, None),
            (CloseReason::UpstreamDrained, 1012, 1012, None),
            (CloseReason::IdleTimeout, 1001, 1001, Some("idle_timeout")),
            (CloseReason::MessageStalled, 1001, 1001, Some("idle_timeout")),
            (CloseReason::Overloaded, 1013, 1013, None),
            (CloseReason::PingTimeout, 1001, 1001, Some("ping_timeout")),
            (CloseReason::ClientProtocol, 1002, 1002, Some("protocol")),
            (CloseReason::ClientInvalidUtf8, 1007, 1007, Some("protocol")),
            (CloseReason::ClientTooBig, 1009, 1009, Some("message_too_big")),
            (CloseReason::ClientIo, 1001, 1001, Some("io")),
            (CloseReason::UpstreamReset, 1011, 1011, Some("upstream_reset")),
            (CloseReason::UpstreamProtocol, 1011, 1002, Some("upstream_protocol")),
            (CloseReason::UpstreamInvalidUtf8, 1011, 1007, Some("upstream_protocol")),
            (CloseReason::UpstreamTooBig, 1009, 1009, Some("message_too_big")),
            (CloseReason::TokenExpired, 4401, 4401, None),
            (CloseReason::RateAbuse, 1008, 1008, Some("protocol")),
            (CloseReason::AccessRevoked, 1008, 1008, None),
            (CloseReason::RefreshRefused, 1008, 1008, None),
            (CloseReason::InvalidMessage(MessageRejection::NotJson), 1007, 1007, None),
            (CloseReason::InvalidMessage(MessageRejection::TooDeep), 1008, 1008, None),
            (CloseReason::InvalidMessage(MessageRejection::Schema), 1008, 1008, None),
            (CloseReason::InvalidMessage(MessageRejection::Binary), 1003, 1003, None),
        ];
        for (r, c, u, kind) in rows {
            let (cc, uc) = r.codes();
            assert_eq!((u16::from(cc), u16::from(uc)), (*c, *u), "{r:?}");
            assert_eq!(r.error_kind(), *kind, "{r:?}");
        }
    }

    #[test]
    fn message_rejection_labels_are_a_fixed_set() {
        let labels: Vec<_> = MessageRejection::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels, ["not_json", "too_deep", "schema", "binary"]);
        for (i, r) in MessageRejection::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
