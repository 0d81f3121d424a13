//! What a server runs: its listeners (tenants), each with a plugin, its
//! addresses, its framing and its limits. A configuration comes from the
//! command line (one listener) or from a TOML file (any number). Both are
//! first a [`RawConfig`], the settings as given, and both go through one
//! resolution ([`RawConfig::resolve`]) with the defaults and the checks, so
//! a flag gets exactly the error a file gets for the same mistake: one line
//! naming where (`FILE: listeners.NAME.KEY` or `--KEY`) and why.
//!
//! Loading the plugins a configuration names, and binding its addresses,
//! are the server's business.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::framing::{DEFAULT_MAX_MESSAGE, Framing};
use crate::plugin::{Limits, LogBudget, PluginConfig, PluginSource, PoolSize};
use crate::recording::RecordSettings;
use crate::tenant::MigrationFailurePolicy;

/// The largest state handed between versions unless `max-state` says
/// otherwise: far more than counters and session tables need, small
/// enough that a plugin cannot make a swap copy much.
pub const DEFAULT_MAX_STATE: usize = 1 << 20;

/// A whole server's configuration, resolved and checked.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where it came from, for errors found later (a plugin that does not
    /// load, an address that cannot be bound).
    pub origin: Origin,
    /// The listeners, in the order they were given.
    pub listeners: Vec<ListenerConfig>,
    /// How long open TCP connections may go on once their listener stops.
    pub grace: Duration,
    /// How long the server goes on serving, not ready, after a shutdown
    /// signal, so that load balancers stop sending it traffic first.
    pub drain_delay: Duration,
    /// The largest plugin component file read, in bytes.
    pub max_plugin_size: u64,
    /// Where fetched and compiled plugins are kept between runs, as the
    /// operator named it (`cache-dir`); `None` for the user's cache
    /// directory.
    pub cache_dir: Option<PathBuf>,
    /// Registries (`HOST:PORT`) reached over plain HTTP; loopback ones
    /// always are.
    pub insecure_registries: Vec<String>,
    /// The docker `config.json` holding registry credentials, if any.
    pub registry_auth: Option<PathBuf>,
}

/// One tenant: a plugin serving a UDP and/or a TCP address.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// The name logs and errors use.
    pub name: String,
    /// The plugin every message goes to.
    pub plugin: PluginSource,
    /// The settings the plugin reads with `get-config`.
    pub plugin_config: PluginConfig,
    /// Where to receive datagrams, if at all.
    pub udp: Option<SocketAddr>,
    /// Where to accept connections, if at all.
    pub tcp: Option<SocketAddr>,
    /// How TCP streams are cut into messages.
    pub framing: Framing,
    /// The longest framed TCP message a peer may send.
    pub max_message: usize,
    /// Bounds of every plugin call and instance.
    pub limits: Limits,
    /// Bounds on what the listener's traffic may cost.
    pub traffic: TrafficLimits,
    /// Whether the plugin's `stop-listener` is carried out.
    pub honor_stop: bool,
    /// Whether the UDP listener hands a plugin that exports `udp-batch` the
    /// datagrams it reads together in one call (`udp-batch`, on by
    /// default); off, every datagram gets its own `on-datagram` call.
    pub udp_batch: bool,
    /// What a message gets when its plugin call fails.
    pub on_failure: FailurePolicy,
    /// Whether open TCP connections move to a new version (with their
    /// state) after a swap, instead of finishing on theirs.
    pub upgrade_connections: bool,
    /// What a session gets when its state cannot be handed over.
    pub on_migration_failure: MigrationFailurePolicy,
    /// The largest state a plugin may hand to its next version, in bytes.
    pub max_state: usize,
    /// Where and how its traffic is recorded, if it is (`record`).
    pub record: Option<RecordSettings>,
    /// Whether each TCP connection starts with a PROXY protocol header
    /// from a load balancer, and who may send one (`proxy-protocol`,
    /// `proxy-from`).
    pub proxy: Option<ProxyPolicy>,
    /// Bind with `SO_REUSEPORT`, so that several processes can share the
    /// port (`reuse-port`).
    pub reuse_port: bool,
    /// A rollout started with the server (`[listeners.NAME.rollout]`).
    pub rollout: Option<crate::rollout::Plan>,
    /// Whether `plugin` may be an `oci://` reference by tag (which may
    /// move) rather than by digest.
    pub allow_tags: bool,
    /// How often a followed tag is asked about.
    pub tag_poll_interval: Duration,
}

