//! Threads that work in the background of serving (the recording's writer,
//! a reload's compilation) run at a low priority, so that when serving
//! needs every core they give way instead of slowing it down.
//!
//! On Linux a thread that lowered its priority cannot raise it again
//! without privileges, so work at the lowest priority gets threads of its
//! own rather than borrowing (and spoiling) a pool's shared ones.

/// The nice value of a background thread: the lowest priority there is.
const LOWEST: i32 = 19;

/// Lowers the calling thread to the lowest priority (on Linux a thread's
/// nice value is its own, set through its thread id). Says so in the log
/// if it cannot: the thread then runs at normal priority, which costs
/// serving more but is not wrong.
pub fn lower_priority(what: &str) {
    lower_priority_to(what, LOWEST);
}

/// Lowers the calling thread to nice value `nice` (0 normal, 19 lowest),
/// as [`lower_priority`] does.
fn lower_priority_to(what: &str, nice: i32) {
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), nice) {
        tracing::debug!("{what} runs at normal priority: {error}");
    }
}

/// Runs `work` at nice value `nice` and returns what it returns. It runs
/// on a rayon pool made for it, one thread per core, each lowered as it
/// starts; whatever `work` does in parallel with rayon (wasmtime compiles a
/// component's functions in parallel on the pool it is called from) runs
/// there too, at the same priority. The caller's thread only waits. The
/// pool's threads end once `work` is done, so nothing lingers to be woken.
///
/// Without a pool (the threads cannot be made) `work` runs on the calling
/// thread at its priority, and the log says so.
pub fn at_priority<T: Send>(what: &'static str, nice: i32, work: impl FnOnce() -> T + Send) -> T {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(std::thread::available_parallelism().map_or(1, |cores| cores.get()))
        .thread_name(move |index| format!("{what}-{index}"))
        .start_handler(move |_| lower_priority_to(what, nice))
        .build();
    match pool {
        Ok(pool) => pool.install(work),
        Err(error) => {
            tracing::debug!("{what} runs at normal priority: {error}");
            work()
        }
    }
}
