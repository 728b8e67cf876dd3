//! Incident state set through the admin API (DESIGN.md section 9): bans of address
//! ranges, revoked token ids, kicked users, and the registry of live sessions the API
//! lists. Everything is bounded: each map has a cap and entries expire.
//!
//! Checks are local and cheap: the pre-TLS check asks [`Incidents::is_banned`], the auth
//! stage [`Incidents::is_revoked`], and live sessions re-check all three when an action
//! cancels the gateway's re-check token (see `Gateway::recheck_sessions`).

use crate::util::lock;
use ipnet::IpNet;
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Admin bans held at once, at most.
pub const MAX_BANS: usize = 10_000;
/// Revoked token ids held at once, at most.
pub const MAX_REVOCATIONS: usize = 100_000;
/// Kicked users remembered at once, at most.
pub const MAX_KICKS: usize = 10_000;
/// The longest ban.
pub const MAX_BAN: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a revocation without `exp` is kept (tokens this old should have expired).
pub const REVOCATION_WITHOUT_EXP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a kick is remembered: long enough for every live session to re-check.
const KICK_MEMORY: Duration = Duration::from_secs(60);

/// Why an action was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The map is at its cap.
    Full,
}

/// The live state of one session, for `GET /v1/sessions`.
pub struct LiveSession {
    pub route: Arc<str>,
    pub sub: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// Unix seconds.
    pub started: u64,
    pub counters: Arc<LiveCounters>,
    started_at: Instant,
}

/// Messages and bytes of a live session by direction, updated as the relay reports them.
#[derive(Default)]
pub struct LiveCounters {
    pub messages: [AtomicU64; 2],
    pub bytes: [AtomicU64; 2],
}

impl LiveCounters {
    pub fn add(&self, direction: usize, messages: u64, bytes: u64) {
        self.messages[direction].fetch_add(messages, Ordering::Relaxed);
        self.bytes[direction].fetch_add(bytes, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Incidents {
    bans: Mutex<HashMap<IpNet, Instant>>,
    revoked: Mutex<HashMap<String, Instant>>,
    kicked: Mutex<HashMap<String, Instant>>,
    sessions: Mutex<HashMap<u64, LiveSession>>,
    next_id: AtomicU64,
}

impl Incidents {
    /// Ban `net` for `d` (capped at [`MAX_BAN`]). A ban of a range already banned replaces it.
    pub fn ban(&self, net: IpNet, d: Duration) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut bans = lock(&self.bans);
        bans.retain(|_, until| *until > now);
        if bans.len() >= MAX_BANS && !bans.contains_key(&net) {
            return Err(Refusal::Full);
        }
        bans.insert(net.trunc(), now + d.min(MAX_BAN));
        Ok(())
    }

    /// Lift the ban of exactly `net`; whether there was one.
    pub fn unban(&self, net: IpNet) -> bool {
        let now = Instant::now();
        lock(&self.bans).remove(&net.trunc()).is_some_and(|until| until > now)
    }

    /// Whether `ip` falls in a range banned now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let bans = lock(&self.bans);
        if bans.is_empty() {
            return false;
        }
        let now = Instant::now();
        bans.iter().any(|(net, until)| *until > now && net.contains(&ip))
    }

    /// Revoke token id `jti` until `exp` (Unix seconds; without it for
    /// [`REVOCATION_WITHOUT_EXP`]).
    pub fn revoke(&self, jti: &str, exp: Option<u64>) -> Result<(), Refusal> {
        let now = Instant::now();
        let keep = match exp {
            Some(exp) => Duration::from_secs(exp.saturating_sub(unix_now())).min(MAX_BAN),
            None => REVOCATION_WITHOUT_EXP,
        };
        let mut revoked = lock(&self.revoked);
        if revoked.len() >= MAX_REVOCATIONS {
            revoked.retain(|_, until| *until > now);
        }
        if revoked.len() >= MAX_REVOCATIONS && !revoked.contains_key(jti) {
            return Err(Refusal::Full);
        }
        // A token already past its exp cannot be used anyway; kept briefly so live
        // sessions (close_on_expiry off) still re-check against it.
        revoked.insert(jti.to_string(), now + keep.max(KICK_MEMORY));
        Ok(())
    }

    pub fn is_revoked(&self, jti: Option<&str>) -> bool {
        let Some(jti) = jti else { return false };
        let revoked = lock(&self.revoked);
        revoked.get(jti).is_some_and(|until| *until > Instant::now())
    }

    /// Close every live session of `sub` (they re-check); returns how many are live now.
    pub fn kick(&self, sub: &str) -> Result<usize, Refusal> {
        let now = Instant::now();
        let mut kicked = lock(&self.kicked);
        kicked.retain(|_, at| now.duration_since(*at) < KICK_MEMORY);
        if kicked.len() >= MAX_KICKS && !kicked.contains_key(sub) {
            return Err(Refusal::Full);
        }
        kicked.insert(sub.to_string(), now);
        drop(kicked);
        Ok(lock(&self.sessions).values().filter(|s| s.sub.as_deref() == Some(sub)).count())
    }

    /// Whether a session of `sub` that started at `started` has been kicked since.
    pub fn is_kicked(&self, sub: Option<&str>, started: Instant) -> bool {
        let Some(sub) = sub else { return false };
        lock(&self.kicked).get(sub).is_some_and(|at| *at >= started)
    }

    /// Register a live session whose connection was accepted at `started_at`; it is
    /// listed until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, route: Arc<str>, sub: Option<String>, client_ip: Option<IpAddr>, started_at: Instant) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let counters = Arc::new(LiveCounters::default());
        lock(&self.sessions).insert(
            id,
            LiveSession {
                route,
                sub,
                client_ip,
                started: unix_now(),
                counters: counters.clone(),
                started_at,
            },
        );
        Registered {
            owner: self.clone(),
            id,
            counters,
            started_at,
        }
    }