/// A TCP listener behind a load balancer that speaks the PROXY protocol
/// (v1 or v2): every connection must open with a header naming the real
/// client, or it is closed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyPolicy {
    /// The addresses (the balancer's) allowed to send a header; empty:
    /// any. A connection from anywhere else is closed unread.
    pub allowed: Vec<ipnet::IpNet>,
}

impl ProxyPolicy {
    /// Whether `source` may send a PROXY header.
    pub fn allows(&self, source: std::net::IpAddr) -> bool {
        let source = source.to_canonical();
        self.allowed.is_empty() || self.allowed.iter().any(|net| net.contains(&source))
    }
}

/// Bounds on a listener's traffic, so that no peer and no plugin can make a
/// tenant cost more than its share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrafficLimits {
    /// The largest reply a plugin may send; a larger one is refused.
    pub max_reply: usize,
    /// A UDP reply may be at most this many times the request's size (or
    /// [`TrafficLimits::UDP_REPLY_ALLOWANCE`], whichever is larger), so the
    /// server cannot amplify a reflected flood.
    pub udp_amplification: usize,
    /// Open TCP connections at once; more are refused at once, not queued.
    pub max_connections: usize,
    /// A TCP connection with nothing to read for this long is closed.
    pub idle_timeout: Duration,
    /// A TCP connection whose peer accepts no byte of a reply for this long
    /// is closed (reset): a peer that sends but never reads would otherwise
    /// hold its slot and its plugin instance for as long as it likes, since
    /// the idle timer only runs while the server waits to read. UDP replies
    /// wait this long at most for room on the socket, then are dropped.
    pub write_timeout: Duration,
    /// Messages (datagrams and TCP messages) per second per peer address;
    /// `None` for no limit.
    pub rate_limit: Option<RateLimit>,
    /// Plugin log lines (and stdout/stderr lines) per second; more are
    /// counted and dropped.
    pub log_lines_per_second: u32,
    /// Bytes of plugin log text per second, so that long lines cannot do
    /// what many lines may not; more are counted and dropped.
    pub log_bytes_per_second: u32,
}

/// A token bucket: `per_second` messages on average, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate.
    pub per_second: u32,
    /// Largest burst.
    pub burst: u32,
}

impl TrafficLimits {
    /// The longest default write timeout: the default is the idle timeout,
    /// but at most this. A peer that reads at all, however slowly, takes
    /// some bytes off the server's socket buffer every few hundred
    /// milliseconds; one that takes none for 10 s with a reply waiting is
    /// not reading, and a quiet-but-alive client's 5-minute idle timeout is
    /// far too long to let it hold a slot and an instance.
    pub const MAX_DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

    /// Any UDP reply may be this long whatever the request's size: with the
    /// 28 bytes of IP and UDP headers a request costs, that is no useful
    /// amplification, and the tutorial's `Hello, client!` fits.
    pub const UDP_REPLY_ALLOWANCE: usize = 64;

    /// The longest reply allowed to a datagram of `request_len` bytes.
    pub fn max_udp_reply(&self, request_len: usize) -> usize {
        let amplified = request_len.saturating_mul(self.udp_amplification);
        amplified.max(Self::UDP_REPLY_ALLOWANCE).min(self.max_reply)
    }
}

impl Default for TrafficLimits {
    fn default() -> Self {
        Self {
            max_reply: 1 << 20,
            udp_amplification: 2,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            write_timeout: Self::MAX_DEFAULT_WRITE_TIMEOUT,
            rate_limit: None,
            log_lines_per_second: LogBudget::DEFAULT_LINES_PER_SECOND,
            log_bytes_per_second: LogBudget::DEFAULT_BYTES_PER_SECOND,
        }
    }
}

/// What a message gets when its plugin call traps, times out or runs out of
/// memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// No reply for a datagram; the TCP connection is closed.
    #[default]
    FailClosed,
    /// The host answers with the request's bytes, like a plain echo server.
    FailOpen,
}

