//! Incident state set through the admin API (DESIGN.md section 9): bans of address
//! ranges, revoked token ids, kicked users, and the registry of live sessions the API
//! lists. Everything is bounded: each map has a cap and entries expire.
//!
//! Checks are local and cheap: the pre-TLS check asks [`Incidents::is_banned`], the auth
//! stage [`Incidents::is_revoked`], and live sessions re-check all three when an action
//! cancels the gateway's re-check token (see `Gateway::recheck_sessions`).

use crate::firewall::RangeSet;
use crate::metrics::LiveCounters;
use crate::util::lock;
use arc_swap::ArcSwap;
use ipnet::{IpNet, Ipv4Net};
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
pub(crate) const MAX_BANS: usize = 10_000;
/// Revoked token ids held at once, at most.
pub(crate) const MAX_REVOCATIONS: usize = 100_000;
/// Kicked users remembered at once, at most.
pub(crate) const MAX_KICKS: usize = 10_000;
/// The longest ban.
pub(crate) const MAX_BAN: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a revocation without `exp` is kept (tokens this old should have expired).
pub(crate) const REVOCATION_WITHOUT_EXP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a kick is remembered: long enough for every live session to re-check.
const KICK_MEMORY: Duration = Duration::from_secs(60);

/// Why an action was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The map is at its cap.
    Full,
}

/// The live state of one session, for `GET /v1/sessions`.
pub(crate) struct LiveSession {
    pub route: Arc<str>,
    pub sub: Option<String>,
    /// The `[providers.NAME]` that verified the session's token (`None`: `[jwt]`).
    pub provider: Option<String>,
    /// [`crate::auth::scoped`] `sub`: what kicks name.
    user: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// Unix seconds.
    pub started: u64,
    pub counters: Arc<LiveCounters>,
    started_at: Instant,
}

/// The bans as a sorted range set, rebuilt on every change and when the earliest one
/// expires: the check before TLS is a lock-free binary search however many there are.
struct BanIndex {
    set: RangeSet,
    empty: bool,
    next_expiry: Option<Instant>,
}

impl Default for BanIndex {
    fn default() -> BanIndex {
        BanIndex {
            set: RangeSet::default(),
            empty: true,
            next_expiry: None,
        }
    }
}

#[derive(Default)]
pub struct Incidents {
    bans: Mutex<HashMap<IpNet, Instant>>,
    ban_index: ArcSwap<BanIndex>,
    /// `bans` changed since `ban_index` was built (rebuilt at the next check, once for
    /// any number of changes).
    bans_changed: std::sync::atomic::AtomicBool,
    revoked: Mutex<HashMap<String, Instant>>,
    kicked: Mutex<HashMap<String, Instant>>,
    sessions: Mutex<HashMap<u64, LiveSession>>,
    next_id: AtomicU64,
}

impl Incidents {
    /// Ban `net` for `d` (capped at [`MAX_BAN`]). A ban of a range already banned replaces
    /// it. Whether the range was not banned before.
    pub fn ban(&self, net: IpNet, d: Duration) -> Result<bool, Refusal> {
        let net = canonical(net);
        let now = Instant::now();
        let mut bans = lock(&self.bans);
        bans.retain(|_, until| *until > now);
        if bans.len() >= MAX_BANS && !bans.contains_key(&net) {
            return Err(Refusal::Full);
        }
        let before = bans.insert(net, now + d.min(MAX_BAN));
        self.bans_changed.store(true, Ordering::Release);
        Ok(before.is_none())
    }

    /// Lift the ban of exactly `net`; whether there was one.
    pub fn unban(&self, net: IpNet) -> bool {
        let now = Instant::now();
        let mut bans = lock(&self.bans);
        let lifted = bans.remove(&canonical(net)).is_some_and(|until| until > now);
        self.bans_changed.store(true, Ordering::Release);
        lifted
    }

