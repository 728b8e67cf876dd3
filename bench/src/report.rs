//! `report`: turn the RESULT lines of a bench run into a markdown table of medians
//! per target, with the ratios wsgate/nginx and wsgate/direct and the goals.

use serde_json::Value;
use std::{collections::BTreeMap, fmt::Write, path::Path};

const TARGETS: [&str; 3] = ["direct", "wsgate", "nginx"];
const AT_LEAST_1_2: Goal = Goal::RatioAtLeast(1.2);

#[derive(Clone, Copy)]
enum Goal {
    None,
    /// wsgate / nginx at least this.
    RatioAtLeast(f64),
    /// wsgate / nginx at most this.
    RatioAtMost(f64),
    /// wsgate's value at most this.
    AtMost(f64),
}

struct Results {
    /// (test, target) → RESULT objects, in run order.
    runs: BTreeMap<(String, String), Vec<Value>>,
}

impl Results {
    fn values(&self, test: &str, target: &str, field: &str) -> Vec<f64> {
        self.runs
            .get(&(test.to_string(), target.to_string()))
            .map(|v| v.iter().filter_map(|r| r.get(field).and_then(Value::as_f64)).collect())
            .unwrap_or_default()
    }

    fn median(&self, test: &str, target: &str, field: &str) -> Option<f64> {
        median(self.values(test, target, field))
    }

