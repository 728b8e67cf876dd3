//! `first_message`: the client sends its token as the first message after the 101
//! (browsers cannot set headers); the upstream is connected only once it verifies.

use super::request::Checked;
use super::{Admission, UserHold};
use crate::auth::{Principal, Seen};
use crate::error::{AuthFailure, Reject};
use crate::tls::ClientCert;
use crate::upstream::Connected;
use http::HeaderMap;
use std::{net::IpAddr, sync::Arc};
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest `first_message` token message.
const MAX_TOKEN_MESSAGE: usize = 16 * 1024;

/// What the upstream request needs when it is built after the 101.
pub(super) struct Pending {
    target: http::uri::PathAndQuery,
    headers: HeaderMap,
    client_ip: IpAddr,
    peer_ip: IpAddr,
}

impl Pending {
    pub(super) fn new(headers: HeaderMap, checked: &Checked, peer_ip: IpAddr) -> Pending {
        Pending {
            target: checked.target.clone(),
            headers,
            client_ip: checked.client_ip,
            peer_ip,
        }
    }
}

/// Wait for the token, verify it, take the user's place, then connect the upstream.
/// Any failure closes the client with 1008 (auth) or 1011 (upstream).
pub(super) async fn complete<S: AsyncRead + AsyncWrite + Unpin>(
    admission: &Admission,
    route_index: usize,
    client: &mut crate::relay::Endpoint<S>,
    pending: Pending,
    cert: Option<&Arc<ClientCert>>,
) -> Result<(Connected, Principal, Option<UserHold>), Reject> {
    let (gw, rt) = (&admission.gw, &admission.rt());
    let route = &rt.config.routes[route_index];
    let result = async {
        let l = rt.config.limits_of(route);
        let wait = l.first_message_timeout;
        // Every frame before the token pays toward the route's message rate too.
        let first = client.first_text(MAX_TOKEN_MESSAGE, l.message_rate, l.message_burst);
        let text = match tokio::time::timeout(wait, first).await {
            Ok(Some(t)) => t,
            _ => return Err(Reject::Auth(AuthFailure::Missing)),
        };
        let mut seen = Seen::default();
        let verified = rt.auth.authenticate_message(route, &text, cert, &mut seen).await;
        admission.note(|i| {
            i.token_fingerprint = seen.token_fingerprint;
            i.sub = seen.identity;
            i.provider.clone_from(&route.provider);
        });
        let principal = verified?;
        let user = super::authorize(gw, &rt.config, route, Some(&principal)).await?;
        let request_id = admission.with_info(|i| i.request_id.clone());
        let mut facts = super::upstream::facts(
            rt,
            route,
            (pending.client_ip, pending.peer_ip),
            (pending.target.path(), pending.target.query()),
            &pending.headers,
            Some(&principal),
            cert.map(Arc::as_ref),
        );
        facts.request_id = request_id.as_deref();
        let upstream = super::upstream::connect(gw, rt, route_index, &facts).await?;
        admission.note(|i| i.upstream = Some(std::sync::Arc::from(&*upstream.target)));
        Ok((upstream, principal, user))
    }
    .await;
    if let Err(reject) = &result {
        let close = reject.close_after_upgrade();
        let _ = tokio::time::timeout(rt.config.server.close_timeout, client.close(Some(close))).await;
    }
    result
}
