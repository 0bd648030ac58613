//! `train.early_stopping`: stop when the monitored metric has not improved by more than
//! `min_delta` over the best so far for `patience` consecutive observations (validations for
//! `val_mAP`/`val_mAP50`, epochs for `train_loss`), as Lightning's `EarlyStopping` counts them;
//! the mAPs are maximised, the loss minimised. A pure counter: the trainer observes and acts.

use crate::spec::{EarlyStopMetric, EarlyStoppingConfig};

/// The best value so far and the observations since it.
#[derive(Debug, Clone)]
pub struct EarlyStop {
    cfg: EarlyStoppingConfig,
    pub best: Option<f64>,
    pub bad: u32,
}

impl EarlyStop {
    pub fn new(cfg: &EarlyStoppingConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            best: None,
            bad: 0,
        }
    }

    /// Records `value`; true when the run should stop now.
    pub fn observe(&mut self, value: f64) -> bool {
        let better = match (self.best, self.cfg.monitor) {
            (None, _) => true,
            (Some(b), EarlyStopMetric::TrainLoss) => value < b - self.cfg.min_delta,
            (Some(b), _) => value > b + self.cfg.min_delta,
        };
        if better {
            self.best = Some(value);
            self.bad = 0;
        } else {
            self.bad += 1;
        }
        self.bad >= self.cfg.patience
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(
        monitor: EarlyStopMetric,
        patience: u32,
        min_delta: f64,
        values: &[f64],
    ) -> Option<usize> {
        let mut e = EarlyStop::new(&EarlyStoppingConfig {
            enable: true,
            monitor,
            patience,
            min_delta,
        });
        values.iter().position(|&v| e.observe(v))
    }

    #[test]
    fn stops_after_patience_observations_without_a_large_enough_gain() {
        let map = EarlyStopMetric::ValMap50;
        // 0.5 best, then two that do not beat it: stops at the second with patience 2.
        assert_eq!(stop(map, 2, 0.0, &[0.3, 0.5, 0.5, 0.4, 0.9]), Some(3));
        // A gain resets the count.
        assert_eq!(
            stop(map, 2, 0.0, &[0.3, 0.2, 0.4, 0.3, 0.5, 0.5, 0.5]),
            Some(6)
        );
        // min_delta: +0.005 is no gain with min_delta 0.01.
        assert_eq!(stop(map, 1, 0.01, &[0.5, 0.505]), Some(1));
        assert_eq!(stop(map, 1, 0.01, &[0.5, 0.52]), None);
        // The loss is minimised.
        let loss = EarlyStopMetric::TrainLoss;
        assert_eq!(stop(loss, 1, 0.0, &[3.0, 2.0, 2.5]), Some(2));
        assert_eq!(stop(loss, 3, 0.0, &[3.0, 2.0, 1.0, 0.5]), None);
    }
}