    fn first(&self, test: &str) -> Option<&Value> {
        TARGETS
            .iter()
            .find_map(|t| self.runs.get(&(test.to_string(), t.to_string())).and_then(|v| v.first()))
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) => format!("{x:.decimals$}"),
        None => "–".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn run(raw: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(raw)?;
    let mut runs: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for line in text.lines() {
        let Some(json) = line.strip_prefix("RESULT ") else { continue };
        let Ok(v) = serde_json::from_str::<Value>(json) else { continue };
        let test = v.get("test").and_then(Value::as_str).unwrap_or("?").to_string();
        let target = v.get("target").and_then(Value::as_str).unwrap_or("?").to_string();
        runs.entry((test, target)).or_default().push(v);
    }
    let r = Results { runs };
    let table = table(&r) + &forward(&r) + &features(&r) + &compression(&r);
    print!("{table}");
    if let Some(out) = out {
        std::fs::write(out, &table)?;
    }
    Ok(())
}

fn table(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| measurement (median of runs) | direct | wsgate | nginx | wsgate/nginx | wsgate/direct | goal | met |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|---|");
    let mut row = |label: String, test: &str, field: &str, decimals: usize, goal: Goal, goal_text: &str| {
        let v: Vec<Option<f64>> = TARGETS.iter().map(|t| r.median(test, t, field)).collect();
        if v.iter().all(Option::is_none) {
            return;
        }
        let (wn, wd) = (ratio(v[1], v[2]), ratio(v[1], v[0]));
        let met = match goal {
            Goal::None => None,
            Goal::RatioAtLeast(x) => wn.map(|q| q >= x),
            Goal::RatioAtMost(x) => wn.map(|q| q <= x),
            Goal::AtMost(x) => v[1].map(|w| w <= x),
        };
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} | {goal_text} | {} |",
            fmt(v[0], decimals),
            fmt(v[1], decimals),
            fmt(v[2], decimals),
            fmt(wn, 2),
            fmt(wd, 2),
            match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        );
    };
    let cpu = "server CPU µs per message";
    for test in ["tp16", "tp1"] {
        if let Some(f) = r.first(test) {
            let k = &f["inflight"];
            let what = format!("{} conns × {} B, {k} in flight", f["connections"], f["size"]);
            row(
                format!("throughput (msg/s), {what}"),
                test,
                "msgs_per_s",
                0,
                AT_LEAST_1_2,
                "≥ 1.2× nginx",
            );
            row(
                format!("throughput (MB/s payload), {k} in flight"),
                test,
                "mb_per_s",
                1,
                Goal::None,
                "",
            );
            row(
                format!("throughput: {cpu}, {k} in flight"),
                test,
                "server_cpu_us_per_unit",
                2,
                Goal::None,
                "",
            );
            kernel_rows(&mut row, test, &format!("{k} in flight"), "message");
        }
    }
    if let Some(f) = r.first("hs") {
        let c = &f["concurrency"];
        let what = format!("{c} concurrent (connect+TLS+upgrade+echo+close)");
        row(
            format!("handshakes/s, {what}"),
            "hs",
            "per_s",
            0,
            Goal::RatioAtLeast(1.5),
            "≥ 1.5× nginx",
        );
        row(
            format!("handshake iteration p99 (ms), {c} concurrent"),
            "hs",
            "p99_ms",
            2,
            Goal::None,
            "",
        );
        row(
            "handshakes: server CPU µs per handshake".into(),
            "hs",
            "server_cpu_us_per_unit",
            0,
            Goal::None,
            "",
        );
        kernel_rows(&mut row, "hs", "handshakes", "handshake");
    }
    if let Some(f) = r.first("hsr") {
        let c = &f["concurrency"];
        row(
            format!("handshakes/s with TLS resumption (returning clients), {c} concurrent"),
            "hsr",
            "per_s",
            0,
            Goal::None,
            "",
        );
        row(
            "handshakes with resumption: share resumed (%)".into(),
            "hsr",
            "resumed_pct",
            0,
            Goal::None,
            "",
        );
        row(
            "handshakes with resumption: server CPU µs per handshake".into(),
            "hsr",
            "server_cpu_us_per_unit",
            0,
            Goal::None,
            "",
        );
    }
    if let Some(f) = r.first("http") {
        let c = &f["connections"];
        row(
            format!("HTTP requests/s, {c} kept-alive conns × small GET, 1 in flight (http = true route)"),
            "http",
            "per_s",
            0,
            Goal::RatioAtLeast(1.0),
            "≥ nginx",
        );
        row(format!("HTTP request p99 (ms), {c} conns"), "http", "p99_ms", 3, Goal::None, "");
        row(
            "HTTP: server CPU µs per request".into(),
            "http",
            "server_cpu_us_per_unit",
            2,
            Goal::RatioAtMost(1.0),
            "≤ nginx",
        );
        kernel_rows(&mut row, "http", "HTTP", "request");
    }
    if let Some(f) = r.first("lat") {
        let what = format!("@ {} msg/s over {} conns", f["rate"].as_f64().unwrap_or(f64::NAN), f["connections"]);
        row(format!("latency p50 (ms) {what}"), "lat", "p50_ms", 3, Goal::None, "");
        row(
            format!("latency p99 (ms) {what}"),
            "lat",
            "p99_ms",
            3,
            Goal::RatioAtMost(1.0),
            "≤ nginx",
        );
        row(format!("latency p99.9 (ms) {what}"), "lat", "p999_ms", 3, Goal::None, "");
        row(
            "latency: client pacer lag p99 (ms)".into(),
            "lat",
            "send_lag_p99_ms",
            3,
            Goal::None,
            "",
        );
        row(format!("latency: {cpu}"), "lat", "server_cpu_us_per_unit", 2, Goal::None, "");
    }
    if let Some(f) = r.first("many") {
        let what = format!("{} sockets, {} msg/s in all", f["connections"], f["rate"]);
        row(
            format!("many sockets: latency p99 (ms), {what}"),
            "many",
            "p99_ms",
            3,
            Goal::RatioAtMost(1.0),
            "≤ nginx",
        );
        row(
            format!("many sockets: {cpu}"),
            "many",
            "server_cpu_us_per_unit",
            1,
            Goal::RatioAtMost(0.8),
            "≤ 0.8× nginx",
        );
        kernel_rows(&mut row, "many", "many sockets", "message");
    }
    // Idle sockets: one row per socket count, in increasing order.
    let mut idle: Vec<(u64, String)> = r
        .runs
        .keys()
        .filter(|(t, _)| t.starts_with("idle"))
        .filter_map(|(t, _)| r.first(t).and_then(|f| f["count"].as_u64()).map(|c| (c, t.clone())))
        .collect();
    idle.sort();
    idle.dedup();
    for (count, test) in &idle {
        row(
            format!("idle memory per socket (KB), {count} sockets"),
            test,
            "kb_per_socket",
            1,
            Goal::AtMost(14.0),
            "≤ 14 KB",
        );
    }
    if idle.len() >= 2 {
        let (lo, hi) = (&idle[0], &idle[idle.len() - 1]);
        let cells: Vec<Option<f64>> = TARGETS
            .iter()
            .map(|t| ratio(r.median(&hi.1, t, "kb_per_socket"), r.median(&lo.1, t, "kb_per_socket")))
            .collect();
        let met = cells[1].map(|q| if (0.85..=1.15).contains(&q) { "yes" } else { "**no**" });
        let _ = writeln!(
            s,
            "| idle KB/socket at {} ÷ at {} (flat = 1.00) | {} | {} | {} | | | flat (±15%) | {} |",
            hi.0,
            lo.0,
            fmt(cells[0], 2),
            fmt(cells[1], 2),
            fmt(cells[2], 2),
            met.unwrap_or("")
        );
    }
    for (count, test) in &idle {
        let cells: Vec<String> = TARGETS
            .iter()
            .map(|t| {
                let echoed = r.values(test, t, "echoed");
                let held = r.values(test, t, "held_s");
                match echoed.iter().copied().reduce(f64::min) {
                    Some(min) => format!(
                        "{min:.0}/{count} (held {:.0} s)",
                        held.iter().copied().reduce(f64::min).unwrap_or(0.0)
                    ),
                    None => "–".into(),
                }
            })
            .collect();
        let all = cells.iter().filter(|c| *c != "–").all(|c| c.starts_with(&format!("{count}/")));
        let _ = writeln!(
            s,
            "| idle sockets still echoing after the hold, worst run, {count} | {} | {} | {} | | | all | {} |",
            cells[0],
            cells[1],
            cells[2],
            if all { "yes" } else { "**no**" }
        );
    }
    // Correctness over every run: payload mismatches, lost echoes, errors, failed connects.
    let cells: Vec<String> = TARGETS
        .iter()
        .map(|t| {
            let mut bad = 0.0;
            let mut any = false;
            for ((_, target), runs) in &r.runs {
                if target != t {
                    continue;
                }
                any = true;
                for v in runs {
                    for k in ["mismatches", "errors", "lost", "failed", "connect_failures"] {
                        bad += v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                    }
                }
            }
            if any { format!("{bad:.0}") } else { "–".into() }
        })
        .collect();
    let _ = writeln!(
        s,
        "| errors: mismatched/lost echoes, failed connections (all runs) | {} | {} | {} | | | 0 | {} |",
        cells[0],
        cells[1],
        cells[2],
        if cells.iter().all(|c| c == "0" || c == "–") {
            "yes"
        } else {
            "**no**"
        }
    );
    let runs: usize = r.runs.values().map(Vec::len).sum();
    let _ = writeln!(
        s,
        "\n{runs} runs. Ratios divide medians; for latency, CPU and memory lower is better. Server CPU counts \
         the target's processes only (nginx: master + workers): the echo backend behind wsgate and nginx is \
         left out, while direct's figure is a whole wss echo."
    );
    s
}