/// A configuration mistake, in one line.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {reason}")]
pub struct ConfigError {
    /// `FILE`, `FILE:LINE` and/or the key.
    location: String,
    /// What is wrong.
    reason: String,
    /// The error behind it, when there is one (a plugin that does not
    /// load, say).
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// A configuration as given, before defaults and checks: the TOML file's
/// format (`grace`, then `[listeners.NAME]` tables), and what the command
/// line's flags are turned into.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(missing_docs)] // the keys are documented in wasm-echo.example.toml
pub struct RawConfig {
    #[serde(default, deserialize_with = "duration")]
    pub grace: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub drain_delay: Option<Duration>,
    #[serde(default, deserialize_with = "size")]
    pub max_plugin_size: Option<usize>,
    pub cache_dir: Option<PathBuf>,
    pub insecure_registries: Option<Vec<String>>,
    pub registry_auth: Option<PathBuf>,
    // Missing or empty alike: `resolve` says what to add.
    #[serde(default)]
    pub listeners: BTreeMap<String, RawListener>,
}

/// One listener as given (see [`RawConfig`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(missing_docs)] // the keys are documented in wasm-echo.example.toml
pub struct RawListener {
    pub plugin: String,
    #[serde(default, deserialize_with = "address")]
    pub udp: Option<SocketAddr>,
    #[serde(default, deserialize_with = "address")]
    pub tcp: Option<SocketAddr>,
    #[serde(default)]
    pub framing: Option<Framing>,
    #[serde(default, deserialize_with = "size")]
    pub max_message: Option<usize>,
    pub honor_stop: Option<bool>,
    pub udp_batch: Option<bool>,
    pub on_failure: Option<FailurePolicy>,
    pub upgrade_connections: Option<bool>,
    pub on_migration_failure: Option<MigrationFailurePolicy>,
    #[serde(default, deserialize_with = "size")]
    pub max_state: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub call_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "size")]
    pub memory_limit: Option<usize>,
    #[serde(default, deserialize_with = "size")]
    pub recycle_at: Option<usize>,
    pub table_elements: Option<usize>,
    pub instances: Option<usize>,
    #[serde(default, deserialize_with = "size")]
    pub max_reply: Option<usize>,
    pub udp_amplification: Option<usize>,
    pub max_connections: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub write_timeout: Option<Duration>,
    pub rate_limit: Option<u32>,
    pub rate_burst: Option<u32>,
    pub log_rate: Option<u32>,
    #[serde(default, deserialize_with = "size")]
    pub log_bytes_rate: Option<usize>,
    #[serde(default)]
    pub plugin_config: BTreeMap<String, String>,
    pub record: Option<PathBuf>,
    #[serde(default, deserialize_with = "size")]
    pub record_max_size: Option<usize>,
    pub record_keep: Option<usize>,
    pub record_sample: Option<f64>,
    pub proxy_protocol: Option<bool>,
    pub proxy_from: Option<Vec<String>>,
    pub reuse_port: Option<bool>,
    pub rollout: Option<crate::rollout::RawRollout>,
    pub allow_tags: Option<bool>,
    #[serde(default, deserialize_with = "duration")]
    pub tag_poll_interval: Option<Duration>,
}

/// How often a followed tag is asked about unless `tag-poll-interval` says
/// otherwise.
pub const DEFAULT_TAG_POLL_INTERVAL: Duration = Duration::from_secs(30);

/// The default grace period for open connections.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The default drain delay: none, so that a server on its own stops
/// accepting at once; one behind a balancer wants its probe period or more.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::ZERO;

/// The largest configuration file read: far more than any real one, and a
/// path to something else by mistake is refused unread.
pub const MAX_CONFIG_SIZE: u64 = 4 << 20;

/// What `max-plugin-size` (key and flag) may be.
pub const MAX_PLUGIN_SIZE_RANGE: RangeInclusive<u64> = 1 << 20..=4 << 30;

/// Checks a `max-plugin-size`.
///
/// # Errors
///
/// The reason it is out of range.
pub fn check_max_plugin_size(bytes: u64) -> Result<u64, String> {
    in_range(bytes, MAX_PLUGIN_SIZE_RANGE, |v| show_size(*v))
}

