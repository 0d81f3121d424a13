//! State hand-over: moving a conversation (the UDP listener's session, or a
//! TCP connection's) from the version it runs to the current one, with its
//! state, between two of its messages. The old instance's `snapshot` is
//! `restore`d into a fresh instance of the new version; each call has the
//! tenant's deadline, and a snapshot may be at most `max-state` bytes.
//!
//! When it fails, the tenant's `on-migration-failure` policy decides:
//! `keep` leaves the conversation on its old instance, with its state (it
//! is not tried again until the next swap), `fresh` moves it to a fresh
//! instance of the new version without its state. An old instance that
//! trapped in `snapshot` cannot go on, so then the conversation moves
//! afresh whatever the policy.
//!
//! When to try is the listeners' business (at once after a swap, when they
//! are between messages); the contract is in `wit/plugin.wit` (`state`).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;

use super::Tenant;
use super::session::Session;
use super::version::{Code, Version};
use crate::plugin::{CallError, Connection};

/// What a conversation gets when its state cannot be handed over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationFailurePolicy {
    /// It stays on its old version, with its state.
    #[default]
    Keep,
    /// It moves to a fresh instance of the new version, without its state.
    Fresh,
}

/// How one conversation's move ended, as `wasm_echo_migrations_total`'s
/// `outcome` label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// Its state was handed over (`migrated`).
    Migrated,
    /// It moved with no state to hand over (`fresh`): a UDP listener whose
    /// versions do not both offer `state`, or whose snapshot was `none`.
    Fresh,
    /// It stayed where it was, nothing tried (`skipped`): a TCP connection
    /// whose versions do not both offer `state`, or whose snapshot was
    /// `none`.
    Skipped,
    /// The hand-over failed and it stayed on its old version with its
    /// state (`kept`).
    Kept,
    /// The hand-over failed and it moved without its state (`reset`).
    Reset,
}

impl MigrationOutcome {
    /// Every outcome, in the order of their discriminants.
    pub const ALL: [Self; 5] = [
        Self::Migrated,
        Self::Fresh,
        Self::Skipped,
        Self::Kept,
        Self::Reset,
    ];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Migrated => "migrated",
            Self::Fresh => "fresh",
            Self::Skipped => "skipped",
            Self::Kept => "kept",
            Self::Reset => "reset",
        }
    }
}

/// The outcomes of the moves to one version, for the swap's log line.
#[derive(Debug, Default)]
pub struct Tally([AtomicUsize; MigrationOutcome::ALL.len()]);

impl Tally {
    fn add(&self, outcome: MigrationOutcome) {
        self.0[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many moves ended with `outcome`.
    pub fn count(&self, outcome: MigrationOutcome) -> usize {
        self.0[outcome as usize].load(Ordering::Relaxed)
    }
}

/// Why a hand-over failed, for the log.
enum Failure {
    Snapshot(CallError),
    TooLarge { bytes: usize, cap: usize },
    Start(CallError),
    Restore(CallError),
    Refused(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Snapshot(error) => write!(f, "snapshot failed: {error}"),
            Self::TooLarge { bytes, cap } => {
                write!(
                    f,
                    "snapshot of {bytes} bytes is over max-state ({cap} bytes)"
                )
            }
            Self::Start(error) => write!(f, "the new version did not start: {error}"),
            Self::Restore(error) => write!(f, "restore failed: {error}"),
            Self::Refused(reason) => write!(f, "restore refused the state: {reason}"),
        }
    }
}

/// A TCP connection being moved: what a fresh instance's `on-open` is told.
#[derive(Clone, Copy)]
pub struct Open<'a> {
    /// The connection, as `on-open` first saw it.
    pub conn: &'a Connection,
    /// Its peer.
    pub peer: SocketAddr,
}

impl Tenant {
    /// Moves `session` to the current version if it runs another one and
    /// has not already been kept off it; `open` is `Some` for a TCP
    /// connection. Returns what happened (`None`: nothing to do), and
    /// whether the session can go on: it cannot when its old instance
    /// trapped in `snapshot` and no fresh one started.
    pub async fn upgrade(
        &self,
        session: &mut Session,
        open: Option<Open<'_>>,
    ) -> (Option<MigrationOutcome>, bool) {
        let target = self.handler.current();
        if Arc::ptr_eq(session.version_of(), &target) || session.declined(&target) {
            return (None, true);
        }
        let (outcome, alive) = self.hand_over(session, &target, open).await;
        target.tally().add(outcome);
        self.metrics.migrated(outcome);
        (Some(outcome), alive)
    }