/// Forward auth against the JWT route (`hs` and `fwd-*` tests, target wsgate): handshakes/s
/// with the endpoint's answer cached and with one HTTP round trip to it per connection.
fn forward(r: &Results) -> String {
    let mut s = String::new();
    let hs = |test: &str, field: &str| r.median(test, "wsgate", field);
    if r.runs.keys().all(|(t, _)| !t.starts_with("fwd-")) {
        return s;
    }
    let c = r.first("fwd-cache").or(r.first("fwd-nocache")).map(|f| f["concurrency"].clone());
    let _ = writeln!(
        s,
        "\n## Forward auth (wsgate only; {} concurrent handshakes, connect+TLS+upgrade+echo+close, as the `hs` row)\n\n\
         | measurement (median of runs) | JWT route | forward auth | forward/JWT | goal | met |\n|---|---:|---:|---:|---|---|",
        c.unwrap_or_default()
    );
    let rows = [
        ("handshakes/s", "per_s", 0, "fwd-cache", "`cache = \"30s\"`", Some(0.8)),
        (
            "handshakes/s",
            "per_s",
            0,
            "fwd-nocache",
            "no cache (one HTTP round trip per connection)",
            None,
        ),
        (
            "server CPU µs per handshake",
            "server_cpu_us_per_unit",
            1,
            "fwd-cache",
            "`cache = \"30s\"`",
            None,
        ),
        (
            "server CPU µs per handshake",
            "server_cpu_us_per_unit",
            1,
            "fwd-nocache",
            "no cache",
            None,
        ),
        (
            "upgrade p50 (ms, TCP connect to 101)",
            "upgrade_p50_ms",
            2,
            "fwd-cache",
            "`cache = \"30s\"`",
            None,
        ),
        (
            "upgrade p50 (ms, TCP connect to 101)",
            "upgrade_p50_ms",
            2,
            "fwd-nocache",
            "no cache",
            None,
        ),
    ];
    for (label, field, decimals, test, what, goal) in rows {
        let (b, w) = (hs("hs", field), hs(test, field));
        if w.is_none() {
            continue;
        }
        let q = ratio(w, b);
        let (goal_text, met) = match goal {
            Some(x) => (format!("≥ {x}×"), q.map(|q| if q >= x { "yes" } else { "**no**" }).unwrap_or("")),
            None => (String::new(), ""),
        };
        let _ = writeln!(
            s,
            "| {label}: {what} | {} | {} | {} | {goal_text} | {met} |",
            fmt(b, decimals),
            fmt(w, decimals),
            fmt(q, 2)
        );
    }
    // The cost of no cache, per connection, against the cached route (same client, same process).
    let diff = |field: &str, d: usize| fmt(hs("fwd-nocache", field).zip(hs("fwd-cache", field)).map(|(a, b)| a - b), d);
    if hs("fwd-nocache", "per_s").is_some() && hs("fwd-cache", "per_s").is_some() {
        let _ = writeln!(
            s,
            "\nNo cache costs one HTTP round trip to the endpoint per connection (a fresh TCP connection, one GET, \
             the answer head): {} handshakes/s ({}×), {} µs more server CPU and {} ms more upgrade p50 per handshake \
             than `cache = \"30s\"`; the endpoint's own CPU (auth-app, its own process) is not counted.",
            diff("per_s", 0),
            fmt(ratio(hs("fwd-nocache", "per_s"), hs("fwd-cache", "per_s")), 2),
            diff("server_cpu_us_per_unit", 1),
            diff("upgrade_p50_ms", 2),
        );
    }
    s
}