impl ServerConfig {
    /// Reads and checks a TOML configuration file. Relative plugin paths
    /// are relative to the file's folder.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the file, the key and the reason.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read = |error: &dyn fmt::Display| ConfigError {
            location: path.display().to_string(),
            reason: format!("cannot read the configuration: {error}"),
            source: None,
        };
        let bytes =
            crate::input_file::read(path, MAX_CONFIG_SIZE, "", crate::input_file::READ_TIMEOUT)
                .map_err(|error| read(&error))?;
        let text = String::from_utf8(bytes).map_err(|error| read(&error))?;
        let deserializer =
            toml::Deserializer::parse(&text).map_err(|error| parse_error(path, &text, &error))?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let key = error.path().to_string();
            let inner = error.into_inner();
            let line = inner.span().map(|span| line_of(&text, span.start));
            let location = match (line, key.as_str()) {
                (Some(line), ".") => format!("{}:{line}", path.display()),
                (None, ".") => path.display().to_string(),
                (Some(line), key) => format!("{}:{line}: {key}", path.display()),
                (None, key) => format!("{}: {key}", path.display()),
            };
            ConfigError {
                location,
                reason: inner.message().trim().to_owned(),
                source: None,
            }
        })?;
        raw.resolve(Origin::File(path.to_owned()))
    }

    /// The instance pool this configuration needs: every listener's
    /// `max-connections` plus its UDP instance, with the largest memory and
    /// table limits any listener sets.
    pub fn pool_size(&self) -> PoolSize {
        let mut instances = 0usize;
        let mut memory_bytes = 0;
        let mut table_elements = 0;
        for listener in &self.listeners {
            instances += listener.traffic.max_connections + usize::from(listener.udp.is_some());
            memory_bytes = memory_bytes.max(listener.limits.memory_bytes);
            table_elements = table_elements.max(listener.limits.table_elements);
        }
        PoolSize::sized(instances, memory_bytes, table_elements)
    }

    /// Checks what each listener's keys cannot say alone: that no two
    /// listeners share an address.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming both listeners.
    fn check(&self) -> Result<(), ConfigError> {
        let mut recorded: Vec<(&Path, &str)> = Vec::new();
        for listener in &self.listeners {
            let Some(record) = &listener.record else {
                continue;
            };
            if let Some((_, other)) = recorded.iter().find(|(path, _)| *path == record.path) {
                return Err(self.origin.error(
                    Some(&listener.name),
                    "record",
                    format!(
                        "{} is also listener `{other}`'s recording; give each its own file",
                        record.path.display()
                    ),
                ));
            }
            recorded.push((&record.path, &listener.name));
        }
        let mut seen: Vec<(Protocol, SocketAddr, &str)> = Vec::new();
        for listener in &self.listeners {
            for (protocol, addr) in listener.sockets() {
                if let Some((_, _, other)) = seen
                    .iter()
                    .find(|(p, a, _)| *p == protocol && overlaps(*a, addr))
                {
                    return Err(self.origin.error(
                        Some(&listener.name),
                        protocol.key(),
                        format!("{protocol} {addr} is also listener `{other}`'s address"),
                    ));
                }
                seen.push((protocol, addr, &listener.name));
            }
        }
        Ok(())
    }
}

/// Where a configuration came from, which is what its errors name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A TOML file: errors name the file and the key; relative plugin paths
    /// are relative to its folder.
    File(PathBuf),
    /// `serve`'s flags: errors name the flag; relative plugin paths are
    /// relative to the working directory.
    Flags,
}

impl Origin {
    /// A mistake about `key`, of `listener` (or of the whole server).
    pub fn error(
        &self,
        listener: Option<&str>,
        key: &str,
        reason: impl fmt::Display,
    ) -> ConfigError {
        let location = match (self, listener) {
            (Self::File(path), Some(name)) => format!("{}: listeners.{name}.{key}", path.display()),
            (Self::File(path), None) => format!("{}: {key}", path.display()),
            (Self::Flags, _) => format!("--{key}"),
        };
        ConfigError {
            location,
            reason: reason.to_string(),
            source: None,
        }
    }

    /// A mistake about `key` that `error` explains, kept as the source.
    pub fn caused_by(
        &self,
        listener: Option<&str>,
        key: &str,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> ConfigError {
        ConfigError {
            source: Some(Box::new(error)),
            ..self.error(listener, key, "")
        }
        .with_reason_from_source()
    }

    /// The folder relative plugin paths start from.
    fn base(&self) -> PathBuf {
        match self {
            Self::File(path) => path.parent().unwrap_or(Path::new(".")).to_owned(),
            Self::Flags => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        }
    }
}

/// A transport a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Datagrams.
    Udp,
    /// Connections.
    Tcp,
}

