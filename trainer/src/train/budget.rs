//! `train.max_minutes`: a wall-clock budget for training. The schedule is fitted to the
//! throughput the run measures — after its first steps, and again after every validation with
//! the validation's measured cost — so the run ends with a validated checkpoint inside the budget:
//!
//! * the number of epochs is what fits (more than `train.num_epochs` when the budget allows, fewer
//!   when it does not), keeping back the cost of the final validation and checkpoint;
//! * the lr schedule keeps its shape: `lr_steps` (MultiStep) or `lr_step_size` (StepLR) are scaled
//!   by fitted epochs / `train.num_epochs`, so "decay for the last sixth" stays the last sixth;
//! * should the estimate be wrong, the epoch in progress stops where the time left only covers
//!   the final validation and checkpoint ([`Budget::must_stop`]).
//!
//! Pure arithmetic on measured seconds, no clock: the trainer measures and asks (agreeing on the
//! plan across ranks is the trainer's: [`super::trainer`]).

use crate::spec::{LrScheduler, OptimConfig};

/// Steps of the first epoch measured before the first fit (the first step, a warm-up, is not).
pub const PROBE_STEPS: usize = 6;
/// A validation's cost before one has run, as a fraction of a training step per validation batch
/// (a forward without backward, loss or optimizer: about a third of a step).
const VAL_STEP_FRACTION: f64 = 0.4;
/// Kept back besides the final validation: checkpoint writes, plots, scheduling noise.
const MARGIN: f64 = 0.03;

/// What the trainer knows of the run so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Seconds of wall time since training started.
    pub elapsed_s: f64,
    /// Seconds per training step (the mean over measured steps).
    pub step_s: f64,
    /// Seconds per validation, measured, or `None` before the first.
    pub validation_s: Option<f64>,
    /// Epochs already complete.
    pub epochs_done: u32,
    /// Steps already done in the epoch in progress.
    pub steps_into_epoch: usize,
}

/// The fitted schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub epochs: u32,
    pub optim: OptimConfig,
}

/// A training budget and the schedule it was planned for.
#[derive(Debug, Clone)]
pub struct Budget {
    pub seconds: f64,
    /// `train.num_epochs`: the length the spec's lr schedule is written for.
    pub spec_epochs: u32,
    pub steps_per_epoch: usize,
    /// Validation batches of this rank per validation.
    pub val_batches: usize,
    /// `train.validation_interval` (0: only the final validation).
    pub validation_interval: u32,
}

impl Budget {
    /// The cost of one validation: measured, or estimated from the step time.
    fn validation_s(&self, m: &Measured) -> f64 {
        m.validation_s
            .unwrap_or(self.val_batches as f64 * m.step_s * VAL_STEP_FRACTION)
    }

    /// The schedule that fits in what is left of the budget.
    pub fn fit(&self, optim: &OptimConfig, m: &Measured) -> Plan {
        let val = self.validation_s(m);
        let epoch_s = self.steps_per_epoch as f64 * m.step_s;
        let per_epoch = epoch_s
            + if self.validation_interval > 0 {
                val / f64::from(self.validation_interval)
            } else {
                0.0
            };
        let left = self.seconds * (1.0 - MARGIN) - m.elapsed_s - val;
        // An epoch in progress runs to its end (or to `must_stop`); whole epochs after it.
        let in_progress = m.steps_into_epoch > 0 && m.steps_into_epoch < self.steps_per_epoch;
        let rest = if in_progress {
            (self.steps_per_epoch - m.steps_into_epoch) as f64 * m.step_s
        } else {
            0.0
        };
        let more = if left <= rest {
            0
        } else {
            ((left - rest) / per_epoch.max(1e-9)).floor() as u32
        };
        let epochs = (m.epochs_done + u32::from(in_progress) + more).max(1);
        Plan {
            epochs,
            optim: scaled(optim, self.spec_epochs, epochs),
        }
    }

    /// Whether the epoch in progress must stop now so that the final validation and checkpoint
    /// still fit.
    pub fn must_stop(&self, m: &Measured) -> bool {
        m.elapsed_s + m.step_s + self.validation_s(m) > self.seconds * (1.0 - MARGIN / 2.0)
    }
}