/// The features table: wsgate with a feature against wsgate without it, in one process
/// (tests `feat-*`, target wsgate).
fn features(r: &Results) -> String {
    let mut s = String::new();
    let pairs = [
        (
            "JSON throughput (msg/s), 64 conns × 64 B, 16 in flight",
            "feat-json-plain",
            "feat-json-valid",
            "msgs_per_s",
            Some(0.8),
            "route without validation",
            "with `[routes.validate]` (schema)",
        ),
        (
            "JSON throughput: server CPU µs per message",
            "feat-json-plain",
            "feat-json-valid",
            "server_cpu_us_per_unit",
            None,
            "route without validation",
            "with `[routes.validate]` (schema)",
        ),
        (
            "handshakes/s, 32 concurrent",
            "feat-hs-plain",
            "feat-hs-mtls",
            "per_s",
            None,
            "JWT, no client certificate",
            "client certificate (`auth = \"mtls\"`)",
        ),
        (
            "handshakes/s, 32 concurrent",
            "feat-hs-plain",
            "feat-hs-cluster",
            "per_s",
            None,
            "one instance",
            "cluster mode (Redis on loopback)",
        ),
        (
            "handshakes: server CPU µs per handshake",
            "feat-hs-plain",
            "feat-hs-cluster",
            "server_cpu_us_per_unit",
            None,
            "one instance",
            "cluster mode (Redis on loopback)",
        ),
        (
            "handshakes: server CPU µs per handshake",
            "feat-hs-plain",
            "feat-hs-mtls",
            "server_cpu_us_per_unit",
            None,
            "JWT, no client certificate",
            "client certificate (`auth = \"mtls\"`)",
        ),
    ];
    let mut any = false;
    for (label, base, with, field, goal, base_text, with_text) in pairs {
        let (b, w) = (r.median(base, "wsgate", field), r.median(with, "wsgate", field));
        if b.is_none() && w.is_none() {
            continue;
        }
        if !any {
            let _ = writeln!(
                s,
                "\n## Features (wsgate, one process with `client_ca` set)\n\n\
                 | measurement (median of runs) | without | with | with/without | goal | met |\n|---|---:|---:|---:|---|---|"
            );
            any = true;
        }
        let q = ratio(w, b);
        let (goal_text, met) = match goal {
            Some(x) => (format!("≥ {x}×"), q.map(|q| if q >= x { "yes" } else { "**no**" }).unwrap_or("")),
            None => (String::new(), ""),
        };
        let decimals = if field == "server_cpu_us_per_unit" { 1 } else { 0 };
        let _ = writeln!(
            s,
            "| {label}: {base_text} → {with_text} | {} | {} | {} | {goal_text} | {met} |",
            fmt(b, decimals),
            fmt(w, decimals),
            fmt(q, 2)
        );
    }
    s
}

