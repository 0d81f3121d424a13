//! Plugins from an OCI registry: `push`, `pull`, `check` and `serve` by
//! digest against Debian's real registry on 127.0.0.1 (see
//! [`crate::registry`]); tampered blobs refused, tags opt-in and followed,
//! the cache when the registry is down, and basic auth.

use std::process::Command;

use base64::Engine as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::thread;

use crate::common::{
    BIN, GREETING_UDP, Progress, Server, control, control_path, one_line_error, plugins,
    poll_until, run, run_command, scratch_file, succeeded, tcp_load, udp_ask, udp_client, udp_load,
};
use crate::registry::{PASSWORD, Registry, USER};

/// A private cache folder of the test's own.
fn cache_dir() -> String {
    let marker = scratch_file("cache-marker", b"");
    let dir = marker.parent().expect("scratch folder").join("cache");
    dir.to_str().expect("utf-8 path").to_owned()
}

/// `wasm-echo push FILE REFERENCE` with `env` set; returns the pinned
/// reference it prints.
fn push_with(file: &str, reference: &str, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(BIN);
    command
        .args(["push", file, reference, "--cache-dir", &cache_dir()])
        .env_remove("WASM_ECHO_REGISTRY_USERNAME")
        .env_remove("WASM_ECHO_REGISTRY_PASSWORD")
        .envs(env.iter().copied());
    let stdout = succeeded("push", &run_command(command));
    let pinned = stdout
        .trim()
        .strip_prefix("pushed ")
        .unwrap_or_else(|| panic!("push prints `pushed REF`: {stdout}"))
        .to_owned();
    assert!(pinned.contains("@sha256:"), "{pinned}");
    pinned
}

fn push(file: &str, reference: &str) -> String {
    push_with(file, reference, &[])
}

/// Serves `reference` on UDP with `extra` arguments and a control socket.
fn serve(reference: &str, cache: &str, extra: &[&str]) -> (Server, std::path::PathBuf) {
    let control = control_path();
    let mut args = vec![
        "--plugin",
        reference,
        "--udp",
        "127.0.0.1:0",
        "--cache-dir",
        cache,
        "--control",
        control.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    (Server::with_args(&args), control)
}

/// The digest of the component layer `file` becomes when pushed: the
/// sha256 of its bytes.
fn layer_digest(file: &str) -> String {
    wasm_echo::registry::sha256(&std::fs::read(file).expect("built plugin"))
}

/// Push, then `pull`, `check` and `serve` by digest: the plugin's own
/// reply comes back, from a server whose cache started empty.
#[test]
#[cfg_attr(skip_registry, ignore = "WASM_ECHO_SKIP_TESTS names registry")]
fn a_pushed_component_is_pulled_checked_and_served_by_digest() {
    let registry = Registry::start();
    let pinned = push(plugins::ECHO, &registry.reference("echo", "v1"));

    let cache = cache_dir();
    let pulled = succeeded("pull", &run(&["pull", &pinned, "--cache-dir", &cache]));
    assert!(pulled.contains(&pinned), "{pulled}");
    assert!(pulled.contains(&format!("{cache}/oci")), "{pulled}");
    let checked = succeeded("check", &run(&["check", &pinned, "--cache-dir", &cache]));
    assert!(checked.starts_with(&format!("ok: {pinned}")), "{checked}");

    let (server, _control) = serve(&pinned, &cache_dir(), &[]);
    let client = udp_client(server.udp());
    assert_eq!(udp_ask(&client, b"from the registry"), b"from the registry");
    server.wait_for_log("fetched from the registry, verified and cached");
}

/// `pull` compiles too (issue 15's swaps without a dip: a version compiled
/// ahead is swapped in without compiling while serving): a server given
/// the same cache folder then loads that version's code from the cache.
#[test]
#[cfg_attr(skip_registry, ignore = "WASM_ECHO_SKIP_TESTS names registry")]
fn a_pulled_version_is_compiled_ahead_and_started_from_the_cache() {
    let registry = Registry::start();
    let pinned = push(plugins::ECHO, &registry.reference("ahead", "v1"));
    let cache = cache_dir();
    let pulled = succeeded("pull", &run(&["pull", &pinned, "--cache-dir", &cache]));
    assert!(
        pulled.contains(&format!("compiled into {cache}/compiled")),
        "{pulled}"
    );

    let server = Server::with_env(
        &[("WASM_ECHO_LOG", "debug")],
        &[
            "--plugin",
            &pinned,
            "--udp",
            "127.0.0.1:0",
            "--cache-dir",
            &cache,
        ],
        1,
    );
    let log = server.wait_for_log("loaded from the cache");
    assert!(
        !log.contains("kept in the cache"),
        "it compiled again:\n{log}"
    );
    let client = udp_client(server.udp());
    assert_eq!(udp_ask(&client, b"compiled ahead"), b"compiled ahead");
}

/// A blob whose bytes were changed in the registry's storage is refused in
/// one line naming both digests, and the version running stays.
#[test]
#[cfg_attr(skip_registry, ignore = "WASM_ECHO_SKIP_TESTS names registry")]
fn a_tampered_blob_is_refused_and_the_running_version_stays() {
    let registry = Registry::start();
    let echo = push(plugins::ECHO, &registry.reference("plugin", "v1"));
    let hello = push(plugins::HELLO, &registry.reference("plugin", "v2"));
    let layer = layer_digest(plugins::HELLO);
    let blob = registry.blob_file(&layer);
    let mut bytes = std::fs::read(&blob).expect("the layer is in the registry's storage");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, &bytes).expect("tampered");

    let (server, control_socket) = serve(&echo, &cache_dir(), &[]);
    let failed = control("reload", &control_socket, &["--plugin", &hello]);
    let line = one_line_error(
        &failed,
        &[
            "reload failed, nothing changed",
            &format!("refusing blob {layer}"),
            "its bytes have digest sha256:",
        ],
    );
    assert!(
        line.contains(&hello),
        "the refusal names the reference: {line}"
    );
    let client = udp_client(server.udp());
    assert_eq!(udp_ask(&client, b"still echo"), b"still echo");
}

