//! Servers in processes of their own: a target (this same binary, run as
//! `wasm-echo-bench server`) or another program such as the C baseline.
//! Measuring a server's resident set ([`crate::memory`]) or its CPU time
//! ([`crate::cpu`]) needs a process that holds that server alone, with none
//! of the load generator's sockets or threads.
//!
//! A child prints `listening udp ADDR` and `listening tcp ADDR`, then
//! serves until its standard input closes, so it never outlives the bench.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::targets::{self, Addrs, Kind};

/// The kernel's unit for a process's CPU time in `/proc/PID/stat`:
/// USER_HZ, which is 100 in the Linux ABI of every architecture the project
/// builds for (it is not the kernel's tick rate, which may differ).
const USER_HZ: u64 = 100;

/// A server in a child process; killed when dropped, whatever happened in
/// between.
pub struct ChildServer {
    child: Child,
    /// Where it serves.
    pub addrs: Addrs,
}

impl ChildServer {
    /// Starts `kind` serving `plugin` in a child process of this binary,
    /// with room for `connections` connections.
    ///
    /// # Errors
    ///
    /// A child that does not start or does not say where it listens.
    pub fn target(kind: Kind, plugin: &str, connections: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the bench binary")?;
        let mut command = Command::new(exe);
        command
            .args(["server", "--kind", kind.arg(), "--plugin", plugin])
            .args(["--connections", &connections.to_string()]);
        Self::spawn(command).with_context(|| format!("starting {kind} in a child process"))
    }

    /// Starts the program at `path`, which must speak the protocol above.
    ///
    /// # Errors
    ///
    /// A program that does not start or does not say where it listens.
    pub fn program(path: &Path) -> anyhow::Result<Self> {
        Self::spawn(Command::new(path)).with_context(|| format!("starting {}", path.display()))
    }

    fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut server = Self {
            child,
            addrs: Addrs {
                udp: ([127, 0, 0, 1], 0).into(),
                tcp: ([127, 0, 0, 1], 0).into(),
            },
        };
        let stdout = server.child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        for _ in 0..2 {
            let line = lines.next().context("the child ended before listening")??;
            let (protocol, addr) = line
                .strip_prefix("listening ")
                .and_then(|rest| rest.split_once(' '))
                .with_context(|| format!("the child said {line:?}"))?;
            let addr: SocketAddr = addr.parse()?;
            match protocol {
                "udp" => server.addrs.udp = addr,
                "tcp" => server.addrs.tcp = addr,
                _ => anyhow::bail!("the child said {line:?}"),
            }
        }
        Ok(server)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CPU time the child has used so far, user and system, with every
    /// thread it ever ran (to 10 ms).
    ///
    /// # Errors
    ///
    /// A child that is gone, or a kernel without `/proc`.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // The command name, field 2, is in parentheses and may hold spaces;
        // utime and stime are fields 14 and 15, the 12th and 13th after it.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("no command name in /proc/PID/stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks = |index: usize| -> anyhow::Result<u64> {
            Ok(fields
                .get(index)
                .context("/proc/PID/stat too short")?
                .parse()?)
        };
        let total = ticks(11)? + ticks(12)?;
        Ok(Duration::from_millis(total * 1000 / USER_HZ))
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: serves `kind` with `plugin` on loopback, says where,
/// and exits when its standard input closes.
///
/// # Errors
///
/// A server that does not start.
pub fn serve(kind: Kind, plugin: &str, connections: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let addrs = targets::start(kind, plugin, connections).await?;
        println!("listening udp {}", addrs.udp);
        println!("listening tcp {}", addrs.tcp);
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await?;
        anyhow::Ok(())
    })
}