impl Protocol {
    /// The configuration key (and flag) that gives its address.
    pub fn key(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl ListenerConfig {
    /// The sockets this listener serves, UDP first.
    pub fn sockets(&self) -> impl Iterator<Item = (Protocol, SocketAddr)> + use<> {
        [(Protocol::Udp, self.udp), (Protocol::Tcp, self.tcp)]
            .into_iter()
            .filter_map(|(protocol, addr)| addr.map(|addr| (protocol, addr)))
    }
}

impl ConfigError {
    /// Says what the source says.
    fn with_reason_from_source(mut self) -> Self {
        if let Some(source) = &self.source {
            self.reason = source.to_string();
        }
        self
    }
}

impl RawConfig {
    /// Applies the defaults and every check, the same for a file and for
    /// flags; `origin` says which, for errors and relative paths.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the first mistake.
    pub fn resolve(self, origin: Origin) -> Result<ServerConfig, ConfigError> {
        if self.listeners.is_empty() {
            return Err(origin.error(
                None,
                "listeners",
                "no listeners: add a [listeners.NAME] table",
            ));
        }
        let max_plugin_size = match self.max_plugin_size {
            None => crate::plugin::DEFAULT_MAX_PLUGIN_SIZE,
            Some(bytes) => check_max_plugin_size(bytes as u64)
                .map_err(|reason| origin.error(None, "max-plugin-size", reason))?,
        };
        let grace = in_range(
            self.grace.unwrap_or(DEFAULT_GRACE),
            Duration::ZERO..=Duration::from_secs(3600),
            |v| humantime::format_duration(*v),
        )
        .map_err(|reason| origin.error(None, "grace", reason))?;
        let drain_delay = in_range(
            self.drain_delay.unwrap_or(DEFAULT_DRAIN_DELAY),
            Duration::ZERO..=Duration::from_secs(3600),
            |v| humantime::format_duration(*v),
        )
        .map_err(|reason| origin.error(None, "drain-delay", reason))?;
        let mut listeners = Vec::new();
        for (name, listener) in self.listeners {
            listeners.push(listener.resolve(&origin, name)?);
        }
        let config = ServerConfig {
            listeners,
            grace,
            drain_delay,
            max_plugin_size,
            cache_dir: self.cache_dir.map(|dir| {
                if dir.is_relative() {
                    origin.base().join(dir)
                } else {
                    dir
                }
            }),
            insecure_registries: self.insecure_registries.unwrap_or_default(),
            registry_auth: self.registry_auth.map(|file| {
                if file.is_relative() {
                    origin.base().join(file)
                } else {
                    file
                }
            }),
            origin,
        };
        config.check()?;
        Ok(config)
    }
}

/// Two addresses collide if they share a port (other than 0, which means
/// "any free port") and an IP, or one of them is the wildcard.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl RawListener {
    fn resolve(self, origin: &Origin, name: String) -> Result<ListenerConfig, ConfigError> {
        let error = |field: &str, reason: String| origin.error(Some(&name), field, reason);
        let plugin = match PluginSource::parse(&self.plugin) {
            Ok(PluginSource::File(file)) if file.is_relative() => {
                PluginSource::File(origin.base().join(file))
            }
            Ok(source) => source,
            Err(reason) => return Err(error("plugin", reason.to_string())),
        };
        let allow_tags = self.allow_tags.unwrap_or(false);
        if let PluginSource::Oci(reference) = &plugin
            && reference.tag().is_some()
            && !allow_tags
        {
            let refusal = crate::registry::RegistryError::TagNotAllowed {
                reference: reference.to_string(),
            };
            return Err(error("plugin", refusal.to_string()));
        }
        let tag_poll_interval = in_range(
            self.tag_poll_interval.unwrap_or(DEFAULT_TAG_POLL_INTERVAL),
            Duration::from_millis(100)..=Duration::from_secs(24 * 3600),
            |v| humantime::format_duration(*v),
        )
        .map_err(|reason| error("tag-poll-interval", reason))?;
        if self.udp.is_none() && self.tcp.is_none() {
            return Err(error(
                "udp",
                "a listener needs `udp`, `tcp` or both".to_owned(),
            ));
        }
        let defaults = Limits::default();
        let traffic = TrafficLimits::default();
        let check = |field: &str, value: usize, range: RangeInclusive<usize>| {
            in_range(value, range, |v| *v).map_err(|reason| error(field, reason))
        };
        let check_size = |field: &str, value: usize, range: RangeInclusive<usize>| {
            in_range(value, range, |v| show_size(*v as u64)).map_err(|reason| error(field, reason))
        };
        let check_duration = |field: &str, value: Duration, range: RangeInclusive<Duration>| {
            in_range(value, range, |v| humantime::format_duration(*v))
                .map_err(|reason| error(field, reason))
        };
        let memory_bytes = check_size(
            "memory-limit",
            self.memory_limit.unwrap_or(defaults.memory_bytes),
            1 << 20..=4 << 30,
        )?;
        let limits = Limits {
            call_timeout: check_duration(
                "call-timeout",
                self.call_timeout.unwrap_or(defaults.call_timeout),
                Duration::from_millis(1)..=Duration::from_secs(60),
            )?,
            memory_bytes,
            recycle_bytes: check_size(
                "recycle-at",
                self.recycle_at
                    .unwrap_or(Limits::recycle_default(memory_bytes)),
                1 << 20..=memory_bytes,
            )?,
            table_elements: check(
                "table-elements",
                self.table_elements.unwrap_or(defaults.table_elements),
                1..=10_000_000,
            )?,
            instances: check(
                "instances",
                self.instances.unwrap_or(defaults.instances),
                1..=10_000,
            )?,
        };
        let rate_limit = match self.rate_limit {
            None | Some(0) => None,
            Some(per_second) => {
                let per_second = check("rate-limit", per_second as usize, 1..=10_000_000)? as u32;
                let burst = check(
                    "rate-burst",
                    self.rate_burst.unwrap_or(per_second) as usize,
                    1..=10_000_000,
                )?;
                Some(RateLimit {
                    per_second,
                    burst: burst as u32,
                })
            }
        };
        let idle_timeout = check_duration(
            "idle-timeout",
            self.idle_timeout.unwrap_or(traffic.idle_timeout),
            Duration::from_millis(10)..=Duration::from_secs(7 * 24 * 3600),
        )?;
        let write_timeout = check_duration(
            "write-timeout",
            self.write_timeout
                .unwrap_or(idle_timeout.min(TrafficLimits::MAX_DEFAULT_WRITE_TIMEOUT)),
            Duration::from_millis(10)..=Duration::from_secs(3600),
        )?;
        let traffic = TrafficLimits {
            max_reply: check_size(
                "max-reply",
                self.max_reply.unwrap_or(traffic.max_reply),
                1..=64 << 20,
            )?,
            udp_amplification: check(
                "udp-amplification",
                self.udp_amplification.unwrap_or(traffic.udp_amplification),
                1..=1000,
            )?,
            max_connections: check(
                "max-connections",
                self.max_connections.unwrap_or(traffic.max_connections),
                1..=1_000_000,
            )?,
            idle_timeout,
            write_timeout,
            rate_limit,
            log_lines_per_second: check(
                "log-rate",
                self.log_rate.unwrap_or(traffic.log_lines_per_second) as usize,
                1..=1_000_000,
            )? as u32,
            log_bytes_per_second: check_size(
                "log-bytes-rate",
                self.log_bytes_rate
                    .unwrap_or(traffic.log_bytes_per_second as usize),
                LogBudget::MIN_BYTES_PER_SECOND as usize..=1 << 30,
            )? as u32,
        };
        let record = self.resolve_record(origin, &name)?;
        let proxy = self.resolve_proxy(origin, &name)?;
        let rollout = match self.rollout {
            None => None,
            Some(raw) => Some(
                raw.resolve(&origin.base())
                    .map_err(|(key, reason)| error(&format!("rollout.{key}"), reason))?,
            ),
        };
        Ok(ListenerConfig {
            rollout,
            proxy,
            reuse_port: self.reuse_port.unwrap_or(false),
            allow_tags,
            tag_poll_interval,
            record,
            plugin,
            plugin_config: self.plugin_config,
            udp: self.udp,
            tcp: self.tcp,
            framing: self.framing.unwrap_or_default(),
            max_message: check_size(
                "max-message",
                self.max_message.unwrap_or(DEFAULT_MAX_MESSAGE),
                1..=64 << 20,
            )?,
            limits,
            traffic,
            honor_stop: self.honor_stop.unwrap_or(true),
            udp_batch: self.udp_batch.unwrap_or(true),
            on_failure: self.on_failure.unwrap_or_default(),
            upgrade_connections: self.upgrade_connections.unwrap_or(false),
            on_migration_failure: self.on_migration_failure.unwrap_or_default(),
            max_state: check_size(
                "max-state",
                self.max_state.unwrap_or(DEFAULT_MAX_STATE),
                0..=64 << 20,
            )?,
            name,
        })
    }
}

impl RawListener {
    /// The `proxy-*` keys: a policy with `proxy-protocol = true` on a TCP
    /// listener; `proxy-from` without it, or it without `tcp`, is a
    /// mistake.
    fn resolve_proxy(
        &self,
        origin: &Origin,
        name: &str,
    ) -> Result<Option<ProxyPolicy>, ConfigError> {
        let error = |field: &str, reason: String| origin.error(Some(name), field, reason);
        if self.proxy_protocol != Some(true) {
            return match self.proxy_from {
                Some(_) => Err(error(
                    "proxy-from",
                    "has no effect without `proxy-protocol = true`".to_owned(),
                )),
                None => Ok(None),
            };
        }
        if self.tcp.is_none() {
            return Err(error(
                "proxy-protocol",
                "needs a `tcp` address: the PROXY protocol is served on TCP only".to_owned(),
            ));
        }
        let allowed = self
            .proxy_from
            .iter()
            .flatten()
            .map(|text| {
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        error(
                            "proxy-from",
                            format!("{text:?} is not an IP address or a CIDR block (10.0.0.0/8, fd00::/8)"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(ProxyPolicy { allowed }))
    }

    /// The `record*` keys: nothing unless `record` names a file; the other
    /// keys without it are a mistake, not silently ignored.
    fn resolve_record(
        &self,
        origin: &Origin,
        name: &str,
    ) -> Result<Option<RecordSettings>, ConfigError> {
        let error = |field: &str, reason: String| origin.error(Some(name), field, reason);
        let Some(path) = &self.record else {
            let stray = [
                ("record-max-size", self.record_max_size.is_some()),
                ("record-keep", self.record_keep.is_some()),
                ("record-sample", self.record_sample.is_some()),
            ];
            return match stray.iter().find(|(_, given)| *given) {
                Some((key, _)) => Err(error(
                    key,
                    "has no effect without `record` (the file to record to)".to_owned(),
                )),
                None => Ok(None),
            };
        };
        let max_size = in_range(
            self.record_max_size
                .map_or(RecordSettings::DEFAULT_MAX_SIZE, |size| size as u64),
            4 << 10..=1 << 40,
            |v| *v,
        )
        .map_err(|reason| error("record-max-size", reason))?;
        let keep = in_range(
            self.record_keep.unwrap_or(RecordSettings::DEFAULT_KEEP),
            0..=1000,
            |v| *v,
        )
        .map_err(|reason| error("record-keep", reason))?;
        let sample = self.record_sample.unwrap_or(1.0);
        if !(sample > 0.0 && sample <= 1.0) {
            return Err(error(
                "record-sample",
                format!(
                    "{sample} is out of range (above 0, up to 1: the share of exchanges recorded)"
                ),
            ));
        }
        let path = if path.is_relative() {
            origin.base().join(path)
        } else {
            path.clone()
        };
        Ok(Some(RecordSettings {
            path,
            max_size,
            keep,
            sample,
        }))
    }
}

/// `value` if it lies in `range`, or the reason it does not, with the
/// values shown by `show`.
fn in_range<T: PartialOrd, S: fmt::Display>(
    value: T,
    range: RangeInclusive<T>,
    show: impl Fn(&T) -> S,
) -> Result<T, String> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{} is out of range ({} to {})",
            show(&value),
            show(range.start()),
            show(range.end())
        ))
    }
}

