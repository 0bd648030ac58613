//! The optimizers and learning-rate schedules of `train.optim`, written over plain tensors so
//! their state can go into a checkpoint: AdamW and SGD with momentum exactly as
//! `torch.optim.AdamW` / `torch.optim.SGD` (single-tensor path) compute them, with upstream's
//! three parameter groups (default lr; `lr_backbone` for the backbone; `lr · lr_linear_proj_mult`
//! for sampling offsets and reference points), and the epoch-wise MultiStep / StepLR schedules.

use std::collections::BTreeMap;

use tch::Tensor;

use crate::spec::{LrScheduler, OptimConfig, Optimizer};
use crate::TrainerError;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// One trainable parameter: its official key, tensor and group.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub group: usize,
}

/// AdamW or SGD over a fixed, named list of parameters.
#[derive(Debug)]
pub struct Optim {
    kind: Optimizer,
    weight_decay: f64,
    momentum: f64,
    /// Base lr of each group (before the schedule).
    base_lr: [f64; 3],
    /// The scheduled factor now applied to every group.
    factor: f64,
    /// Optimizer steps taken (AdamW's bias correction).
    pub steps: u64,
    /// Per parameter: AdamW (exp_avg, exp_avg_sq) or SGD (momentum_buffer, unused).
    state: Vec<Option<(Tensor, Tensor)>>,
}

impl Optim {
    pub fn new(cfg: &OptimConfig, n_params: usize) -> Self {
        Self {
            kind: cfg.optimizer,
            weight_decay: cfg.weight_decay,
            momentum: cfg.momentum,
            base_lr: [cfg.lr, cfg.lr_backbone, cfg.lr * cfg.lr_linear_proj_mult],
            factor: 1.0,
            steps: 0,
            state: (0..n_params).map(|_| None).collect(),
        }
    }

    /// The lr of `group` now.
    pub fn lr(&self, group: usize) -> f64 {
        self.base_lr[group.min(2)] * self.factor
    }

    /// Sets the schedule's factor for `epoch` (0-based).
    pub fn set_epoch(&mut self, cfg: &OptimConfig, epoch: u32) {
        self.factor = lr_factor(cfg, epoch);
    }

    /// One step over `params` (the same list, in the same order, every call). Parameters
    /// without a gradient are skipped, as torch does.
    pub fn step(&mut self, params: &[Param]) {
        self.begin_step();
        tch::no_grad(|| {
            for (i, p) in params.iter().enumerate() {
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let mut slot = self.state[i].take();
                self.update(&mut slot, &p.tensor, &g, p.group);
                self.state[i] = slot;
            }
        })
    }

    /// Counts one optimizer step (AdamW's bias correction uses the count); call once per step
    /// before the [`Optim::update`]s of that step.
    pub fn begin_step(&mut self) {
        self.steps += 1;
    }

    /// The element-wise update of `w` (a parameter or any slice of one, updated in place) from
    /// its gradient `g`, with `slot` holding that slice's state (created on first use). The
    /// sharded engine applies it to each rank's slices; element for element it is [`Optim::step`].
    pub fn update(
        &self,
        slot: &mut Option<(Tensor, Tensor)>,
        w: &Tensor,
        g: &Tensor,
        group: usize,
    ) {
        let t = self.steps as f64;
        let lr = self.lr(group);
        let mut w = w.shallow_clone();
        match self.kind {
            Optimizer::AdamW => {
                let (m, v) = slot.get_or_insert_with(|| (w.zeros_like(), w.zeros_like()));
                let _ = w.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let _ = m.lerp_(g, 1.0 - BETA1);
                let _ = v.g_mul_scalar_(BETA2);
                let _ = v.addcmul_(g, &g.g_mul_scalar(1.0 - BETA2));
                let bc1 = 1.0 - BETA1.powf(t);
                let bc2 = 1.0 - BETA2.powf(t);
                let denom = (v.sqrt() / bc2.sqrt()).g_add_scalar(EPS);
                let _ = w.addcdiv_(&(m.g_mul_scalar(-lr / bc1)), &denom);
            }
            Optimizer::SGD => {
                let d = if self.weight_decay != 0.0 {
                    g + &w * self.weight_decay
                } else {
                    g.shallow_clone()
                };
                let d = if self.momentum != 0.0 {
                    match slot {
                        Some((buf, _)) => {
                            let _ = buf.g_mul_scalar_(self.momentum);
                            let _ = buf.g_add_(&d);
                            buf.shallow_clone()
                        }
                        None => {
                            let buf = d.copy();
                            *slot = Some((
                                buf.shallow_clone(),
                                Tensor::zeros([0], (w.kind(), w.device())),
                            ));
                            buf
                        }
                    }
                } else {
                    d
                };
                let _ = w.g_add_(&(d * -lr));
            }
        }
    }

    /// f32 state elements kept per parameter element (AdamW 2, SGD with momentum 1, else 0).
    pub fn state_elems_per_param(&self) -> usize {
        match self.kind {
            Optimizer::AdamW => 2,
            Optimizer::SGD if self.momentum != 0.0 => 1,
            Optimizer::SGD => 0,
        }
    }

