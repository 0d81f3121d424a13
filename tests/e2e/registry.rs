//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF
//! distribution registry), started on 127.0.0.1 with a config file of the
//! test's own and its storage in a scratch folder, and killed when its
//! guard is dropped. The package's own service (which would listen on all
//! interfaces) is never started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{free_port, poll_until, scratch_file};

/// Where Debian installs the registry.
const REGISTRY: &str = "/usr/bin/docker-registry";

/// A user the auth test's registry knows.
pub const USER: &str = "tester";
/// That user's password.
pub const PASSWORD: &str = "s3cret-for-tests";

/// A running registry, killed on drop.
pub struct Registry {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its storage root (`docker/registry/v2/...` inside).
    pub storage: PathBuf,
    /// Its config file, to start it again on the same storage.
    config: PathBuf,
}

/// Fails with how to get it when this machine has no registry.
fn require_registry() {
    assert!(
        Path::new(REGISTRY).exists(),
        "no {REGISTRY}: run scripts/install-debian.sh (Debian's docker-registry), or set \
         WASM_ECHO_SKIP_TESTS=registry to report this test as ignored"
    );
}

impl Registry {
    /// A registry anyone may pull from and push to.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A registry that wants [`USER`] and [`PASSWORD`] (basic auth, over
    /// an htpasswd file written with Debian's `htpasswd`).
    pub fn start_with_auth() -> Self {
        Self::start_with(true)
    }

    fn start_with(auth: bool) -> Self {
        require_registry();
        let addr = free_port();
        let config = scratch_file("registry.yml", b"");
        let dir = config.parent().expect("scratch folder").to_owned();
        let storage = dir.join("storage");
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        if auth {
            let htpasswd = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("htpasswd runs (apache2-utils, scripts/install-debian.sh)");
            assert!(htpasswd.status.success(), "htpasswd failed");
            let file = dir.join("htpasswd");
            std::fs::write(&file, &htpasswd.stdout).expect("htpasswd file");
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: wasm-echo-tests\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(&config, yaml).expect("registry config");
        let mut registry = Self {
            child: None,
            addr,
            storage,
            config,
        };
        registry.resume();
        registry
    }

    /// Starts it (again) on its storage, and waits until `/v2/` answers.
    pub fn resume(&mut self) {
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry starts");
        self.child = Some(child);
        let addr = self.addr;
        poll_until(&format!("the registry answers on {addr}"), || {
            answers(addr).then_some(())
        });
    }

    /// Stops it (its storage stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `oci://127.0.0.1:PORT/REPOSITORY:TAG`.
    pub fn reference(&self, repository: &str, tag: &str) -> String {
        format!("oci://{}/{repository}:{tag}", self.addr)
    }

    /// The file holding blob `digest` (`sha256:HEX`) in its storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether something answers HTTP at `addr`'s `/v2/` (200, or 401 for a
/// registry that wants credentials).
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok()
        && (head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.1 401"))
}
