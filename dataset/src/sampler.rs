//! The distributed sampler: which images each rank reads at each step.
//!
//! Training follows the official `DistributedSampler` + `BatchSampler(drop_last=True)`: one
//! permutation per `(seed, epoch)`, shared by every rank; padded (by repeating its start) to a
//! multiple of the world size; rank r takes positions r, r + world, …; full batches only, so every
//! rank runs the same number of steps. Evaluation keeps the file order and the last partial batch;
//! its padding entries (repeats that make the ranks' shares equal) are counted in
//! [`IndexBatch::padding`] so they are not scored twice. A resumed run starts at a step offset and
//! sees exactly the batches the interrupted run had not yet seen.

use crate::error::{DatasetError, Result};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Shuffled per (seed, epoch); full batches only.
    Train { seed: u64 },
    /// File order; the last batch may be partial.
    Eval,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    len: usize,
    world: usize,
    rank: usize,
    batch_size: usize,
    mode: Mode,
}

/// One step's sample indices on this rank, which the loader turns into a
/// [`crate::loader::Batch`]; the last `padding` of them repeat earlier samples (only in
/// evaluation, at the end of the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexBatch {
    pub step: usize,
    pub indices: Vec<usize>,
    pub padding: usize,
}

impl DistributedSampler {
    pub fn new(
        len: usize,
        world: usize,
        rank: usize,
        batch_size: usize,
        mode: Mode,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(DatasetError::InvalidArgument(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        if batch_size == 0 {
            return Err(DatasetError::InvalidArgument(
                "dataset.batch_size must be at least 1".into(),
            ));
        }
        if len == 0 {
            return Err(DatasetError::InvalidArgument(
                "the dataset has no images".into(),
            ));
        }
        let s = Self {
            len,
            world,
            rank,
            batch_size,
            mode,
        };
        if matches!(mode, Mode::Train { .. }) && s.steps_per_epoch() == 0 {
            return Err(DatasetError::InvalidArgument(format!(
                "{len} training images cannot fill one batch of {batch_size} on each of {world} ranks: lower dataset.batch_size to at most {} or add images",
                len.div_ceil(world)
            )));
        }
        Ok(s)
    }

    /// Samples per rank per epoch (after padding to a multiple of the world size).
    pub fn samples_per_rank(&self) -> usize {
        self.len.div_ceil(self.world)
    }

    /// Steps per epoch; the same on every rank.
    pub fn steps_per_epoch(&self) -> usize {
        match self.mode {
            Mode::Train { .. } => self.samples_per_rank() / self.batch_size,
            Mode::Eval => self.samples_per_rank().div_ceil(self.batch_size),
        }
    }

    /// This rank's samples for `epoch`, in order, padding included.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if let Mode::Train { seed } = self.mode {
            Rng::derive(seed, &[epoch]).shuffle(&mut order);
        }
        let total = self.samples_per_rank() * self.world;
        (self.rank..total)
            .step_by(self.world)
            .map(|p| order[p % self.len])
            .collect()
    }

    /// This rank's images in evaluation order without the padding repeats: positions rank,
    /// rank + world, … of the file order.
    pub fn eval_shard(&self) -> Vec<usize> {
        (self.rank..self.len).step_by(self.world).collect()
    }

