//! The control socket: a Unix socket (mode 0600) through which `wasm-echo
//! reload` asks a running server to reload. One JSON request per line, one
//! JSON answer per line.
//!
//! Every server has a socket of its own. By default it lives in the
//! control folder ([`default_dir`]: `$XDG_RUNTIME_DIR/wasm-echo`, or
//! `/tmp/wasm-echo-UID`, mode 0700), named for the server's configuration
//! file (or `serve`) and its process id, so two servers on one machine never
//! share one; `--control PATH` picks another. A client without `--control`
//! looks in that folder ([`find`]): one live server there is the one meant;
//! with several, it names them all and asks which.
//!
//! It also carries `wasm-echo rollout start|status|promote|abort`; what a
//! reload and a rollout do is [`crate::reload`]'s and [`crate::rollout`]'s
//! business.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::plugin::PluginSource;
use crate::reload::{Reloader, Swap};

/// What a client may ask.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Reload one listener or all, from a new plugin or their own files.
    Reload {
        /// The listener, or all of them.
        listener: Option<String>,
        /// A built-in's name or a component's absolute path, or each
        /// listener's own.
        plugin: Option<String>,
    },
    /// Start a rollout of a candidate on one listener.
    RolloutStart {
        /// The listener.
        listener: String,
        /// The candidate (a built-in's name or an absolute path) and the
        /// settings, as a `[listeners.NAME.rollout]` table gives them.
        plan: crate::rollout::RawRollout,
    },
    /// Report one listener's rollout, or every listener's.
    RolloutStatus {
        /// The listener, or all of them.
        listener: Option<String>,
    },
    /// Promote a listener's candidate now, whatever its step.
    RolloutPromote {
        /// The listener.
        listener: String,
    },
    /// Send all of a listener's traffic back to its stable version.
    RolloutAbort {
        /// The listener.
        listener: String,
    },
}

/// The server's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// What each listener's reload did.
    #[serde(default)]
    pub swaps: Vec<Swap>,
    /// The rollouts a `rollout` request concerned, as they stand.
    #[serde(default)]
    pub rollouts: Vec<crate::rollout::Report>,
    /// Why not, when `ok` is false.
    pub error: Option<String>,
}

/// The longest request line the server reads.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer: one that never reads
/// must not hold its task and socket for good.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The folder every server's default control socket is made in.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("wasm-echo"),
        None => PathBuf::from(format!(
            "/tmp/wasm-echo-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}

/// This server's default control socket: in [`default_dir`], named for its
/// configuration file (`serve` without one) and its process id.
pub fn default_path(config: Option<&Path>) -> PathBuf {
    let name = config.and_then(Path::file_stem).map_or_else(
        || "serve".to_owned(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    default_dir().join(format!("{name}-{}.sock", std::process::id()))
}

/// Makes the control folder, or checks the one there: it must be this
/// user's and no one else's, or another user could answer in a server's
/// place.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    let metadata = std::fs::symlink_metadata(dir)?;
    let mine = metadata.uid() == rustix::process::getuid().as_raw();
    if !metadata.is_dir() || !mine || metadata.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a folder of this user's alone (mode 0700); remove it or give --control",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Which server a client without `--control` means: the one live control
/// socket in [`default_dir`]. Sockets left behind by servers that are gone
/// are removed on the way.
///
/// # Errors
///
/// No server is running, or several are (the error names them all).
pub fn find() -> anyhow::Result<PathBuf> {
    let dir = default_dir();
    let entries = std::fs::read_dir(&dir).map_err(|error| {
        anyhow::anyhow!(
            "no wasm-echo server found: cannot read {}: {error}; is one running? (or give --control PATH)",
            dir.display()
        )
    })?;
    let mut live: Vec<PathBuf> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|ext| ext != "sock") {
            continue;
        }
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => live.push(path),
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => {}
        }
    }
    live.sort();
    match live.len() {
        0 => anyhow::bail!(
            "no wasm-echo server found: no live control socket in {}; is one running? (or give --control PATH)",
            dir.display()
        ),
        1 => Ok(live.remove(0)),
        n => anyhow::bail!(
            "{n} wasm-echo servers are running; say which with --control: {}",
            live.iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The bound control socket; the file is removed when this is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket file but never a live one.
    ///
    /// # Errors
    ///
    /// Another server answers on `path`, or the socket cannot be made.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent()
            && dir == default_dir()
        {
            prepare_dir(dir)?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another wasm-echo server answers there",
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers requests until `stop`.
    pub async fn serve(self, reloader: Arc<Reloader>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let reloader = reloader.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, &reloader).await {
                            tracing::warn!("control request failed: {error:#}");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!("control socket accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: UnixStream, reloader: &Arc<Reloader>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("no request within 5s")?
        .context("reading the request")?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Reload { listener, plugin }) => reload(reloader, listener, plugin).await,
        Ok(rollout) => match crate::rollout::answer(reloader, rollout).await {
            Ok(rollouts) => Response {
                ok: true,
                swaps: Vec::new(),
                rollouts,
                error: None,
            },
            Err(error) => failed(error.to_string()),
        },
        Err(error) => failed(format!("bad request: {error}")),
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    tokio::time::timeout(ANSWER_TIMEOUT, write.write_all(text.as_bytes()))
        .await
        .context("the client did not read the answer within 5s")?
        .context("writing the answer")?;
    Ok(())
}

/// A refusal.
fn failed(error: String) -> Response {
    Response {
        ok: false,
        swaps: Vec::new(),
        rollouts: Vec::new(),
        error: Some(error),
    }
}

async fn reload(reloader: &Reloader, listener: Option<String>, plugin: Option<String>) -> Response {
    let plugin = match plugin.as_deref().map(PluginSource::parse).transpose() {
        Ok(plugin) => plugin,
        Err(error) => return failed(error.to_string()),
    };
    match reloader.reload(listener.as_deref(), plugin.as_ref()).await {
        Ok(swaps) => Response {
            ok: true,
            swaps,
            rollouts: Vec::new(),
            error: None,
        },
        Err(error) => {
            tracing::warn!("reload failed, nothing changed: {error}");
            failed(error.to_string())
        }
    }
}

/// Sends `request` to the server at `path` and returns its answer.
///
/// # Errors
///
/// No server there, or a garbled answer.
pub async fn send(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "no wasm-echo server answers on {} (is it running? does it use --control?)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write
        .write_all(text.as_bytes())
        .await
        .context("sending the request")?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .context("reading the answer")?;
    serde_json::from_str(&line).with_context(|| format!("garbled answer from {}", path.display()))
}
