//! Start-up and reload with the compiled-code cache, measured: how long a
//! server takes from being started to its first reply, with an empty cache
//! (everything compiled) and with a warm one (compiled code loaded), for
//! the Rust echo plugin and, given `--polyglot`, the Python, JavaScript and
//! C ones; and how long a reload back to a version already seen takes.
//!
//! Each start is [`Server::bind`] and [`Server::run`] on a tokio runtime of
//! its own, with a cache directory of this measurement's own (never the
//! user's), so what is timed is what `wasm-echo serve` does from reading
//! its configuration on: making the engine, compiling or loading the code,
//! binding, starting the UDP listener's instance. Starting the process
//! itself is left out (a few milliseconds, the same for every plugin).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use wasm_echo::control::{self, Request};
use wasm_echo::server::Operations;

use crate::load::{nanos, quantile};

/// What every probe sends; every echo plugin sends it back.
const PROBE: &[u8] = b"startup";
/// How long a probe waits for its reply before the next is sent.
const PROBE_WAIT: Duration = Duration::from_millis(100);
/// How long a start or a reload may take before the run gives up: a
/// JavaScript component compiles for a minute on a busy two-core machine.
const GIVE_UP: Duration = Duration::from_secs(300);
/// The listener's name in [`crate::targets::listener_config`].
const LISTENER: &str = "bench";

/// How much work the measurement does.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Starts with an empty cache, per plugin.
    pub cold: usize,
    /// Starts with a warm cache, per plugin.
    pub warm: usize,
    /// Reloads back to a version already seen, per plugin.
    pub reloads: usize,
}

impl Sizes {
    /// The full run or the `--quick` one.
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                cold: 1,
                warm: 2,
                reloads: 2,
            }
        } else {
            Self {
                cold: 2,
                warm: 5,
                reloads: 6,
            }
        }
    }
}

/// One plugin's echo and hello versions, as `--plugin` arguments.
pub struct Subject {
    /// The language, for the report.
    pub label: String,
    /// The echo version: what is started.
    pub echo: String,
    /// The hello version: what a reload swaps to and back from.
    pub hello: String,
}

/// The Rust plugins (built in) and, from `polyglot`, the others.
pub fn subjects(polyglot: Option<&Path>) -> Vec<Subject> {
    let mut subjects = vec![Subject {
        label: "rust".to_owned(),
        echo: "echo".to_owned(),
        hello: "hello".to_owned(),
    }];
    if let Some(dir) = polyglot {
        for (label, lang) in [("python", "python"), ("javascript", "js"), ("c", "c")] {
            let file = |plugin: &str| {
                dir.join(format!("{plugin}-{lang}.wasm"))
                    .display()
                    .to_string()
            };
            subjects.push(Subject {
                label: label.to_owned(),
                echo: file("echo"),
                hello: file("hello"),
            });
        }
    }
    subjects
}

/// One plugin's figures.
#[derive(Debug, Default)]
pub struct Figures {
    /// The language.
    pub label: String,
    /// Start to first reply, empty cache.
    pub cold: Vec<Duration>,
    /// Start to first reply, warm cache.
    pub warm: Vec<Duration>,
    /// Reload request to its answer, back to a version already seen.
    pub reload: Vec<Duration>,
}

/// A cache directory of the measurement's own, emptied when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(label: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "wasm-echo-bench-startup-{}-{label}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// Empties the cache: the next start compiles everything.
    fn empty(&self) -> anyhow::Result<()> {
        let cache = self.cache();
        match std::fs::remove_dir_all(&cache) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).with_context(|| format!("emptying {}", cache.display()))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Measures every subject in turn.
///
/// # Errors
///
/// A server that does not start, answer or reload within [`GIVE_UP`].
pub fn measure(subjects: &[Subject], sizes: Sizes) -> anyhow::Result<Vec<Figures>> {
    let mut all = Vec::new();
    for subject in subjects {
        let scratch = Scratch::new(&subject.label)?;
        let mut figures = Figures {
            label: subject.label.clone(),
            ..Figures::default()
        };
        for round in 0..sizes.cold {
            eprintln!("startup: {} cold, {}", subject.label, round + 1);
            scratch.empty()?;
            figures
                .cold
                .push(start(&subject.echo, &scratch.cache(), None)?.0);
        }
        for round in 0..sizes.warm {
            eprintln!("startup: {} warm, {}", subject.label, round + 1);
            figures
                .warm
                .push(start(&subject.echo, &scratch.cache(), None)?.0);
        }
        eprintln!("startup: {} reloads back to a seen version", subject.label);
        figures.reload = reloads(subject, &scratch, sizes.reloads)?;
        all.push(figures);
    }
    Ok(all)
}

