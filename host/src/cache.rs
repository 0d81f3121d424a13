//! The server's cache directory: where what it fetched or compiled is kept
//! between runs, so that a restart or a reload back to a version already
//! seen does not pay for it again.
//!
//! This module owns only the directory itself: where it is by default, and
//! the rule that it is private to the user running the server. Compiled
//! machine code is loaded from it and run, so a directory another user can
//! write would let that user run code inside the server. What goes in which
//! subdirectory is the business of whoever fills it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The name of the directory under the user's cache directory.
const APPLICATION: &str = "wasm-echo";

/// Why a cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cache directory {}: {reason}", path.display())]
pub struct CacheError {
    /// The directory in question.
    pub path: PathBuf,
    /// What is wrong with it, in plain words.
    pub reason: String,
}

/// A directory that exists, belongs to the user running the server and
/// that no one else can write.
#[derive(Clone, Debug)]
pub struct CacheDir {
    path: PathBuf,
}

impl CacheDir {
    /// The cache directory used unless `cache-dir` says otherwise:
    /// `$XDG_CACHE_HOME/wasm-echo`, or `~/.cache/wasm-echo`. `None` when
    /// the environment names no home at all (a bare service account).
    pub fn default_path() -> Option<PathBuf> {
        dirs::cache_dir().map(|dir| dir.join(APPLICATION))
    }

    /// Opens `path`, making it (mode 0700) and its missing parents if need
    /// be.
    ///
    /// # Errors
    ///
    /// A [`CacheError`] when it cannot be made, is not a directory, belongs
    /// to another user, or can be written by its group or by anyone.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        make_private(path)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Opens the [default](CacheDir::default_path) cache directory, for
    /// whatever was not told where its cache is. `None` when there is no
    /// default or it cannot be used: that is said once in the log, and the
    /// caller runs without a cache (slower, never wrong).
    pub fn open_default() -> Option<Self> {
        let Some(dir) = Self::default_path() else {
            tracing::warn!("no cache: the environment names no home directory (set --cache-dir)");
            return None;
        };
        Self::open(&dir)
            .inspect_err(|error| tracing::warn!("no cache: {error} (set --cache-dir)"))
            .ok()
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory, `name`, held to the same rule as the cache itself.
    ///
    /// # Errors
    ///
    /// As for [`CacheDir::open`].
    pub fn subdir(&self, name: &str) -> Result<Self, CacheError> {
        Self::open(&self.path.join(name))
    }
}

/// Makes `path` if it is missing, then checks it is private.
fn make_private(path: &Path) -> Result<(), CacheError> {
    let error = |reason: String| CacheError {
        path: path.to_owned(),
        reason,
    };
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(|e| error(describe(&e)))?;
    let metadata = fs::metadata(path).map_err(|e| error(describe(&e)))?;
    if !metadata.is_dir() {
        return Err(error("not a directory".into()));
    }
    check_owner(&metadata).map_err(error)
}

/// Refuses a directory that another user owns or can write.
#[cfg(target_os = "linux")]
fn check_owner(metadata: &fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    if metadata.uid() != me {
        return Err(format!(
            "belongs to user {}, not to this server's user ({me}); compiled code is never loaded from a place another user can write",
            metadata.uid()
        ));
    }
    if metadata.mode() & 0o022 != 0 {
        return Err(format!(
            "can be written by others (mode {:o}); compiled code is never loaded from a place another user can write: chmod go-w it",
            metadata.mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn check_owner(_metadata: &fs::Metadata) -> Result<(), String> {
    Ok(())
}

fn describe(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::AlreadyExists => "not a directory".into(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("wasm-echo-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_missing_directory_is_made_private() {
        let dir = scratch("made");
        let cache = CacheDir::open(&dir.join("a/b")).expect("opens");
        let sub = cache.subdir("compiled").expect("subdir");
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let mode = fs::metadata(sub.path()).expect("exists").mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        fs::remove_dir_all(&dir).ok();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("shared");
        fs::create_dir_all(&dir).expect("made");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        let error = CacheDir::open(&dir).expect_err("refused");
        assert!(
            error.to_string().contains("can be written by others"),
            "{error}"
        );
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_file_in_the_way_is_refused() {
        let dir = scratch("file");
        fs::create_dir_all(&dir).expect("made");
        let file = dir.join("cache");
        fs::write(&file, b"").expect("written");
        let error = CacheDir::open(&file).expect_err("refused");
        assert!(error.to_string().contains("not a directory"), "{error}");
        fs::remove_dir_all(&dir).ok();
    }
}
