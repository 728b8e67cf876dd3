//! Reloading from the config file: the one path SIGHUP and `watch_config` take
//! (DESIGN.md section 17), with systemd told `RELOADING=1` … `READY=1` around it.
//!
//! `[server] watch_config = true` polls the config file and every file it names
//! ([`Config::watched_files`]) every [`POLL_INTERVAL`]: a file whose inode, size or
//! mtime changed (symlinks followed, so Kubernetes' `..data` swap is seen as the new
//! files it points to) triggers a reload once nothing changed for one more poll
//! (debounce: an editor's several writes make one reload). The stamps are taken
//! *before* the files are read, so a directory swapped in the middle of a reload leaves
//! a difference behind and the next poll reloads again: the gateway ends on the newest
//! complete version, never on a mix (a mix that fails to load changes nothing).

use crate::config::Config;
use crate::gateway::Gateway;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a round of `stat` calls may take (a hung network file system): past it the
/// round is skipped, and the watcher tries again at the next poll.
const STAT_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many files are watched (the config names far fewer).
const MAX_WATCHED: usize = 1024;

/// What a file looked like: enough to see a rewrite, a rename over it or a symlink swap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    File {
        inode: (u64, u64),
        len: u64,
        modified: Option<SystemTime>,
    },
    Missing,
}

type Stamps = BTreeMap<PathBuf, Stamp>;

fn stamp(path: &Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(m) => Stamp::File {
            inode: inode(&m),
            len: m.len(),
            modified: m.modified().ok(),
        },
        Err(_) => Stamp::Missing,
    }
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// Stamps of `config` and the files the running config names, on a blocking thread
/// under [`STAT_TIMEOUT`]; `None` when that ran out.
async fn stamps(config: &Path, gw: &Gateway) -> Option<Stamps> {
    let mut files = gw.runtime().config.watched_files();
    files.truncate(MAX_WATCHED);
    files.push(config.to_path_buf());
    let task = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|f| {
                let s = stamp(&f);
                (f, s)
            })
            .collect()
    });
    tokio::time::timeout(STAT_TIMEOUT, task).await.ok()?.ok()
}

/// What the files looked like when the running config was read: the watcher's first
/// baseline. Take [`Baseline::config`] *before* the config is loaded and
/// [`Baseline::named_files`] before telling anyone the gateway is ready, so a change
/// during the start is seen.
pub struct Baseline(Stamps);

impl Baseline {
    /// The config file alone, before it is read.
    pub fn config(path: &Path) -> Baseline {
        Baseline(Stamps::from([(path.to_path_buf(), stamp(path))]))
    }

    /// Add the files the running config names (those not stamped yet).
    pub fn named_files(mut self, gw: &Gateway) -> Baseline {
        let mut files = gw.runtime().config.watched_files();
        files.truncate(MAX_WATCHED);
        for f in files {
            if let std::collections::btree_map::Entry::Vacant(e) = self.0.entry(f) {
                let s = stamp(e.key());
                e.insert(s);
            }
        }
        self
    }
}

/// Watch `config` and the files it names while `watch_config` is on (it is read at each
/// poll, so a reload can turn it on or off); reload through [`reload_file`] on a change.
pub async fn run(gw: Arc<Gateway>, config: PathBuf, baseline: Baseline, stop: CancellationToken) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What the running config was loaded from, and what the last poll saw.
    let mut applied: Option<Stamps> = gw.runtime().config.server.watch_config.then_some(baseline.0);
    let mut last: Option<Stamps> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !gw.runtime().config.server.watch_config {
            (applied, last) = (None, None);
            continue;
        }
        let Some(now) = stamps(&config, &gw).await else {
            tracing::warn!(config = %config.display(), "watch_config: looking at the files took over 2 s; trying again");
            continue;
        };
        let Some(base) = &mut applied else {
            // First look (at start, or watch_config just turned on): the baseline.
            (applied, last) = (Some(now.clone()), Some(now));
            continue;
        };
        // A file the config names for the first time (after a reload that named it) is
        // taken as loaded: that reload read it.
        for (path, s) in &now {
            base.entry(path.clone()).or_insert_with(|| s.clone());
        }
        base.retain(|path, _| now.contains_key(path));
        let changed = now != *base;
        let settled = last.as_ref() == Some(&now);
        last = Some(now.clone());
        if changed && settled {
            let changed_files: Vec<String> = now
                .iter()
                .filter(|(p, s)| base.get(*p) != Some(*s))
                .map(|(p, _)| p.display().to_string())
                .collect();
            tracing::info!(files = %changed_files.join(", "), "watch_config: files changed");
            // The stamps from before the read: a change during the read shows at the next poll.
            applied = Some(now);
            reload_file(&gw, &config).await;
        }
    }
}

/// Read `path`, validate it and everything it names, and swap it in; an invalid file
/// changes nothing (logged, `wsgate_config_reloads_total{result="failure"}`). Returns
/// whether the new config is in force.
pub async fn reload_file(gw: &Gateway, path: &Path) -> bool {
    crate::notify::reloading();
    tracing::info!(config = %path.display(), "reloading");
    let applied = match read(path).await {
        Err(e) => {
            gw.metrics.reload(false);
            tracing::error!("reload failed, keeping the running config: {e}");
            false
        }
        Ok(config) => match gw.reload(config).await {
            Ok(notes) => {
                for n in notes {
                    tracing::warn!("reload: {n}");
                }
                tracing::info!("reloaded");
                true
            }
            Err(e) => {
                tracing::error!("reload failed, keeping the running config: {e}");
                false
            }
        },
    };
    crate::notify::reloaded(applied);
    applied
}

/// The config file, read on a blocking thread (a slow file system never stalls the runtime).
async fn read(path: &Path) -> Result<Config, crate::config::ConfigError> {
    let owned = path.to_path_buf();
    match tokio::task::spawn_blocking(move || Config::load(&owned)).await {
        Ok(r) => r,
        Err(_) => Err(crate::config::ConfigError {
            file: path.display().to_string(),
            line: None,
            key: "(file)".into(),
            message: "the read was cancelled".into(),
        }),
    }
}
