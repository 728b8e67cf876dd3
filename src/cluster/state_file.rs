//! `state_file`: the last synced bans, revocations and auth-failure bans, and the
//! number of live instances, kept on disk so that an instance that starts while Redis is
//! unreachable does not admit what the cluster refuses, nor grant a whole cap.
//!
//! JSON, written atomically (a private temporary file in the same directory, then a
//! rename), mode 0600, at most once per [`WRITE_EVERY`] after something changed; read
//! at start with a size bound, entries past their end dropped.

use super::{Cluster, Host, unix_now};
use crate::incidents::{MAX_BANS, MAX_REVOCATIONS};
use serde::{Deserialize, Serialize};
use std::{
    io::Write,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// How often a changed state is written, at most.
const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Largest state file read: the caps' worth of entries and some.
const MAX_STATE_FILE: u64 = 16 << 20;
/// The format written.
const VERSION: u32 = 1;

/// What the file holds. Times are Unix seconds.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
struct State {
    version: u32,
    written_at: u64,
    /// Live instances as last seen (this one included).
    instances: u32,
    /// Banned ranges and the end of each ban.
    bans: Vec<(String, u64)>,
    /// Revoked token ids and when each revocation may end.
    revoked: Vec<(String, u64)>,
    /// Client keys banned for auth failures and the end of each ban.
    auth_bans: Vec<(String, u64)>,
}

impl Cluster {
    /// Something the file holds changed: write it at the next turn of the writer.
    pub(super) fn state_changed(&self) {
        self.state_dirty.store(true, Ordering::Relaxed);
    }

    /// Whether the local copy holds the cluster's state: a Redis sync completed, or the
    /// state file was loaded.
    pub fn has_state(&self) -> bool {
        self.has_state.load(Ordering::Relaxed)
    }

    /// Load the state file, when there is one: its bans, revocations and auth bans go
    /// into the local copy, its instance count becomes the one `local` mode divides by.
    /// A missing file is not an error (first start); an unreadable one is logged and
    /// skipped (the instance then waits for Redis to be ready).
    pub fn load_state(&self, gw: &dyn Host) {
        let Some(path) = &self.state_file else { return };
        let state = match read(path) {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::info!(file = %path.display(), "cluster: no state file yet");
                return;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cluster: state file not used");
                return;
            }
        };
        let now = unix_now();
        let left = |until: u64| Duration::from_secs(until.saturating_sub(now));
        let incidents = gw.incidents();
        for (cidr, until) in state.bans.iter().filter(|(_, u)| *u > now).take(MAX_BANS) {
            if let Ok(net) = cidr.parse() {
                let _ = incidents.ban(crate::incidents::canonical(net), left(*until));
            }
        }
        for (jti, until) in state.revoked.iter().filter(|(_, u)| *u > now).take(MAX_REVOCATIONS) {
            let _ = incidents.revoke(jti, Some(*until));
        }
        for (key, until) in state.auth_bans.iter().filter(|(_, u)| *u > now).take(MAX_BANS) {
            gw.auth_ban(key, left(*until));
        }
        if state.instances > 0 && self.live.load(Ordering::Relaxed) == 0 {
            self.live.store(state.instances, Ordering::Relaxed);
        }
        self.has_state.store(true, Ordering::Relaxed);
        tracing::info!(
            file = %path.display(),
            bans = state.bans.len(),
            revoked = state.revoked.len(),
            auth_bans = state.auth_bans.len(),
            instances = state.instances,
            "cluster: state file loaded"
        );
    }

    /// Write the state file after changes, at most every [`WRITE_EVERY`], until `stop`.
    pub(super) async fn keep_state_written(self: Arc<Self>, gw: Arc<dyn Host>, stop: CancellationToken) {
        let Some(path) = self.state_file.clone() else { return };
        let mut tick = tokio::time::interval(WRITE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Nothing worth keeping before the first sync or load: an empty file would
            // make the next start believe the cluster bans nothing.
            if !self.state_dirty.swap(false, Ordering::Relaxed) || !self.has_state() {
                continue;
            }
            let state = self.snapshot(gw.as_ref());
            let path = path.clone();
            let written = tokio::task::spawn_blocking(move || write(&path, &state)).await;
            if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
                tracing::warn!(error = %e, "cluster: cannot write the state file");
                self.state_changed(); // try again at the next turn
            }
        }
    }

    fn snapshot(&self, gw: &dyn Host) -> State {
        let now = unix_now();
        let until = |d: Duration| now.saturating_add(d.as_secs()).saturating_add(u64::from(d.subsec_nanos() > 0));
        let incidents = gw.incidents();
        State {
            version: VERSION,
            written_at: now,
            instances: self.live.load(Ordering::Relaxed),
            bans: incidents
                .ban_entries()
                .into_iter()
                .map(|(n, d)| (n.to_string(), until(d)))
                .collect(),
            revoked: incidents.revoked_entries().into_iter().map(|(j, d)| (j, until(d))).collect(),
            auth_bans: gw.auth_bans().into_iter().map(|(k, d)| (k, until(d))).collect(),
        }
    }
}

/// Read the state file: `None` when there is none.
fn read(path: &Path) -> Result<Option<State>, String> {
    let text = match crate::fsutil::read_text(path, MAX_STATE_FILE) {
        Ok(t) => t,
        Err(e) if !path.exists() => {
            let _ = e;
            return Ok(None);
        }
        Err(e) => return Err(e.to_string()),
    };
    let state: State = serde_json::from_str(&text).map_err(|e| format!("not a state file: {e}"))?;
    if state.version != VERSION {
        return Err(format!("state file version {} is not {VERSION}", state.version));
    }
    Ok(Some(state))
}

/// Write `state` to `path` atomically, mode 0600.
fn write(path: &Path, state: &State) -> std::io::Result<()> {
    let text = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut rand = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut rand);
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", u64::from_le_bytes(rand)));
    let result = (|| {
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?
        };
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(read(&path).unwrap(), None);
        let state = State {
            version: VERSION,
            written_at: 1,
            instances: 3,
            bans: vec![("203.0.113.0/24".into(), 2)],
            revoked: vec![("j1".into(), 3)],
            auth_bans: vec![("4:c0000201".into(), 4)],
        };
        write(&path, &state).unwrap();
        assert_eq!(read(&path).unwrap(), Some(state));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, "{\"version\": 9}").unwrap();
        assert!(read(&path).is_err());
        std::fs::write(&path, "garbage").unwrap();
        assert!(read(&path).is_err());
    }
}