/// A size as a person would write it: in the largest binary unit that
/// divides it (`1KiB`, `64MiB`, `4GiB`), else in bytes.
pub fn show_size(bytes: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes} bytes")
}

/// Parses a socket address: an IP address and a port. A host name is
/// refused with a word on why, not resolved: what it resolves to can
/// change, and one name can stand for several addresses.
///
/// # Errors
///
/// A message saying what an address looks like.
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    match text.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && port.parse::<u16>().is_ok()
                && host.parse::<std::net::IpAddr>().is_err()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') =>
        {
            Err(format!(
                "`{text}`: host names are not accepted, give an IP address (e.g. 127.0.0.1:{port}, 0.0.0.0:{port} or [::1]:{port})"
            ))
        }
        _ => Err(format!(
            "`{text}` is not an IP address and port (e.g. 127.0.0.1:12345 or [::1]:12345)"
        )),
    }
}

/// A socket address in the file; see [`parse_address`].
fn address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_address(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A TOML syntax error in one line, with its line number.
fn parse_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let location = match error.span() {
        Some(span) => format!("{}:{}", path.display(), line_of(text, span.start)),
        None => path.display().to_string(),
    };
    ConfigError {
        location,
        reason: error.message().trim().replace('\n', " "),
        source: None,
    }
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}