    /// Live sessions matching the filters, oldest first, at most `limit`; and whether
    /// more matched.
    pub fn sessions(&self, sub: Option<&str>, route: Option<&str>, limit: usize) -> (Vec<SessionView>, bool) {
        let sessions = lock(&self.sessions);
        let mut matched: Vec<(&u64, &LiveSession)> = sessions
            .iter()
            .filter(|(_, s)| sub.is_none_or(|u| s.sub.as_deref() == Some(u)))
            .filter(|(_, s)| route.is_none_or(|r| &*s.route == r))
            .collect();
        matched.sort_by_key(|(id, s)| (s.started_at, **id));
        let more = matched.len() > limit;
        let views = matched
            .into_iter()
            .take(limit)
            .map(|(id, s)| SessionView {
                id: *id,
                route: s.route.to_string(),
                sub: s.sub.clone(),
                client_ip: s.client_ip.map(|i| i.to_string()),
                started: s.started,
                messages: s.counters.messages.each_ref().map(|a| a.load(Ordering::Relaxed)),
                bytes: s.counters.bytes.each_ref().map(|a| a.load(Ordering::Relaxed)),
            })
            .collect();
        (views, more)
    }
}

/// One listed session.
#[derive(serde::Serialize)]
pub struct SessionView {
    pub id: u64,
    pub route: String,
    pub sub: Option<String>,
    pub client_ip: Option<String>,
    /// Unix seconds.
    pub started: u64,
    /// Client → upstream, upstream → client.
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

/// A registered live session; unlisted when dropped.
pub struct Registered {
    owner: Arc<Incidents>,
    id: u64,
    pub counters: Arc<LiveCounters>,
    pub started_at: Instant,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.owner.sessions).remove(&self.id);
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_cover_their_range_until_lifted_or_expired() {
        let i = Incidents::default();
        let net: IpNet = "203.0.113.0/24".parse().unwrap();
        i.ban(net, Duration::from_secs(60)).unwrap();
        assert!(i.is_banned("203.0.113.9".parse().unwrap()));
        assert!(!i.is_banned("203.0.114.9".parse().unwrap()));
        // Written with host bits set, it is the same range.
        assert!(i.unban("203.0.113.7/24".parse().unwrap()));
        assert!(!i.is_banned("203.0.113.9".parse().unwrap()));
        assert!(!i.unban(net));
        i.ban(net, Duration::ZERO).unwrap();
        assert!(!i.is_banned("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn maps_are_capped() {
        let i = Incidents::default();
        for n in 0..MAX_BANS as u32 {
            i.ban(IpNet::from(IpAddr::from(n.to_be_bytes())), Duration::from_secs(60)).unwrap();
        }
        assert_eq!(
            i.ban("198.51.100.0/24".parse().unwrap(), Duration::from_secs(60)),
            Err(Refusal::Full)
        );
        for n in 0..MAX_KICKS {
            i.kick(&format!("u{n}")).unwrap();
        }
        assert_eq!(i.kick("one more"), Err(Refusal::Full));
        assert!(i.kick("u0").is_ok(), "a known user can be kicked again");
    }

    #[test]
    fn revocations_and_kicks() {
        let i = Arc::new(Incidents::default());
        i.revoke("j1", Some(unix_now() + 3600)).unwrap();
        i.revoke("j2", None).unwrap();
        assert!(i.is_revoked(Some("j1")) && i.is_revoked(Some("j2")) && !i.is_revoked(Some("j3")) && !i.is_revoked(None));
        let before = i.register("chat".into(), Some("alice".into()), None, Instant::now());
        assert_eq!(i.kick("alice").unwrap(), 1);
        assert!(i.is_kicked(Some("alice"), before.started_at));
        let after = i.register("chat".into(), Some("alice".into()), None, Instant::now());
        assert!(!i.is_kicked(Some("alice"), after.started_at), "a new session is not kicked");
        assert_eq!(i.sessions(Some("alice"), None, 10).0.len(), 2);
        drop(before);
        let (list, more) = i.sessions(Some("alice"), Some("chat"), 10);
        assert_eq!((list.len(), more), (1, false));
        assert_eq!(i.sessions(None, Some("other"), 10).0.len(), 0);
    }
}
