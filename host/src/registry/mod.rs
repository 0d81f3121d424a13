//! Plugins from OCI registries: turning an `oci://` reference into the
//! component's verified bytes, from the blob cache when it holds them,
//! else from the registry (then kept in the cache); publishing a component
//! (`wasm-echo push`); and reading which digest a tag points to now, for
//! tenants that follow one.
//!
//! Every blob (manifest, config, component) is hashed and compared with the
//! digest that named it before anything uses it. Both layouts plugins are
//! published in are read: the CNCF Wasm artifact (`application/wasm`
//! layer) and the older `application/vnd.wasm.content.layer.v1+wasm` one
//! Envoy and Istio use. The distribution API itself is `oci-client`'s;
//! compiling the bytes is [`crate::plugin::Runtime`]'s, and when to follow
//! a tag is [`follow`]'s.

mod credentials;
pub mod follow;
mod reference;
mod store;

use std::collections::BTreeSet;

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;

pub use credentials::{Credentials, PASSWORD_VARIABLE, USERNAME_VARIABLE};
pub use reference::{OciReference, Pin, ReferenceError, SCHEME};
pub use store::{BlobStore, sha256};

/// The CNCF Wasm artifact's component layer.
pub const WASM_LAYER: &str = "application/wasm";
/// The older layer type Envoy and Istio publish.
pub const ENVOY_WASM_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";

/// The largest manifest or config blob read: far more than any real one.
const MAX_METADATA_BYTES: usize = 4 << 20;

/// The manifest types asked for.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// How long one registry request may take to connect, and to go on
/// without a byte, before it is given up.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a reference could not be turned into a component. Each names the
/// reference and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A blob's bytes do not hash to the digest that named it.
    #[error(
        "{reference}: refusing blob {expected}: its bytes have digest {actual} (tampered or corrupt)"
    )]
    DigestMismatch {
        /// What was being fetched.
        reference: String,
        /// The digest that named the blob.
        expected: String,
        /// The digest of what came.
        actual: String,
    },
    /// The registry wants credentials, or refused the ones given.
    #[error(
        "{reference}: registry {registry} says unauthorized: set {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}, or registry-auth"
    )]
    Unauthorized {
        /// What was being fetched.
        reference: String,
        /// The registry.
        registry: String,
    },
    /// The registry could not be reached, or answered with an error.
    #[error("{reference}: registry {registry}: {reason}")]
    Registry {
        /// What was being fetched.
        reference: String,
        /// The registry.
        registry: String,
        /// What went wrong, on one line.
        reason: String,
        /// Whether it is worth trying the cache instead (the registry did
        /// not answer, rather than answering no).
        unreachable: bool,
    },
    /// The manifest is not a Wasm artifact this host reads.
    #[error("{reference}: {reason}")]
    NotAPlugin {
        /// What was being fetched.
        reference: String,
        /// Why, on one line.
        reason: String,
    },
    /// A blob larger than allowed.
    #[error("{reference}: blob {digest} is larger than {limit} bytes (raise max-plugin-size)")]
    TooLarge {
        /// What was being fetched.
        reference: String,
        /// The blob.
        digest: String,
        /// The limit.
        limit: usize,
    },
    /// A reference by tag without `allow-tags`.
    #[error(
        "{reference} names a tag, which may move: pin a digest (@sha256:...) or set allow-tags = true (--allow-tags)"
    )]
    TagNotAllowed {
        /// The reference.
        reference: String,
    },
    /// No cache to keep what was fetched.
    #[error("{reference}: no cache directory to keep it in (set cache-dir)")]
    NoCache {
        /// The reference.
        reference: String,
    },
}

/// The registry access a server's configuration describes: its insecure
/// registries, its credentials, and a blob store in `cache`.
///
/// # Errors
///
/// The credentials cannot be read, or the store cannot be made.
pub fn access(
    insecure: &[String],
    auth_file: Option<&std::path::Path>,
    cache: Option<&crate::cache::CacheDir>,
) -> anyhow::Result<RegistryAccess> {
    let credentials = Credentials::load(auth_file)?;
    let store = cache.map(BlobStore::open).transpose()?;
    Ok(RegistryAccess::new(
        insecure.iter().cloned(),
        credentials,
        store,
    ))
}