/// A tenant pinned by digest keeps its version when the tag it was pushed
/// under moves; a tenant of the same server following the tag swaps, which
/// shows the move was seen.
#[test]
#[cfg_attr(skip_registry, ignore = "WASM_ECHO_SKIP_TESTS names registry")]
fn a_tenant_pinned_by_digest_ignores_a_tag_move() {
    let registry = Registry::start();
    let tag = registry.reference("plugin", "live");
    let echo = push(plugins::ECHO, &tag);
    let toml = format!(
        "cache-dir = \"{}\"\n\
         [listeners.pinned]\nplugin = \"{echo}\"\nudp = \"127.0.0.1:0\"\n\
         [listeners.follower]\nplugin = \"{tag}\"\nudp = \"127.0.0.1:0\"\n\
         allow-tags = true\ntag-poll-interval = \"200ms\"\n",
        cache_dir()
    );
    let server = Server::with_config(&toml, 2);
    server.wait_for_log(&format!("following {tag}"));
    push(plugins::HELLO, &tag);
    server.wait_for_log("reloaded: listener `follower`");
    let follower = udp_client(server.udp_of("follower"));
    assert_eq!(udp_ask(&follower, b"x"), GREETING_UDP);
    let pinned = udp_client(server.udp_of("pinned"));
    assert_eq!(udp_ask(&pinned, b"still echo"), b"still echo");
    assert!(
        !server.stderr().contains("reloaded: listener `pinned`"),
        "{}",
        server.stderr()
    );
}

