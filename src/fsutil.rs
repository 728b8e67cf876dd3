//! Small file helpers.

use std::{io::Write, path::Path};

/// Create `path` with `data`, readable by the owner only (mode 0600 on Unix).
/// Fails if the file already exists, so a secret is never silently replaced.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}
