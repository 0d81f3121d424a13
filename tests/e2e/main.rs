//! End-to-end tests: every test starts the real `wasm-echo` binary on
//! 127.0.0.1 with ephemeral ports and talks to it over real sockets.

mod common;

/// The admin endpoint: health, readiness and drain, `/metrics`.
mod admin;
/// The optional `udp-batch`: batches answered as single calls would be, lying batches contained.
mod batch;
/// Command-line errors: each bad input gets one clear line.
mod cli;
/// The compiled-code cache: second starts and reloads back load, damaged entries recompile.
mod compile_cache;
/// Configuration files: every mistake refused before anything binds.
mod config;
/// The counter plugin: per-connection and per-peer state.
mod counter;
/// The echo plugin: sizes, binary data, long streams, many clients.
mod echo;
/// Plugins that trap, loop or bloat fail one message, not the server.
mod faults;
/// TCP framing: raw chunks, lines, length-prefixed frames, and their errors.
mod framing;
/// The documents' exchange, `exit`, their Python clients and shutdown.
mod hello;
/// An idle server sleeps, and wakes for the next call's deadline.
mod idle;
/// The container image deploy/image.sh builds: a static binary alone, that serves.
mod image;
/// The Kubernetes manifests: valid against the schemas, and in step with their TOML.
mod kubernetes;
/// Plugin output (log calls, stdout, stderr, panics) reaches the log bounded and escaped.
mod logs;
/// `/metrics` counts exactly the traffic sent; JSON logs; `status`.
mod metrics;
/// State hand-over between versions across a reload.
mod migration;
/// Three nodes behind nginx (`deploy/multinode.sh`): spread, real clients, drain, rolling swap.
mod multinode;
/// Plugins from a real OCI registry: push, pull, digests verified, tags followed, the cache.
mod oci;
/// The hello and echo plugins in Python, JavaScript and C, held to the Rust ones' behaviour.
mod polyglot;
/// Debian's prometheus with the shipped scrape config; the Grafana dashboard's series.
mod prometheus;
/// A real registry (Debian's docker-registry) on 127.0.0.1, for `oci`.
mod registry;
/// Hot reloads: under load, on file changes, on SIGHUP, and failed ones.
mod reload;
/// A plugin instance whose memory keeps growing is renewed before its cap.
mod renewal;
/// Recording traffic and replaying it against another plugin version.
mod replay;
/// One configuration path for flags and files; one control socket a server.
mod resolution;
/// Safe rollout: canary and shadow, gated promotion and rollback.
mod rollout;
/// Bounds that hold whatever the guest does: blocked calls, piled-up
/// handles, files that are not plugins, and the host's own warnings.
mod sandbox;
/// `wasm-echo new`: every language's project builds, passes `check` and serves.
mod scaffold;
/// Behind a load balancer: PROXY protocol headers, `reuse-port`.
mod scaleout;
/// Peers and log readers that stop reading cannot hold the server.
mod stalls;
/// Tenants' limits, and hostile plugins contained next to a good tenant.
mod tenants;
