//! Following tags: one task per tag the server's tenants follow (shared by
//! every tenant that follows it), asking the registry every
//! `tag-poll-interval` which digest the tag points to. When it moves, each
//! tenant following it is reloaded through [`Reloader`], the same path as
//! a file change, so the swap loses nothing and is counted the same.
//!
//! A registry that stops answering is asked less often (the interval
//! doubles, up to eight times) and is warned about once per streak of
//! failures, not once per poll. A digest that failed to load is not tried
//! again until the tag moves once more.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::OciReference;
use crate::plugin::{PluginSource, Runtime};
use crate::reload::Reloader;

/// The longest wait between two polls of a registry that does not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Starts a follower for each tag the tenants run now.
pub fn spawn(
    runtime: Arc<Runtime>,
    reloader: Arc<Reloader>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    let mut followed: BTreeMap<String, (OciReference, Duration)> = BTreeMap::new();
    for (reference, interval) in reloader.followed_tags() {
        let entry = followed
            .entry(reference.to_string())
            .or_insert((reference, interval));
        entry.1 = entry.1.min(interval);
    }
    for (_, (reference, interval)) in followed {
        tracing::info!(
            "following {reference}: polling every {}",
            humantime::format_duration(interval)
        );
        tasks.spawn(follow(
            runtime.clone(),
            reloader.clone(),
            reference,
            interval,
            stop.child_token(),
        ));
    }
}

/// Polls `reference`'s tag until `stop`, reloading its tenants when it
/// moves.
async fn follow(
    runtime: Arc<Runtime>,
    reloader: Arc<Reloader>,
    reference: OciReference,
    interval: Duration,
    stop: CancellationToken,
) {
    let source = PluginSource::Oci(reference.clone());
    let mut failures: u32 = 0;
    let mut failed_digest: Option<String> = None;
    loop {
        let wait = interval
            .saturating_mul(1 << failures.min(3))
            .min(MAX_BACKOFF.max(interval));
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        let digest = match runtime.registry().resolve_tag(&reference).await {
            Ok(digest) => digest,
            Err(error) => {
                if failures == 0 {
                    tracing::warn!(
                        "following {reference}: {error}; polling less often, and quiet until it answers"
                    );
                }
                failures = failures.saturating_add(1);
                continue;
            }
        };
        if failures > 0 {
            tracing::info!("following {reference}: the registry answers again");
            failures = 0;
        }
        if failed_digest.as_deref() == Some(digest.as_str()) {
            continue;
        }
        for listener in reloader.behind(&source, &digest) {
            tracing::info!("{reference} moved to {digest}: reloading listener `{listener}`");
            if let Err(error) = reloader.reload(Some(&listener), Some(&source)).await {
                tracing::warn!(
                    "{reference} moved to {digest}, but the reload failed, nothing changed: {error}"
                );
                failed_digest = Some(digest.clone());
            }
        }
    }
}