/// A component fetched and verified.
#[derive(Debug)]
pub struct Fetched {
    /// The manifest digest: what to pin, and what `status` shows.
    pub digest: String,
    /// The component's bytes.
    pub bytes: Vec<u8>,
    /// Whether the registry was asked for nothing (everything came from
    /// the cache).
    pub from_cache: bool,
}

/// How this server reaches registries: which may be spoken to over plain
/// HTTP, with which credentials, and where blobs are kept.
#[derive(Debug)]
pub struct RegistryAccess {
    /// `HOST:PORT`s reached over plain HTTP (`insecure-registries`);
    /// loopback ones always are.
    insecure: BTreeSet<String>,
    /// Credentials per registry, or for all.
    credentials: Credentials,
    /// The blob cache.
    store: Option<BlobStore>,
}

impl RegistryAccess {
    /// Access with these settings.
    pub fn new(
        insecure: impl IntoIterator<Item = String>,
        credentials: Credentials,
        store: Option<BlobStore>,
    ) -> Self {
        Self {
            insecure: insecure.into_iter().collect(),
            credentials,
            store,
        }
    }

    /// The blob cache, if there is one.
    pub fn store(&self) -> Option<&BlobStore> {
        self.store.as_ref()
    }

    /// A client for `registry`: HTTPS unless it is loopback or listed as
    /// insecure.
    fn client(&self, registry: &str) -> oci_client::Client {
        let protocol = if self.insecure.contains(registry) || is_loopback(registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        oci_client::Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        })
    }

    fn auth(&self, registry: &str) -> RegistryAuth {
        self.credentials.for_registry(registry)
    }

    /// The digest `reference`'s tag points to now, asked of the registry
    /// (the cache is not consulted: this is how a tag move is seen). It
    /// is remembered in the cache only once [`RegistryAccess::fetch`] has
    /// kept everything it names.
    ///
    /// # Errors
    ///
    /// The registry cannot be reached or refuses.
    pub async fn resolve_tag(&self, reference: &OciReference) -> Result<String, RegistryError> {
        let client = self.client(&reference.registry);
        let digest = client
            .fetch_manifest_digest(&reference.to_client(), &self.auth(&reference.registry))
            .await
            .map_err(|error| registry_error(reference, error))?;
        Ok(digest)
    }

    /// The component `reference` names, verified: from the cache when it
    /// holds every blob, else from the registry. A tag is resolved first;
    /// with the registry unreachable, the digest it had when last seen is
    /// used if the cache holds it (and the log says so).
    ///
    /// # Errors
    ///
    /// A [`RegistryError`]: a blob that does not match its digest, a
    /// registry that cannot be reached (with nothing cached), refuses, or
    /// holds something that is not a component.
    pub async fn fetch(
        &self,
        reference: &OciReference,
        max_bytes: usize,
    ) -> Result<Fetched, RegistryError> {
        let store = self.store.as_ref().ok_or_else(|| RegistryError::NoCache {
            reference: reference.to_string(),
        })?;
        let digest = match &reference.pin {
            Pin::Digest(digest) => digest.clone(),
            Pin::Tag(tag) => match self.resolve_tag(reference).await {
                Ok(digest) => digest,
                Err(RegistryError::Registry {
                    unreachable: true,
                    reason,
                    ..
                }) if store.tag(reference, tag).is_some() => {
                    let digest = store.tag(reference, tag).unwrap_or_default();
                    tracing::warn!(
                        "{reference}: registry {} unreachable ({reason}): using {digest}, the digest the tag had when last seen, from the cache",
                        reference.registry
                    );
                    digest
                }
                Err(error) => return Err(error),
            },
        };
        let pinned = reference.pinned(&digest);
        let mut from_cache = true;
        let manifest_bytes = match store.get(&digest) {
            Some(bytes) => bytes,
            None => {
                from_cache = false;
                let client = self.client(&reference.registry);
                let (bytes, _) = client
                    .pull_manifest_raw(
                        &pinned.to_client(),
                        &self.auth(&reference.registry),
                        MANIFEST_TYPES,
                    )
                    .await
                    .map_err(|error| registry_error(reference, error))?;
                let bytes = bytes.to_vec();
                self.verified(reference, &digest, &bytes)?;
                let _ = store.put(&digest, &bytes);
                bytes
            }
        };
        let manifest: OciImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|error| RegistryError::NotAPlugin {
                reference: reference.to_string(),
                reason: format!("manifest {digest} is not an image manifest: {error}"),
            })?;
        let layer = component_layer(reference, &manifest)?;
        // The config is not used, but it is part of what the digest pins:
        // a registry that serves another one is refused all the same.
        let (_, config_cached) = self
            .blob(reference, &pinned, &manifest.config, MAX_METADATA_BYTES)
            .await?;
        let (bytes, layer_cached) = self.blob(reference, &pinned, layer, max_bytes).await?;
        from_cache &= config_cached && layer_cached;
        // Remembered only once every blob it names is in the cache: a
        // restart with the registry down needs all of them.
        if let Some(tag) = reference.tag() {
            let _ = store.set_tag(reference, tag, &digest);
        }
        Ok(Fetched {
            digest,
            bytes,
            from_cache,
        })
    }

    /// Blob `descriptor` from the cache, or else from the registry (then
    /// cached); `true` with it when it came from the cache.
    async fn blob(
        &self,
        reference: &OciReference,
        pinned: &OciReference,
        descriptor: &OciDescriptor,
        max_bytes: usize,
    ) -> Result<(Vec<u8>, bool), RegistryError> {
        let digest = &descriptor.digest;
        let too_large = || RegistryError::TooLarge {
            reference: reference.to_string(),
            digest: digest.clone(),
            limit: max_bytes,
        };
        if !usize::try_from(descriptor.size).is_ok_and(|size| size <= max_bytes) {
            return Err(too_large());
        }
        if let Some(bytes) = self.store.as_ref().and_then(|store| store.get(digest)) {
            return Ok((bytes, true));
        }
        let client = self.client(&reference.registry);
        let auth = self.auth(&reference.registry);
        // Authenticates (or not) once for the repository; the blob request
        // itself carries no credentials of its own.
        client
            .store_auth_if_needed(&reference.registry, &auth)
            .await;
        let mut stream = client
            .pull_blob_stream(&pinned.to_client(), descriptor)
            .await
            .map_err(|error| registry_error(reference, error))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if bytes.len() + chunk.len() > max_bytes {
                        return Err(too_large());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                // The client checks the digest as the bytes come; the
                // refusal names both digests, whoever noticed.
                Err(error)
                    if error
                        .get_ref()
                        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>()) =>
                {
                    break;
                }
                Err(error) => {
                    return Err(RegistryError::Registry {
                        reference: reference.to_string(),
                        registry: reference.registry.clone(),
                        reason: format!("reading blob {digest}: {error}"),
                        unreachable: true,
                    });
                }
            }
        }
        self.verified(reference, digest, &bytes)?;
        if let Some(store) = &self.store {
            let _ = store.put(digest, &bytes);
        }
        Ok((bytes, false))
    }

    /// `Ok` when `bytes` hash to `digest`.
    fn verified(
        &self,
        reference: &OciReference,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let actual = sha256(bytes);
        if actual == digest {
            Ok(())
        } else {
            Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                expected: digest.to_owned(),
                actual,
            })
        }
    }

    /// Publishes `component` at `reference` (a tag) in the CNCF Wasm
    /// layout, and returns the reference pinned to the new manifest's
    /// digest.
    ///
    /// # Errors
    ///
    /// The component's WIT cannot be read for the config, or the registry
    /// refuses.
    pub async fn push(
        &self,
        reference: &OciReference,
        component: Vec<u8>,
    ) -> anyhow::Result<OciReference> {
        let (config, layer) =
            oci_wasm::WasmConfig::from_raw_component(component, None).map_err(|error| {
                anyhow::anyhow!("{reference}: cannot describe the component: {error:#}")
            })?;
        let client = oci_wasm::WasmClient::new(self.client(&reference.registry));
        let auth = self.auth(&reference.registry);
        client
            .push(&reference.to_client(), &auth, layer, config, None)
            .await
            .map_err(|error| match error.downcast::<OciDistributionError>() {
                Ok(error) => registry_error(reference, error).into(),
                Err(error) => anyhow::anyhow!("{reference}: {error:#}"),
            })?;
        let digest = self.resolve_tag(reference).await?;
        Ok(reference.pinned(&digest))
    }
}

