//! CPU work on candle's compute pool: inferd's kernels (tiled matmuls, paged attention) run on
//! the same threads as candle's own ops, so no second pool competes for the cores.

/// Threads of the pool (its workers and the calling thread).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// `f` over `0..items` in ranges shared out by a cursor (fast threads take a straggler's
/// share); returns when every item is done.
pub fn for_each_range(items: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(items, f);
}

/// A pointer to an output buffer whose parts the pool's workers write, each its own.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    pub fn get(self) -> *mut T {
        self.0
    }
}

// SAFETY: callers write disjoint parts of the buffer behind it.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