/// Parses a size: bytes, or a number with KiB, MiB or GiB.
///
/// # Errors
///
/// A message saying what a size looks like.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("expected a size like 64MiB, got `{text}`"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("size `{text}` is too large"))
}

/// A size in the file: a number of bytes, or a string like "64MiB".
fn size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(usize),
        Text(String),
    }
    match Size::deserialize(deserializer)? {
        Size::Bytes(bytes) => Ok(Some(bytes)),
        Size::Text(text) => parse_size(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// A duration in the file: a string like "100ms" or "5s".
fn duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map(Some).map_err(|error| {
        serde::de::Error::custom(format!("expected a duration like 100ms or 5s: {error}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `proxy-from` holds for IPv4 clients of a dual-stack socket too
    /// (which the kernel reports as `::ffff:a.b.c.d`); no list allows all.
    #[test]
    fn proxy_from_matches_blocks_and_mapped_addresses() {
        let policy = ProxyPolicy {
            allowed: vec!["10.0.0.0/8".parse().expect("a block")],
        };
        let ip = |text: &str| text.parse::<std::net::IpAddr>().expect("an address");
        assert!(policy.allows(ip("10.1.2.3")));
        assert!(policy.allows(ip("::ffff:10.1.2.3")));
        assert!(!policy.allows(ip("192.0.2.1")));
        assert!(ProxyPolicy::default().allows(ip("192.0.2.1")));
    }

    /// The plugin runtime sizes its default pool without reading this
    /// module; this keeps the two defaults in step.
    #[test]
    fn the_default_pool_fits_one_default_listener() {
        let listener = RawListener {
            plugin: "echo".to_owned(),
            udp: Some(([127, 0, 0, 1], 0).into()),
            ..RawListener::default()
        };
        let config = RawConfig {
            listeners: [("main".to_owned(), listener)].into(),
            ..RawConfig::default()
        }
        .resolve(Origin::Flags)
        .expect("valid");
        assert_eq!(config.pool_size(), PoolSize::default());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn sizes_are_shown_in_their_unit() {
        assert_eq!(show_size(1024), "1KiB");
        assert_eq!(show_size(64 << 20), "64MiB");
        assert_eq!(show_size(4 << 30), "4GiB");
        assert_eq!(show_size(1536), "1536 bytes");
    }

    #[test]
    fn host_names_are_refused_with_the_reason() {
        assert_eq!(
            parse_address("[::1]:7"),
            Ok("[::1]:7".parse().expect("addr"))
        );
        let named = parse_address("localhost:0").expect_err("a host name");
        assert!(named.contains("host names are not accepted"), "{named}");
        let garbled = parse_address("localhost").expect_err("no port");
        assert!(
            garbled.contains("is not an IP address and port"),
            "{garbled}"
        );
    }

    #[test]
    fn wildcard_addresses_overlap_specific_ones() {
        let any: SocketAddr = "0.0.0.0:7000".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:7000".parse().expect("addr");
        let other: SocketAddr = "127.0.0.2:7000".parse().expect("addr");
        let ephemeral: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert!(overlaps(any, local));
        assert!(!overlaps(local, other));
        assert!(!overlaps(ephemeral, ephemeral));
    }

    #[test]
    fn udp_replies_are_bounded_by_amplification_with_an_allowance() {
        let limits = TrafficLimits {
            udp_amplification: 2,
            max_reply: 1000,
            ..TrafficLimits::default()
        };
        assert_eq!(limits.max_udp_reply(1), TrafficLimits::UDP_REPLY_ALLOWANCE);
        assert_eq!(limits.max_udp_reply(100), 200);
        assert_eq!(limits.max_udp_reply(10_000), 1000);
    }

    #[test]
    fn the_write_timeout_defaults_to_the_idle_timeout_up_to_ten_seconds() {
        let dir =
            std::env::temp_dir().join(format!("wasm-echo-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch dir");
        let path = dir.join("write-timeout.toml");
        let toml = r#"
            [listeners.quick]
            plugin = "echo"
            tcp = "127.0.0.1:0"
            idle-timeout = "2s"
            [listeners.patient]
            plugin = "echo"
            tcp = "127.0.0.1:0"
            [listeners.explicit]
            plugin = "echo"
            tcp = "127.0.0.1:0"
            idle-timeout = "1s"
            write-timeout = "30s"
        "#;
        std::fs::write(&path, toml).expect("a config file");
        let config = ServerConfig::from_file(&path).expect("a valid config");
        let write_timeout = |name: &str| {
            config
                .listeners
                .iter()
                .find(|listener| listener.name == name)
                .map(|listener| listener.traffic.write_timeout)
        };
        assert_eq!(write_timeout("quick"), Some(Duration::from_secs(2)));
        assert_eq!(write_timeout("patient"), Some(Duration::from_secs(10)));
        assert_eq!(write_timeout("explicit"), Some(Duration::from_secs(30)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
