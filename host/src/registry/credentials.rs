//! Registry credentials, from where operators already keep them: the
//! environment (`WASM_ECHO_REGISTRY_USERNAME` / `WASM_ECHO_REGISTRY_PASSWORD`,
//! for every registry) or a file in the docker `config.json` format
//! (`{"auths": {"HOST:PORT": {"auth": base64("user:password")}}}`, named
//! by `registry-auth`). Never from the command line, where any user of the
//! machine can read them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// The user name for every registry, from the environment.
pub const USERNAME_VARIABLE: &str = "WASM_ECHO_REGISTRY_USERNAME";
/// The password that goes with it.
pub const PASSWORD_VARIABLE: &str = "WASM_ECHO_REGISTRY_PASSWORD";

/// The largest credentials file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A user name and password.
#[derive(Clone)]
struct Login {
    username: String,
    password: String,
}

/// Who to say we are to each registry; anonymous where nothing is known.
#[derive(Clone, Default)]
pub struct Credentials {
    /// From the environment: for every registry.
    everywhere: Option<Login>,
    /// From the file: by `HOST[:PORT]`.
    by_registry: BTreeMap<String, Login>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("Credentials")
            .field("from_environment", &self.everywhere.is_some())
            .field("registries", &self.by_registry.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One entry of a docker `config.json`'s `auths`.
#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// A docker `config.json`; other keys are not ours to judge.
#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

impl Credentials {
    /// Reads the environment and, if given, the credentials file.
    ///
    /// # Errors
    ///
    /// Only one of the two variables is set, or the file cannot be read or
    /// is not a docker `config.json`.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let username = std::env::var(USERNAME_VARIABLE).ok();
        let password = std::env::var(PASSWORD_VARIABLE).ok();
        let everywhere = match (username, password) {
            (Some(username), Some(password)) => Some(Login { username, password }),
            (None, None) => None,
            _ => anyhow::bail!("set both {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}, or neither"),
        };
        let mut credentials = Self {
            everywhere,
            by_registry: BTreeMap::new(),
        };
        if let Some(path) = file {
            credentials.by_registry = read_file(path)?;
        }
        Ok(credentials)
    }

    /// What to send to `registry`: the file's entry for it, else the
    /// environment's, else nothing.
    pub(super) fn for_registry(&self, registry: &str) -> RegistryAuth {
        match self.by_registry.get(registry).or(self.everywhere.as_ref()) {
            Some(login) => RegistryAuth::Basic(login.username.clone(), login.password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// The logins in a docker `config.json`.
fn read_file(path: &Path) -> anyhow::Result<BTreeMap<String, Login>> {
    warn_if_shared(path);
    let bytes = crate::input_file::read(path, MAX_FILE_BYTES, "", crate::input_file::READ_TIMEOUT)?;
    let config: DockerConfig = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "registry credentials {}: not a docker config.json ({{\"auths\": {{\"HOST:PORT\": {{\"auth\": \"...\"}}}}}})",
            path.display()
        )
    })?;
    let mut logins = BTreeMap::new();
    for (registry, entry) in config.auths {
        let bad = |what: &str| {
            anyhow::anyhow!(
                "registry credentials {}: the entry for {registry}: {what}",
                path.display()
            )
        };
        let login = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad("`auth` is not base64"))?;
                let text = String::from_utf8(decoded).map_err(|_| bad("`auth` is not text"))?;
                let (username, password) = text
                    .split_once(':')
                    .ok_or_else(|| bad("`auth` is not base64 of USER:PASSWORD"))?;
                Login {
                    username: username.to_owned(),
                    password: password.to_owned(),
                }
            }
            (None, Some(username), Some(password)) => Login { username, password },
            _ => return Err(bad("needs `auth`, or `username` and `password`")),
        };
        // `https://HOST/` keys are what older tools wrote.
        let key = registry
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        logins.insert(key, login);
    }
    Ok(logins)
}

/// Says so once when others can read the file: it holds passwords.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(metadata) = std::fs::metadata(path)
            && metadata.mode() & 0o077 != 0
        {
            tracing::warn!(
                "registry credentials {} can be read by others (mode {:o}): chmod 600 it",
                path.display(),
                metadata.mode() & 0o777
            );
        }
    }
}