/// The fleet rollout: two servers follow one tag; when it moves, both swap
/// while clients keep sending over UDP and TCP, and no reply is lost.
#[test]
#[cfg_attr(skip_registry, ignore = "WASM_ECHO_SKIP_TESTS names registry")]
fn two_servers_following_one_tag_both_swap_under_load_losing_nothing() {
    let registry = Registry::start();
    let tag = registry.reference("fleet", "live");
    push(plugins::ECHO, &tag);
    let follow = |cache: &str| {
        Server::with_args(&[
            "--plugin",
            &tag,
            "--allow-tags",
            "--tag-poll-interval",
            "200ms",
            "--udp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--cache-dir",
            cache,
            "--control",
            control_path().to_str().expect("utf-8 path"),
        ])
    };
    let servers = [follow(&cache_dir()), follow(&cache_dir())];
    let done = Arc::new(AtomicBool::new(false));
    // Odd progress: a swap may happen at any moment, so either version is
    // a right answer; what counts is that every request gets one.
    let progress: Progress = Arc::new(AtomicUsize::new(1));
    let mut clients = Vec::new();
    for (id, server) in servers.iter().enumerate() {
        let (addr, stop, progress_) = (server.udp(), done.clone(), progress.clone());
        clients.push(thread::spawn(move || udp_load(addr, id, stop, progress_)));
        let (addr, stop, progress_) = (server.tcp(), done.clone(), progress.clone());
        clients.push(thread::spawn(move || tcp_load(addr, id, stop, progress_)));
    }
    push(plugins::HELLO, &tag);
    for server in &servers {
        server.wait_for_log("reloaded: listener `main`");
        let client = udp_client(server.udp());
        poll_until("the server answers with the new version", || {
            (udp_ask(&client, b"x") == GREETING_UDP).then_some(())
        });
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let requests: usize = clients
        .into_iter()
        .map(|client| client.join().expect("no request lost or wrong"))
        .sum();
    eprintln!("tag move under load: {requests} requests, none lost");
    assert!(requests > 0, "the load ran");
}

/// With the registry stopped, a server restarts from its cache, by digest
/// and by tag (the digest the tag had when last seen), and says so.
#[test]
#[cfg_attr(skip_registry, ignore = "WASM_ECHO_SKIP_TESTS names registry")]
fn with_the_registry_stopped_a_server_starts_from_the_cache() {
    let mut registry = Registry::start();
    let tag = registry.reference("cached", "v1");
    let pinned = push(plugins::ECHO, &tag);
    let cache = cache_dir();
    drop(serve(&pinned, &cache, &[]));
    drop(serve(&tag, &cache, &["--allow-tags"]));
    registry.stop();

    let (server, _control) = serve(&pinned, &cache, &[]);
    server.wait_for_log("read from the cache, verified; no registry contacted");
    let client = udp_client(server.udp());
    assert_eq!(udp_ask(&client, b"cached"), b"cached");

    let (server, _control) = serve(&tag, &cache, &["--allow-tags"]);
    server.wait_for_log("the digest the tag had when last seen, from the cache");
    let client = udp_client(server.udp());
    assert_eq!(udp_ask(&client, b"cached tag"), b"cached tag");
}

/// A registry that wants credentials: without them, one line saying what
/// to set; with them from the environment or a docker config.json, the
/// plugin serves.
#[test]
#[cfg_attr(skip_registry, ignore = "WASM_ECHO_SKIP_TESTS names registry")]
fn a_registry_that_requires_auth_says_so_without_credentials_and_serves_with_them() {
    let registry = Registry::start_with_auth();
    let credentials = [
        ("WASM_ECHO_REGISTRY_USERNAME", USER),
        ("WASM_ECHO_REGISTRY_PASSWORD", PASSWORD),
    ];
    let pinned = push_with(
        plugins::ECHO,
        &registry.reference("private", "v1"),
        &credentials,
    );

    let mut command = Command::new(BIN);
    command
        .args(["serve", "--plugin", &pinned, "--udp", "127.0.0.1:0"])
        .args(["--cache-dir", &cache_dir()])
        .env_remove("WASM_ECHO_REGISTRY_USERNAME")
        .env_remove("WASM_ECHO_REGISTRY_PASSWORD");
    let refused = run_command(command);
    one_line_error(
        &refused,
        &[
            &format!(
                "registry {} says unauthorized: set WASM_ECHO_REGISTRY_USERNAME",
                registry.addr
            ),
            &pinned,
        ],
    );

    let server = Server::with_env(
        &credentials,
        &[
            "--plugin",
            &pinned,
            "--udp",
            "127.0.0.1:0",
            "--cache-dir",
            &cache_dir(),
        ],
        1,
    );
    let client = udp_client(server.udp());
    assert_eq!(udp_ask(&client, b"with env"), b"with env");

    let auth_file = scratch_file(
        "config.json",
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{}\"}}}}}}",
            registry.addr,
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        )
        .as_bytes(),
    );
    let server = Server::with_args(&[
        "--plugin",
        &pinned,
        "--udp",
        "127.0.0.1:0",
        "--cache-dir",
        &cache_dir(),
        "--registry-auth",
        auth_file.to_str().expect("utf-8 path"),
    ]);
    let client = udp_client(server.udp());
    assert_eq!(udp_ask(&client, b"with file"), b"with file");
}

/// A reference by tag without `allow-tags` is refused in one line, from
/// flags and from a file, before anything binds (the address stays free).
#[test]
fn a_tag_reference_without_the_opt_in_is_refused_before_anything_binds() {
    let addr = crate::common::free_port().to_string();
    let tag = "oci://127.0.0.1:9/echo:latest";
    let refused = run(&["serve", "--plugin", tag, "--udp", &addr]);
    one_line_error(&refused, &[tag, "names a tag", "allow-tags"]);
    assert!(
        !String::from_utf8_lossy(&refused.stdout).contains("listening"),
        "nothing was bound"
    );
    std::net::UdpSocket::bind(&addr).expect("the address was never taken");

    let toml = format!("[listeners.main]\nplugin = \"{tag}\"\nudp = \"{addr}\"\n");
    let file = scratch_file("tags.toml", toml.as_bytes());
    let refused = run(&["serve", "--config", file.to_str().expect("utf-8 path")]);
    one_line_error(&refused, &["listeners.main", "plugin", "allow-tags = true"]);
}
