//! Small file helpers.

use std::{
    io::{Read, Write},
    path::Path,
};

/// Create `path` with `data`, readable by the owner only (mode 0600 on Unix).
/// Fails if the file already exists, so a secret is never silently replaced.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Largest config file read.
pub(crate) const MAX_CONFIG_FILE: u64 = 16 << 20;
/// Largest certificate, key, secret or JWKS file read.
pub(crate) const MAX_KEY_FILE: u64 = 16 << 20;
/// Largest list file read (firewall rules, revoked `jti`s).
pub(crate) const MAX_LIST_FILE: u64 = 64 << 20;

/// Read `path` whole, refusing anything but a regular file (a FIFO would block the
/// reload, `/dev/zero` never ends) and a file larger than `max` bytes.
pub(crate) fn read_limited(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let not_a_file = || std::io::Error::other("not a regular file");
    // Checked before opening: opening a FIFO blocks until a writer comes.
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_a_file());
    }
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(not_a_file()); // swapped between the two checks
    }
    let mut data = Vec::new();
    f.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(data)
}

/// [`read_limited`], as UTF-8 text.
pub(crate) fn read_text(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, max)?).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_limited(&f, 5).unwrap(), b"12345");
        assert!(read_limited(&f, 4).unwrap_err().to_string().contains("larger than 4 bytes"));
        assert!(read_limited(dir.path(), 5).unwrap_err().to_string().contains("not a regular file"));
        assert!(
            read_limited(Path::new("/dev/zero"), 5)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        let fifo = dir.path().join("fifo");
        if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
            // Would block forever if opened.
            assert!(read_limited(&fifo, 5).unwrap_err().to_string().contains("not a regular file"));
        }
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert_eq!(read_text(&f, 5).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}
