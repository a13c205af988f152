//! The threads a sink spreads one batch's columns over: building each Arrow column and encoding it as
//! Parquet are independent per column, so a batch costs about `max(column) + sum / threads`.
//!
//! One pool per process (rayon's work stealing, sized by [`threads`]), created on first use and kept:
//! threads spawned per batch cost a stack mapping and a join each time, and left the second core idle
//! while the next batch's columns were built on one thread. A sink that must stay on one core (live
//! capture, see `mode::roll_policy`) or a batch too small to be worth it runs on the calling thread.

use std::sync::OnceLock;

use rayon::prelude::*;

/// At most this many threads encode (the events table has 18 columns; beyond a few threads the widest
/// string column dominates).
const MAX_THREADS: usize = 4;

/// Batches with fewer rows are not worth a hand-off to the pool.
const MIN_PARALLEL_ROWS: usize = 1024;

/// Threads a sink may encode on: the cores this process may use (affinity, `taskset`), up to
/// [`MAX_THREADS`].
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_THREADS)
}

fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads())
            .thread_name(|i| format!("tcplake-encode-{i}"))
            .build()
            // Without threads (a limit on them) the sink encodes on the calling thread: slower, never
            // wrong.
            .map_err(|e| tracing::warn!("no encoder threads, encoding serially: {e}"))
            .ok()
    })
    .as_ref()
}

/// Where a batch's columns are worked on: the calling thread or the process's encoder pool.
#[derive(Clone, Copy, Debug)]
pub struct Encoder {
    pool: Option<&'static rayon::ThreadPool>,
}

impl Encoder {
    /// On the calling thread only.
    pub const SERIAL: Encoder = Encoder { pool: None };

    /// Encodes on the pool when `threads > 1` and this process may use more than one core.
    pub fn new(threads: usize) -> Self {
        if threads <= 1 || self::threads() <= 1 {
            return Self::SERIAL;
        }
        Encoder { pool: pool() }
    }

    fn pool_for(&self, rows: usize) -> Option<&'static rayon::ThreadPool> {
        self.pool.filter(|_| rows >= MIN_PARALLEL_ROWS)
    }

    /// `f(0..n)` in order, computed in parallel for a batch of `rows` rows.
    pub fn map<T, F>(&self, rows: usize, n: usize, f: F) -> Vec<T>
    where
        T: Send,
        F: Fn(usize) -> T + Sync + Send,
    {
        match self.pool_for(rows) {
            Some(pool) => pool.install(|| (0..n).into_par_iter().map(&f).collect()),
            None => (0..n).map(f).collect(),
        }
    }

    /// `a()` and `b()`, at once for a batch of `rows` rows.
    pub fn join<A, B>(
        &self,
        rows: usize,
        a: impl FnOnce() -> A + Send,
        b: impl FnOnce() -> B + Send,
    ) -> (A, B)
    where
        A: Send,
        B: Send,
    {
        match self.pool_for(rows) {
            Some(pool) => pool.install(|| rayon::join(a, b)),
            None => (a(), b()),
        }
    }

    /// `f(a[i], b[i])` for every pair, in parallel for a batch of `rows` rows; the first error (in
    /// column order when serial, any when parallel) is returned.
    pub fn zip_mut<A, B, E, F>(&self, rows: usize, a: &mut [A], b: &[B], f: F) -> Result<(), E>
    where
        A: Send,
        B: Sync,
        E: Send,
        F: Fn(&mut A, &B) -> Result<(), E> + Sync + Send,
    {
        match self.pool_for(rows) {
            Some(pool) => pool.install(|| {
                a.par_iter_mut()
                    .zip(b.par_iter())
                    .try_for_each(|(x, y)| f(x, y))
            }),
            None => a.iter_mut().zip(b).try_for_each(|(x, y)| f(x, y)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_the_order_whether_serial_or_parallel() {
        let want: Vec<usize> = (0..40).map(|i| i * i).collect();
        for e in [Encoder::SERIAL, Encoder::new(4)] {
            assert_eq!(e.map(MIN_PARALLEL_ROWS, 40, |i| i * i), want);
            assert_eq!(e.map(1, 40, |i| i * i), want);
        }
    }

    #[test]
    fn zip_mut_visits_every_pair_and_returns_an_error() {
        for e in [Encoder::SERIAL, Encoder::new(4)] {
            let mut a = vec![0u64; 30];
            let b: Vec<u64> = (0..30).collect();
            e.zip_mut(MIN_PARALLEL_ROWS, &mut a, &b, |x, y| {
                *x = y + 1;
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(a, (1..=30).collect::<Vec<_>>());
            let r = e.zip_mut(MIN_PARALLEL_ROWS, &mut a, &b, |_, y| {
                if *y == 17 {
                    Err(*y)
                } else {
                    Ok(())
                }
            });
            assert_eq!(r, Err(17));
        }
    }
}
