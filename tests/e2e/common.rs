//! Starting the real server and talking to it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Paths of the guest plugins built by host/build.rs.
pub use wasm_echo::testing::plugins;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_wasm-echo");

/// How long a test waits for anything before it fails: generous, since the
/// machine is shared; nothing is timed against it. Python and JavaScript
/// components take seconds to compile when a server starts, far more when
/// tests compile several at once on two cores.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How long any server a test starts may live. The longest test needs well
/// under a minute; a test that hangs with its server running has its
/// server killed at this bound (and so fails) instead of holding the run
/// until CI's limit.
pub const SERVER_LIFETIME: Duration = Duration::from_secs(300);

/// `XDG_CACHE_HOME` for every server and command the suite starts, unless
/// a test sets its own (or passes `--cache-dir`): a folder under target/,
/// so that compiled code outlives a run of the suite (a JavaScript plugin
/// compiles for a minute on a busy machine, then loads from the cache in
/// under a second) and tests never write into the user's own cache.
/// Sharing it is safe: entries are keyed by the component's bytes and the
/// engine's settings, and written whole or not at all.
pub fn shared_cache_home() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cache-home")
}

/// Runs `wasm-echo ARGS` to completion, failing the test if it has not
/// finished within [`PATIENCE`]: a regression that makes a command hang
/// (a `serve` that starts on bad input, a read that never ends) fails its
/// test instead of hanging the suite.
pub fn run(args: &[&str]) -> Output {
    run_in(std::path::Path::new("."), args)
}

/// [`run`], in folder `dir`.
pub fn run_in(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .current_dir(dir)
        .env("XDG_CACHE_HOME", shared_cache_home())
        .args(args);
    run_command(command)
}

