//! `wasm-echo new`: writes a plugin project in Rust, Python, JavaScript or
//! C that builds with its own `build.sh` into a component passing
//! `wasm-echo check` as it is. Each project carries a copy of the WIT this
//! binary was built with, so that it builds without this repository.
//!
//! The templates live in `host/templates/<lang>/` and are compiled in; this
//! module only fills in their `{{placeholders}}` and writes the files. How a
//! language's toolchain is installed is the business of its `build.sh`
//! (which uses the same tools and versions as scripts/build-polyglot.sh).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The contract, as this binary was built against it.
const WIT: &str = include_str!("../../wit/plugin.wit");

/// wit-bindgen for Rust guests (as in guest-plugins/Cargo.toml).
const WIT_BINDGEN_VERSION: &str = "0.61";
// The tools' versions, as pinned in scripts/build-polyglot.sh and
// guest-plugins/js/package.json (a unit test keeps them in step).
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
const COMPONENTIZE_QJS_VERSION: &str = "0.4.5";
const WIT_BINDGEN_CLI_VERSION: &str = "0.63.0";
const WASM_TOOLS_VERSION: &str = "1.263.0";
/// The WASI preview 1 adapter follows the host's wasmtime release.
const ADAPTER_VERSION: &str = "48.0.8";

/// The languages `wasm-echo new` writes projects in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    /// Rust with wit-bindgen, built by cargo for wasm32-wasip2.
    Rust,
    /// Python, componentized with componentize-py.
    Python,
    /// JavaScript, componentized with componentize-qjs (QuickJS).
    #[value(alias = "javascript")]
    Js,
    /// C, compiled by clang against wasi-libc, made a component by
    /// wit-bindgen and wasm-tools.
    C,
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rust => "Rust",
            Self::Python => "Python",
            Self::Js => "JavaScript",
            Self::C => "C",
        })
    }
}

/// One file of a template: where it goes in the project, its text, and
/// whether it is a script to run.
struct Template {
    path: &'static str,
    text: &'static str,
    executable: bool,
}

const fn file(path: &'static str, text: &'static str) -> Template {
    Template {
        path,
        text,
        executable: false,
    }
}

const fn script(path: &'static str, text: &'static str) -> Template {
    Template {
        path,
        text,
        executable: true,
    }
}

impl Language {
    /// The files of this language's project, besides `wit/plugin.wit`.
    fn templates(self) -> &'static [Template] {
        match self {
            Self::Rust => RUST,
            Self::Python => PYTHON,
            Self::Js => JS,
            Self::C => C,
        }
    }
}

const RUST: &[Template] = &[
    file(
        "Cargo.toml",
        include_str!("../templates/rust/Cargo.toml.tmpl"),
    ),
    file("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
    script("build.sh", include_str!("../templates/rust/build.sh")),
    file(".gitignore", include_str!("../templates/rust/gitignore")),
    file("README.md", include_str!("../templates/rust/README.md")),
];

const PYTHON: &[Template] = &[
    file("app.py", include_str!("../templates/python/app.py")),
    script("build.sh", include_str!("../templates/python/build.sh")),
    file(".gitignore", include_str!("../templates/python/gitignore")),
    file("README.md", include_str!("../templates/python/README.md")),
];

const JS: &[Template] = &[
    file("app.js", include_str!("../templates/js/app.js")),
    file("package.json", include_str!("../templates/js/package.json")),
    script("build.sh", include_str!("../templates/js/build.sh")),
    file(".gitignore", include_str!("../templates/js/gitignore")),
    file("README.md", include_str!("../templates/js/README.md")),
];

const C: &[Template] = &[
    file("app.c", include_str!("../templates/c/app.c")),
    script("build.sh", include_str!("../templates/c/build.sh")),
    file(".gitignore", include_str!("../templates/c/gitignore")),
    file("README.md", include_str!("../templates/c/README.md")),
];

/// Fills in a template's `{{placeholders}}` for the plugin `name`.
fn render(text: &str, name: &str) -> String {
    let lib_name = name.replace('-', "_");
    [
        ("{{name}}", name),
        ("{{lib_name}}", &lib_name),
        ("{{wit_bindgen_version}}", WIT_BINDGEN_VERSION),
        ("{{componentize_py_version}}", COMPONENTIZE_PY_VERSION),
        ("{{componentize_qjs_version}}", COMPONENTIZE_QJS_VERSION),
        ("{{wit_bindgen_cli_version}}", WIT_BINDGEN_CLI_VERSION),
        ("{{wasm_tools_version}}", WASM_TOOLS_VERSION),
        ("{{adapter_version}}", ADAPTER_VERSION),
    ]
    .iter()
    .fold(text.to_owned(), |text, (key, value)| {
        text.replace(key, value)
    })
}

/// Checks that `name` can be a crate, package and file name in every
/// language: lowercase ASCII letters, digits, `-` and `_`, starting with a
/// letter.
fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_fits =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if starts_well && rest_fits && name.len() <= 64 {
        return Ok(());
    }
    anyhow::bail!(
        "invalid plugin name `{name}`: use up to 64 lowercase letters, digits, `-` and `_`, starting with a letter"
    )
}

