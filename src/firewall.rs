//! Stage 2: the IP firewall, before TLS.
//!
//! Rules become sorted, merged address ranges (IPv4 and IPv6 apart), so a lookup is
//! two binary searches whatever the number of rules: 10 or 100,000 cost the same.
//! IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`) are matched as the IPv4 address they
//! are, so an IPv4 deny rule cannot be bypassed over a dual-stack listener.

use crate::config::{ConfigError, FirewallDefault, FirewallRules, parse_ip_rule};
use ipnet::IpNet;
use std::net::IpAddr;
use std::path::Path;

/// A set of addresses as sorted, non-overlapping inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl RangeSet {
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> RangeSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => {
                    // An IPv4-mapped IPv6 rule is an IPv4 rule.
                    if let (Some(a), Some(b)) = (n.network().to_ipv4_mapped(), n.broadcast().to_ipv4_mapped()) {
                        v4.push((u32::from(a), u32::from(b)));
                    } else {
                        v6.push((u128::from(n.network()), u128::from(n.broadcast())));
                    }
                }
            }
        }
        RangeSet {
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Number of merged ranges.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

fn merge<T: Ord + Copy + num_like::Succ>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1.succ() => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out.shrink_to_fit();
    out
}

fn find<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|r| r.0 <= x);
    i > 0 && ranges[i - 1].1 >= x
}

mod num_like {
    /// `x + 1`, saturating: lets adjacent ranges merge.
    pub(super) trait Succ {
        fn succ(self) -> Self;
    }
    impl Succ for u32 {
        fn succ(self) -> Self {
            self.saturating_add(1)
        }
    }
    impl Succ for u128 {
        fn succ(self) -> Self {
            self.saturating_add(1)
        }
    }
}

/// The compiled firewall.
#[derive(Debug, Clone, Default)]
pub struct Firewall {
    default: FirewallDefault,
    allow: RangeSet,
    deny: RangeSet,
}

impl Firewall {
    pub fn new(default: FirewallDefault, allow: RangeSet, deny: RangeSet) -> Firewall {
        Firewall { default, allow, deny }
    }

    /// Compile `[firewall]`: the inline rules and the rule files it names (read now).
    /// A file error names the file, its line and the config key that points at it.
    pub fn load(rules: &FirewallRules, origin: &str) -> Result<Firewall, ConfigError> {
        let compile = |inline: &[IpNet], files: &[crate::config::Located<std::path::PathBuf>]| {
            let mut nets = inline.to_vec();
            for file in files {
                nets.extend(read_rule_file(&file.value).map_err(|m| file.error(origin, m))?);
            }
            Ok::<_, ConfigError>(RangeSet::from_nets(nets))
        };
        let allow = compile(&rules.allow, &rules.allow_files)?;
        let deny = compile(&rules.deny, &rules.deny_files)?;
        Ok(Firewall::new(rules.default, allow, deny))
    }

    /// Deny wins over allow; with no match, the default decides.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.deny.contains(ip) {
            return false;
        }
        if self.allow.contains(ip) {
            return true;
        }
        self.default == FirewallDefault::Allow
    }
}

/// Read a rule file: one CIDR or address per line, `#` starts a comment.
/// The error names the file and line, and echoes no more than the offending entry's length.
pub fn read_rule_file(path: &Path) -> Result<Vec<IpNet>, String> {
    let text = crate::fsutil::read_text(path, crate::fsutil::MAX_LIST_FILE).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut nets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        match parse_ip_rule(entry) {
            Some(n) => nets.push(n),
            None => {
                let shown = crate::util::escape(entry, 64);
                return Err(format!("{}:{}: not an address or CIDR: \"{shown}\"", path.display(), i + 1));
            }
        }
    }
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rules: &[&str]) -> RangeSet {
        RangeSet::from_nets(rules.iter().map(|r| parse_ip_rule(r).unwrap()))
    }

    #[test]
    fn ranges_merge_and_match() {
        let s = set(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.5", "192.168.1.1", "2001:db8::/32"]);
        assert_eq!(s.len(), 3);
        for ip in ["10.0.0.0", "10.0.1.255", "192.168.1.1", "2001:db8::1", "::ffff:10.0.0.7"] {
            assert!(s.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.2.0", "9.255.255.255", "192.168.1.2", "2001:db9::1", "::1"] {
            assert!(!s.contains(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn mapped_rules_and_peers_are_ipv4() {
        let s = set(&["::ffff:1.2.3.0/120"]);
        assert!(s.contains("1.2.3.4".parse().unwrap()));
        let fw = Firewall::new(FirewallDefault::Allow, RangeSet::default(), set(&["1.2.3.4"]));
        assert!(!fw.allows("::ffff:1.2.3.4".parse().unwrap()));
        assert!(fw.allows("1.2.3.5".parse().unwrap()));
    }

    #[test]
    fn deny_wins_and_default_decides() {
        let fw = Firewall::new(FirewallDefault::Deny, set(&["10.0.0.0/8"]), set(&["10.1.0.0/16"]));
        assert!(fw.allows("10.2.0.1".parse().unwrap()));
        assert!(!fw.allows("10.1.0.1".parse().unwrap()));
        assert!(!fw.allows("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn rule_file_errors_name_file_and_line() {
        let dir = std::env::temp_dir().join(format!("wsgate-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("deny.txt");
        std::fs::write(&p, "# comment\n10.0.0.0/8\n\n1.2.3.4 # trailing\nnot-an-ip\n").unwrap();
        let e = read_rule_file(&p).unwrap_err();
        assert!(e.ends_with(":5: not an address or CIDR: \"not-an-ip\""), "{e}");
        std::fs::write(&p, "# comment\n10.0.0.0/8\n1.2.3.4 # trailing\n").unwrap();
        assert_eq!(read_rule_file(&p).unwrap().len(), 2);
    }

    /// `config` is a leaf: parsing reads no file but the TOML text. A rule file is read
    /// when the runtime is built, and its error still names the config key and line.
    #[test]
    fn rule_files_are_read_at_load_not_at_parse() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("deny.txt");
        let src = format!("[firewall]\n\ndeny_files = [{:?}]\n", file.display().to_string());
        let c = crate::Config::from_toml_str(&src, "t.toml").unwrap();
        let e = Firewall::load(&c.firewall, "t.toml").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("firewall.deny_files", Some(3)), "{e}");
        std::fs::write(&file, "10.0.0.0/8\nnot-an-ip\n").unwrap();
        let e = Firewall::load(&c.firewall, "t.toml").unwrap_err();
        assert!(e.to_string().contains(":2: not an address or CIDR: \"not-an-ip\""), "{e}");
        std::fs::write(&file, "10.0.0.0/8\n").unwrap();
        let fw = Firewall::load(&c.firewall, "t.toml").unwrap();
        assert!(!fw.allows("10.1.2.3".parse().unwrap()));
    }
}
