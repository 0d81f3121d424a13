//! The control socket: a Unix socket (mode 0600) through which `wasm-echo
//! reload` asks a running server to reload. One JSON request per line, one
//! JSON answer per line. By default it lives at
//! `$XDG_RUNTIME_DIR/wasm-echo.sock` (or `/tmp/wasm-echo.sock` without a
//! runtime dir); `--control PATH` picks another.
//!
//! What a reload does is [`crate::reload`]'s business.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::reload::{Reloader, Swap};

/// What a client may ask.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Reload one listener or all, from a new plugin or their own files.
    Reload {
        /// The listener, or all of them.
        listener: Option<String>,
        /// A built-in's name or a component's path, or each listener's own.
        plugin: Option<String>,
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

/// Where the control socket lives unless `--control` says otherwise.
pub fn default_path() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
        .join("wasm-echo.sock")
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

    /// Answers requests until the process ends.
    pub async fn serve(self, reloader: Arc<Reloader>) {
        loop {
            match self.listener.accept().await {
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

async fn answer(stream: UnixStream, reloader: &Reloader) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("no request within 5s")?
        .context("reading the request")?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Reload { listener, plugin }) => match reloader
            .reload(listener.as_deref(), plugin.as_deref())
            .await
        {
            Ok(swaps) => Response {
                ok: true,
                swaps,
                error: None,
            },
            Err(error) => {
                tracing::warn!("reload failed, nothing changed: {error}");
                Response {
                    ok: false,
                    swaps: Vec::new(),
                    error: Some(error.to_string()),
                }
            }
        },
        Err(error) => Response {
            ok: false,
            swaps: Vec::new(),
            error: Some(format!("bad request: {error}")),
        },
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    tokio::time::timeout(ANSWER_TIMEOUT, write.write_all(text.as_bytes()))
        .await
        .context("the client did not read the answer within 5s")?
        .context("writing the answer")?;
    Ok(())
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
