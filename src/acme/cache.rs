//! `cache_dir`: the ACME account (its key included) per directory URL, and the
//! certificate with its key per directory URL and set of names, so a restart serves
//! the cached certificate without asking the ACME server, and a config naming other
//! names or another server never picks up the wrong one.
//!
//! Files are mode 0600 in a directory of mode 0700, written to a temporary file and
//! renamed, so a crash leaves the old file or the new one, never half of one; the
//! certificate and its key share one file, so they cannot get out of step.
//!
//! What is read back is trusted only if nobody but the gateway's user (and root) could
//! have put it there, checked the way OpenSSH's `StrictModes` checks a home directory:
//! the directory and every directory above it (as written and as resolved through
//! symbolic links) belong to root or to the gateway's user and are writable by nobody
//! else (unless sticky, like `/tmp`), symbolic links on the way included, and each file
//! is a private regular file of the gateway's user, checked again on the opened file.
//! The directory is resolved once at start and used by its resolved path (so no link
//! is followed afterwards), and checked again before every read and write.

use crate::config::{Acme, ConfigError};
use crate::tls::Served;
use instant_acme::AccountCredentials;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use std::path::{Path, PathBuf};

/// Largest cache file read.
const MAX_CACHE_FILE: u64 = 1 << 20;

pub(super) struct Cache {
    dir: PathBuf,
    account: PathBuf,
    certificate: PathBuf,
    /// The account belongs to this directory URL and no other.
    directory_url: String,
    /// This process's user (the owner of a file it creates); `None` off Unix.
    uid: Option<u32>,
}

impl Cache {
    /// The cache for `a`; learns this process's user by creating a file in the
    /// directory (checked by [`check_cache_dir`] just before).
    pub(super) fn new(a: &Acme) -> Result<Cache, String> {
        // Resolved once: later reads and writes never follow a symbolic link that someone
        // could repoint (the resolved path's directories are root's or ours alone).
        let dir = std::fs::canonicalize(&a.cache_dir.value).map_err(|e| format!("{}: {e}", a.cache_dir.value.display()))?;
        let server = short_hash(&[a.directory_url.value.as_bytes()]);
        let mut names: Vec<String> = a.domains.iter().map(|d| d.to_string()).collect();
        names.sort();
        let mut parts: Vec<&[u8]> = vec![a.directory_url.value.as_bytes()];
        parts.extend(names.iter().map(|n| n.as_bytes()));
        let set = short_hash(&parts);
        let uid = probe(&dir)?;
        let m = std::fs::symlink_metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        secure_dir(&dir, &m, uid)?;
        Ok(Cache {
            account: dir.join(format!("account-{server}.json")),
            certificate: dir.join(format!("certificate-{set}.pem")),
            directory_url: a.directory_url.value.clone(),
            dir,
            uid,
        })
    }

    /// The account for this directory URL, if one was created before (and names this
    /// directory URL: a file naming another CA is not used).
    pub(super) fn load_account(&self) -> Result<Option<AccountCredentials>, String> {
        self.verify_dir()?;
        let path = &self.account;
        if std::fs::symlink_metadata(path).is_err() {
            return Ok(None);
        }
        let data = self.read_private(path)?;
        // serde_json's errors name a position, never the content.
        let value: serde_json::Value =
            serde_json::from_slice(&data).map_err(|e| format!("unreadable account file {}: {e}", path.display()))?;
        if value.get("directory").and_then(|d| d.as_str()) != Some(self.directory_url.as_str()) {
            return Err(format!("{} belongs to another ACME directory", path.display()));
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| format!("unreadable account file {}: {e}", path.display()))
    }

    pub(super) fn save_account(&self, creds: &AccountCredentials) -> Result<(), String> {
        let data = serde_json::to_vec(creds).map_err(|e| format!("cannot encode the account: {e}"))?;
        self.write(&self.account, &data)
    }

