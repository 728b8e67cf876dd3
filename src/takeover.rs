//! Binary upgrades without refusing a connection (DESIGN.md section 17).
//!
//! A running gateway with `[server] control_socket` listens there (a Unix socket, 0600,
//! answering only peers of its own user). `wsgate run --takeover` connects, asks for the
//! listeners, and receives copies of the listening sockets (wss, plain, admin) by
//! `SCM_RIGHTS`. It starts accepting on them, answers `ok`, and only then does the old
//! process stop accepting and drain as on SIGTERM. The kernel keeps one queue per
//! listening socket, shared by both processes, so no connection attempt meets a closed
//! port. Anything else (a wrong request, no `ok` within [`CONFIRM_TIMEOUT`], a new
//! process that exits) leaves the old process serving.

use crate::server::{Listeners, Running};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// What the new process sends first.
const REQUEST: &[u8] = b"wsgate takeover 1\n";
/// What it sends once it accepts on the listeners.
const CONFIRM: &[u8] = b"ok\n";
/// How long a peer has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the new process has to start serving and confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many listening sockets are handed over.
const MAX_FDS: usize = 64;

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no control socket: set [server] control_socket")]
    NoControlSocket,
    #[error("cannot reach the running gateway at {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("{0} is served by another user (uid {1}): not a gateway of ours")]
    Stranger(PathBuf, u32),
    #[error("{0} is served by pid {1}, not by the gateway that started this one (pid {2}): another gateway took that path")]
    NotTheParent(PathBuf, u32, u32),
    #[error("the running gateway's answer: {0}")]
    Protocol(&'static str),
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
}

/// The file name of the default control socket in systemd's `RuntimeDirectory=`.
pub const DEFAULT_SOCKET_NAME: &str = "control.sock";

/// The control socket: `[server] control_socket` when set, else `control.sock` in the
/// directory systemd names in `$RUNTIME_DIRECTORY` (`RuntimeDirectory=wsgate` in the
/// unit: `/run/wsgate/control.sock`), else none. Outside systemd there is no default,
/// so two gateways started side by side (tests, a second instance) never share one.
pub fn socket_path(configured: Option<&Path>) -> Option<PathBuf> {
    socket_path_in(configured, std::env::var_os("RUNTIME_DIRECTORY").as_deref())
}

fn socket_path_in(configured: Option<&Path>, runtime_dir: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path.to_path_buf());
    }
    // Several `RuntimeDirectory=` entries arrive colon-separated: the first is ours.
    let first = runtime_dir?.to_str()?.split(':').next()?;
    (!first.is_empty()).then(|| Path::new(first).join(DEFAULT_SOCKET_NAME))
}

/// Bind the control socket at `path` (0600), replacing a stale socket or a predecessor's
/// in one rename, so the path always names a live gateway. Anything else at the path (a
/// regular file such as a mistyped config path, a symlink, a directory) is left alone
/// and the gateway runs without a control socket.
pub fn bind(path: &Path) -> std::io::Result<(UnixListener, u32)> {
    use std::os::unix::fs::FileTypeExt;
    let not_a_socket = |p: &Path| match std::fs::symlink_metadata(p) {
        Ok(m) if !m.file_type().is_socket() => Some(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket (a file, directory or symlink): not replaced",
                p.display()
            ),
        )),
        _ => None,
    };
    if let Some(e) = not_a_socket(path) {
        return Err(e);
    }
    let tmp = path.with_extension(format!("new.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    // chmod follows symlinks: make sure the name still is the socket just bound.
    if let Some(e) = not_a_socket(&tmp) {
        return Err(e);
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    let meta = std::fs::symlink_metadata(&tmp)?;
    let owner = rustix::process::geteuid().as_raw();
    if !meta.file_type().is_socket() || meta.uid() != owner {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::other("the control socket was replaced while it was set up"));
    }
    if let Some(e) = not_a_socket(path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    Ok((listener, owner))
}

/// Serve takeover requests until one succeeds (then `handed_over` is cancelled and this
/// returns) or `stop`.
pub async fn serve(listener: UnixListener, owner: u32, running: Arc<RunningFds>, handed_over: CancellationToken, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
        };
        match answer(stream, owner, &running.0).await {
            Ok(()) => {
                tracing::info!("takeover: the new process accepts on the listeners; draining");
                handed_over.cancel();
                return;
            }
            Err(why) => tracing::warn!(reason = why, "takeover refused or failed; still serving"),
        }
    }
}

