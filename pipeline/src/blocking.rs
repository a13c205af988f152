//! CPU-heavy and blocking work called from async code (Parquet encoding and zstd, sealing and
//! fsyncing files, renames into place): on the multi-threaded runtime it runs through
//! `block_in_place`, so the worker hands its other tasks (edges, timers, the admin endpoint) to the
//! other workers instead of stalling them; on a current-thread runtime (unit tests) it runs inline.
//! Borrowed data stays borrowed: no copy or `'static` move into a blocking pool for each batch.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f`, letting the runtime move other tasks off this worker while it does.
pub fn run<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_inline_outside_a_runtime() {
        assert_eq!(super::run(|| 2 + 2), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_in_place_on_a_multi_threaded_runtime() {
        let v = [1, 2, 3];
        assert_eq!(super::run(|| v.iter().sum::<i32>()), 6);
    }

    #[tokio::test]
    async fn runs_inline_on_a_current_thread_runtime() {
        assert_eq!(super::run(|| "ok"), "ok");
    }
}