    /// Moves `session` off a rolled-back candidate to the current version:
    /// with its state if both offer it, or else afresh (a candidate that
    /// failed its gates is not kept running for a conversation's sake).
    /// Says whether the session can go on.
    pub async fn leave_candidate(&self, session: &mut Session, open: Option<Open<'_>>) -> bool {
        let target = self.handler.current();
        let (outcome, alive) = self.hand_over(session, &target, open).await;
        match outcome {
            MigrationOutcome::Skipped | MigrationOutcome::Kept if alive => {
                self.replace(session, &target, open, MigrationOutcome::Reset)
                    .await
                    .1
            }
            _ => alive,
        }
    }

    async fn hand_over(
        &self,
        old: &mut Session,
        target: &Arc<Version>,
        open: Option<Open<'_>>,
    ) -> (MigrationOutcome, bool) {
        let tcp = open.is_some();
        let offered = match target.code() {
            Code::Wasm(plugin) => plugin.contract().state,
            Code::Native(_) => false,
        };
        let from = old.version();
        let saved = if old.offers_state() && offered {
            match old.snapshot().await {
                Ok(saved) => saved,
                Err(error) => {
                    // The old instance is spent: whatever the policy, the
                    // conversation goes on afresh, if it can.
                    let failure = Failure::Snapshot(error);
                    self.log_failure(&from, target, &failure, "starting afresh");
                    return self
                        .replace(old, target, open, MigrationOutcome::Reset)
                        .await;
                }
            }
        } else {
            None
        };
        let Some(saved) = saved else {
            // Nothing to hand over: UDP moves on without it, as 0.1.0
            // plugins always have; a connection stays where it is.
            if tcp {
                old.decline(target);
                return (MigrationOutcome::Skipped, true);
            }
            return self
                .replace(old, target, open, MigrationOutcome::Fresh)
                .await;
        };
        let cap = self.config.max_state;
        let failure = if saved.data.len() > cap {
            Failure::TooLarge {
                bytes: saved.data.len(),
                cap,
            }
        } else {
            match self.session_on(target.clone(), true).await {
                Err(error) => Failure::Start(error),
                Ok(mut new) => match new.restore(&old.version_info(), &saved).await {
                    Ok(Ok(())) => {
                        tracing::debug!(
                            listener = self.name(),
                            "{from} -> {}: {} bytes of state handed over",
                            target.label(),
                            saved.data.len()
                        );
                        *old = new;
                        return (MigrationOutcome::Migrated, true);
                    }
                    Ok(Err(reason)) => Failure::Refused(reason),
                    Err(error) => Failure::Restore(error),
                },
            }
        };
        match self.config.on_migration_failure {
            MigrationFailurePolicy::Keep => {
                self.log_failure(
                    &from,
                    target,
                    &failure,
                    "kept on the old version with its state",
                );
                old.decline(target);
                (MigrationOutcome::Kept, true)
            }
            MigrationFailurePolicy::Fresh => {
                self.log_failure(
                    &from,
                    target,
                    &failure,
                    "starting afresh (on-migration-failure = \"fresh\")",
                );
                match self
                    .replace(old, target, open, MigrationOutcome::Reset)
                    .await
                {
                    (outcome, true) => (outcome, true),
                    // The old instance is still sound: it goes on.
                    (_, false) => {
                        old.decline(target);
                        (MigrationOutcome::Kept, true)
                    }
                }
            }
        }
    }

    /// Replaces `old` with a fresh session on `target`; a connection's gets
    /// `on-open` (its reply is not sent: the peer is mid-conversation).
    /// Returns `outcome`, and whether a fresh session took over: not if it
    /// did not start, or `on-open` failed or turned the peer away.
    async fn replace(
        &self,
        old: &mut Session,
        target: &Arc<Version>,
        open: Option<Open<'_>>,
        outcome: MigrationOutcome,
    ) -> (MigrationOutcome, bool) {
        let mut fresh = match self.session_on(target.clone(), true).await {
            Ok(fresh) => fresh,
            Err(error) => {
                if self.warnings().admit("migration failed") {
                    tracing::warn!(
                        listener = self.name(),
                        "{} did not start: {error}",
                        target.label()
                    );
                }
                return (outcome, false);
            }
        };
        if let Some(open) = open {
            match fresh.on_open(open.conn, open.peer).await {
                Ok(decision) if decision.next == crate::plugin::Next::CarryOn => {}
                Ok(_) => return (outcome, false),
                Err(error) => {
                    if self.warnings().admit("migration failed") {
                        tracing::warn!(listener = self.name(), peer = %open.peer, "{}: on-open failed: {error}", target.label());
                    }
                    return (outcome, false);
                }
            }
        }
        *old = fresh;
        (outcome, true)
    }

    fn log_failure(&self, from: &str, target: &Version, failure: &Failure, then: &str) {
        if self.warnings().admit("migration failed") {
            tracing::warn!(
                listener = self.name(),
                "state hand-over {from} -> {} failed: {failure}; {then}",
                target.label()
            );
        }
    }
}