/// The listening sockets a takeover hands over.
pub struct RunningFds(Vec<(&'static str, OwnedFd)>);

impl RunningFds {
    pub fn of(running: &mut Running) -> Arc<RunningFds> {
        Arc::new(RunningFds(std::mem::take(&mut running.handover)))
    }
}

async fn answer(mut stream: UnixStream, owner: u32, fds: &[(&'static str, OwnedFd)]) -> Result<(), &'static str> {
    // The socket file is 0600; the peer's credentials are checked all the same (a socket
    // passed on by a process that could open it is still another user's).
    let cred = stream.peer_cred().map_err(|_| "no peer credentials")?;
    if cred.uid() != owner {
        return Err("a peer of another user");
    }
    let mut request = [0u8; REQUEST.len()];
    tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut request))
        .await
        .map_err(|_| "no request in time")?
        .map_err(|_| "short request")?;
    if request != REQUEST {
        return Err("not a takeover request");
    }
    let text: String = fds
        .iter()
        .map(|(kind, fd)| {
            let addr = std::net::TcpListener::from(fd.try_clone().ok()?).local_addr().ok()?;
            Some(format!("{kind} {addr}\n"))
        })
        .collect::<Option<String>>()
        .ok_or("a listener is gone")?;
    let borrowed: Vec<_> = fds.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !control.push(rustix::net::SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err("too many listeners");
    }
    loop {
        stream.writable().await.map_err(|_| "control socket")?;
        match rustix::net::sendmsg(
            &stream,
            &[IoSlice::new(text.as_bytes())],
            &mut control,
            rustix::net::SendFlags::empty(),
        ) {
            Ok(n) if n == text.len() => break,
            Ok(_) => return Err("short send"),
            Err(rustix::io::Errno::AGAIN) => continue,
            Err(_) => return Err("cannot send the listeners"),
        }
    }
    let mut confirm = [0u8; CONFIRM.len()];
    tokio::time::timeout(CONFIRM_TIMEOUT, stream.read_exact(&mut confirm))
        .await
        .map_err(|_| "the new process did not confirm in time")?
        .map_err(|_| "the new process went away before confirming")?;
    if confirm != CONFIRM {
        return Err("the new process did not confirm");
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// Set by a gateway in the environment of the successor it starts on SIGUSR2: its pid,
/// which the successor requires of the process answering on the control socket.
pub const PARENT_ENV: &str = "WSGATE_TAKEOVER_FROM_PID";

/// The pid a successor started on SIGUSR2 must take over from (`None` for a `run
/// --takeover` typed by hand).
pub fn expected_peer() -> Option<u32> {
    std::env::var(PARENT_ENV).ok()?.parse().ok()
}

/// The new process's side: ask the gateway at `path` for its listeners (from the process
/// `from` when given). The returned stream confirms the takeover once the new process
/// serves ([`confirm`]).
pub fn receive(path: &Path, from: Option<u32>) -> Result<(Listeners, std::os::unix::net::UnixStream), TakeoverError> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| TakeoverError::Connect(path.to_path_buf(), e))?;
    // Listeners are taken only from a process of our own user: a socket planted at the
    // path (or a symlink to one) by anybody else hands over nothing.
    let peer = rustix::net::sockopt::socket_peercred(&stream).map_err(std::io::Error::from)?;
    let me = rustix::process::geteuid();
    if peer.uid != me {
        return Err(TakeoverError::Stranger(path.to_path_buf(), peer.uid.as_raw()));
    }
    // Started on SIGUSR2: only the gateway that started this one is taken over, not
    // another one that has since bound the same path (two instances, one config).
    let answering = peer.pid.as_raw_nonzero().get().unsigned_abs();
    if let Some(parent) = from.filter(|p| *p != answering) {
        return Err(TakeoverError::NotTheParent(path.to_path_buf(), answering, parent));
    }
    stream.set_read_timeout(Some(CONFIRM_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream.write_all(REQUEST)?;
    let mut buf = [0u8; 4096];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let fds: Vec<OwnedFd> = control
        .drain()
        .filter_map(|m| match m {
            rustix::net::RecvAncillaryMessage::ScmRights(fds) => Some(fds.collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    let text = std::str::from_utf8(&buf[..got.bytes]).map_err(|_| TakeoverError::Protocol("not text"))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() || lines.len() != fds.len() {
        return Err(TakeoverError::Protocol("the listeners do not match their names"));
    }
    let (mut wss, mut plain, mut admin) = (Vec::new(), Vec::new(), None);
    for (line, fd) in lines.into_iter().zip(fds) {
        let (kind, addr) = line.split_once(' ').ok_or(TakeoverError::Protocol("unreadable listener line"))?;
        let listener = std::net::TcpListener::from(fd);
        // Only a listening TCP socket at the address it was named with is used.
        if listener.local_addr().ok().map(|a| a.to_string()).as_deref() != Some(addr) {
            return Err(TakeoverError::Protocol("a listener is not the socket it was named"));
        }
        match kind {
            "wss" => wss.push(listener),
            "plain" => plain.push(listener),
            "admin" if admin.is_none() => admin = Some(listener),
            _ => return Err(TakeoverError::Protocol("unknown listener kind")),
        }
    }
    let admin = admin.ok_or(TakeoverError::Protocol("no admin listener"))?;
    if wss.is_empty() {
        return Err(TakeoverError::Protocol("no wss listener"));
    }
    Ok((Listeners { wss, plain, admin }, stream))
}

/// Tell the old process the new one accepts: it stops accepting and drains.
pub fn confirm(mut stream: std::os::unix::net::UnixStream) -> std::io::Result<()> {
    stream.write_all(CONFIRM)?;
    // The old process closes its end once it has read the confirmation.
    let mut rest = [0u8; 16];
    let _ = stream.read(&mut rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn the_control_socket_is_the_configured_one_else_systemds_runtime_directory_else_none() {
        let set = Path::new("/srv/gw.sock");
        assert_eq!(socket_path_in(Some(set), Some(OsStr::new("/run/wsgate"))).as_deref(), Some(set));
        assert_eq!(
            socket_path_in(None, Some(OsStr::new("/run/wsgate"))),
            Some(PathBuf::from("/run/wsgate/control.sock"))
        );
        assert_eq!(
            socket_path_in(None, Some(OsStr::new("/run/wsgate:/run/other"))),
            Some(PathBuf::from("/run/wsgate/control.sock"))
        );
        assert_eq!(socket_path_in(None, Some(OsStr::new(""))), None);
        assert_eq!(socket_path_in(None, None), None);
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_never_a_file_or_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A stale socket (a gateway that died): replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (_l, _) = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A regular file (a mistyped path): left alone.
        let file = dir.path().join("wsgate.toml");
        std::fs::write(&file, "[server]\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "[server]\n");
        // A symlink planted at the path: neither replaced nor followed.
        let link = dir.path().join("planted.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(bind(&link).is_err());
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o640);
    }
}
