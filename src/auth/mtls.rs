//! `auth = "mtls"`: the verified client certificate names the user (its first URI SAN,
//! else its first DNS SAN, else its CN; DESIGN section 10).

use super::{Credential, Principal};
use crate::tls::ClientCert;
use serde_json::{Map, Value};
use std::sync::Arc;

/// The principal a verified certificate names; `None` when it names no one.
pub(super) fn principal(cert: Option<&Arc<ClientCert>>) -> Option<Principal> {
    let cert = cert?;
    let sub = cert.identity()?.to_string();
    Some(Principal {
        provider: None,
        identity: Some(sub.clone()),
        claims: Arc::new(sub_claims(sub)),
        expires_at: None,
        jti: None,
        credential: Credential {
            token: None,
            cert: Some(cert.clone()),
            cert_authenticates: true,
            forward: None,
        },
    })
}

/// The claims an `mtls` route checks and forwards: the certificate's identity as `sub`.
fn sub_claims(sub: String) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("sub".to_string(), Value::String(sub));
    m
}