/// Whether `registry` (`HOST[:PORT]`) is this machine, where plain HTTP
/// crosses no network.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A client error as a [`RegistryError`] naming `reference`.
fn registry_error(reference: &OciReference, error: OciDistributionError) -> RegistryError {
    let registry = reference.registry.clone();
    let unauthorized = match &error {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => true,
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::Unauthorized
                    | oci_client::errors::OciErrorCode::Denied
            )
        }),
        _ => false,
    };
    if unauthorized {
        return RegistryError::Unauthorized {
            reference: reference.to_string(),
            registry,
        };
    }
    let unreachable = matches!(&error, OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout())
        || matches!(&error, OciDistributionError::ServerError { code, .. } if *code >= 500);
    let reason = match &error {
        OciDistributionError::RequestError(e) if e.is_connect() => {
            "cannot connect (is it running, and is the address right?)".to_owned()
        }
        OciDistributionError::RequestError(e) if e.is_timeout() => "timed out".to_owned(),
        _ => crate::plugin::fold_lines(&error.to_string()),
    };
    RegistryError::Registry {
        reference: reference.to_string(),
        registry,
        reason,
        unreachable,
    }
}

/// The one component layer of `manifest`, in either layout.
fn component_layer<'m>(
    reference: &OciReference,
    manifest: &'m OciImageManifest,
) -> Result<&'m OciDescriptor, RegistryError> {
    let mut layers = manifest
        .layers
        .iter()
        .filter(|layer| layer.media_type == WASM_LAYER || layer.media_type == ENVOY_WASM_LAYER);
    match (layers.next(), layers.next()) {
        (Some(layer), None) => Ok(layer),
        (None, _) => Err(RegistryError::NotAPlugin {
            reference: reference.to_string(),
            reason: format!(
                "no Wasm layer ({WASM_LAYER} or {ENVOY_WASM_LAYER}); its layers are {}",
                manifest
                    .layers
                    .iter()
                    .map(|layer| layer.media_type.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
        (Some(_), Some(_)) => Err(RegistryError::NotAPlugin {
            reference: reference.to_string(),
            reason: "more than one Wasm layer; a plugin is one component".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_plain_http_by_default() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1"));
    }

    fn manifest(layers: &[&str]) -> OciImageManifest {
        let layers: Vec<String> = layers
            .iter()
            .map(|media_type| {
                format!(
                    r#"{{"mediaType":"{media_type}","digest":"sha256:{}","size":1}}"#,
                    "a".repeat(64)
                )
            })
            .collect();
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.wasm.config.v0+json","digest":"sha256:{}","size":2}},"layers":[{}]}}"#,
            "b".repeat(64),
            layers.join(",")
        );
        serde_json::from_str(&json).expect("a manifest")
    }

    #[test]
    fn both_wasm_layouts_are_read_and_anything_else_is_refused() {
        let reference = OciReference::parse("oci://127.0.0.1:5000/echo:v1").expect("a reference");
        for media_type in [WASM_LAYER, ENVOY_WASM_LAYER] {
            let manifest = manifest(&[media_type]);
            let layer = component_layer(&reference, &manifest).expect("a component layer");
            assert_eq!(layer.media_type, media_type);
        }
        let tar = manifest(&["application/vnd.oci.image.layer.v1.tar"]);
        let error = component_layer(&reference, &tar).expect_err("no wasm layer");
        assert!(error.to_string().contains("no Wasm layer"), "{error}");
        let two = manifest(&[WASM_LAYER, ENVOY_WASM_LAYER]);
        let error = component_layer(&reference, &two).expect_err("two layers");
        assert!(error.to_string().contains("more than one"), "{error}");
    }
}
