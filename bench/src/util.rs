//! Small helpers: the RESULT line, payloads, counters, histograms, RSS.

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Print the one machine-readable line a run ends with: `RESULT {json}`, the tags first.
pub fn print_result(mode: &str, tags: &[(String, String)], fields: Value) {
    let mut m = Map::new();
    m.insert("mode".into(), json!(mode));
    for (k, v) in tags {
        m.insert(k.clone(), json!(v));
    }
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    println!("RESULT {}", Value::Object(m));
}

/// A counter on its own cache line: each connection task bumps its own.
#[repr(align(128))]
#[derive(Default)]
pub struct Padded(pub AtomicU64);

pub fn sum(counters: &[Padded]) -> u64 {
    counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
}

/// A payload that differs for every (connection, index) pair, so an echo that
/// mixes up connections or order is caught by comparing bytes.
pub fn payload(conn: u64, index: u64, size: usize) -> Bytes {
    let seed = conn.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x5555;
    let v: Vec<u8> = (0..size).map(|i| ((seed >> ((i % 8) * 8)) as u8) ^ (i as u8)).collect();
    Bytes::from(v)
}

/// Microsecond histogram, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Quantile in milliseconds, 3 decimals (µs resolution).
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    round3(h.value_at_quantile(q) as f64 / 1000.0)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// JSON cannot hold NaN: a missing value becomes null.
pub fn num(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// VmRSS in KiB of `pid` plus all its child processes (nginx: master + workers).
pub fn rss_tree_kb(pid: u32) -> Option<u64> {
    let mut total = vm_rss_kb(pid)?;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if parent_of(child) == Some(pid) {
                total += vm_rss_kb(child).unwrap_or(0);
            }
        }
    }
    Some(total)
}

fn vm_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Let a sleeping thread wake within ~1 µs of its deadline rather than the default
/// 50 µs slack (Linux): the latency pacer's lateness counts against the target.
pub fn tighten_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes an integer and only changes this thread's timer slack.
    unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
    }
}

/// CPU time (user + system, all threads, ns; clock-tick resolution) of `pids` and
/// their child processes: the server's cost per message, independent of how the
/// two cores happened to be shared.
pub fn cpu_tree_ns(pids: &[u32]) -> Option<u64> {
    let all = tree(pids)?;
    all.iter().map(|&p| cpu_ns(&p.to_string())).sum()
}

/// `pids` and their child processes (nginx: master and workers); `None` when empty.
fn tree(pids: &[u32]) -> Option<Vec<u32>> {
    if pids.is_empty() {
        return None;
    }
    let mut all: Vec<u32> = pids.to_vec();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let child = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok());
            if let Some(p) = child.filter(|&p| parent_of(p).is_some_and(|pp| pids.contains(&pp))) {
                all.push(p);
            }
        }
    }
    Some(all)
}

/// Context switches (voluntary and not) of every thread of `pids` and their children.
pub fn ctx_switches_tree(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for pid in tree(pids)? {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            total += status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some(total)
}

/// System calls made by the server's processes during a window, counted by `perf stat`
/// (the `raw_syscalls:sys_enter` tracepoint) when perf is installed and allowed to
/// attach; otherwise the figure is left out. Threads started during the window are
/// counted too (perf follows the processes, not a thread list).
pub struct SyscallCount {
    child: Option<std::process::Child>,
}

impl SyscallCount {
    pub fn start(pids: &[u32]) -> SyscallCount {
        let child = tree(pids).and_then(|all| {
            let list: Vec<String> = all.iter().map(u32::to_string).collect();
            std::process::Command::new("perf")
                .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", &list.join(",")])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .ok()
        });
        SyscallCount { child }
    }

    /// Stop counting (SIGINT, as perf expects) and read the count.
    pub fn finish(self) -> Option<u64> {
        let child = self.child?;
        let pid = i32::try_from(child.id()).ok()?;
        // SAFETY: kill only sends a signal to the perf process this struct started.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        let out = child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        // CSV: "count,unit,event,...": the count of our one event.
        text.lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next()?.trim().parse().ok())
    }
}

