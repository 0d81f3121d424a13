//! Reading recordings back: the files `serve --record` wrote (the format
//! is in [`super`]), checked line by line. A file that is not a recording,
//! a line that is not JSON or lacks what an exchange needs, and a file that
//! ends mid-line (a server killed while writing, a copy cut short) are each
//! refused in one line naming the file and the line.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

use super::{Event, FORMAT_VERSION, HEADER_KEY, Outcome};
use crate::framing::Framing;
use crate::plugin::{Next, PluginConfig};

/// Why a recording cannot be read, naming where.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {reason}")]
pub struct ReadError {
    /// `FILE` or `FILE:LINE`.
    location: String,
    /// What is wrong there.
    reason: String,
}

/// One recorded exchange, with where it was read.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The file and line it came from, for the report.
    pub file: Arc<Path>,
    /// Its 1-based line.
    pub line: usize,
    /// The server run it belongs to: connection numbers are unique within
    /// one.
    pub run: Arc<str>,
    /// When the call began.
    pub time: SystemTime,
    /// The listener (tenant) it came to.
    pub listener: Arc<str>,
    /// Which exchange.
    pub event: Event,
    /// Who sent it.
    pub peer: SocketAddr,
    /// The version that answered.
    pub version: Arc<str>,
    /// The bytes the plugin was given.
    pub input: Vec<u8>,
    /// What it decided.
    pub outcome: Outcome,
}

/// Every exchange of some recording files, in the order given, and each
/// listener's plugin settings as its headers say.
#[derive(Debug, Default)]
pub struct Recording {
    /// The exchanges, in file order.
    pub exchanges: Vec<Exchange>,
    /// The settings each listener's plugin read, by listener.
    pub plugin_config: BTreeMap<String, PluginConfig>,
}

impl Recording {
    /// Reads `files` in the order given (oldest first, for rotated files:
    /// `rec.jsonl.2 rec.jsonl.1 rec.jsonl`).
    ///
    /// # Errors
    ///
    /// A [`ReadError`] for the first thing wrong, naming the file and line.
    pub fn read(files: &[PathBuf]) -> Result<Self, ReadError> {
        let mut recording = Self::default();
        for file in files {
            recording.read_file(file)?;
        }
        Ok(recording)
    }

    fn read_file(&mut self, path: &Path) -> Result<(), ReadError> {
        let file_error = |reason: String| ReadError {
            location: path.display().to_string(),
            reason,
        };
        // A FIFO or a device would be read forever.
        let meta = std::fs::metadata(path).map_err(|error| file_error(error.to_string()))?;
        if !meta.is_file() {
            return Err(file_error("not a regular file".to_owned()));
        }
        let file = std::fs::File::open(path).map_err(|error| file_error(error.to_string()))?;
        let mut reader = BufReader::new(file);
        let shared: Arc<Path> = path.into();
        let mut bytes = Vec::new();
        let mut number = 0;
        let mut header: Option<(Arc<str>, Arc<str>)> = None;
        loop {
            bytes.clear();
            let read = reader
                .read_until(b'\n', &mut bytes)
                .map_err(|error| file_error(error.to_string()))?;
            if read == 0 {
                break;
            }
            number += 1;
            let at = |reason: String| ReadError {
                location: format!("{}:{number}", path.display()),
                reason,
            };
            let complete = bytes.last() == Some(&b'\n');
            let parsed = serde_json::from_slice::<Value>(&bytes);
            let object = match parsed {
                Ok(Value::Object(object)) => object,
                Err(_) if !complete => {
                    return Err(at(
                        "truncated: the file ends in the middle of a record (a server \
                         stopped while writing, or a copy cut short)"
                            .to_owned(),
                    ));
                }
                Err(error) => return Err(at(format!("corrupt record: not JSON ({error})"))),
                Ok(_) => return Err(at("corrupt record: not a JSON object".to_owned())),
            };
            match &header {
                None => header = Some(self.header(&object).map_err(at)?),
                Some((run, listener)) => {
                    let exchange = exchange(&object, run, listener)
                        .map_err(|reason| at(format!("corrupt record: {reason}")))?;
                    self.exchanges.push(Exchange {
                        file: shared.clone(),
                        line: number,
                        ..exchange
                    });
                }
            }
        }
        if header.is_none() {
            return Err(file_error(
                "empty: not a wasm-echo recording (no header line)".to_owned(),
            ));
        }
        Ok(())
    }

