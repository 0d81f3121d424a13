//! A tenant's budget of host warnings: what the host itself logs about a
//! tenant's failed calls, dropped datagrams, closed connections and unsent
//! replies. Those happen as often as peers make them happen, so without a
//! budget a peer would decide how much the host writes (1,000 failing
//! datagrams once made 1,037 log lines). As quinn-udp does for its send
//! errors, the first few of each window are logged in full and the rest are
//! counted (`wasm_echo_warnings_suppressed_total`) and summed up in one line
//! when the window is over.
//!
//! The plugin's own log lines have a budget of their own
//! ([`crate::plugin::LogBudget`]); the failures themselves are counted in
//! the metrics whether or not they are logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{Counter, counter};

/// How long a window lasts: at most [`Warnings::PER_WINDOW`] warnings and
/// one summary line per tenant in this time.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One tenant's warning budget.
#[derive(Debug)]
pub struct Warnings {
    tenant: String,
    window: Mutex<Window>,
    suppressed: Counter,
}

/// What the current window has let through and held back.
#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    /// Held-back warnings by kind, in the order first seen; a tenant has a
    /// handful of kinds, so a list beats a map.
    held: Vec<(&'static str, u64)>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            logged: 0,
            held: Vec::new(),
        }
    }
}

impl Warnings {
    /// Warnings logged in full per window; the rest are summed up.
    pub const PER_WINDOW: u32 = 10;

    /// A budget for `tenant`'s warnings.
    pub fn new(tenant: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            window: Mutex::new(Window::new(Instant::now())),
            suppressed: counter!("wasm_echo_warnings_suppressed_total", "listener" => tenant.to_owned()),
        }
    }

    /// Whether a warning of `kind` (a short fixed phrase such as "datagram
    /// dropped") may be logged now. When it may not, it is counted towards
    /// the window's summary instead.
    pub fn admit(&self, kind: &'static str) -> bool {
        let now = Instant::now();
        let Ok(mut window) = self.window.lock() else {
            return false;
        };
        if now.duration_since(window.started) >= WINDOW {
            self.summarize(&window);
            *window = Window::new(now);
        }
        if window.logged < Self::PER_WINDOW {
            window.logged += 1;
            return true;
        }
        match window.held.iter_mut().find(|(held, _)| *held == kind) {
            Some((_, count)) => *count += 1,
            None => window.held.push((kind, 1)),
        }
        self.suppressed.increment(1);
        false
    }

    /// Writes the summary of a window that is over, if anything was held
    /// back in it. Call at least once a [`WINDOW`], so that a burst
    /// followed by silence is still summed up.
    pub fn flush(&self) {
        self.close_window(false);
    }

    /// Writes the summary of the current window now, over or not: the
    /// last word when the listener stops.
    pub fn finish(&self) {
        self.close_window(true);
    }

    fn close_window(&self, now_or_never: bool) {
        let now = Instant::now();
        let Ok(mut window) = self.window.lock() else {
            return;
        };
        if now_or_never || now.duration_since(window.started) >= WINDOW {
            self.summarize(&window);
            *window = Window::new(now);
        }
    }

    /// The one line that stands for a window's held-back warnings.
    fn summarize(&self, window: &Window) {
        if window.held.is_empty() {
            return;
        }
        let total: u64 = window.held.iter().map(|(_, count)| count).sum();
        let kinds = window
            .held
            .iter()
            .map(|(kind, count)| format!("{count} {kind}"))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            listener = self.tenant,
            "{total} more warnings not logged in the last {} ({kinds}); the metrics count them all",
            humantime::format_duration(Duration::from_secs(WINDOW.as_secs()))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_warnings_of_a_window_pass_and_the_rest_are_held() {
        let warnings = Warnings::new("t");
        let passed = (0..1_000)
            .filter(|_| warnings.admit("datagram dropped"))
            .count();
        assert_eq!(passed, Warnings::PER_WINDOW as usize);
        let window = warnings.window.lock().expect("lock");
        assert_eq!(
            window.held,
            vec![("datagram dropped", 1_000 - u64::from(Warnings::PER_WINDOW))]
        );
    }

    #[test]
    fn a_new_window_starts_with_a_full_budget() {
        let warnings = Warnings::new("t");
        for _ in 0..100 {
            warnings.admit("connection closed");
        }
        {
            let mut window = warnings.window.lock().expect("lock");
            window.started = window.started.checked_sub(WINDOW).expect("booted long ago");
        }
        warnings.flush();
        let window = warnings.window.lock().expect("lock");
        assert!(window.held.is_empty());
        assert_eq!(window.logged, 0);
        drop(window);
        assert!(warnings.admit("connection closed"));
    }
}
