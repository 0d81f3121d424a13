//! The compiled-code cache: a plugin's second start and a reload back to a
//! version already seen load compiled code instead of compiling, an entry
//! that was damaged is compiled again rather than trusted, and a cache that
//! another user could write is refused. Each test has a `--cache-dir` of
//! its own, so no test sees another's entries, and each tells a load from
//! the cache by the server's debug log, never by how long it took.

use std::path::{Path, PathBuf};

use crate::common::{
    self, Server, control_path, one_line_error, plugins, run, scratch_file, udp_ask, udp_client,
};

/// What the log says when compiled code came from the cache.
const FROM_CACHE: &str = "loaded from the cache";
/// What the log says when code was compiled and written to the cache.
const KEPT: &str = "kept in the cache";

/// An empty cache directory of the test's own, private to this user.
fn cache_dir() -> PathBuf {
    let dir = scratch_file("placeholder", b"").with_file_name("cache");
    std::fs::create_dir_all(&dir).expect("cache dir");
    dir
}

/// Serves `plugin` on UDP with `cache` as its cache directory, logging at
/// debug (where the cache's lines are), plus `extra` arguments.
fn serve(plugin: &str, cache: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--plugin",
        plugin,
        "--udp",
        "127.0.0.1:0",
        "--cache-dir",
        cache.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    Server::with_env(&[("WASM_ECHO_LOG", "debug")], &args, 1)
}

/// The files wasmtime keeps compiled code in, under `cache`: everything in
/// `compiled/modules/*/` but its `.stats` bookkeeping.
fn entries(cache: &Path) -> Vec<PathBuf> {
    let modules = cache.join("compiled").join("modules");
    let mut found = Vec::new();
    for version in std::fs::read_dir(&modules)
        .expect("compiled/modules")
        .flatten()
    {
        for entry in std::fs::read_dir(version.path())
            .expect("a version's dir")
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_none() {
                found.push(path);
            }
        }
    }
    found
}

/// Starts `plugin` once against an empty `cache` and checks it compiled it
/// and kept the code.
fn fill(plugin: &str, cache: &Path) {
    let server = serve(plugin, cache, &[]);
    let log = server.wait_for_log(KEPT);
    assert!(!log.contains(FROM_CACHE), "an empty cache had it:\n{log}");
    assert_eq!(udp_ask(&udp_client(server.udp()), b"ping"), b"ping");
}

/// The second start of a plugin loads its compiled code from the cache,
/// and serves with it.
#[test]
fn a_second_start_loads_compiled_code_from_the_cache() {
    let cache = cache_dir();
    fill(plugins::ECHO, &cache);
    assert_eq!(entries(&cache).len(), 1, "one component, one entry");
    let server = serve(plugins::ECHO, &cache, &[]);
    let log = server.wait_for_log(FROM_CACHE);
    assert!(log.contains(plugins::ECHO), "{log}");
    assert_eq!(udp_ask(&udp_client(server.udp()), b"again"), b"again");
}

/// A reload back to a version the server compiled before is loaded from
/// the cache, and that version answers.
#[test]
fn a_reload_back_to_a_seen_version_comes_from_the_cache() {
    let cache = cache_dir();
    let control = control_path();
    let control_arg = control.to_str().expect("utf-8 path");
    let server = serve(plugins::ECHO, &cache, &["--control", control_arg]);
    server.wait_for_log(KEPT);
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"one"), b"one");

    let reload = |plugin: &str| {
        let output = common::control("reload", &control, &["--plugin", plugin]);
        assert!(output.status.success(), "{output:?}");
    };
    reload(plugins::HELLO);
    assert_eq!(udp_ask(&socket, b"two"), b"Hello, client!");
    let log = server.stderr();
    assert!(
        !log.contains(FROM_CACHE),
        "nothing was seen twice yet:\n{log}"
    );

    reload(plugins::ECHO);
    assert_eq!(udp_ask(&socket, b"three"), b"three");
    let log = server.wait_for_log(FROM_CACHE);
    let line = log
        .lines()
        .find(|line| line.contains(FROM_CACHE))
        .expect("the line");
    assert!(line.contains(plugins::ECHO), "{line}");
}

/// Regression guard: an entry damaged on disk (cut short, or overwritten)
/// must be compiled again and rewritten, never loaded; the server starts
/// and serves, and the next start is served from the repaired entry.
#[test]
fn a_damaged_entry_is_compiled_again_not_trusted() {
    type Damage = fn(&[u8]) -> Vec<u8>;
    let damages: [(&str, Damage); 3] = [
        ("cut in half", |bytes| bytes[..bytes.len() / 2].to_vec()),
        ("emptied", |_| Vec::new()),
        ("overwritten", |bytes| {
            bytes.iter().map(|byte| byte ^ 0x5a).collect()
        }),
    ];
    for (what, damage) in damages {
        let cache = cache_dir();
        fill(plugins::ECHO, &cache);
        let found = entries(&cache);
        assert_eq!(found.len(), 1, "one component, one entry");
        let bytes = std::fs::read(&found[0]).expect("the entry");
        std::fs::write(&found[0], damage(&bytes)).expect("damaged");

        let server = serve(plugins::ECHO, &cache, &[]);
        let log = server.wait_for_log(KEPT);
        assert!(
            !log.contains(FROM_CACHE),
            "an entry {what} was loaded:\n{log}"
        );
        assert_eq!(udp_ask(&udp_client(server.udp()), b"ping"), b"ping");
        drop(server);

        let server = serve(plugins::ECHO, &cache, &[]);
        server.wait_for_log(FROM_CACHE);
        assert_eq!(udp_ask(&udp_client(server.udp()), b"pong"), b"pong");
    }
}

/// Compiled code is run from `compiled`, so that subdirectory is held to
/// the cache directory's rule too: one that others can write is refused in
/// one line, before anything binds.
#[test]
fn a_compiled_dir_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let cache = cache_dir();
    let compiled = cache.join("compiled");
    std::fs::create_dir_all(&compiled).expect("made");
    std::fs::set_permissions(&compiled, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let cache_arg = cache.to_str().expect("utf-8 path");
    let output = run(&[
        "serve",
        "--plugin",
        plugins::ECHO,
        "--udp",
        "127.0.0.1:0",
        "--cache-dir",
        cache_arg,
    ]);
    let compiled_text = compiled.display().to_string();
    one_line_error(&output, &[&compiled_text, "can be written by others"]);
}
