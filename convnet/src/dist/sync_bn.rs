//! Synchronised batch norm (PyTorch's `SyncBatchNorm`): in training, batch statistics over
//! the global batch of all ranks instead of each rank's slice.
//!
//! Forward: each rank's per-channel count, mean and sum of squared deviations (float64) are
//! gathered from every rank and combined pairwise in rank order (Chan et al.), so every rank
//! normalises with the same statistics and updates its running statistics identically.
//! Backward: the two per-channel gradient sums (of `dy` and `dy * xhat`) are summed over the
//! ranks, and the input gradient uses them with the global count.
//!
//! The batch-norm op consults the group of the forward pass in progress
//! ([`with_group`]), so every BatchNorm layer of any model takes part without being changed;
//! the op keeps the group for its backward pass.

use super::{Channel, Communicator};
use crate::error::{invalid, Result};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The ranks that share batch statistics.
pub(crate) struct SyncGroup {
    comm: Arc<dyn Communicator>,
    /// This rank has no images in the current step (a short last batch): it runs the step
    /// on stand-in images to take part in every collective, contributing nothing.
    idle: AtomicBool,
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<SyncGroup>>> = const { RefCell::new(None) };
}

/// The group of the forward pass running on this thread, if any.
pub(crate) fn active() -> Option<Arc<SyncGroup>> {
    ACTIVE.with(|a| a.borrow().clone())
}

/// Runs `f` (a training forward pass) with batch norm synchronised over `group`.
pub(crate) fn with_group<R>(group: &Arc<SyncGroup>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<SyncGroup>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ACTIVE.with(|a| *a.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(ACTIVE.with(|a| a.borrow_mut().replace(group.clone())));
    f()
}

/// What a synchronised batch-norm op keeps for its backward pass.
pub(crate) struct Synced {
    pub group: Arc<SyncGroup>,
    /// Values per channel in the global batch.
    pub count: f64,
    /// Whether this rank's values were part of it (an idle rank's stand-ins were not, and
    /// get no input gradient).
    pub contributes: bool,
}

/// Per-channel statistics of one part of a batch: `count` values, their `mean` and the sum
/// of squared deviations from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// The moments of the union of two parts (Chan, Golub and LeVeque's pairwise update).
    pub(crate) fn merge(self, other: Moments) -> Moments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * (other.count / count),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / count),
        }
    }
}

impl SyncGroup {
    pub(crate) fn new(comm: Arc<dyn Communicator>) -> SyncGroup {
        SyncGroup {
            comm,
            idle: AtomicBool::new(false),
        }
    }

    /// Marks this rank as contributing nothing to the statistics (see `idle`).
    pub(crate) fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
    }

    /// Whether this rank's values are part of the global batch now (not an idle rank's
    /// stand-ins).
    pub(crate) fn contributes(&self) -> bool {
        !self.idle.load(Ordering::Relaxed)
    }

    /// The global batch's per-channel statistics from this rank's `count` values per
    /// channel with batch `mean` and biased `var`: `(count, mean, biased variance)`.
    pub(crate) fn combine(
        &self,
        count: usize,
        mean: &[f64],
        var: &[f64],
    ) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        let c = mean.len();
        let n = if self.contributes() {
            count as f64
        } else {
            0.0
        };
        // [count, mean..., m2...] per rank.
        let mut local = Vec::with_capacity(1 + 2 * c);
        local.push(n);
        local.extend(mean.iter().map(|&m| if n > 0.0 { m } else { 0.0 }));
        local.extend(var.iter().map(|&v| if n > 0.0 { v * n } else { 0.0 }));
        let all = self.comm.all_gather(Channel::BatchStats, &local)?;
        if all.len() != local.len() * self.comm.size() {
            return Err(invalid(
                "sync batch norm",
                format!(
                    "ranks gathered {} statistics, expected {} per rank: the ranks run different models",
                    all.len(),
                    local.len()
                ),
            ));
        }
        let mut total = 0.0;
        let (mut gmean, mut gvar) = (vec![0.0; c], vec![0.0; c]);
        for ch in 0..c {
            let m = all
                .chunks_exact(local.len())
                .map(|r| Moments {
                    count: r[0],
                    mean: r[1 + ch],
                    m2: r[1 + c + ch],
                })
                .fold(
                    Moments {
                        count: 0.0,
                        mean: 0.0,
                        m2: 0.0,
                    },
                    Moments::merge,
                );
            total = m.count;
            gmean[ch] = m.mean;
            gvar[ch] = if m.count > 0.0 { m.m2 / m.count } else { 0.0 };
        }
        Ok((total, gmean, gvar))
    }

    /// Sums the backward pass's per-channel gradient sums over the ranks.
    pub(crate) fn reduce_sums(&self, sums: &mut [f64]) -> Result<()> {
        self.comm.all_reduce_sum(Channel::BatchStats, sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merging the moments of parts gives the moments of the whole (and empty parts are
    /// neutral), checked against a direct two-pass computation.
    #[test]
    fn merged_moments_equal_the_whole() {
        let mut rng = crate::Rng::new(3);
        let xs: Vec<f64> = (0..97).map(|_| rng.normal() as f64 * 3.0 + 10.0).collect();
        let moments = |p: &[f64]| {
            let count = p.len() as f64;
            let mean = if p.is_empty() {
                0.0
            } else {
                p.iter().sum::<f64>() / count
            };
            let m2 = p.iter().map(|x| (x - mean) * (x - mean)).sum();
            Moments { count, mean, m2 }
        };
        let whole = moments(&xs);
        for cuts in [[0, 40, 97], [13, 13, 60], [97, 97, 97]] {
            let parts = [
                &xs[..cuts[0]],
                &xs[cuts[0]..cuts[1]],
                &xs[cuts[1]..cuts[2]],
                &xs[cuts[2]..],
            ];
            let merged = parts
                .iter()
                .map(|p| moments(p))
                .fold(moments(&[]), Moments::merge);
            assert_eq!(merged.count, whole.count);
            assert!(
                (merged.mean - whole.mean).abs() < 1e-12 * whole.mean.abs(),
                "{cuts:?}"
            );
            assert!((merged.m2 - whole.m2).abs() < 1e-10 * whole.m2, "{cuts:?}");
        }
    }
}