/// `command` as it would be typed, for messages.
fn describe(command: &Command) -> String {
    format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Runs `command` to completion, its stdin empty and its output captured,
/// failing the test if it has not finished within [`PATIENCE`].
pub fn run_command(mut command: Command) -> Output {
    let what = describe(&command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("`{what}` does not start: {error}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {PATIENCE:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Asserts that `output` is a refusal: a failed exit, exactly one line on
/// stderr containing each of `needles`, no panic and no backtrace. Returns
/// that line.
pub fn one_line_error(output: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected a refusal; stderr:\n{stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line of error, got:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    }
    stderr.trim().to_owned()
}

/// The stdout of `what`, a command that must have succeeded; the test
/// fails with its stderr otherwise.
pub fn succeeded(what: &str, output: &Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `probe` every 20 ms until it returns `Some`, failing the test
/// with `what` after [`PATIENCE`].
pub fn poll_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`poll_until`] for a probe that says why it is not done yet: the
/// test fails with `what` and the last reason.
pub fn poll_until_ok<T>(what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match probe() {
            Ok(found) => return found,
            Err(reason) => assert!(
                Instant::now() < deadline,
                "gave up waiting: {what}: {reason}"
            ),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A file of the repository (`deploy/...`), by its path from the top.
pub fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// A control socket path of a test's own, in a fresh scratch folder.
pub fn control_path() -> std::path::PathBuf {
    scratch_file("placeholder", b"").with_file_name("control.sock")
}

/// Runs `wasm-echo COMMAND --control CONTROL ARGS` (`reload`, `status`).
pub fn control(command: &str, control: &std::path::Path, args: &[&str]) -> Output {
    let control = control.to_str().expect("utf-8 path");
    let mut all = vec![command, "--control", control];
    all.extend_from_slice(args);
    run(&all)
}

/// Sends `signal` (`TERM`, `INT`, `HUP`) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{signal} {pid} failed");
}

/// A running `wasm-echo serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub udp: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    /// The `/metrics` endpoint, with `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// Every socket by listener name: (udp, tcp).
    named: HashMap<String, (Option<SocketAddr>, Option<SocketAddr>)>,
    stderr: Arc<Mutex<String>>,
    /// Dropped with the server, which stops its watchdog.
    _watchdog: mpsc::Sender<()>,
}

impl Server {
    /// Serves `plugin` on UDP and TCP, both on 127.0.0.1 with ephemeral
    /// ports, with `extra` arguments.
    pub fn start(plugin: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--plugin",
            plugin,
            "--udp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Self::with_args(&args)
    }

    /// Runs `wasm-echo serve ARGS` and waits for its `listening` lines.
    pub fn with_args(args: &[&str]) -> Self {
        let expected = ["--udp", "--tcp"]
            .iter()
            .filter(|flag| args.contains(flag))
            .count()
            .max(1);
        Self::expecting(args, expected + usize::from(args.contains(&"--metrics")))
    }

    /// Writes `toml` to a scratch file, serves it, and waits for `sockets`
    /// `listening` lines.
    pub fn with_config(toml: &str, sockets: usize) -> Self {
        let path = scratch_file("wasm-echo.toml", toml.as_bytes());
        Self::expecting(&["--config", path.to_str().expect("utf-8 path")], sockets)
    }

    /// Like [`Server::with_config`], with `extra` arguments (such as
    /// `--metrics`), waiting for `lines` `listening` lines in all.
    pub fn with_config_and(toml: &str, lines: usize, extra: &[&str]) -> Self {
        let path = scratch_file("wasm-echo.toml", toml.as_bytes());
        let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::expecting(&args, lines)
    }

    /// Like [`Server::with_args`], with `XDG_RUNTIME_DIR` set to `runtime`
    /// (where the server makes its default control socket).
    pub fn with_runtime_dir(runtime: &std::path::Path, args: &[&str]) -> Self {
        let expected = ["--udp", "--tcp"]
            .iter()
            .filter(|flag| args.contains(flag))
            .count()
            .max(1);
        Self::spawn(args, expected, &[("XDG_RUNTIME_DIR", runtime.as_os_str())])
    }

    /// Like [`Server::with_args`], with environment variables `env` set
    /// (such as `WASM_ECHO_LOG`), waiting for `lines` `listening` lines.
    pub fn with_env(env: &[(&str, &str)], args: &[&str], lines: usize) -> Self {
        let env: Vec<(&str, &std::ffi::OsStr)> = env
            .iter()
            .map(|(key, value)| (*key, std::ffi::OsStr::new(*value)))
            .collect();
        Self::spawn(args, lines, &env)
    }

    fn expecting(args: &[&str], expected: usize) -> Self {
        Self::spawn(args, expected, &[])
    }

    fn spawn(args: &[&str], expected: usize, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut command = Command::new(BIN);
        command.env("XDG_CACHE_HOME", shared_cache_home());
        command.envs(env.iter().copied());
        command.arg("serve").args(args).stdin(Stdio::null());
        Self::from_command(command, expected)
    }

    /// Runs `command`, a `wasm-echo serve` however it is started (a script
    /// that ends by exec'ing it, say, or with a stdin of the caller's
    /// choice), and waits for `expected` `listening` lines.
    pub fn from_command(mut command: Command, expected: usize) -> Self {
        let what = describe(&command);
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wasm-echo serve starts");
        let watchdog = watch_lifetime(child.id(), what);
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().expect("stderr piped");
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (lines, received) = mpsc::channel();
        let out = child.stdout.take().expect("stdout piped");
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            udp: None,
            tcp: None,
            named: HashMap::new(),
            metrics: None,
            stderr,
            _watchdog: watchdog,
        };
        let deadline = Instant::now() + PATIENCE;
        let mut seen = 0;
        while seen < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = received.recv_timeout(left) else {
                panic!(
                    "server did not report its sockets; stderr:\n{}",
                    server.stderr()
                );
            };
            let mut words = line.split_whitespace();
            if words.next() != Some("listening") {
                continue;
            }
            let protocol = words.next().expect("protocol");
            let addr: SocketAddr = words
                .next()
                .expect("address")
                .parse()
                .expect("a socket address");
            if protocol == "metrics" {
                server.metrics = Some(addr);
                seen += 1;
                continue;
            }
            let name = words.next().expect("listener name").to_owned();
            let entry = server.named.entry(name).or_default();
            match protocol {
                "udp" => (server.udp, entry.0) = (Some(addr), Some(addr)),
                "tcp" => (server.tcp, entry.1) = (Some(addr), Some(addr)),
                other => panic!("unexpected protocol {other}"),
            }
            seen += 1;
        }
        server
    }

    pub fn udp(&self) -> SocketAddr {
        self.udp.expect("serving udp")
    }

    pub fn tcp(&self) -> SocketAddr {
        self.tcp.expect("serving tcp")
    }

    /// The UDP address of listener `name`.
    pub fn udp_of(&self, name: &str) -> SocketAddr {
        self.named
            .get(name)
            .and_then(|(udp, _)| *udp)
            .unwrap_or_else(|| panic!("{name} serves no udp: {:?}", self.named))
    }

    /// The TCP address of listener `name`.
    pub fn tcp_of(&self, name: &str) -> SocketAddr {
        self.named
            .get(name)
            .and_then(|(_, tcp)| *tcp)
            .unwrap_or_else(|| panic!("{name} serves no tcp"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server has logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// Kills process `pid` if it is still running after [`SERVER_LIFETIME`],
/// unless the returned sender is dropped first. For any server a test
/// starts (Prometheus too), so that a hung test cannot leave it behind.
pub fn watch_lifetime(pid: u32, what: String) -> mpsc::Sender<()> {
    let (alive, watched) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(SERVER_LIFETIME) {
            eprintln!("`{what}` outlived {SERVER_LIFETIME:?}: killing it");
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    alive
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a file into this test process's scratch folder.
pub fn scratch_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wasm-echo-test-{}-{unique}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write scratch file");
    path
}

/// An address on 127.0.0.1 that was free a moment ago for both UDP and TCP,
/// for a server a test starts later.
///
/// Regressions it guards against, both seen as "address in use":
/// - it was only checked for TCP, so a test binding both protocols on it
///   failed when another test's UDP socket had the same port;
/// - it was a port the kernel picked (bound to port 0, then let go), so
///   between that and the server binding it, any client socket of a test
///   running beside it could be given the same ephemeral port. The ports
///   handed out now lie below the kernel's ephemeral range (32768 and up
///   on Linux), which no socket bound to port 0 is ever given, and each
///   is handed out once per test process.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::AtomicU16;
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    // Test processes that run side by side start at different places.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..1_000 {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start.wrapping_add(step.wrapping_mul(7))) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no port on 127.0.0.1 between 20000 and 32000 free for both UDP and TCP in 1,000 tries");
}

/// A UDP socket on 127.0.0.1 connected to `server`.
pub fn udp_client(server: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp client");
    socket.connect(server).expect("connect udp client");
    socket
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    socket
}

/// Sends one datagram and waits for the reply.
pub fn udp_ask(socket: &UdpSocket, message: &[u8]) -> Vec<u8> {
    socket.send(message).expect("send datagram");
    let mut buf = vec![0u8; 70_000];
    let len = socket.recv(&mut buf).expect("a reply datagram");
    buf.truncate(len);
    buf
}

/// Asserts that no datagram arrives within `wait` (a negative check can
/// only ever be bounded).
pub fn udp_expect_silence(socket: &UdpSocket, wait: Duration) {
    socket.set_read_timeout(Some(wait)).expect("read timeout");
    let mut buf = [0u8; 2048];
    let got = socket.recv(&mut buf);
    socket
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    match got {
        Ok(len) => panic!(
            "expected no reply, got {:?}",
            String::from_utf8_lossy(&buf[..len])
        ),
        // Silence is the wait running out, nothing else: an ICMP error
        // (connection refused) means the server's socket is gone.
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Err(error) => panic!("expected silence, got an error: {error}"),
    }
}

/// Waits (up to [`PATIENCE`]) for the server to close `stream`, and fails
/// if it does not: a read that times out is a connection left open.
pub fn expect_closed_by_server(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(len) => panic!(
            "expected the server to close the connection, got {:?}",
            String::from_utf8_lossy(&buf[..len])
        ),
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        Err(error) => panic!("the server did not close the connection: {error}"),
    }
}

/// A TCP connection to `server` with read timeouts.
pub fn tcp_client(server: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(server).expect("connect tcp");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Sends `message` and reads exactly `expected_len` bytes back.
pub fn tcp_ask(stream: &mut TcpStream, message: &[u8], expected_len: usize) -> Vec<u8> {
    stream.write_all(message).expect("send");
    let mut reply = vec![0u8; expected_len];
    stream.read_exact(&mut reply).expect("a whole reply");
    reply
}

/// Reads until the server closes the connection; returns what came.
pub fn tcp_read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => rest,
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => rest,
        Err(error) => panic!("expected the server to close the connection: {error}"),
    }
}

/// The built-in hello plugin's UDP greeting.
pub const GREETING_UDP: &[u8] = b"Hello, client!";
/// The built-in hello plugin's TCP greeting.
pub const GREETING_TCP: &[u8] = b"hello, tcp client!";

// Load that counts lost replies while plugins are swapped (echo and hello
// alternate): used by the reload tests and the registry's tag-following
// ones.

/// How long a request under load may wait for its reply before it counts
/// as lost: short, so a lost datagram fails at once with its count instead
/// of a minute's hang, and far above a reply's real latency.
pub const REPLY_WAIT: Duration = Duration::from_secs(5);

/// Swap progress shared with the clients: `2 * k` once `k` swaps are done,
/// `2 * k + 1` while swap `k + 1` is being made.
pub type Progress = Arc<AtomicUsize>;

/// Which plugin serves after `swaps` successful swaps (they alternate,
/// starting from echo).
pub fn serving_after(swaps: usize) -> &'static str {
    if swaps.is_multiple_of(2) {
        "echo"
    } else {
        "hello"
    }
}

/// Checks a reply that came back between two reads of `progress`: if no
/// swap was made or begun meanwhile, it must be the version the last swap
/// put in place; an older one would mean versions went back.
pub fn check_version(progress: &Progress, before: usize, version: &str, what: &str) {
    let after = progress.load(Ordering::SeqCst);
    if before == after && before.is_multiple_of(2) {
        let swaps = before / 2;
        assert_eq!(
            version,
            serving_after(swaps),
            "{what}: answered by a replaced version after swap {swaps}"
        );
    }
}

/// One UDP client: asks until `stop`, each reply within [`REPLY_WAIT`];
/// returns how many requests it made.
pub fn udp_load(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, progress: Progress) -> usize {
    let socket = udp_client(addr);
    socket.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
    let started = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) && sent < 500_000 && started.elapsed() < PATIENCE {
        let message = format!("udp {id} {sent}");
        let before = progress.load(Ordering::SeqCst);
        socket.send(message.as_bytes()).expect("send");
        let len = socket.recv(&mut buf).unwrap_or_else(|error| {
            panic!(
                "udp client {id}: request {sent} lost ({error} within {REPLY_WAIT:?}; \
                 {sent} answered before it)"
            )
        });
        let version = match &buf[..len] {
            r if r == message.as_bytes() => "echo",
            GREETING_UDP => "hello",
            other => panic!("{message:?} got {:?}", String::from_utf8_lossy(other)),
        };
        check_version(&progress, before, version, &message);
        sent += 1;
    }
    sent
}

/// One TCP client: connections of five exchanges each until `stop`, each
/// reply within [`REPLY_WAIT`], each connection on one version; returns
/// how many requests it made.
pub fn tcp_load(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, progress: Progress) -> usize {
    let started = Instant::now();
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && sent < 500_000 && started.elapsed() < PATIENCE {
        let before = progress.load(Ordering::SeqCst);
        let mut stream = tcp_client(addr);
        stream.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
        let mut versions = Vec::new();
        for round in 0..5 {
            let message = format!("tcp {id} {sent} {round}");
            stream.write_all(message.as_bytes()).expect("send");
            let mut buf = [0u8; 64];
            let len = stream.read(&mut buf).unwrap_or_else(|error| {
                panic!("tcp client {id}: {message:?} lost ({error} within {REPLY_WAIT:?})")
            });
            let version = match &buf[..len] {
                r if r == message.as_bytes() => "echo",
                GREETING_TCP => "hello",
                other => panic!("{message:?} got {:?}", String::from_utf8_lossy(other)),
            };
            if round == 0 {
                check_version(&progress, before, version, &message);
            }
            versions.push(version);
            sent += 1;
        }
        assert!(
            versions.iter().all(|v| *v == versions[0]),
            "one connection saw two versions: {versions:?}"
        );
    }
    sent
}
