//! Builds the guest plugins in `guest-plugins/` for `wasm32-wasip2` and
//! hands them to the host: the built-in plugins are embedded in the binary
//! (`$OUT_DIR/builtin_plugins.rs`), the test-only ones are given to the
//! end-to-end tests as paths (`$OUT_DIR/test_plugins.rs`).
//!
//! The guests live in their own workspace with the target pinned, so they
//! are built by a nested `cargo` into `target/guest-plugins`, shared by every
//! profile of the host.
//!
//! It also reads `WASM_ECHO_SKIP_TESTS`, the end-to-end tests' one opt-out
//! (see [`SKIPPABLE`]): a test attribute cannot read the environment, a
//! `cfg` set here can.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Plugins embedded in the `wasm-echo` binary, usable by name.
const BUILTIN: &[&str] = &["hello", "echo", "counter"];
/// Plugins that only the tests use.
const TEST_ONLY: &[&str] = &["counter-next", "trap", "hostile", "batcher"];
const TARGET: &str = "wasm32-wasip2";

/// What `WASM_ECHO_SKIP_TESTS` (a comma-separated list) may name: things an
/// end-to-end test needs that a machine may lack. Each named one sets the
/// `cfg` beside it, and the tests that need it are reported as ignored,
/// with the reason, instead of failing on what is missing. Nothing else
/// skips a test: without the opt-out, a test that cannot run fails and
/// says how to provide what it needs. `scripts/test.sh` never skips.
const SKIPPABLE: &[(&str, &str)] = &[
    // The Python, JavaScript and C toolchains and plugins
    // (`WASM_ECHO_POLYGLOT_DIR`, written by scripts/build-polyglot.sh).
    ("polyglot", "skip_polyglot"),
    // An IPv6 loopback address, `::1`.
    ("ipv6", "skip_ipv6"),
    // The documented default addresses, UDP and TCP port 12345, free.
    ("default-ports", "skip_default_ports"),
    // Debian's nginx with its stream module (scripts/install-debian.sh),
    // the balancer of deploy/multinode.sh.
    ("nginx", "skip_nginx"),
    // Debian's prometheus (scripts/bootstrap.sh installs it).
    ("prometheus", "skip_prometheus"),
    // Debian's docker-registry and htpasswd (scripts/install-debian.sh).
    ("registry", "skip_registry"),
    // kubernetes-validate in target/venv (scripts/bootstrap.sh installs it).
    ("kubernetes", "skip_kubernetes"),
];
const SKIP_VARIABLE: &str = "WASM_ECHO_SKIP_TESTS";

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let root = manifest_dir
        .parent()
        .ok_or("host/ has no parent")?
        .to_path_buf();
    let guests = root.join("guest-plugins");
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guest-plugins");

    for path in ["Cargo.toml", "Cargo.lock", ".cargo"] {
        println!("cargo::rerun-if-changed={}", guests.join(path).display());
    }
    // `lean` is the std-less runtime some plugins link.
    for name in BUILTIN.iter().chain(TEST_ONLY).chain(&["lean"]) {
        println!("cargo::rerun-if-changed={}", guests.join(name).display());
    }
    println!("cargo::rerun-if-changed={}", root.join("wit").display());

    skip_tests()?;
    check_target_installed()?;

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&guests)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    // The host build's own settings must not leak into the guest build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .map_err(|e| format!("running cargo for guest-plugins: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building guest-plugins for {TARGET} failed ({status})"
        ));
    }

    let artifacts = target_dir.join(TARGET).join("release");
    let artifact = |name: &str| -> Result<PathBuf, String> {
        // A crate's artifact is named with `_` where its name has `-`.
        let path = artifacts.join(format!("{}.wasm", name.replace('-', "_")));
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{} was not built", path.display()))
        }
    };

    let mut builtin = String::from(
        "/// The plugins embedded in this binary: name and component bytes.\n\
         pub const BUILTIN_PLUGINS: &[(&str, &[u8])] = &[\n",
    );
    for name in BUILTIN {
        let path = artifact(name)?;
        writeln!(
            builtin,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .map_err(|e| e.to_string())?;
    }
    builtin.push_str("];\n");
    write(&out_dir.join("builtin_plugins.rs"), &builtin)?;

    let mut test_only = String::new();
    for name in BUILTIN.iter().chain(TEST_ONLY) {
        let path = artifact(name)?;
        writeln!(
            test_only,
            "/// The `{name}` guest plugin, built from guest-plugins/{name}.\n\
             pub const {}: &str = {:?};",
            name.to_uppercase().replace('-', "_"),
            path.display().to_string()
        )
        .map_err(|e| e.to_string())?;
    }
    write(&out_dir.join("test_plugins.rs"), &test_only)
}

/// Sets a `cfg` for each requirement `WASM_ECHO_SKIP_TESTS` names.
///
/// # Errors
///
/// A name that is not in [`SKIPPABLE`]: a typo must not run what the user
/// meant to skip, nor skip what they did not name.
fn skip_tests() -> Result<(), String> {
    println!("cargo::rerun-if-env-changed={SKIP_VARIABLE}");
    for (_, cfg) in SKIPPABLE {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    let list = env::var(SKIP_VARIABLE).unwrap_or_default();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        let Some((_, cfg)) = SKIPPABLE.iter().find(|(known, _)| *known == name) else {
            let known: Vec<_> = SKIPPABLE.iter().map(|(known, _)| *known).collect();
            return Err(format!(
                "{SKIP_VARIABLE}: unknown requirement `{name}` (known: {})",
                known.join(", ")
            ));
        };
        println!("cargo::rustc-cfg={cfg}");
        println!(
            "cargo::warning={SKIP_VARIABLE} names `{name}`: the end-to-end tests that need it are reported as ignored"
        );
    }
    Ok(())
}

/// A fresh machine has only the host target; say how to get the other one
/// instead of letting the nested cargo fail with a page of errors.
fn check_target_installed() -> Result<(), String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("running rustc --print sysroot: {e}"))?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .is_dir()
    {
        Ok(())
    } else {
        Err(format!(
            "the {TARGET} Rust target is not installed; run scripts/bootstrap.sh \
             (or `rustup target add {TARGET}`)"
        ))
    }
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()))
}