/// Writes a new `lang` plugin project called `name` into `dir` (default:
/// `./NAME`), and returns the directory.
///
/// # Errors
///
/// An invalid name, a `dir` that exists and is not an empty directory, or
/// a file that cannot be written.
pub fn create(lang: Language, name: &str, dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if dir.exists() {
        let mut entries = std::fs::read_dir(&dir)
            .with_context(|| format!("{} exists and is not a readable directory", dir.display()))?;
        if entries.next().is_some() {
            anyhow::bail!(
                "{} already exists and is not empty: choose another NAME or --dir",
                dir.display()
            );
        }
    }
    let wit = Template {
        path: "wit/plugin.wit",
        text: WIT,
        executable: false,
    };
    for template in lang.templates().iter().chain([&wit]) {
        let path = dir.join(template.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, render(template.text, name))
            .with_context(|| format!("cannot write {}", path.display()))?;
        if template.executable {
            make_executable(&path)?;
        }
    }
    Ok(dir)
}

#[cfg(unix)]
fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LANGUAGES: [Language; 4] = [Language::Rust, Language::Python, Language::Js, Language::C];

    #[test]
    fn every_placeholder_is_filled_in() {
        for lang in LANGUAGES {
            for template in lang.templates() {
                let text = render(template.text, "my-plugin");
                assert!(
                    !text.contains("{{") && !text.contains("}}"),
                    "{lang} {} keeps a placeholder",
                    template.path
                );
            }
        }
    }

    #[test]
    fn names_must_suit_every_language() {
        for good in ["shout", "my-plugin", "v2_echo"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Shout",
            "2fast",
            "-x",
            "a b",
            "../x",
            "é",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    /// The templates must build with the tools scripts/build-polyglot.sh
    /// tests the repository's own plugins with.
    #[test]
    fn versions_match_the_repository_builds() {
        let script = include_str!("../../scripts/build-polyglot.sh");
        for (variable, version) in [
            ("COMPONENTIZE_PY_VERSION", COMPONENTIZE_PY_VERSION),
            ("WASM_TOOLS_VERSION", WASM_TOOLS_VERSION),
            ("WIT_BINDGEN_VERSION", WIT_BINDGEN_CLI_VERSION),
            ("ADAPTER_VERSION", ADAPTER_VERSION),
        ] {
            assert!(
                script.contains(&format!("\n{variable}={version}\n")),
                "build-polyglot.sh pins another {variable} than {version}"
            );
        }
        let package = include_str!("../../guest-plugins/js/package.json");
        assert!(
            package.contains(&format!(
                "\"componentize-qjs\": \"{COMPONENTIZE_QJS_VERSION}\""
            )),
            "guest-plugins/js/package.json pins another componentize-qjs"
        );
        let guests = include_str!("../../guest-plugins/Cargo.toml");
        assert!(
            guests.contains(&format!(
                "wit-bindgen = {{ version = \"{WIT_BINDGEN_VERSION}\""
            )),
            "guest-plugins/Cargo.toml uses another wit-bindgen"
        );
    }

    #[test]
    fn an_existing_non_empty_directory_is_left_alone() {
        let dir =
            std::env::temp_dir().join(format!("wasm-echo-scaffold-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::write(dir.join("keep.txt"), "mine").expect("a file");
        let error = create(Language::C, "x", Some(&dir)).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("already exists and is not empty"),
            "{error}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("keep.txt")).expect("kept"),
            "mine"
        );
        assert!(!dir.join("build.sh").exists());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
