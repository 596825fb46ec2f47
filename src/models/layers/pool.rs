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

/// The compute threads to use when none are asked for: candle's default (the physical cores
/// in this process's CPU affinity mask), capped by a cgroup CPU quota (a container given 2 CPUs
/// of a 64-core host gets 2 threads, not 32 that would be throttled).
pub fn default_threads() -> usize {
    let physical = candle_core::utils::get_num_threads();
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let quota = cgroup_cpu_limit(
        read("/sys/fs/cgroup/cpu.max").as_deref(),
        read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").as_deref(),
        read("/sys/fs/cgroup/cpu/cpu.cfs_period_us").as_deref(),
    );
    quota.map_or(physical, |q| physical.min(q)).max(1)
}

/// CPUs a cgroup allows, rounded up, from cgroup v2's `cpu.max` ("QUOTA PERIOD" or "max
/// PERIOD") or v1's `cfs_quota_us` / `cfs_period_us` (-1: no limit); `None` when unlimited.
pub fn cgroup_cpu_limit(
    v2: Option<&str>,
    v1_quota: Option<&str>,
    v1_period: Option<&str>,
) -> Option<usize> {
    let ratio = |quota: i64, period: i64| {
        (quota > 0 && period > 0).then(|| (quota as u64).div_ceil(period as u64) as usize)
    };
    if let Some(line) = v2 {
        let mut it = line.split_whitespace();
        let (q, p) = (it.next()?, it.next()?);
        return if q == "max" {
            None
        } else {
            ratio(q.parse().ok()?, p.parse().ok()?)
        };
    }
    ratio(
        v1_quota?.trim().parse().ok()?,
        v1_period?.trim().parse().ok()?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_quotas_round_up_and_unlimited_is_none() {
        assert_eq!(cgroup_cpu_limit(Some("max 100000\n"), None, None), None);
        assert_eq!(
            cgroup_cpu_limit(Some("200000 100000\n"), None, None),
            Some(2)
        );
        assert_eq!(cgroup_cpu_limit(Some("150000 100000"), None, None), Some(2));
        assert_eq!(cgroup_cpu_limit(None, Some("-1\n"), Some("100000\n")), None);
        assert_eq!(
            cgroup_cpu_limit(None, Some("400000\n"), Some("100000\n")),
            Some(4)
        );
        assert_eq!(cgroup_cpu_limit(None, None, None), None);
        assert_eq!(cgroup_cpu_limit(Some("garbage"), None, None), None);
        assert!(default_threads() >= 1);
    }
}