    /// The cached certificate for these names, if any; an unreadable or untrusted one
    /// is an error (the caller orders a new one).
    pub(super) fn load_certificate(&self) -> Result<Option<Served>, String> {
        self.verify_dir()?;
        let path = &self.certificate;
        if std::fs::symlink_metadata(path).is_err() {
            return Ok(None);
        }
        let data = self.read_private(path)?;
        let chain = CertificateDer::pem_slice_iter(&data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("unreadable certificate in {}: {e:?}", path.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&data).map_err(|_| format!("no usable private key in {}", path.display()))?;
        Served::new(chain, key).map(Some).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Store a certificate chain (PEM) with its key (PEM) in one file.
    pub(super) fn save_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let mut data = String::with_capacity(chain_pem.len() + key_pem.len() + 1);
        data.push_str(key_pem);
        if !data.ends_with('\n') {
            data.push('\n');
        }
        data.push_str(chain_pem);
        self.write(&self.certificate, data.as_bytes())
    }

    pub(super) fn certificate_path(&self) -> &Path {
        &self.certificate
    }

    /// The directory is still one only we (and root) control.
    pub(super) fn verify_dir(&self) -> Result<(), String> {
        let m = std::fs::symlink_metadata(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        secure_dir(&self.dir, &m, self.uid)
    }

    /// Read a cached file, which must be a private regular file of this process's user:
    /// checked before opening (a FIFO would block the open) and again on the opened file.
    fn read_private(&self, path: &Path) -> Result<Vec<u8>, String> {
        use std::io::Read;
        let before = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.private_file(path, &before)?;
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let opened = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
        self.private_file(path, &opened)?;
        if opened.len() > MAX_CACHE_FILE {
            return Err(format!("{} is larger than {MAX_CACHE_FILE} bytes", path.display()));
        }
        let mut data = Vec::new();
        file.take(MAX_CACHE_FILE + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(data)
    }

    fn private_file(&self, path: &Path, m: &std::fs::Metadata) -> Result<(), String> {
        if !m.file_type().is_file() {
            return Err(format!("{} is not a regular file; the cache holds plain files", path.display()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if self.uid.is_some_and(|uid| m.uid() != uid) || m.mode() & 0o077 != 0 {
                return Err(format!(
                    "{} is not a private file of the gateway's user (uid {}, mode {:o}): not trusted",
                    path.display(),
                    m.uid(),
                    m.mode() & 0o777
                ));
            }
        }
        Ok(())
    }

    /// Write `data` to `path` through a private temporary file (a name no other writer
    /// uses: instances sharing the directory do not collide) and a rename.
    fn write(&self, path: &Path, data: &[u8]) -> Result<(), String> {
        self.verify_dir()?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("cache");
        let tmp = self.dir.join(format!(".{name}.{}.tmp", unique()));
        crate::fsutil::write_private(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
    }
}

/// A name part no other process picks: the process id and 64 random bits.
fn unique() -> String {
    let mut random = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut random);
    format!("{}-{:016x}", std::process::id(), u64::from_le_bytes(random))
}

/// 16 hex digits of SHA-256 over `parts` (each length-prefixed, so parts cannot run together).
fn short_hash(parts: &[&[u8]]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    crate::util::hex(&ctx.finish().as_ref()[..8])
}

/// `tls.acme.cache_dir` must be a directory only the gateway's user (and root) can
/// change (see the module's text). A missing one is created (mode 0700) when `create`;
/// else its nearest existing parent must be writable.
pub(crate) fn check_cache_dir(a: &Acme, origin: &str, create: bool) -> Result<(), ConfigError> {
    let loc = &a.cache_dir;
    let dir = &loc.value;
    let err = |m: String| loc.error(origin, m);
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(err(format!("{} is not a directory", dir.display()))),
        Ok(m) => {
            let uid = probe(dir).map_err(err)?;
            secure_dir(dir, &m, uid).map_err(err)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if create {
                let mut b = std::fs::DirBuilder::new();
                b.recursive(true);
                #[cfg(unix)]
                std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
                b.create(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
                let m = std::fs::metadata(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
                let uid = probe(dir).map_err(err)?;
                return secure_dir(dir, &m, uid).map_err(err);
            }
            let parent = dir
                .ancestors()
                .skip(1)
                .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
                .find(|p| p.exists())
                .unwrap_or(Path::new("."));
            probe(parent)
                .map(|_| ())
                .map_err(|e| err(format!("{} does not exist and cannot be created: {e}", dir.display())))
        }
        Err(e) => Err(err(format!("{}: {e}", dir.display()))),
    }
}

/// `dir` (metadata `m`, symbolic links followed) and every directory above it, as
/// written and as resolved: owned by root or `uid`, writable by nobody else unless
/// sticky; `dir` itself owned by `uid` and writable by its owner only.
fn secure_dir(dir: &Path, m: &std::fs::Metadata, uid: Option<u32>) -> Result<(), String> {
    if !m.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if m.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is writable by other users (mode {:o}): they could plant a certificate; use mode 0700",
                dir.display(),
                m.mode() & 0o777
            ));
        }
        if let Some(uid) = uid {
            if m.uid() != uid {
                return Err(format!(
                    "{} belongs to another user (uid {}): they could plant a certificate; it must belong to the gateway's user",
                    dir.display(),
                    m.uid()
                ));
            }
            let absolute = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            // A symbolic link on the way can be repointed by its owner (even in a sticky
            // directory such as /tmp): it, and every link its target goes through, must be
            // root's or ours.
            links_owned_by(&absolute, uid, 0).map_err(|m| format!("{}: {m}", dir.display()))?;
            let resolved = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for above in absolute.ancestors().skip(1).chain(resolved.ancestors().skip(1)) {
                let am = std::fs::metadata(above).map_err(|e| format!("{}: {e}", above.display()))?;
                let sticky = am.mode() & 0o1000 != 0;
                if am.uid() != 0 && am.uid() != uid {
                    return Err(format!(
                        "{} is inside {}, which belongs to another user (uid {}): they could replace it",
                        dir.display(),
                        above.display(),
                        am.uid()
                    ));
                }
                if am.mode() & 0o022 != 0 && !sticky {
                    return Err(format!(
                        "{} is inside {}, which other users can write (mode {:o}, not sticky): they could replace it",
                        dir.display(),
                        above.display(),
                        am.mode() & 0o7777
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Most symbolic links followed while checking a path (Linux follows 40).
const MAX_LINKS: usize = 40;

/// Every symbolic link on `path` (absolute), and on the targets of those links, belongs
/// to root or `uid`.
#[cfg(unix)]
fn links_owned_by(path: &Path, uid: u32, followed: usize) -> Result<usize, String> {
    use std::os::unix::fs::MetadataExt;
    let mut followed = followed;
    let steps: Vec<&Path> = path.ancestors().collect();
    for step in steps.into_iter().rev() {
        let Ok(m) = std::fs::symlink_metadata(step) else { continue };
        if !m.file_type().is_symlink() {
            continue;
        }
        if m.uid() != 0 && m.uid() != uid {
            return Err(format!(
                "the symbolic link {} belongs to another user (uid {}): they could repoint it",
                step.display(),
                m.uid()
            ));
        }
        followed += 1;
        if followed > MAX_LINKS {
            return Err("too many symbolic links".into());
        }
        let target = std::fs::read_link(step).map_err(|e| format!("{}: {e}", step.display()))?;
        let target = step.parent().unwrap_or(Path::new("/")).join(target);
        followed = links_owned_by(&target, uid, followed)?;
    }
    Ok(followed)
}

/// Whether a file can be created in `dir` (created and removed at once); the owner
/// the file got, which is this process's user (`None` off Unix).
fn probe(dir: &Path) -> Result<Option<u32>, String> {
    let p = dir.join(format!(".wsgate-probe-{}", unique()));
    match crate::fsutil::write_private(&p, b"") {
        Ok(()) => {
            #[cfg(unix)]
            let owner = std::fs::metadata(&p).ok().map(|m| std::os::unix::fs::MetadataExt::uid(&m));
            #[cfg(not(unix))]
            let owner = None;
            let _ = std::fs::remove_file(&p);
            Ok(owner)
        }
        Err(e) => Err(format!("{} is not writable: {e}", dir.display())),
    }
}
