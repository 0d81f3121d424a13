//! Reading the files an operator names (plugin components, configuration
//! files) without trusting the name: a typo can point at `/dev/zero`, a
//! FIFO, a directory or a file on a hung network mount. Only regular files
//! are read, never more than a stated size, and never for longer than a
//! stated time; anything else is refused with an error that says which.
//!
//! What the bytes mean is the caller's business.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How long reading one file may take. A local file of the largest allowed
/// size reads in well under a second; a path on a hung mount or a device
/// that never answers is given up on after this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// It could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It is a directory, a device, a FIFO or a socket.
    #[error("{} is {kind}, not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead, with its article ("a directory").
        kind: &'static str,
    },
    /// It is larger than the limit.
    #[error("{} is {size} bytes, more than the limit of {limit} bytes{hint}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// How large it is (at least).
        size: u64,
        /// The limit.
        limit: u64,
        /// What raises the limit, if anything does.
        hint: &'static str,
    },
    /// Reading it did not finish in time.
    #[error("reading {} did not finish within {}", path.display(), humantime::format_duration(*timeout))]
    TimedOut {
        /// The file.
        path: PathBuf,
        /// How long was waited.
        timeout: Duration,
    },
}

/// Reads the regular file at `path`, refusing one larger than `limit`
/// bytes (`hint` says how to raise it), and giving up after `timeout`.
///
/// The read runs on a thread of its own, so that a read that never returns
/// (a hung mount) costs a parked thread, not the caller.
///
/// # Errors
///
/// An [`InputError`] saying why nothing was read.
pub fn read(
    path: &Path,
    limit: u64,
    hint: &'static str,
    timeout: Duration,
) -> Result<Vec<u8>, InputError> {
    let (sender, receiver) = mpsc::sync_channel(1);
    let owned = path.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("read file".into())
        .spawn(move || {
            let _ = sender.send(read_here(&owned, limit, hint));
        });
    if let Err(source) = reader {
        return Err(InputError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    match receiver.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(InputError::TimedOut {
            path: path.to_path_buf(),
            timeout,
        }),
    }
}

/// [`read`], on the calling thread and without a time limit.
fn read_here(path: &Path, limit: u64, hint: &'static str) -> Result<Vec<u8>, InputError> {
    let io_error = |source| InputError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Checked before opening, so that no device is ever opened, and again
    // on the open file, in case the path changed in between.
    check_kind(path, &std::fs::metadata(path).map_err(io_error)?)?;
    // Non-blocking, so that a FIFO swapped in after the check cannot hang
    // the open; it is refused by the second check.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io_error)?;
    let metadata = file.metadata().map_err(io_error)?;
    check_kind(path, &metadata)?;
    let too_large = |size| InputError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
        hint,
    };
    if metadata.len() > limit {
        return Err(too_large(metadata.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    // One byte past the limit tells a file that grew since the check.
    let read = File::take(file, limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if read as u64 > limit {
        return Err(too_large(read as u64));
    }
    Ok(bytes)
}

/// Refuses anything but a regular file, naming what it is.
fn check_kind(path: &Path, metadata: &std::fs::Metadata) -> Result<(), InputError> {
    let kind = metadata.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(InputError::NotAFile {
        path: path.to_path_buf(),
        kind: what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wasm-echo-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("scratch file");
        path
    }

    #[test]
    fn a_regular_file_within_the_limit_is_read_whole() {
        let path = scratch("small", b"0123456789");
        let bytes = read(&path, 10, "", READ_TIMEOUT).expect("read");
        assert_eq!(bytes, b"0123456789");
    }

    #[test]
    fn a_file_over_the_limit_is_refused() {
        let path = scratch("large", b"0123456789");
        let error = read(&path, 9, "; raise it", READ_TIMEOUT).expect_err("too large");
        assert!(matches!(
            error,
            InputError::TooLarge {
                size: 10,
                limit: 9,
                ..
            }
        ));
        assert!(error.to_string().ends_with("; raise it"), "{error}");
    }

    /// Regression: `plugin = "/dev/zero"` grew the process until the
    /// kernel killed it.
    #[test]
    fn devices_and_directories_are_refused_without_reading() {
        let error = read(Path::new("/dev/zero"), 1 << 30, "", READ_TIMEOUT).expect_err("device");
        assert_eq!(
            error.to_string(),
            "/dev/zero is a character device, not a regular file"
        );
        let error = read(Path::new("/"), 1 << 30, "", READ_TIMEOUT).expect_err("directory");
        assert!(matches!(
            error,
            InputError::NotAFile {
                kind: "a directory",
                ..
            }
        ));
    }
}