    /// The batches of `epoch` from step `start_step` on (0 for a fresh epoch).
    pub fn batches(
        &self,
        epoch: u64,
        start_step: usize,
    ) -> impl Iterator<Item = IndexBatch> + 'static {
        let indices = self.indices(epoch);
        let real = (self.rank..self.len).step_by(self.world).count();
        let (b, steps) = (self.batch_size, self.steps_per_epoch());
        (start_step.min(steps)..steps).map(move |step| {
            let lo = step * b;
            let hi = (lo + b).min(indices.len());
            IndexBatch {
                step,
                indices: indices[lo..hi].to_vec(),
                padding: hi.saturating_sub(real.max(lo)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn all_ranks(len: usize, world: usize, batch: usize, mode: Mode) -> Vec<DistributedSampler> {
        (0..world)
            .map(|r| DistributedSampler::new(len, world, r, batch, mode).unwrap())
            .collect()
    }

    #[test]
    fn ranks_do_not_overlap_and_cover_everything() {
        for (len, world) in [(12, 3), (10, 4), (7, 2), (5, 8), (1, 1)] {
            for mode in [Mode::Train { seed: 3 }, Mode::Eval] {
                let ranks = all_ranks(len, world, 1, mode);
                let lists: Vec<Vec<usize>> = ranks.iter().map(|s| s.indices(2)).collect();
                assert!(
                    lists.iter().all(|l| l.len() == len.div_ceil(world)),
                    "equal shares"
                );
                let all: Vec<usize> = lists.concat();
                let distinct: HashSet<usize> = all.iter().copied().collect();
                assert_eq!(distinct.len(), len, "full coverage {len}/{world}");
                // Only the padding (total - len entries) repeats.
                assert_eq!(
                    all.len() - distinct.len(),
                    len.div_ceil(world) * world - len
                );
            }
        }
    }

    #[test]
    fn every_rank_gets_the_same_number_of_full_batches() {
        for (len, world, batch) in [(100, 3, 4), (17, 4, 2), (9, 2, 4)] {
            let counts: Vec<(usize, bool)> = all_ranks(len, world, batch, Mode::Train { seed: 0 })
                .iter()
                .map(|s| {
                    let batches: Vec<IndexBatch> = s.batches(0, 0).collect();
                    (
                        batches.len(),
                        batches
                            .iter()
                            .all(|b| b.indices.len() == batch && b.padding == 0),
                    )
                })
                .collect();
            let steps = len.div_ceil(world) / batch;
            assert!(
                counts.iter().all(|&c| c == (steps, true)),
                "{len}/{world}/{batch}: {counts:?}"
            );
        }
    }

    #[test]
    fn the_shuffle_depends_on_seed_and_epoch_and_is_shared_by_ranks() {
        let s = |seed, rank| DistributedSampler::new(50, 2, rank, 5, Mode::Train { seed }).unwrap();
        assert_eq!(s(1, 0).indices(3), s(1, 0).indices(3));
        assert_ne!(s(1, 0).indices(3), s(1, 0).indices(4));
        assert_ne!(s(1, 0).indices(3), s(2, 0).indices(3));
        // Ranks interleave one permutation: together they hold 0..50 exactly once.
        let mut both = [s(1, 0).indices(3), s(1, 1).indices(3)].concat();
        both.sort();
        assert_eq!(both, (0..50).collect::<Vec<_>>());
        // Eval keeps file order.
        let e = DistributedSampler::new(10, 2, 1, 3, Mode::Eval).unwrap();
        assert_eq!(e.indices(7), [1, 3, 5, 7, 9]);
    }

    #[test]
    fn resuming_at_a_step_gives_the_remaining_batches() {
        let s = DistributedSampler::new(64, 2, 1, 4, Mode::Train { seed: 9 }).unwrap();
        let full: Vec<IndexBatch> = s.batches(5, 0).collect();
        for k in 0..=full.len() + 1 {
            let resumed: Vec<IndexBatch> = s.batches(5, k).collect();
            assert_eq!(resumed.as_slice(), &full[k.min(full.len())..]);
        }
        assert_eq!(
            full.iter().map(|b| b.step).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
    }

    #[test]
    fn eval_marks_padding_and_keeps_the_partial_batch() {
        // 7 images on 2 ranks: rank 0 gets 0 2 4 6, rank 1 gets 1 3 5 + padding (0).
        let r1 = DistributedSampler::new(7, 2, 1, 3, Mode::Eval).unwrap();
        let b: Vec<IndexBatch> = r1.batches(0, 0).collect();
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0],
            IndexBatch {
                step: 0,
                indices: vec![1, 3, 5],
                padding: 0
            }
        );
        assert_eq!(
            b[1],
            IndexBatch {
                step: 1,
                indices: vec![0],
                padding: 1
            }
        );
        let r0 = DistributedSampler::new(7, 2, 0, 3, Mode::Eval).unwrap();
        let b: Vec<IndexBatch> = r0.batches(0, 0).collect();
        assert_eq!(
            b[1],
            IndexBatch {
                step: 1,
                indices: vec![6],
                padding: 0
            }
        );
    }

    #[test]
    fn impossible_configurations_are_explained() {
        let e = DistributedSampler::new(5, 2, 0, 4, Mode::Train { seed: 0 })
            .unwrap_err()
            .to_string();
        assert_eq!(e, "5 training images cannot fill one batch of 4 on each of 2 ranks: lower dataset.batch_size to at most 3 or add images");
        assert!(DistributedSampler::new(5, 2, 2, 1, Mode::Eval).is_err());
        assert!(DistributedSampler::new(5, 2, 0, 0, Mode::Eval).is_err());
    }
}