/// The chat workload with and without permessage-deflate (`chat-*` tests, wsgate only).
fn compression(r: &Results) -> String {
    let mut s = String::new();
    let rows = [
        (
            "bytes on the wire per message (TLS included, mean of both ways)",
            "chat-plain",
            "chat-deflate",
            "wire_per_msg",
            Some(0.4),
            "uncompressed",
            "permessage-deflate (default: no context takeover)",
        ),
        (
            "bytes on the wire per message (TLS included, mean of both ways)",
            "chat-plain",
            "chat-keep",
            "wire_per_msg",
            Some(0.4),
            "uncompressed",
            "permessage-deflate, `context_takeover = true`",
        ),
        (
            "server CPU µs per message (echoed: inflate + deflate)",
            "chat-plain",
            "chat-deflate",
            "server_cpu_us_per_unit",
            None,
            "uncompressed",
            "permessage-deflate (default)",
        ),
        (
            "server CPU µs per message (echoed: inflate + deflate)",
            "chat-plain",
            "chat-keep",
            "server_cpu_us_per_unit",
            None,
            "uncompressed",
            "`context_takeover = true`",
        ),
        (
            "idle KB per socket (1 message each, then idle)",
            "chat-idle-plain",
            "chat-idle-deflate",
            "kb_per_socket",
            None,
            "uncompressed",
            "permessage-deflate (default)",
        ),
    ];
    let mut any = false;
    for (label, base, with, field, goal, base_text, with_text) in rows {
        let (b, w) = (r.median(base, "wsgate", field), r.median(with, "wsgate", field));
        if b.is_none() && w.is_none() {
            continue;
        }
        if !any {
            let _ = writeln!(
                s,
                "\n## Compression (wsgate, JSON chat messages of ~300 B, echoed)\n\n\
                 | measurement (median of runs) | without | with | with/without | goal | met |\n|---|---:|---:|---:|---|---|"
            );
            any = true;
        }
        let q = ratio(w, b);
        let (goal_text, met) = match goal {
            Some(x) => (format!("≤ {x}×"), q.map(|q| if q <= x { "yes" } else { "**no**" }).unwrap_or("")),
            None => (String::new(), ""),
        };
        let _ = writeln!(
            s,
            "| {label}: {base_text} → {with_text} | {} | {} | {} | {goal_text} | {met} |",
            fmt(b, 1),
            fmt(w, 1),
            fmt(q, 2)
        );
    }
    s
}

/// The kernel crossings per `unit` (message, handshake, request) of `test`: system calls
/// (perf stat) and context switches (/proc), each target's processes only. The goal
/// (system calls at most nginx's) is the per-message one of issue 30; the other units are
/// shown to explain their CPU rows.
fn kernel_rows(row: &mut impl FnMut(String, &str, &str, usize, Goal, &str), test: &str, what: &str, unit: &str) {
    let (goal, goal_text) = if unit == "message" {
        (Goal::RatioAtMost(1.0), "≤ nginx")
    } else {
        (Goal::None, "")
    };
    row(
        format!("server system calls per {unit}, {what}"),
        test,
        "server_syscalls_per_unit",
        3,
        goal,
        goal_text,
    );
    row(
        format!("server context switches per {unit}, {what}"),
        test,
        "server_ctx_per_unit",
        3,
        Goal::None,
        "",
    );
}
