//! The container image: `deploy/image.sh` builds an OCI image layout with
//! umoci, without a daemon, whose only file is a static wasm-echo; unpacked
//! by umoci, that binary serves.
//!
//! Its static build is a second compile of everything, wasmtime included
//! (22 CPU-minutes measured here, on a loaded machine), which the suite's
//! time on a fresh machine has no room for; so this test runs in a step of
//! its own, `scripts/test-image.sh` (which `.ci/run` runs after
//! `scripts/test.sh`), and is reported as ignored, with that reason, in
//! the rest of the suite. That step builds the image first, so the script
//! here only repacks.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Server, repo_file, scratch_file, succeeded, udp_ask, udp_client};

/// How long the script may take: seconds once the static binary is built,
/// minutes when it must be compiled first (the test run by hand after a
/// change to the host).
const BUILD_PATIENCE: Duration = Duration::from_secs(15 * 60);

/// Runs `program ARGS` to completion within `patience`, its output kept.
fn run_bounded(program: &Path, args: &[&str], patience: Duration) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()));
    let deadline = Instant::now() + patience;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{} did not finish within {patience:?}", program.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            let relative = path.strip_prefix(dir).expect("under dir");
            found.push(relative.display().to_string());
        }
    }
    found.sort();
    found
}

#[test]
#[ignore = "a second compile of everything: scripts/test-image.sh runs it"]
fn the_image_holds_a_static_binary_alone_and_it_serves() {
    let scratch = scratch_file("placeholder", b"");
    let layout = scratch.with_file_name("layout");
    let bundle = scratch.with_file_name("bundle");
    let layout_arg = layout.to_str().expect("utf-8 path");
    let output = run_bounded(&repo_file("deploy/image.sh"), &[layout_arg], BUILD_PATIENCE);
    succeeded("deploy/image.sh", &output);

    // One image, tagged with the crate's version.
    let umoci = Path::new("umoci");
    let tags = run_bounded(
        umoci,
        &["ls", "--layout", layout_arg],
        Duration::from_secs(60),
    );
    assert_eq!(
        succeeded("umoci ls", &tags).trim(),
        env!("CARGO_PKG_VERSION")
    );

    let image = format!("{layout_arg}:{}", env!("CARGO_PKG_VERSION"));
    let unpacked = run_bounded(
        umoci,
        &[
            "unpack",
            "--rootless",
            "--image",
            &image,
            bundle.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(60),
    );
    succeeded("umoci unpack", &unpacked);
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        tree(&rootfs),
        ["wasm-echo"],
        "the image holds the binary alone"
    );

    // The runtime configuration umoci derives from the image's: the
    // entrypoint and default command, and the unprivileged user.
    let runtime: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("config.json"))
            .expect("JSON");
    let process = &runtime["process"];
    assert_eq!(process["args"], serde_json::json!(["/wasm-echo", "serve"]));
    assert_eq!(process["user"]["uid"], 65532);

    // Static: nothing for the loader to find in an image that has no
    // libraries.
    let binary = rootfs.join("wasm-echo");
    let file = run_bounded(
        Path::new("file"),
        &["-b", binary.to_str().expect("utf-8 path")],
        Duration::from_secs(60),
    );
    let kind = String::from_utf8_lossy(&file.stdout);
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "{kind}"
    );

    // And it serves, with nothing from the environment.
    let mut command = Command::new(&binary);
    command
        .env_clear()
        .args(["serve", "--plugin", "echo", "--udp", "127.0.0.1:0"]);
    let server = Server::from_command(command, 1);
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"from the image"), b"from the image");
}
