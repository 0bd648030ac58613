//! `train.ema`: an exponential moving average of the trainable weights, as RT-DETR's and
//! D-FINE's `ModelEMA`: after each optimizer step that updated the weights,
//! `ema ← d·ema + (1 − d)·weights` with `d = decay · (1 − exp(−updates / warmups))`, so the
//! average follows the weights closely at first and ever more slowly. Every rank holds the same
//! weights after a step (ddp and fsdp alike), so every rank keeps the same average; rank 0 saves
//! it as `ema.<name>` beside the weights, with the update count.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::optim::Param;
use crate::spec::EmaConfig;
use crate::TrainerError;

/// The checkpoint key prefix of the averaged weights.
pub const PREFIX: &str = "ema.";
/// The checkpoint key of the update count.
const UPDATES: &str = "ema_updates";

/// The moving average of `params` (same order).
pub struct Ema {
    decay: f64,
    warmups: f64,
    pub updates: u64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(cfg: &EmaConfig, params: &[Param]) -> Self {
        Self {
            decay: cfg.decay,
            warmups: f64::from(cfg.warmups),
            updates: 0,
            shadow: tch::no_grad(|| params.iter().map(|p| p.tensor.detach().copy()).collect()),
        }
    }

    /// The weight of the old average at update number `updates` (1-based).
    pub fn factor(&self, updates: u64) -> f64 {
        if self.warmups == 0.0 {
            self.decay
        } else {
            self.decay * (1.0 - (-(updates as f64) / self.warmups).exp())
        }
    }

    /// Folds the current weights into the average.
    pub fn update(&mut self, params: &[Param]) {
        self.updates += 1;
        let d = self.factor(self.updates);
        tch::no_grad(|| {
            for (s, p) in self.shadow.iter_mut().zip(params) {
                let _ = s.g_mul_scalar_(d);
                let _ = s.g_add_(&(p.tensor.detach() * (1.0 - d)));
            }
        });
    }

    /// Exchanges the weights and the average (twice restores both): validation runs on the
    /// average between two swaps.
    pub fn swap(&mut self, params: &[Param]) {
        tch::no_grad(|| {
            for (s, p) in self.shadow.iter_mut().zip(params) {
                let weights = p.tensor.detach().copy();
                p.tensor.shallow_clone().copy_(s);
                s.copy_(&weights);
            }
        });
    }

    /// The average and its update count, as checkpoint tensors.
    pub fn state_tensors(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = params
            .iter()
            .zip(&self.shadow)
            .map(|(p, s)| (format!("{PREFIX}{}", p.name), s.shallow_clone()))
            .collect();
        out.push((
            UPDATES.into(),
            Tensor::from_slice(&[self.updates as i64]).to_kind(Kind::Int64),
        ));
        out
    }

    /// Restores [`Ema::state_tensors`]; false (and the average left at the current weights) when
    /// the checkpoint has none, e.g. when EMA was enabled for the resumed run only.
    pub fn load_state(
        &mut self,
        params: &[Param],
        saved: &BTreeMap<String, Tensor>,
    ) -> Result<bool, TrainerError> {
        let Some(n) = saved.get(UPDATES) else {
            return Ok(false);
        };
        for (p, s) in params.iter().zip(&mut self.shadow) {
            let key = format!("{PREFIX}{}", p.name);
            let t = saved.get(&key).ok_or_else(|| {
                TrainerError::Config(format!(
                    "the checkpoint has an EMA but no {key}: it is from another model"
                ))
            })?;
            tch::no_grad(|| s.copy_(t));
        }
        self.updates = n.int64_value(&[0]).max(0) as u64;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(v: f32) -> Param {
        Param {
            name: "w".into(),
            tensor: Tensor::from_slice(&[v]),
            group: 0,
        }
    }

    #[test]
    fn the_average_follows_rt_detrs_rule() {
        let cfg = EmaConfig {
            enable: true,
            decay: 0.9,
            warmups: 10,
        };
        let p = vec![param(0.0)];
        let mut e = Ema::new(&cfg, &p);
        // d(1) = 0.9·(1 − e^−0.1)
        let d1 = 0.9 * (1.0 - (-0.1f64).exp());
        assert!((e.factor(1) - d1).abs() < 1e-12);
        let _ = p[0].tensor.shallow_clone().fill_(1.0);
        e.update(&p);
        let got = e.shadow[0].double_value(&[0]);
        assert!((got - (1.0 - d1)).abs() < 1e-6, "{got}");
        // No warm-up: the decay itself.
        let plain = Ema::new(
            &EmaConfig {
                warmups: 0,
                ..cfg.clone()
            },
            &p,
        );
        assert_eq!(plain.factor(1), 0.9);
        // Swapping twice restores both; the checkpoint round-trips.
        e.swap(&p);
        assert!((p[0].tensor.double_value(&[0]) - (1.0 - d1)).abs() < 1e-6);
        e.swap(&p);
        assert_eq!(p[0].tensor.double_value(&[0]), 1.0);
        let saved: BTreeMap<String, Tensor> = e.state_tensors(&p).into_iter().collect();
        assert!(saved.contains_key("ema.w"));
        let mut back = Ema::new(&cfg, &p);
        assert!(back.load_state(&p, &saved).unwrap());
        assert_eq!(back.updates, 1);
        assert!((back.shadow[0].double_value(&[0]) - (1.0 - d1)).abs() < 1e-6);
        assert!(!back.load_state(&p, &BTreeMap::new()).unwrap());
    }
}
