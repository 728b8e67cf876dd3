//! `cache_dir`: the ACME account (its key included) per directory URL, and the
//! certificate with its key per directory URL and set of names, so a restart serves
//! the cached certificate without asking the ACME server, and a config naming other
//! names or another server never picks up the wrong one.
//!
//! Files are mode 0600 in a directory of mode 0700, written to a temporary file and
//! renamed, so a crash leaves the old file or the new one, never half of one; the
//! certificate and its key share one file, so they cannot get out of step.

use crate::config::{Acme, ConfigError};
use crate::tls::Served;
use instant_acme::AccountCredentials;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use std::path::{Path, PathBuf};

/// Largest cache file read.
const MAX_CACHE_FILE: u64 = 1 << 20;

pub struct Cache {
    dir: PathBuf,
    account: PathBuf,
    certificate: PathBuf,
}

impl Cache {
    pub fn new(a: &Acme) -> Cache {
        let dir = a.cache_dir.value.clone();
        let server = short_hash(&[a.directory_url.value.as_bytes()]);
        let mut names: Vec<String> = a.domains.iter().map(|d| d.to_string()).collect();
        names.sort();
        let mut parts: Vec<&[u8]> = vec![a.directory_url.value.as_bytes()];
        parts.extend(names.iter().map(|n| n.as_bytes()));
        let set = short_hash(&parts);
        Cache {
            account: dir.join(format!("account-{server}.json")),
            certificate: dir.join(format!("certificate-{set}.pem")),
            dir,
        }
    }

    /// The account for this directory URL, if one was created before.
    pub fn load_account(&self) -> Result<Option<AccountCredentials>, String> {
        if !self.account.exists() {
            return Ok(None);
        }
        self.owned_like_the_directory(&self.account)?;
        let data = crate::fsutil::read_limited(&self.account, MAX_CACHE_FILE)
            .map_err(|e| format!("cannot read {}: {e}", self.account.display()))?;
        // serde_json's error names a position, never the content.
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| format!("unreadable account file {}: {e}", self.account.display()))
    }

    pub fn save_account(&self, creds: &AccountCredentials) -> Result<(), String> {
        let data = serde_json::to_vec(creds).map_err(|e| format!("cannot encode the account: {e}"))?;
        self.write(&self.account, &data)
    }

    /// The cached certificate for these names, if any; an unreadable one is an error
    /// (the caller orders a new one).
    pub fn load_certificate(&self) -> Result<Option<Served>, String> {
        if !self.certificate.exists() {
            return Ok(None);
        }
        let path = &self.certificate;
        self.owned_like_the_directory(path)?;
        let data = crate::fsutil::read_limited(path, MAX_CACHE_FILE).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let chain = CertificateDer::pem_slice_iter(&data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("unreadable certificate in {}: {e:?}", path.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&data).map_err(|_| format!("no usable private key in {}", path.display()))?;
        Served::new(chain, key).map(Some).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Store a certificate chain (PEM) with its key (PEM) in one file.
    pub fn save_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let mut data = String::with_capacity(chain_pem.len() + key_pem.len() + 1);
        data.push_str(key_pem);
        if !data.ends_with('\n') {
            data.push('\n');
        }
        data.push_str(chain_pem);
        self.write(&self.certificate, data.as_bytes())
    }

    /// A cached file must belong to the directory's owner (checked to be this process's
    /// user at start) and be readable by nobody else: anything else was planted.
    fn owned_like_the_directory(&self, path: &Path) -> Result<(), String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let dir = std::fs::metadata(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
            let file = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if file.file_type().is_symlink() {
                return Err(format!("{} is a symbolic link; the cache holds plain files", path.display()));
            }
            if file.uid() != dir.uid() || file.mode() & 0o077 != 0 {
                return Err(format!(
                    "{} is not a private file of the cache directory's owner (mode {:o}): not trusted",
                    path.display(),
                    file.mode() & 0o777
                ));
            }
        }
        Ok(())
    }

    pub fn certificate_path(&self) -> &Path {
        &self.certificate
    }

    /// Write `data` to `path` through a private temporary file and a rename.
    fn write(&self, path: &Path, data: &[u8]) -> Result<(), String> {
        let tmp = self
            .dir
            .join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("cache")));
        let _ = std::fs::remove_file(&tmp);
        crate::fsutil::write_private(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
    }
}

/// 16 hex digits of SHA-256 over `parts` (each length-prefixed, so parts cannot run together).
fn short_hash(parts: &[&[u8]]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    ctx.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `tls.acme.cache_dir` must be a directory the gateway can write and nobody else can
/// (a file planted there would be served). A missing one is created (mode 0700) when
/// `create`, else its nearest existing parent must be writable.
pub fn check_cache_dir(a: &Acme, origin: &str, create: bool) -> Result<(), ConfigError> {
    let loc = &a.cache_dir;
    let dir = &loc.value;
    let err = |m: String| loc.error(origin, m);
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            // Follow a symlink to a directory, as a system's /var/lib links often do.
            let target = std::fs::metadata(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
            check_existing(dir, &target).map_err(err)
        }
        Ok(m) => check_existing(dir, &m).map_err(err),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if create {
                let mut b = std::fs::DirBuilder::new();
                b.recursive(true);
                #[cfg(unix)]
                std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
                b.create(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
                let created = std::fs::metadata(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
                return check_existing(dir, &created).map_err(err);
            }
            let parent = dir
                .ancestors()
                .skip(1)
                .find(|p| p.as_os_str().is_empty() || p.exists())
                .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
                .unwrap_or(Path::new("."));
            probe(parent)
                .map(|_| ())
                .map_err(|e| err(format!("{} does not exist and cannot be created: {e}", dir.display())))
        }
        Err(e) => Err(err(format!("{}: {e}", dir.display()))),
    }
}

/// An existing cache directory: ours (the owner of a file we create in it), writable by
/// nobody else, inside a parent where nobody else can swap it (not writable by others,
/// or sticky like /tmp).
fn check_existing(dir: &Path, m: &std::fs::Metadata) -> Result<(), String> {
    if !m.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let ours = probe(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mode = m.mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "{} is writable by other users (mode {:o}): they could plant a certificate; use mode 0700",
                dir.display(),
                mode & 0o777
            ));
        }
        if ours.is_some_and(|uid| uid != m.uid()) {
            return Err(format!(
                "{} belongs to another user (uid {}): they could plant a certificate; it must belong to the gateway's user",
                dir.display(),
                m.uid()
            ));
        }
        let parent = std::fs::canonicalize(dir)
            .ok()
            .and_then(|d| d.parent().map(Path::to_path_buf))
            .and_then(|p| std::fs::metadata(&p).ok().map(|m| (p, m)));
        if let Some((p, pm)) = parent {
            if pm.mode() & 0o002 != 0 && pm.mode() & 0o1000 == 0 {
                return Err(format!(
                    "{} is in {}, which every user can write (no sticky bit): the directory could be replaced",
                    dir.display(),
                    p.display()
                ));
            }
        }
    }
    Ok(())
}

/// Whether a file can be created in `dir` (created and removed at once); the owner
/// the file got, which is this process's user.
fn probe(dir: &Path) -> Result<Option<u32>, String> {
    let mut unique = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut unique);
    let p = dir.join(format!(".wsgate-probe-{}-{}", std::process::id(), u64::from_le_bytes(unique)));
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