/// Starts a server of `plugin` with `cache`, waits for its first reply and
/// stops it; returns how long that took, and the server's runtime and UDP
/// address when `keep` asks to go on using it (with a control socket).
fn start(
    plugin: &str,
    cache: &Path,
    keep: Option<&Path>,
) -> anyhow::Result<(Duration, Option<(tokio::runtime::Runtime, SocketAddr)>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("startup-server")
        .enable_all()
        .build()?;
    let began = Instant::now();
    let udp = runtime.block_on(async {
        let mut config = crate::targets::listener_config(plugin, 16)?;
        config.cache_dir = Some(cache.to_owned());
        let operations = Operations {
            control: keep.map(Path::to_owned),
            control_socket: keep.is_some(),
            ..Operations::default()
        };
        let udp = crate::targets::serve_udp(config, operations).await?;
        first_reply(udp, PROBE).await?;
        anyhow::Ok(udp)
    })?;
    let took = began.elapsed();
    if keep.is_some() {
        return Ok((took, Some((runtime, udp))));
    }
    runtime.shutdown_background();
    Ok((took, None))
}

/// Probes `server` until it answers `want`.
async fn first_reply(server: SocketAddr, want: &[u8]) -> anyhow::Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(server).await?;
    let deadline = Instant::now() + GIVE_UP;
    let mut reply = [0u8; 256];
    // Bounded by the deadline, and by a count in case the clock misbehaves.
    for _ in 0..GIVE_UP.as_millis() / PROBE_WAIT.as_millis() * 2 {
        anyhow::ensure!(Instant::now() < deadline, "no reply within {GIVE_UP:?}");
        socket.send(PROBE).await?;
        if let Ok(Ok(len)) = timeout(PROBE_WAIT, socket.recv(&mut reply)).await
            && &reply[..len] == want
        {
            return Ok(());
        }
    }
    anyhow::bail!("no reply after many probes")
}

/// Starts `subject`'s echo with a control socket, reloads to its hello and
/// back once so both are in the cache, then times `count` reloads back and
/// forth, each to a version already seen: request to answer.
fn reloads(subject: &Subject, scratch: &Scratch, count: usize) -> anyhow::Result<Vec<Duration>> {
    let control = scratch.dir.join("control.sock");
    let (_, kept) = start(&subject.echo, &scratch.cache(), Some(&control))?;
    let (runtime, _udp) = kept.context("the server was not kept")?;
    let result = runtime.block_on(async {
        let versions = [&subject.hello, &subject.echo];
        for plugin in versions {
            reload(&control, plugin).await?;
        }
        let mut times = Vec::new();
        for index in 0..count {
            let began = Instant::now();
            reload(&control, versions[index % 2]).await?;
            times.push(began.elapsed());
        }
        anyhow::Ok(times)
    });
    runtime.shutdown_background();
    result
}

/// One `reload --listener bench --plugin PLUGIN` through the control socket.
async fn reload(control: &Path, plugin: &str) -> anyhow::Result<()> {
    let request = Request::Reload {
        listener: Some(LISTENER.to_owned()),
        plugin: Some(plugin.to_owned()),
    };
    let response = timeout(GIVE_UP, control::send(control, &request))
        .await
        .context("no answer from the control socket")??;
    anyhow::ensure!(
        response.ok && response.swaps.iter().all(|swap| swap.swapped),
        "reload to {plugin} did not swap: {}",
        response.error.unwrap_or_default()
    );
    Ok(())
}

/// Prints the figures as a Markdown section, ready for BENCHMARKS.md.
pub fn print(figures: &[Figures], sizes: Sizes) {
    println!();
    println!("## Start-up and the compiled-code cache");
    println!();
    println!(
        "Server bound and started in this process ({} cold starts with an empty cache \
         directory, then {} warm ones), timed until the first UDP reply; then reloads through \
         the control socket back to a version already compiled ({} per plugin, request to \
         answer).",
        sizes.cold, sizes.warm, sizes.reloads
    );
    println!();
    println!(
        "| plugin | cold median ms | cold max ms | warm median ms | warm max ms | reload to a seen version, median ms | max ms |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for plugin in figures {
        let (cold, cold_max) = median_max(&plugin.cold);
        let (warm, warm_max) = median_max(&plugin.warm);
        let (reload, reload_max) = median_max(&plugin.reload);
        println!(
            "| {} | {cold:.0} | {cold_max:.0} | {warm:.0} | {warm_max:.0} | {reload:.0} | {reload_max:.0} |",
            plugin.label
        );
    }
}

/// Median and maximum, in milliseconds.
fn median_max(times: &[Duration]) -> (f64, f64) {
    let mut samples: Vec<u64> = times.iter().map(|time| nanos(*time)).collect();
    samples.sort_unstable();
    let ms = |value: Option<u64>| value.unwrap_or(0) as f64 / 1e6;
    (ms(quantile(&samples, 0.5)), ms(samples.last().copied()))
}
