//! Choosing one of a route's upstreams (DESIGN.md section 13): `round_robin`,
//! `least_sessions` (live WebSocket sessions plus in-flight plain requests), and
//! `sticky`: a client keeps the upstream its signed cookie names while that upstream is
//! up; a client without a valid cookie gets the one `least_sessions` picks, and a new
//! cookie.
//!
//! The sticky cookie is opaque: the upstream's index and an HMAC-SHA256 (a key made at
//! start, per process) over the route, the upstream as configured and the index. It
//! names no address. A forged, truncated or stale cookie (another process's key, an
//! upstream list that changed) is ignored, never an error: the client is balanced anew.
//! Copying a cookie to another client only pins that client to the same upstream.

use crate::config::{Balance, Route, Upstream};
use base64::Engine;
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Bytes of the HMAC kept in the cookie.
const MAC_LEN: usize = 16;

/// What one upstream carries now.
#[derive(Debug, Default)]
pub struct Load {
    /// The upstream's index in its route's list.
    index: usize,
    sessions: AtomicUsize,
    in_flight: AtomicUsize,
}

impl Load {
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn total(&self) -> usize {
        self.sessions().saturating_add(self.in_flight())
    }
}

/// One session (`SESSION`) or one plain request counted on an upstream, until dropped.
/// One pointer: a session holds it for its whole life.
#[derive(Debug)]
pub struct Held<const SESSION: bool>(Arc<Load>);

/// A WebSocket session counted on its upstream.
pub(crate) type SessionHeld = Held<true>;
/// An in-flight plain request counted on its upstream.
pub(crate) type RequestHeld = Held<false>;

impl<const SESSION: bool> Held<SESSION> {
    /// The upstream's index in its route's list.
    pub fn index(&self) -> usize {
        self.0.index
    }
}

impl<const SESSION: bool> Drop for Held<SESSION> {
    fn drop(&mut self) {
        let counter = if SESSION { &self.0.sessions } else { &self.0.in_flight };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The choice among one route's upstreams.
pub struct Balancer {
    policy: Balance,
    /// The MAC input of each upstream: route and upstream as configured.
    names: Vec<String>,
    loads: Vec<Arc<Load>>,
    next: AtomicUsize,
    key: Arc<aws_lc_rs::hmac::Key>,
}

/// The key of sticky cookies: one per process, kept across reloads.
pub(crate) fn process_key() -> Arc<aws_lc_rs::hmac::Key> {
    static KEY: std::sync::OnceLock<Arc<aws_lc_rs::hmac::Key>> = std::sync::OnceLock::new();
    KEY.get_or_init(new_key).clone()
}

/// A new random key.
pub(crate) fn new_key() -> Arc<aws_lc_rs::hmac::Key> {
    let mut bytes = [0u8; 32];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // No randomness: a time-derived key is still unknown outside the process.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes[..16].copy_from_slice(&nanos.to_le_bytes());
    }
    Arc::new(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &bytes))
}

/// An upstream as configured (the admin API's name for it).
pub(crate) fn configured_url(u: &Upstream) -> String {
    match u {
        Upstream::BuiltinEcho => "builtin:echo".to_string(),
        Upstream::Remote { tls, host, port, path } => {
            let scheme = if *tls { "wss" } else { "ws" };
            let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
            format!("{scheme}://{host}:{port}{}", path.as_deref().unwrap_or(""))
        }
    }
}

impl Balancer {
    pub fn new(route: &Route, key: Arc<aws_lc_rs::hmac::Key>) -> Balancer {
        Balancer {
            policy: route.balance,
            names: route
                .upstreams
                .iter()
                .map(|u| format!("{}\0{}", route.name, configured_url(u)))
                .collect(),
            loads: (0..route.upstreams.len())
                .map(|index| Arc::new(Load { index, ..Load::default() }))
                .collect(),
            next: AtomicUsize::new(0),
            key,
        }
    }

    pub fn load(&self, index: usize) -> Option<&Arc<Load>> {
        self.loads.get(index)
    }

    /// Count a session (`SESSION`) or a plain request on upstream `index`.
    pub fn hold<const SESSION: bool>(&self, index: usize) -> Option<Held<SESSION>> {
        let load = self.loads.get(index)?.clone();
        let counter = if SESSION { &load.sessions } else { &load.in_flight };
        counter.fetch_add(1, Ordering::Relaxed);
        Some(Held(load))
    }

