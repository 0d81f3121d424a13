//! The content-addressed blob cache under `<cache-dir>/oci`: manifests,
//! configs and components kept by their sha256 digest (`blobs/sha256/HEX`),
//! and the digest each followed tag pointed to when last seen
//! (`tags/REGISTRY/REPOSITORY/TAG`), so that a server restarts with its
//! registry down.
//!
//! Nothing read from here is trusted: a blob is hashed on every read, and
//! one whose bytes no longer match its name is removed and fetched again.
//! Writes go to a temporary file that is renamed into place, so a reader
//! never sees half a blob.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::OciReference;
use crate::cache::CacheDir;

/// The blob cache.
#[derive(Clone, Debug)]
pub struct BlobStore {
    /// `<cache-dir>/oci`, private to the user like the cache itself.
    root: PathBuf,
}

/// `sha256:` and the hex digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in hash {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

impl BlobStore {
    /// The store in `cache`'s `oci` subdirectory.
    ///
    /// # Errors
    ///
    /// The subdirectory cannot be made or is not private.
    pub fn open(cache: &CacheDir) -> Result<Self, crate::cache::CacheError> {
        Ok(Self {
            root: cache.subdir("oci")?.path().to_owned(),
        })
    }

    /// Where the blob `digest` lives; `None` for a digest that is not a
    /// well-formed sha256 one (never a path outside the store).
    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| self.root.join("blobs/sha256").join(hex))
    }

    /// The blob `digest`, if it is here and its bytes still hash to it. A
    /// blob that does not is removed (and said so), so the caller fetches
    /// it again.
    pub fn get(&self, digest: &str) -> Option<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let bytes = fs::read(&path).ok()?;
        let actual = sha256(&bytes);
        if actual == digest {
            return Some(bytes);
        }
        tracing::warn!(
            "cached blob {} holds bytes whose digest is {actual}, not {digest}: removed, fetching it again",
            path.display()
        );
        let _ = fs::remove_file(&path);
        None
    }

    /// Keeps `bytes`, already verified to hash to `digest`.
    ///
    /// # Errors
    ///
    /// The file cannot be written.
    pub fn put(&self, digest: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self
            .blob_path(digest)
            .ok_or_else(|| io::Error::other(format!("`{digest}` is not a sha256 digest")))?;
        write_atomically(&path, bytes)
    }

    /// Where the last digest seen for a tag is remembered.
    fn tag_path(&self, reference: &OciReference, tag: &str) -> PathBuf {
        // `:` in HOST:PORT is a legal file name character; the repository
        // was checked for `..` when parsed.
        self.root
            .join("tags")
            .join(&reference.registry)
            .join(&reference.repository)
            .join(tag)
    }

    /// The digest `tag` pointed to when last seen, if it was.
    pub fn tag(&self, reference: &OciReference, tag: &str) -> Option<String> {
        let text = fs::read_to_string(self.tag_path(reference, tag)).ok()?;
        let digest = text.trim().to_owned();
        self.blob_path(&digest).map(|_| digest)
    }

    /// Remembers that `tag` points to `digest`.
    ///
    /// # Errors
    ///
    /// The file cannot be written.
    pub fn set_tag(&self, reference: &OciReference, tag: &str, digest: &str) -> io::Result<()> {
        write_atomically(&self.tag_path(reference, tag), digest.as_bytes())
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over
/// `path`: readers see the old file or the whole new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("no parent directory"))?;
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = fs::File::create(&temporary)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(error) = written.and_then(|()| fs::rename(&temporary, path)) {
        let _ = fs::remove_file(&temporary);
        return Err(error);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_whose_bytes_changed_is_not_trusted() {
        let dir = std::env::temp_dir().join(format!("wasm-echo-blobs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = BlobStore::open(&CacheDir::open(&dir).expect("cache")).expect("store");
        let digest = sha256(b"component");
        store.put(&digest, b"component").expect("written");
        assert_eq!(store.get(&digest).as_deref(), Some(&b"component"[..]));
        let path = store.blob_path(&digest).expect("path");
        fs::write(&path, b"tampered!").expect("tampered");
        assert_eq!(store.get(&digest), None);
        assert!(!path.exists(), "the corrupt blob is removed");
        assert_eq!(store.blob_path("sha256:../../etc"), None);
        fs::remove_dir_all(&dir).ok();
    }
}
