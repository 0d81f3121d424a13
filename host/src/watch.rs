//! `serve --watch`: reloads a listener when its plugin file changes. Editors
//! and build tools either write a file in place or write a new one and
//! rename it over the old; watching the file's folder sees both. A file
//! renamed into place is whole, so it is reloaded at once (after
//! [`SETTLE`]); a file written in place is reloaded once it has been quiet
//! for [`DEBOUNCE`]. Every reload validates the new bytes, so a half-written
//! file is never swapped in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::plugin::PluginSource;
use crate::reload::Reloader;

/// How long a plugin file must stay unchanged before it is reloaded.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// How long a reload waits after a file is renamed into place, so that the
/// events of one rename are handled once.
pub const SETTLE: Duration = Duration::from_millis(5);

/// Starts watching every listener's plugin file, reloading on `tasks` until
/// `stop`. Keep the returned watcher alive for as long as watching should
/// go on.
///
/// # Errors
///
/// The operating system refuses to watch a folder.
pub fn spawn(
    reloader: Arc<Reloader>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let files: Vec<(String, PathBuf)> = reloader
        .watched_files()
        .into_iter()
        .map(|(listener, path)| (listener, std::path::absolute(&path).unwrap_or(path)))
        .collect();
    if files.is_empty() {
        tracing::warn!("--watch: no listener runs a plugin file (built-in plugins never change)");
    }
    let (changed, mut changes) = mpsc::unbounded_channel::<(PathBuf, Duration)>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let wait = match event.kind {
            EventKind::Modify(ModifyKind::Name(_)) => SETTLE,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => DEBOUNCE,
            _ => return,
        };
        for path in event.paths {
            let _ = changed.send((path, wait));
        }
    })
    .context("starting the file watcher")?;
    let mut folders: Vec<&Path> = files.iter().filter_map(|(_, path)| path.parent()).collect();
    folders.sort();
    folders.dedup();
    for folder in folders {
        watcher
            .watch(folder, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", folder.display()))?;
        tracing::info!("watching {} for plugin changes", folder.display());
    }

    tasks.spawn(async move {
        let mut due: HashMap<String, Instant> = HashMap::new();
        loop {
            let next = due.values().min().copied();
            tokio::select! {
                () = stop.cancelled() => break,
                change = changes.recv() => {
                    let Some((path, wait)) = change else { break };
                    for (listener, _) in files.iter().filter(|(_, file)| *file == path) {
                        due.insert(listener.clone(), Instant::now() + wait);
                    }
                }
                () = sleep_until(next) => {
                    let now = Instant::now();
                    let ready: Vec<String> =
                        due.iter().filter(|(_, at)| **at <= now).map(|(listener, _)| listener.clone()).collect();
                    for listener in ready {
                        due.remove(&listener);
                        // The watched file, even if a `reload --plugin` has
                        // pointed the listener elsewhere since.
                        let file = files
                            .iter()
                            .find(|(name, _)| *name == listener)
                            .map(|(_, file)| PluginSource::File(file.clone()));
                        if let Err(error) = reloader.reload(Some(&listener), file.as_ref()).await {
                            tracing::warn!(listener, "reload after a file change failed, nothing changed: {error}");
                        }
                    }
                }
            }
        }
    });
    Ok(watcher)
}

/// Sleeps until `at`, or forever when nothing is due.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
