//! `oci://HOST[:PORT]/REPOSITORY@sha256:DIGEST` and
//! `oci://HOST[:PORT]/REPOSITORY:TAG`: what an operator writes wherever a
//! plugin path is accepted, parsed once into a typed reference.
//!
//! Only the text is checked here; whether tags are allowed is the
//! configuration's business, and reaching the registry is [`super`]'s.

use std::fmt;

/// The prefix that makes a plugin reference an OCI reference.
pub const SCHEME: &str = "oci://";

/// A plugin in an OCI registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OciReference {
    /// `HOST[:PORT]`, as written.
    pub registry: String,
    /// The repository path inside the registry.
    pub repository: String,
    /// A digest pins one version; a tag names whichever it points to now.
    pub pin: Pin,
}

/// What an [`OciReference`] names inside its repository.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pin {
    /// `sha256:` and 64 lowercase hex digits: the manifest's digest.
    Digest(String),
    /// A tag, which may move.
    Tag(String),
}

/// Why a text is not an OCI reference, in words that say what to write.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{text}` is not an OCI reference: {reason} (expected oci://HOST[:PORT]/REPOSITORY@sha256:DIGEST or oci://HOST[:PORT]/REPOSITORY:TAG)"
)]
pub struct ReferenceError {
    text: String,
    reason: &'static str,
}

impl OciReference {
    /// Parses `text`, which starts with [`SCHEME`].
    ///
    /// # Errors
    ///
    /// A [`ReferenceError`] naming the part that is wrong.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let error = |reason| ReferenceError {
            text: text.to_owned(),
            reason,
        };
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| error("it does not start with oci://"))?;
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| error("no repository after the registry"))?;
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(error("the registry is not HOST or HOST:PORT"));
        }
        let (repository, pin) = if let Some((repository, digest)) = path.split_once('@') {
            let hex = digest
                .strip_prefix("sha256:")
                .ok_or_else(|| error("only sha256 digests are accepted"))?;
            if hex.len() != 64 || !hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
                return Err(error("a sha256 digest is 64 lowercase hex digits"));
            }
            (repository, Pin::Digest(digest.to_owned()))
        } else {
            let (repository, tag) = path
                .rsplit_once(':')
                .filter(|(_, tag)| !tag.contains('/'))
                .ok_or_else(|| error("it names neither a digest (@sha256:...) nor a tag (:TAG)"))?;
            let valid_tag = !tag.is_empty()
                && tag.len() <= 128
                && !tag.starts_with(['.', '-'])
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid_tag {
                return Err(error(
                    "a tag is up to 128 letters, digits, `_`, `.` and `-`",
                ));
            }
            (repository, Pin::Tag(tag.to_owned()))
        };
        // The repository becomes a path in the cache too: no empty or dot
        // components, nothing but what the distribution spec allows.
        let valid_repository = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .chars()
                        .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
            });
        if !valid_repository {
            return Err(error(
                "a repository is lowercase letters, digits, `.`, `_`, `-` and `/`",
            ));
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            pin,
        })
    }

    /// The same repository pinned to `digest`.
    pub fn pinned(&self, digest: &str) -> Self {
        Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            pin: Pin::Digest(digest.to_owned()),
        }
    }

    /// The tag, for a reference by tag.
    pub fn tag(&self) -> Option<&str> {
        match &self.pin {
            Pin::Tag(tag) => Some(tag),
            Pin::Digest(_) => None,
        }
    }

    /// The last part of the repository: the plugin's short name in logs.
    pub fn short_name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }

    /// The reference as the registry client takes it.
    pub(super) fn to_client(&self) -> oci_client::Reference {
        match &self.pin {
            Pin::Digest(digest) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                digest.clone(),
            ),
            Pin::Tag(tag) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone(),
            ),
        }
    }
}

impl fmt::Display for OciReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.registry, self.repository)?;
        match &self.pin {
            Pin::Digest(digest) => write!(f, "@{digest}"),
            Pin::Tag(tag) => write!(f, ":{tag}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digests_and_tags_parse_and_print_back() {
        let text = format!("oci://127.0.0.1:5000/team/echo@{DIGEST}");
        let reference = OciReference::parse(&text).expect("parses");
        assert_eq!(reference.registry, "127.0.0.1:5000");
        assert_eq!(reference.repository, "team/echo");
        assert_eq!(reference.pin, Pin::Digest(DIGEST.to_owned()));
        assert_eq!(reference.to_string(), text);
        let tagged = OciReference::parse("oci://registry.example:5000/echo:v2").expect("parses");
        assert_eq!(tagged.tag(), Some("v2"));
        assert_eq!(tagged.short_name(), "echo");
    }

    #[test]
    fn mistakes_say_what_is_wrong() {
        for (text, reason) in [
            ("oci://127.0.0.1:5000/echo", "neither a digest"),
            ("oci://127.0.0.1:5000/echo@sha256:abc", "64 lowercase hex"),
            ("oci://127.0.0.1:5000/echo@md5:abc", "only sha256"),
            ("oci://127.0.0.1:5000", "no repository"),
            ("oci://127.0.0.1:5000/../echo:v1", "a repository is"),
            ("oci://127.0.0.1:5000/Echo:v1", "a repository is"),
            ("oci://127.0.0.1:5000/echo:v/1", "neither a digest"),
        ] {
            let error = OciReference::parse(text).expect_err(text).to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }
}
