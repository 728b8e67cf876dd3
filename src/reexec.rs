//! SIGUSR2: the running gateway starts its own successor (DESIGN.md section 17).
//!
//! Under systemd a `wsgate run --takeover` typed in a shell runs outside the unit's
//! cgroup, and systemd ignores the `MAINPID=` it sends. So, as nginx does on SIGUSR2, the
//! running gateway starts the new binary itself: `<the path it was started from> run
//! --takeover --config <its config path>`, with its environment, stdin from /dev/null and
//! its stdout and stderr (the journal). The child is in the unit's cgroup; it takes the
//! listeners over through the control socket ([`crate::takeover`]), sends `MAINPID=`, and
//! this process drains and exits 0.
//!
//! The path is the one the process was started from, captured at start (made absolute,
//! symlinks kept): once the file there is replaced, it names the new binary, whereas
//! `/proc/self/exe` would still be the old inode. A child that exits before it takes
//! over (a broken config, a binary that does not start), or that does not take over
//! within [`GIVE_UP_AFTER`], leaves this process serving, with a log line saying so;
//! only one upgrade runs at a time.

use crate::takeover;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a started successor has to take over before it is killed: the control
/// socket's own deadlines (its request, then its confirmation) and a margin.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(takeover::CONFIRM_TIMEOUT.as_secs() + 15);
/// How often the child is looked at.
const POLL: Duration = Duration::from_millis(100);

/// The path this process was started from (`argv[0]`), as an absolute path: a name
/// without a slash is looked up in `PATH` as the shell did, a relative one is joined to
/// the working directory. Symlinks are kept (a `/usr/local/bin/wsgate` symlink swapped
/// to a new release names the new release). `None` when it cannot be found.
pub fn startup_exe() -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.components().count() > 1 || argv0.is_absolute() {
        return std::path::absolute(&argv0).ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(&argv0))
        .find(|p| is_executable(p))
        .and_then(|p| std::path::absolute(p).ok())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why a SIGUSR2 started no successor.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    #[error("no control socket to hand the listeners over on: set [server] control_socket (or run under systemd with RuntimeDirectory=)")]
    NoControlSocket,
    #[error("the path this gateway was started from is unknown, so the new binary cannot be found")]
    NoExe,
    #[error("an upgrade is already in progress (new process pid {0})")]
    InProgress(u32),
    #[error("the listeners were handed over already; this process is draining")]
    HandedOver,
    #[error("cannot start {0}: {1}")]
    Spawn(PathBuf, std::io::Error),
}

/// Starts successors on SIGUSR2, one at a time.
pub struct Upgrader {
    exe: Option<PathBuf>,
    config: PathBuf,
    /// Whether this process serves takeovers on a control socket.
    control: bool,
    handed_over: CancellationToken,
    /// The pid of the successor being watched; 0 when none.
    busy: Arc<AtomicU32>,
}

impl Upgrader {
    pub fn new(exe: Option<PathBuf>, config: &Path, control: bool, handed_over: CancellationToken) -> Upgrader {
        Upgrader {
            exe,
            config: config.to_path_buf(),
            control,
            handed_over,
            busy: Arc::default(),
        }
    }

    /// SIGUSR2: start the successor and watch it, or log why not. Never stops serving.
    pub fn upgrade(&self) {
        match self.start() {
            Ok(pid) => tracing::info!(pid, "upgrade: started the new binary; it takes the listeners over"),
            Err(e @ NotStarted::InProgress(_)) => tracing::warn!("SIGUSR2 refused: {e}"),
            Err(e) => tracing::error!("upgrade not started, still serving: {e}"),
        }
    }

    fn start(&self) -> Result<u32, NotStarted> {
        if self.handed_over.is_cancelled() {
            return Err(NotStarted::HandedOver);
        }
        if !self.control {
            return Err(NotStarted::NoControlSocket);
        }
        let exe = self.exe.as_ref().ok_or(NotStarted::NoExe)?;
        // Claimed before the spawn: a second SIGUSR2 handled meanwhile is refused.
        if self.busy.compare_exchange(0, u32::MAX, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Err(NotStarted::InProgress(self.busy.load(Ordering::SeqCst)));
        }
        let child = Command::new(exe)
            .arg("run")
            .arg("--takeover")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            // systemd's WATCHDOG_PID names this process; the successor must ping too.
            .env_remove("WATCHDOG_PID")
            .env(takeover::PARENT_ENV, std::process::id().to_string())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                self.busy.store(0, Ordering::SeqCst);
                return Err(NotStarted::Spawn(exe.clone(), e));
            }
        };
        let pid = child.id();
        self.busy.store(pid, Ordering::SeqCst);
        tokio::spawn(watch(child, self.handed_over.clone(), self.busy.clone()));
        Ok(pid)
    }
}

/// Until the successor takes over (it then lives on: it is the service) or fails.
async fn watch(mut child: Child, handed_over: CancellationToken, busy: Arc<AtomicU32>) {
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + GIVE_UP_AFTER;
    let failed = loop {
        if handed_over.is_cancelled() {
            return;
        }
        match child.try_wait() {
            Ok(Some(status)) => break Failed::Exited(status),
            Ok(None) => {}
            Err(e) => break Failed::Lost(e),
        }
        if tokio::time::Instant::now() >= deadline {
            // Still running without having taken over: it holds copies of the
            // listeners, so it must not linger (SIGKILL: a SIGTERM would make it send
            // systemd STOPPING=1 for the whole unit).
            let _ = child.kill();
            reap(&mut child).await;
            break Failed::TooSlow;
        }
        tokio::select! {
            _ = handed_over.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    };
    tracing::error!(pid, "upgrade failed, still serving: {failed}");
    busy.store(0, Ordering::SeqCst);
}

#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("the new process exited ({0}) before it took over; its log lines above say why")]
    Exited(ExitStatus),
    #[error("the new process did not take over within {}s and was killed", GIVE_UP_AFTER.as_secs())]
    TooSlow,
    #[error("cannot watch the new process: {0}")]
    Lost(std::io::Error),
}

/// Collect a killed child's exit status (bounded: SIGKILL is not ignored).
async fn reap(child: &mut Child) {
    for _ in 0..50 {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}
