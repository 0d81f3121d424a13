//! `serve --watch`: reloads a listener when its plugin file changes. Editors
//! and build tools either write a file in place or write a new one and
//! rename it over the old; watching the file's folder sees both. A file
//! renamed into place is whole, so it is reloaded at once (after
//! [`SETTLE`]); a file written in place is reloaded once it has been quiet
//! for [`DEBOUNCE`]. Every reload validates the new bytes, so a half-written
//! file is never swapped in.

use std::collections::{BTreeSet, HashMap};
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

use crate::reload::Reloader;

/// How long a plugin file must stay unchanged before it is reloaded.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// How long a reload waits after a file is renamed into place, so that the
/// events of one rename are handled once.
pub const SETTLE: Duration = Duration::from_millis(5);

/// Starts watching every listener's plugin file, reloading on `tasks` until
/// `stop`. The watcher follows what each listener runs: after a `reload
/// --plugin`, the new file is watched (or none, for a built-in) and the
/// old one no longer, so a later write to it cannot undo the choice.
///
/// # Errors
///
/// The operating system refuses to watch a folder at start.
pub fn spawn(
    reloader: Arc<Reloader>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut sources = reloader.follow();
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
    let mut files = reloader.watched_files();
    if files.is_empty() {
        tracing::warn!("--watch: no listener runs a plugin file (built-in plugins never change)");
    }
    let mut folders = BTreeSet::new();
    follow(&mut watcher, &mut folders, &files)?;

    tasks.spawn(async move {
        // Listener -> (the file that changed, when to reload it).
        let mut due: HashMap<String, (PathBuf, Instant)> = HashMap::new();
        loop {
            let next = due.values().map(|(_, at)| *at).min();
            tokio::select! {
                () = stop.cancelled() => break,
                moved = sources.changed() => {
                    if moved.is_err() { break }
                    files = reloader.watched_files();
                    if let Err(error) = follow(&mut watcher, &mut folders, &files) {
                        tracing::warn!("--watch: {error:#}");
                    }
                    due.retain(|listener, (path, _)| files.contains(&(listener.clone(), path.clone())));
                }
                change = changes.recv() => {
                    let Some((path, wait)) = change else { break };
                    for (listener, file) in files.iter().filter(|(_, file)| *file == path) {
                        due.insert(listener.clone(), (file.clone(), Instant::now() + wait));
                    }
                }
                () = sleep_until(next) => {
                    let now = Instant::now();
                    let ready: Vec<String> = due
                        .iter()
                        .filter(|(_, (_, at))| *at <= now)
                        .map(|(listener, _)| listener.clone())
                        .collect();
                    for listener in ready {
                        due.remove(&listener);
                        // From the source it runs: the file that changed,
                        // as only the listeners running it were due.
                        if let Err(error) = reloader.reload(Some(&listener), None).await {
                            tracing::warn!(listener, "reload after a file change failed, nothing changed: {error}");
                        }
                    }
                }
            }
        }
        drop(watcher);
    });
    Ok(())
}

/// Watches the folders of `files` and no others (`watched` holds the ones
/// watched so far), and says which file each listener follows.
///
/// # Errors
///
/// The operating system refuses to watch a folder.
fn follow(
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut BTreeSet<PathBuf>,
    files: &[(String, PathBuf)],
) -> anyhow::Result<()> {
    let wanted: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|(_, path)| path.parent().map(Path::to_owned))
        .collect();
    for gone in watched.difference(&wanted) {
        let _ = watcher.unwatch(gone);
    }
    watched.retain(|folder| wanted.contains(folder));
    for folder in wanted.difference(&watched.clone()) {
        watcher
            .watch(folder, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", folder.display()))?;
        watched.insert(folder.clone());
    }
    for (listener, file) in files {
        tracing::info!(listener, "watching {} for plugin changes", file.display());
    }
    Ok(())
}

/// Sleeps until `at`, or forever when nothing is due.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
