//! Threads that work in the background of serving (the recording's writer)
//! run at the lowest priority, so that when serving needs every core they
//! give way instead of slowing it down.

/// The nice value of a background thread: the lowest priority there is.
const LOWEST: i32 = 19;

/// Lowers the calling thread to the lowest priority (on Linux a thread's
/// nice value is its own, set through its thread id). Says so in the log
/// if it cannot: the thread then runs at normal priority, which costs
/// serving more but is not wrong.
pub fn lower_priority(what: &str) {
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), LOWEST) {
        tracing::debug!("{what} runs at normal priority: {error}");
    }
}