    /// The upstreams to try, best first (`sticky`: the cookie's upstream, if valid).
    pub fn order(&self, sticky: Option<usize>) -> Vec<usize> {
        let n = self.loads.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n.max(1)).collect();
        if self.policy != Balance::RoundRobin {
            // Stable: ties keep the rotation, so equal upstreams share the load.
            order.sort_by_key(|&i| self.loads[i].total());
        }
        if let Some(s) = sticky.filter(|&s| s < n && self.policy == Balance::Sticky)
            && let Some(pos) = order.iter().position(|&i| i == s)
        {
            order.remove(pos);
            order.insert(0, s);
        }
        order
    }

    pub fn is_sticky(&self) -> bool {
        self.policy == Balance::Sticky
    }

    fn mac(&self, index: usize) -> Option<aws_lc_rs::hmac::Tag> {
        let name = self.names.get(index)?;
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.key);
        ctx.update(b"wsgate-sticky\0");
        ctx.update(name.as_bytes());
        ctx.update(&(index as u64).to_be_bytes());
        Some(ctx.sign())
    }

    /// The cookie value that names upstream `index`.
    pub fn cookie_value(&self, index: usize) -> Option<String> {
        let tag = self.mac(index)?;
        let mut raw = Vec::with_capacity(2 + MAC_LEN);
        raw.extend_from_slice(&u16::try_from(index).ok()?.to_be_bytes());
        raw.extend_from_slice(&tag.as_ref()[..MAC_LEN]);
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
    }

    /// The upstream a cookie value names, when it is one this process signed for this
    /// route's upstream list.
    pub fn read_cookie(&self, value: &str) -> Option<usize> {
        if value.len() > 64 {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value).ok()?;
        let (index, mac) = raw.split_at_checked(2)?;
        let index = usize::from(u16::from_be_bytes([index[0], index[1]]));
        let tag = self.mac(index)?;
        aws_lc_rs::constant_time::verify_slices_are_equal(mac, &tag.as_ref()[..MAC_LEN]).ok()?;
        Some(index)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (the first copy).
pub(crate) fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(balance: &str) -> Route {
        let text = format!(
            "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"ws://10.0.0.1:1\", \"ws://10.0.0.2:1\", \"ws://10.0.0.3:1\"]\nauth = \"none\"\nbalance = \"{balance}\"\n"
        );
        crate::Config::from_toml_str(&text, "t").unwrap().routes.remove(0)
    }

    #[test]
    fn a_sticky_cookie_is_kept_only_when_this_process_signed_it_for_this_upstream() {
        let b = Balancer::new(&route("sticky"), new_key());
        let v = b.cookie_value(2).unwrap();
        assert_eq!(b.read_cookie(&v), Some(2));
        assert_eq!(b.order(Some(2))[0], 2);
        // Another process (another key), a changed bit, another index, garbage: ignored.
        assert_eq!(Balancer::new(&route("sticky"), new_key()).read_cookie(&v), None);
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&v).unwrap();
        raw[1] = 1;
        assert_eq!(b.read_cookie(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw)), None);
        raw[1] = 2;
        raw[5] ^= 1;
        assert_eq!(b.read_cookie(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw)), None);
        for bad in ["", "x", "AAAA", "%%%", &"A".repeat(100)] {
            assert_eq!(b.read_cookie(bad), None, "{bad}");
        }
        assert!(!v.contains("10.0.0"));
    }

    #[test]
    fn least_sessions_prefers_the_least_loaded_and_round_robin_rotates() {
        let b = Balancer::new(&route("least_sessions"), new_key());
        let _s0 = b.hold::<true>(0);
        let _s1 = b.hold::<false>(1);
        assert_eq!(b.order(None)[0], 2);
        let h = b.hold::<true>(2);
        let _h2 = b.hold::<true>(2);
        assert_ne!(b.order(None)[0], 2);
        drop(h);
        assert_eq!(b.load(2).unwrap().sessions(), 1);
        let rr = Balancer::new(&route("round_robin"), new_key());
        let firsts: Vec<usize> = (0..3).map(|_| rr.order(None)[0]).collect();
        assert_eq!(firsts, [0, 1, 2]);
    }
}