    /// Whether `ip` falls in a range banned now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let mut index = self.ban_index.load();
        let changed = self.bans_changed.load(Ordering::Acquire);
        if index.empty && !changed {
            return false;
        }
        let now = Instant::now();
        if changed || index.next_expiry.is_some_and(|t| t <= now) {
            let mut bans = lock(&self.bans);
            self.bans_changed.store(false, Ordering::Release);
            bans.retain(|_, until| *until > now);
            self.index(&bans, now);
            drop(bans);
            index = self.ban_index.load();
        }
        index.set.contains(ip)
    }

    /// Rebuild the lookup set from `bans` (entries expired by `now` left out).
    fn index(&self, bans: &HashMap<IpNet, Instant>, now: Instant) {
        let live = bans.iter().filter(|(_, until)| **until > now);
        self.ban_index.store(Arc::new(BanIndex {
            set: RangeSet::from_nets(live.clone().map(|(net, _)| *net)),
            empty: live.clone().next().is_none(),
            next_expiry: live.map(|(_, until)| *until).min(),
        }));
    }

    /// Revoke token id `jti` until `exp` (Unix seconds; without it for
    /// [`REVOCATION_WITHOUT_EXP`]). Whether it was not revoked before.
    pub fn revoke(&self, jti: &str, exp: Option<u64>) -> Result<bool, Refusal> {
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
        let before = revoked.insert(jti.to_string(), now + keep.max(KICK_MEMORY));
        Ok(before.is_none_or(|until| until <= now))
    }

    /// Lift a revocation; whether there was one.
    pub fn unrevoke(&self, jti: &str) -> bool {
        lock(&self.revoked).remove(jti).is_some()
    }

    /// The ranges banned now, with the time each ban has left (the state file).
    pub fn ban_entries(&self) -> Vec<(IpNet, Duration)> {
        let now = Instant::now();
        lock(&self.bans)
            .iter()
            .filter_map(|(net, until)| Some((*net, until.checked_duration_since(now).filter(|d| !d.is_zero())?)))
            .collect()
    }

    /// The token ids revoked now, with the time each revocation has left.
    pub fn revoked_entries(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        lock(&self.revoked)
            .iter()
            .filter_map(|(jti, until)| Some((jti.clone(), until.checked_duration_since(now).filter(|d| !d.is_zero())?)))
            .collect()
    }

    /// The ranges banned now.
    pub fn ban_list(&self) -> Vec<IpNet> {
        let now = Instant::now();
        lock(&self.bans)
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(net, _)| *net)
            .collect()
    }

    /// The token ids revoked now.
    pub fn revoked_list(&self) -> Vec<String> {
        let now = Instant::now();
        lock(&self.revoked)
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(jti, _)| jti.clone())
            .collect()
    }

    pub fn is_revoked(&self, jti: Option<&str>) -> bool {
        let Some(jti) = jti else { return false };
        let revoked = lock(&self.revoked);
        revoked.get(jti).is_some_and(|until| *until > Instant::now())
    }

    /// Close every live session of `user` ([`crate::auth::scoped`]: provider and
    /// identity; they re-check); returns how many are live now.
    pub fn kick(&self, user: &str) -> Result<usize, Refusal> {
        let now = Instant::now();
        let mut kicked = lock(&self.kicked);
        kicked.retain(|_, at| now.duration_since(*at) < KICK_MEMORY);
        if kicked.len() >= MAX_KICKS && !kicked.contains_key(user) {
            return Err(Refusal::Full);
        }
        kicked.insert(user.to_string(), now);
        drop(kicked);
        Ok(lock(&self.sessions).values().filter(|s| s.user.as_deref() == Some(user)).count())
    }

    /// Whether a session of `user` ([`crate::auth::scoped`]) that started at `started`
    /// has been kicked since (a kick counts for `KICK_MEMORY`; sessions re-check at once
    /// when it is made).
    pub fn is_kicked(&self, user: Option<&str>, started: Instant) -> bool {
        let Some(user) = user else { return false };
        lock(&self.kicked)
            .get(user)
            .is_some_and(|at| *at >= started && at.elapsed() < KICK_MEMORY)
    }

    /// Register a live session whose connection was accepted at `started_at`; it is
    /// listed until the returned guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        route: Arc<str>,
        (sub, provider): (Option<String>, Option<String>),
        client_ip: Option<IpAddr>,
        started_at: Instant,
    ) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let counters = Arc::new(LiveCounters::default());
        lock(&self.sessions).insert(
            id,
            LiveSession {
                route,
                user: sub.as_deref().map(|s| crate::auth::scoped(provider.as_deref(), s)),
                sub,
                provider,
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

    /// Live sessions matching the filters (`sub` of any provider, unless `provider`
    /// names one), oldest first, at most `limit`; and whether more matched.
    pub fn sessions(&self, sub: Option<&str>, provider: Option<&str>, route: Option<&str>, limit: usize) -> (Vec<SessionView>, bool) {
        let sessions = lock(&self.sessions);
        let mut matched: Vec<(&u64, &LiveSession)> = sessions
            .iter()
            .filter(|(_, s)| sub.is_none_or(|u| s.sub.as_deref() == Some(u)))
            .filter(|(_, s)| provider.is_none_or(|p| s.provider.as_deref() == Some(p)))
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
                provider: s.provider.clone(),
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
    /// The provider that verified the token (absent: `[jwt]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
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

/// A range as the gateway compares addresses: host bits cleared, and an IPv4-mapped IPv6
/// range (`::ffff:a.b.c.d/n`, n ≥ 96) as the IPv4 range it means (clients are compared
/// as plain IPv4).
pub(crate) fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && let (Some(v4), true) = (n.addr().to_ipv4_mapped(), n.prefix_len() >= 96)
        && let Ok(v4) = Ipv4Net::new(v4, n.prefix_len() - 96)
    {
        return IpNet::V4(v4.trunc());
    }
    net.trunc()
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
    fn an_ipv4_mapped_ban_bans_the_ipv4_clients_it_names() {
        let i = Incidents::default();
        i.ban("::ffff:127.0.0.7/128".parse().unwrap(), Duration::from_secs(60)).unwrap();
        i.ban("::ffff:10.0.0.0/120".parse().unwrap(), Duration::from_secs(60)).unwrap();
        assert!(i.is_banned("127.0.0.7".parse().unwrap()));
        assert!(i.is_banned("::ffff:127.0.0.7".parse().unwrap()));
        assert!(i.is_banned("10.0.0.200".parse().unwrap()));
        assert!(!i.is_banned("10.0.1.1".parse().unwrap()));
        assert!(i.unban("127.0.0.7/32".parse().unwrap()), "the same ban, written as IPv4");
    }

    #[test]
    fn an_expired_ban_leaves_the_index() {
        let i = Incidents::default();
        i.ban("192.0.2.0/24".parse().unwrap(), Duration::from_millis(20)).unwrap();
        i.ban("198.51.100.0/24".parse().unwrap(), Duration::from_secs(60)).unwrap();
        assert!(i.is_banned("192.0.2.1".parse().unwrap()));
        std::thread::sleep(Duration::from_millis(40)); // kept: the expiry is the test
        assert!(!i.is_banned("192.0.2.1".parse().unwrap()));
        assert!(i.is_banned("198.51.100.1".parse().unwrap()));
        assert_eq!(lock(&i.bans).len(), 1, "expired entries are dropped");
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
        let before = i.register("chat".into(), (Some("alice".into()), None), None, Instant::now());
        let partners = i.register("chat".into(), (Some("alice".into()), Some("partners".into())), None, Instant::now());
        assert_eq!(i.kick("alice").unwrap(), 1, "[jwt]'s alice only");
        assert!(i.is_kicked(Some("alice"), before.started_at));
        let partners_alice = crate::auth::scoped(Some("partners"), "alice");
        assert!(
            !i.is_kicked(Some(&partners_alice), partners.started_at),
            "another provider's alice stays"
        );
        assert_eq!(i.kick(&partners_alice).unwrap(), 1);
        let after = i.register("chat".into(), (Some("alice".into()), None), None, Instant::now());
        assert!(!i.is_kicked(Some("alice"), after.started_at), "a new session is not kicked");
        assert_eq!(i.sessions(Some("alice"), None, None, 10).0.len(), 3);
        assert_eq!(i.sessions(Some("alice"), Some("partners"), None, 10).0.len(), 1);
        drop((before, partners));
        let (list, more) = i.sessions(Some("alice"), None, Some("chat"), 10);
        assert_eq!((list.len(), more), (1, false));
        assert_eq!(i.sessions(None, None, Some("other"), 10).0.len(), 0);
    }
}