    /// Checks a header line; returns its run and listener.
    fn header(&mut self, object: &Map<String, Value>) -> Result<(Arc<str>, Arc<str>), String> {
        let Some(format) = object.get(HEADER_KEY) else {
            return Err(format!(
                "not a wasm-echo recording: its first line has no `{HEADER_KEY}` header"
            ));
        };
        if format.as_u64() != Some(FORMAT_VERSION) {
            return Err(format!(
                "recording format {format}; this wasm-echo reads format {FORMAT_VERSION}"
            ));
        }
        let listener = text(object, "listener")?;
        let run = text(object, "run")?;
        if let Some(Value::Object(settings)) = object.get("plugin-config") {
            let config = settings
                .iter()
                .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
                .collect();
            self.plugin_config.insert(listener.to_owned(), config);
        }
        Ok((run.into(), listener.into()))
    }
}

/// The exchange a line describes (its file and line left to the caller).
fn exchange(
    object: &Map<String, Value>,
    run: &Arc<str>,
    header_listener: &Arc<str>,
) -> Result<Exchange, String> {
    let time = text(object, "time")?;
    let time = humantime::parse_rfc3339(time)
        .map_err(|error| format!("`time` is not an RFC 3339 time: {error}"))?;
    let listener = text(object, "listener")?;
    let listener = if listener == &**header_listener {
        header_listener.clone()
    } else {
        listener.into()
    };
    let peer = address(object, "peer")?;
    let conn = || {
        object
            .get("conn")
            .and_then(Value::as_u64)
            .ok_or_else(|| "`conn` is missing or not a number".to_owned())
    };
    let event = match text(object, "kind")? {
        "datagram" => Event::Datagram,
        "open" => Event::Open {
            conn: conn()?,
            local: address(object, "local")?,
            framing: match text(object, "framing")? {
                "raw" => Framing::Raw,
                "lines" => Framing::Lines,
                "length-prefixed" => Framing::LengthPrefixed,
                other => return Err(format!("unknown framing `{other}`")),
            },
        },
        "message" => Event::Message { conn: conn()? },
        other => return Err(format!("unknown kind `{other}`")),
    };
    let input = match event {
        Event::Open { .. } => Vec::new(),
        _ => bytes(text(object, "in")?, "in")?,
    };
    let outcome = match object.get("failed") {
        Some(kind) => Outcome::Failed {
            kind: kind
                .as_str()
                .ok_or_else(|| "`failed` is not a string".to_owned())?
                .to_owned(),
            error: object
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        },
        None => Outcome::Decided {
            reply: match object.get("reply") {
                None | Some(Value::Null) => None,
                Some(Value::String(reply)) => Some(bytes(reply, "reply")?),
                Some(_) => return Err("`reply` is neither base64 nor null".to_owned()),
            },
            next: match text(object, "next")? {
                "carry-on" => Next::CarryOn,
                "close-connection" => Next::CloseConnection,
                "stop-listener" => Next::StopListener,
                other => return Err(format!("unknown next `{other}`")),
            },
        },
    };
    Ok(Exchange {
        file: Path::new("").into(),
        line: 0,
        run: run.clone(),
        time,
        listener,
        event,
        peer,
        version: text(object, "version")?.into(),
        input,
        outcome,
    })
}

/// A string field.
fn text<'a>(object: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match object.get(key) {
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(format!("`{key}` is not a string")),
        None => Err(format!("`{key}` is missing")),
    }
}

/// A socket address field.
fn address(object: &Map<String, Value>, key: &str) -> Result<SocketAddr, String> {
    text(object, key)?
        .parse()
        .map_err(|error| format!("`{key}` is not an address: {error}"))
}

/// A base64 field.
fn bytes(text: &str, key: &str) -> Result<Vec<u8>, String> {
    BASE64
        .decode(text)
        .map_err(|error| format!("`{key}` is not base64: {error}"))
}