    /// Names of the two state tensors of each parameter (`None`: the second is unused).
    pub fn state_names(&self) -> (&'static str, Option<&'static str>) {
        match self.kind {
            Optimizer::AdamW => ("exp_avg", Some("exp_avg_sq")),
            Optimizer::SGD => ("momentum_buffer", None),
        }
    }

    /// The state as named tensors (`optim.<param>.exp_avg` …, `optim.steps`).
    pub fn state_tensors(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "optim.steps".to_string(),
            Tensor::from_slice(&[self.steps as i64]),
        )];
        let (a, b) = self.state_names();
        for (p, s) in params.iter().zip(&self.state) {
            if let Some((x, y)) = s {
                out.push((format!("optim.{}.{a}", p.name), x.shallow_clone()));
                if let Some(b) = b {
                    out.push((format!("optim.{}.{b}", p.name), y.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restores what [`Optim::state_tensors`] saved.
    pub fn load_state(
        &mut self,
        params: &[Param],
        saved: &BTreeMap<String, Tensor>,
    ) -> Result<(), TrainerError> {
        self.load_steps(saved);
        for (i, p) in params.iter().enumerate() {
            let Some((x, y)) = self.saved_state(p, saved)? else {
                self.state[i] = None;
                continue;
            };
            let dev = p.tensor.device();
            let y = match y {
                Some(y) => y.to_device(dev),
                None => p.tensor.zeros_like(),
            };
            self.state[i] = Some((x.to_device(dev), y));
        }
        Ok(())
    }

    /// The step count a checkpoint saved (0 without one).
    pub fn load_steps(&mut self, saved: &BTreeMap<String, Tensor>) {
        self.steps = saved
            .get("optim.steps")
            .map(|t| t.int64_value(&[0]) as u64)
            .unwrap_or(0);
    }

    /// The saved state of `p` (first tensor, second if saved), checked against its shape; None
    /// when the checkpoint has none.
    pub fn saved_state<'s>(
        &self,
        p: &Param,
        saved: &'s BTreeMap<String, Tensor>,
    ) -> Result<Option<(&'s Tensor, Option<&'s Tensor>)>, TrainerError> {
        let (a, b) = self.state_names();
        let Some(x) = saved.get(&format!("optim.{}.{a}", p.name)) else {
            return Ok(None);
        };
        if x.size() != p.tensor.size() {
            return Err(TrainerError::OptimizerState {
                key: format!("optim.{}.{a}", p.name),
                found: x.size(),
                expected: p.tensor.size(),
            });
        }
        Ok(Some((
            x,
            b.and_then(|b| saved.get(&format!("optim.{}.{b}", p.name))),
        )))
    }
}

/// The schedule's multiplier for `epoch` (0-based), as torch's MultiStepLR / StepLR stepped once
/// per epoch.
pub fn lr_factor(cfg: &OptimConfig, epoch: u32) -> f64 {
    let n = match cfg.lr_scheduler {
        LrScheduler::MultiStep => cfg.lr_steps.iter().filter(|&&m| m <= epoch).count() as i32,
        LrScheduler::StepLR => (epoch / cfg.lr_step_size.max(1)) as i32,
    };
    cfg.lr_decay.powi(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// Reference values from torch.optim.AdamW(lr=0.1, weight_decay=0.01), 3 steps on
    /// w = [1, -2], loss = sum(w²) (gradient 2w): computed by hand from torch's formula.
    #[test]
    fn adamw_follows_torch_formula() {
        let mut w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let params = vec![Param {
            name: "w".into(),
            tensor: w.shallow_clone(),
            group: 0,
        }];
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..OptimConfig::default()
        };
        let mut opt = Optim::new(&cfg, 1);
        // Reference in f64.
        let mut rw = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for step in 1..=3 {
            let loss = (&w * &w).sum(Kind::Float);
            w.zero_grad();
            loss.backward();
            opt.step(&params);
            for j in 0..2 {
                let g = 2.0 * rw[j];
                rw[j] *= 1.0 - 0.1 * 0.01;
                m[j] = 0.9 * m[j] + 0.1 * g;
                v[j] = 0.999 * v[j] + 0.001 * g * g;
                let bc1 = 1.0 - 0.9f64.powi(step);
                let bc2 = 1.0 - 0.999f64.powi(step);
                rw[j] -= 0.1 / bc1 * m[j] / (v[j].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = Vec::try_from(&w.detach()).unwrap();
        for j in 0..2 {
            assert!((got[j] as f64 - rw[j]).abs() < 1e-5, "{got:?} vs {rw:?}");
        }
    }

    #[test]
    fn multistep_and_steplr_factors() {
        let mut cfg = OptimConfig {
            lr_steps: vec![2, 4],
            lr_decay: 0.1,
            ..OptimConfig::default()
        };
        let f: Vec<f64> = (0..6).map(|e| lr_factor(&cfg, e)).collect();
        assert_eq!(f[0], 1.0);
        assert_eq!(f[1], 1.0);
        assert!((f[2] - 0.1).abs() < 1e-12 && (f[3] - 0.1).abs() < 1e-12);
        assert!((f[4] - 0.01).abs() < 1e-12);
        cfg.lr_scheduler = LrScheduler::StepLR;
        cfg.lr_step_size = 3;
        assert_eq!(lr_factor(&cfg, 2), 1.0);
        assert!((lr_factor(&cfg, 3) - 0.1).abs() < 1e-12);
    }
}
