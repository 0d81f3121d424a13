//! `wasm-echo new`: for every language, the project it writes builds with
//! its own build.sh, passes `wasm-echo check`, and serves as its comments
//! say (echo; `exit` stops the listener).
//!
//! Python, JavaScript and C projects are built with the toolchains
//! scripts/build-polyglot.sh installed (its toolchains.env, in the folder
//! `WASM_ECHO_POLYGLOT_DIR` names), so nothing is installed here; Rust
//! projects use cargo with a target directory kept under target/ so that
//! reruns are quick.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{BIN, Server, one_line_error, run, udp_ask, udp_client};
use crate::polyglot::built_dir;

/// What `build.sh` needs beyond the usual environment.
struct Toolchains {
    /// Prepended to PATH.
    path: Option<String>,
    /// The WASI preview 1 adapter, for C.
    wasi_adapter: Option<String>,
}

/// The toolchains for `lang`; the polyglot ones must have been built (see
/// [`built_dir`]).
fn toolchains(lang: &str) -> Toolchains {
    if lang == "rust" {
        return Toolchains {
            path: None,
            wasi_adapter: None,
        };
    }
    let dir = built_dir();
    let file = dir.join("toolchains.env");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|error| {
        panic!(
            "{}: {error}: did scripts/build-polyglot.sh finish?",
            file.display()
        )
    });
    let value = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    Toolchains {
        path: Some(value("TOOLCHAIN_PATH").expect("TOOLCHAIN_PATH in toolchains.env")),
        wasi_adapter: value("WASI_ADAPTER"),
    }
}

/// target/, where the binary under test lives.
fn target_dir() -> PathBuf {
    Path::new(BIN)
        .ancestors()
        .nth(2)
        .expect("the binary is in target/release")
        .to_path_buf()
}

/// Asserts that `output` is a success, showing what it printed if not.
fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `wasm-echo new`, the project's build.sh, `wasm-echo check`, and a
/// UDP exchange with the built plugin.
fn new_project_builds_and_passes_check(lang: &str) {
    let tools = toolchains(lang);
    let name = format!("my-{lang}-plugin");
    let project = std::env::temp_dir().join(format!("wasm-echo-new-{}-{lang}", std::process::id()));
    let _ = std::fs::remove_dir_all(&project);
    let project_arg = project.to_str().expect("a UTF-8 path");

    let output = run(&["new", "--lang", lang, &name, "--dir", project_arg]);
    assert_success("wasm-echo new", &output);
    assert!(
        project.join("wit/plugin.wit").is_file(),
        "the WIT is copied"
    );

    let mut build = Command::new(project.join("build.sh"));
    // What cargo set for this test must not leak into the project's build.
    for variable in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        build.env_remove(variable);
    }
    if lang == "rust" {
        build.env("CARGO_TARGET_DIR", target_dir().join("scaffold-rust"));
    }
    if let Some(dirs) = &tools.path {
        let path = std::env::var("PATH").unwrap_or_default();
        build.env("PATH", format!("{dirs}:{path}"));
    }
    if let Some(adapter) = &tools.wasi_adapter {
        build.env("WASI_ADAPTER", adapter);
    }
    let output = build.output().expect("build.sh runs");
    assert_success(
        &format!("{lang} build.sh in {}", project.display()),
        &output,
    );

    let wasm = project.join(format!("{name}.wasm"));
    let wasm_arg = wasm.to_str().expect("a UTF-8 path");
    let output = run(&["check", wasm_arg]);
    assert_success("wasm-echo check", &output);
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("ok: "));

    let mut server = Server::with_args(&["--plugin", wasm_arg, "--udp", "127.0.0.1:0"]);
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"\x00\xffhi"), b"\x00\xffhi");
    socket.send(b"exit").expect("send exit");
    assert!(server.wait_exit().success(), "stderr:\n{}", server.stderr());

    let _ = std::fs::remove_dir_all(&project);
}

#[test]
fn a_rust_project_builds_and_passes_check() {
    new_project_builds_and_passes_check("rust");
}

#[test]
#[cfg_attr(skip_polyglot, ignore = "WASM_ECHO_SKIP_TESTS names polyglot")]
fn a_python_project_builds_and_passes_check() {
    new_project_builds_and_passes_check("python");
}

#[test]
#[cfg_attr(skip_polyglot, ignore = "WASM_ECHO_SKIP_TESTS names polyglot")]
fn a_js_project_builds_and_passes_check() {
    new_project_builds_and_passes_check("js");
}

#[test]
#[cfg_attr(skip_polyglot, ignore = "WASM_ECHO_SKIP_TESTS names polyglot")]
fn a_c_project_builds_and_passes_check() {
    new_project_builds_and_passes_check("c");
}

#[test]
fn new_refuses_a_non_empty_directory_and_a_bad_name_in_one_line() {
    let dir = std::env::temp_dir().join(format!("wasm-echo-new-{}-taken", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::write(dir.join("notes.txt"), "mine").expect("a file");
    let dir_arg = dir.to_str().expect("a UTF-8 path");
    for (args, needle) in [
        (
            vec!["new", "--lang", "rust", "shout", "--dir", dir_arg],
            "already exists and is not empty",
        ),
        (
            vec!["new", "--lang", "c", "Shout!", "--dir", dir_arg],
            "invalid plugin name `Shout!`",
        ),
    ] {
        one_line_error(&run(&args), &[needle]);
    }
    assert_eq!(
        std::fs::read_dir(&dir).expect("still there").count(),
        1,
        "nothing was written"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `new` without `--dir` writes `./NAME` where it runs, and with `--dir`
/// it takes a folder that exists but is empty; in both, the project is
/// there whole (its WIT, build.sh, README and source).
#[test]
fn new_writes_into_name_by_default_and_into_an_empty_folder() {
    let base = std::env::temp_dir().join(format!("wasm-echo-new-{}-places", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(base.join("empty")).expect("scratch dirs");
    let written = |project: &Path| {
        for file in ["wit/plugin.wit", "build.sh", "README.md", "Cargo.toml"] {
            assert!(
                project.join(file).is_file(),
                "{} lacks {file}",
                project.display()
            );
        }
    };

    let output = crate::common::run_in(&base, &["new", "--lang", "rust", "shout"]);
    assert_success("wasm-echo new shout", &output);
    written(&base.join("shout"));

    let output = crate::common::run_in(
        &base,
        &["new", "--lang", "rust", "whisper", "--dir", "empty"],
    );
    assert_success("wasm-echo new --dir empty", &output);
    written(&base.join("empty"));
    assert!(
        !base.join("whisper").exists(),
        "--dir is used instead of ./NAME"
    );
    let _ = std::fs::remove_dir_all(&base);
}