/// `optim` with its lr steps moved from a `from`-epoch schedule to a `to`-epoch one.
pub fn scaled(optim: &OptimConfig, from: u32, to: u32) -> OptimConfig {
    let ratio = f64::from(to) / f64::from(from.max(1));
    let at = |e: u32| ((f64::from(e) * ratio).round() as u32).max(1);
    let mut o = optim.clone();
    match o.lr_scheduler {
        LrScheduler::MultiStep => {
            let mut steps: Vec<u32> = o.lr_steps.iter().map(|&e| at(e)).collect();
            steps.dedup();
            o.lr_steps = steps;
        }
        LrScheduler::StepLR => o.lr_step_size = at(o.lr_step_size),
    }
    o
}

/// Steps whose mean gives a `train.max_minutes` run's step time.
const RECENT_STEPS: usize = 200;

/// What a `train.max_minutes` run knows of itself at `epoch` after `steps_into_epoch` steps,
/// from the step times so far; `None` until a step past the warm-up has been timed.
pub fn measure(
    step_seconds: &[f64],
    elapsed_s: f64,
    validation_s: Option<f64>,
    epoch: u32,
    steps_into_epoch: usize,
) -> Option<Measured> {
    let s = step_seconds;
    // The recent steps (past the warm-up): the throughput the rest of the run will see.
    let timed = s
        .get(1.max(s.len().saturating_sub(RECENT_STEPS))..)
        .filter(|t| !t.is_empty())?;
    Some(Measured {
        elapsed_s,
        step_s: timed.iter().sum::<f64>() / timed.len() as f64,
        validation_s,
        epochs_done: epoch,
        steps_into_epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(minutes: f64) -> Budget {
        Budget {
            seconds: minutes * 60.0,
            spec_epochs: 6,
            steps_per_epoch: 100,
            val_batches: 25,
            validation_interval: 1,
        }
    }

    fn optim() -> OptimConfig {
        OptimConfig {
            lr_steps: vec![5],
            ..OptimConfig::default()
        }
    }

    #[test]
    fn epochs_fill_the_budget_and_the_lr_steps_keep_their_place() {
        // 0.5 s a step: 50 s an epoch, validation estimated at 25 × 0.5 × 0.4 = 5 s.
        let m = Measured {
            elapsed_s: 10.0,
            step_s: 0.5,
            validation_s: None,
            epochs_done: 0,
            steps_into_epoch: 6,
        };
        let p = budget(15.0).fit(&optim(), &m);
        // 900·0.97 − 10 − 5 = 858 s; 47 s for the rest of epoch 1, then 55 s an epoch: 14 more.
        assert_eq!(p.epochs, 15);
        assert_eq!(p.optim.lr_steps, vec![13]); // 5/6 of 15 rounds to 13 (12.5)
        let short = budget(1.0).fit(&optim(), &m);
        assert_eq!(short.epochs, 1, "never less than the epoch in progress");
        assert_eq!(short.optim.lr_steps, vec![1]);
    }

    #[test]
    fn a_measured_validation_refits() {
        let mut m = Measured {
            elapsed_s: 300.0,
            step_s: 0.5,
            validation_s: Some(60.0),
            epochs_done: 5,
            steps_into_epoch: 0,
        };
        // Between epochs: 873 − 300 − 60 = 513 s left, 110 s an epoch: 4 more.
        assert_eq!(budget(15.0).fit(&optim(), &m).epochs, 9);
        m.validation_s = Some(5.0);
        assert_eq!(budget(15.0).fit(&optim(), &m).epochs, 15);
        // Nothing more fits: training ends with the epochs done (the last one validated).
        m.elapsed_s = 850.0;
        assert_eq!(budget(15.0).fit(&optim(), &m).epochs, 5);
    }

    #[test]
    fn the_epoch_stops_when_only_the_final_validation_still_fits() {
        let b = budget(10.0);
        let mut m = Measured {
            elapsed_s: 500.0,
            step_s: 1.0,
            validation_s: Some(60.0),
            epochs_done: 3,
            steps_into_epoch: 40,
        };
        assert!(!b.must_stop(&m));
        m.elapsed_s = 531.0;
        assert!(b.must_stop(&m), "531 + 1 + 60 > 600 · 0.985");
    }

    #[test]
    fn step_lr_periods_scale_too() {
        let o = OptimConfig {
            lr_scheduler: LrScheduler::StepLR,
            lr_step_size: 40,
            ..OptimConfig::default()
        };
        assert_eq!(scaled(&o, 50, 10).lr_step_size, 8);
        assert_eq!(scaled(&optim(), 6, 6), optim());
    }
}