/// `count` per unit, rounded to 3 decimals (`null` when unknown or no units).
pub fn per_unit(count: Option<u64>, units: u64) -> Value {
    match count {
        Some(c) if units > 0 => num(round3(c as f64 / units as f64)),
        _ => Value::Null,
    }
}

/// This process's CPU time, ns.
pub fn self_cpu_ns() -> Option<u64> {
    cpu_ns("self")
}

fn cpu_ns(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    // After the comm: state(3) ppid(4) ... utime(14) stime(15), so indices 11 and 12 here.
    let mut f = rest.split_whitespace().skip(11);
    let ticks: u64 = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    Some(ticks * (1_000_000_000 / clock_ticks()))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// CPU use between two readings: (percent of one core over `wall`, µs per `units`).
pub fn cpu_use(before: Option<u64>, after: Option<u64>, wall: Duration, units: u64) -> (Value, Value) {
    match (before, after) {
        (Some(b), Some(a)) if a >= b => {
            let ns = (a - b) as f64;
            let pct = round1(ns / wall.as_nanos() as f64 * 100.0);
            let per = if units > 0 {
                num(round3(ns / 1000.0 / units as f64))
            } else {
                Value::Null
            };
            (json!(pct), per)
        }
        _ => (Value::Null, Value::Null),
    }
}

/// CPU readings of the server(s) and of this client at one instant.
#[derive(Clone, Copy)]
pub struct CpuMark {
    server: Option<u64>,
    client: Option<u64>,
    ctx: Option<u64>,
    at: std::time::Instant,
}

impl CpuMark {
    pub fn now(pids: &[u32]) -> Self {
        CpuMark {
            server: cpu_tree_ns(pids),
            client: self_cpu_ns(),
            ctx: ctx_switches_tree(pids),
            at: std::time::Instant::now(),
        }
    }

    /// Fields for the RESULT line, from `self` to `later`, `units` messages or handshakes.
    pub fn fields(&self, later: &CpuMark, units: u64) -> Map<String, Value> {
        let wall = later.at - self.at;
        let (server_pct, server_per) = cpu_use(self.server, later.server, wall, units);
        let (client_pct, _) = cpu_use(self.client, later.client, wall, units);
        let mut m = Map::new();
        m.insert("server_cpu_pct".into(), server_pct);
        m.insert("server_cpu_us_per_unit".into(), server_per);
        m.insert("client_cpu_pct".into(), client_pct);
        let ctx = self.ctx.zip(later.ctx).and_then(|(a, b)| b.checked_sub(a));
        m.insert("server_ctx_per_unit".into(), per_unit(ctx, units));
        m
    }
}

/// A measuring window over the server's processes: CPU, context switches and (perf
/// permitting) system calls, from [`Window::start`] to [`Window::end`].
pub struct Window {
    before: CpuMark,
    syscalls: SyscallCount,
    pids: Vec<u32>,
}

/// A closed [`Window`].
pub struct Measured {
    before: CpuMark,
    after: CpuMark,
    syscalls: Option<u64>,
}

impl Window {
    pub fn start(pids: &[u32]) -> Window {
        let syscalls = SyscallCount::start(pids);
        Window {
            before: CpuMark::now(pids),
            syscalls,
            pids: pids.to_vec(),
        }
    }

    /// Close the window now (perf is stopped and read off the runtime's threads).
    pub async fn end(self) -> Measured {
        let after = CpuMark::now(&self.pids);
        let syscalls = self.syscalls;
        let syscalls = tokio::task::spawn_blocking(move || syscalls.finish()).await.ok().flatten();
        Measured {
            before: self.before,
            after,
            syscalls,
        }
    }
}

impl Measured {
    /// The RESULT fields per unit (messages, requests or handshakes): CPU, context
    /// switches and system calls.
    pub fn fields(&self, units: u64) -> Map<String, Value> {
        let mut m = self.before.fields(&self.after, units);
        m.insert("server_syscalls_per_unit".into(), per_unit(self.syscalls, units));
        m
    }
}

/// Add `extra` to a JSON object.
pub fn merge(mut v: Value, extra: Map<String, Value>) -> Value {
    if let Value::Object(m) = &mut v {
        m.extend(extra);
    }
    v
}
