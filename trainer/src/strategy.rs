//! The distributed strategies of `train.distributed_strategy` (Lightning's `Strategy`), between
//! backward and the next forward:
//!
//! - `ddp`: gradients averaged across ranks in buckets ([`ddetr_collective::ddp::Ddp`]), then
//!   every rank runs the whole optimizer over every parameter (replicated optimizer state).
//! - `fsdp`: ZeRO stage 2 (Rajbhandari et al., arXiv:1910.02054; FSDP's SHARD_GRAD_OP). The
//!   parameters are laid end to end in one flat space (padded to a multiple of the world size)
//!   and rank `r` owns the slice `[r·shard, (r+1)·shard)`. Gradients are reduce-scattered
//!   (average), so a rank receives only its slice; the global norm is an all-reduce of the
//!   slices' squared norms; each rank updates its slice with the same element-wise optimizer as
//!   `ddp` ([`Optim::update`], with each parameter's group lr) and holds the optimizer state of
//!   that slice only (≈ 1/N of `ddp`'s); the updated slices are all-gathered into every rank's
//!   parameters. Checkpoints hold the full state under the same names as `ddp`'s (gathered), so
//!   a checkpoint resumes under either strategy and any world size.
//!
//! Both strategies optionally unscale the gradients first (fp16's dynamic loss scaling) and report a
//! non-finite gradient norm, in which case the update is skipped, as torch's GradScaler does.

use std::collections::BTreeMap;

use ddetr_collective::ddp::{broadcast_tensor, clip_coef, grad_or_zero, BucketConfig, Ddp};
use ddetr_collective::{Communicator, ReduceOp};
use tch::{Device, Kind, Tensor};

use crate::optim::{Optim, Param};
use crate::spec::DistributedStrategy;
use crate::TrainerError;

/// What one [`Strategy::step`] did.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Global gradient norm after unscaling, before clipping (NaN when not computed).
    pub grad_norm: f64,
    /// The update was skipped because the gradients were not finite.
    pub skipped: bool,
}

/// The distributed strategy of one training run.
pub enum Strategy<'c> {
    Ddp(Ddp<'c>),
    Sharded(Sharded<'c>),
}

impl<'c> Strategy<'c> {
    /// Broadcasts the parameters and buffers from rank 0 and sets the strategy up.
    pub fn new(
        strategy: DistributedStrategy,
        comm: &'c Communicator,
        params: &[Param],
        buffers: &[Tensor],
    ) -> Result<Self, TrainerError> {
        let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor.shallow_clone()).collect();
        Ok(match strategy {
            DistributedStrategy::Ddp => {
                Strategy::Ddp(Ddp::new(comm, &tensors, buffers, BucketConfig::default())?)
            }
            DistributedStrategy::Fsdp => Strategy::Sharded(Sharded::new(comm, params, buffers)?),
        })
    }

    /// [`Strategy::new`] over a built detector's trainable parameters and buffers.
    pub fn for_model<D>(
        strategy: DistributedStrategy,
        comm: &'c Communicator,
        built: &crate::detector::Built<D>,
    ) -> Result<Self, TrainerError> {
        let buffers: Vec<Tensor> = built
            .buffers
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        Self::new(strategy, comm, &built.params, &buffers)
    }

    /// "ddp" or "fsdp".
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Ddp(_) => "ddp",
            Strategy::Sharded(_) => "fsdp",
        }
    }

    /// Synchronises the gradients of `params`, multiplies them by `inv_scale` (1 without loss
    /// scaling), clips to `clip` (0: no clipping) by the global norm, and updates the parameters
    /// unless the gradients are not finite while `inv_scale != 1`.
    pub fn step(
        &mut self,
        optim: &mut Optim,
        params: &[Param],
        clip: f64,
        inv_scale: f64,
    ) -> Result<StepReport, TrainerError> {
        match self {
            Strategy::Ddp(ddp) => {
                let tensors: Vec<Tensor> =
                    params.iter().map(|p| p.tensor.shallow_clone()).collect();
                ddp.sync_gradients(&tensors)?;
                let mut report = StepReport {
                    grad_norm: f64::NAN,
                    skipped: false,
                };
                if inv_scale != 1.0 {
                    let grads: Vec<Tensor> = tensors.iter().map(Tensor::grad).collect();
                    tch::no_grad(|| {
                        for g in &grads {
                            let _ = g.shallow_clone().g_mul_scalar_(inv_scale);
                        }
                    });
                    let norm = global_norm(&grads);
                    report.grad_norm = norm;
                    if !norm.is_finite() {
                        report.skipped = true;
                        return Ok(report);
                    }
                }
                if clip > 0.0 {
                    report.grad_norm = ddp.clip_grad_norm(&tensors, clip);
                }
                optim.step(params);
                Ok(report)
            }
            Strategy::Sharded(s) => s.step(optim, params, clip, inv_scale),
        }
    }

    /// The optimizer state as named tensors for a checkpoint, the same names under both
    /// strategies. Collective under `fsdp`: every rank calls it.
    pub fn state_tensors(
        &self,
        optim: &Optim,
        params: &[Param],
    ) -> Result<Vec<(String, Tensor)>, TrainerError> {
        match self {
            Strategy::Ddp(_) => Ok(optim.state_tensors(params)),
            Strategy::Sharded(s) => s.state_tensors(optim, params),
        }
    }

    /// Restores what [`Strategy::state_tensors`] saved (by either strategy, at any world size).
    pub fn load_state(
        &mut self,
        optim: &mut Optim,
        params: &[Param],
        saved: &BTreeMap<String, Tensor>,
    ) -> Result<(), TrainerError> {
        match self {
            Strategy::Ddp(_) => optim.load_state(params, saved),
            Strategy::Sharded(s) => s.load_state(optim, params, saved),
        }
    }

    /// Bytes of optimizer state this rank holds once every parameter has state.
    pub fn state_bytes_per_rank(&self, optim: &Optim, params: &[Param]) -> usize {
        let per_elem = optim.state_elems_per_param() * 4;
        match self {
            Strategy::Ddp(_) => params.iter().map(|p| p.tensor.numel()).sum::<usize>() * per_elem,
            Strategy::Sharded(s) => s.shard as usize * per_elem,
        }
    }
}

/// √(Σ g²) over `grads` (defined ones), in f64.
fn global_norm(grads: &[Tensor]) -> f64 {
    tch::no_grad(|| {
        grads
            .iter()
            .filter(|g| g.defined())
            .map(|g| {
                g.to_kind(Kind::Double)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum::<f64>()
            .sqrt()
    })
}

/// A run of one parameter's elements inside this rank's slice.
#[derive(Debug, Clone, Copy)]
struct Piece {
    param: usize,
    /// First element within the (flattened) parameter.
    param_off: i64,
    /// First element within this rank's slice.
    shard_off: i64,
    len: i64,
}

/// ZeRO-2 over the trainer's parameter list (see the module docs).
pub struct Sharded<'c> {
    comm: &'c Communicator,
    numels: Vec<i64>,
    shard: i64,
    pieces: Vec<Piece>,
    /// Optimizer state per piece.
    slots: Vec<Option<(Tensor, Tensor)>>,
    device: Device,
}

impl<'c> Sharded<'c> {
    fn new(
        comm: &'c Communicator,
        params: &[Param],
        buffers: &[Tensor],
    ) -> Result<Self, TrainerError> {
        let Some(first) = params.first() else {
            return Err(TrainerError::Config(
                "fsdp: the model has no trainable parameters".into(),
            ));
        };
        if let Some(p) = params
            .iter()
            .find(|p| p.tensor.kind() != Kind::Float || p.tensor.device() != first.tensor.device())
        {
            return Err(TrainerError::Config(format!(
                "fsdp needs every trainable parameter in f32 on one device; {} is {:?} on {:?}",
                p.name,
                p.tensor.kind(),
                p.tensor.device()
            )));
        }
        tch::no_grad(|| -> Result<(), TrainerError> {
            for t in params.iter().map(|p| &p.tensor).chain(buffers) {
                broadcast_tensor(comm, t)?;
            }
            Ok(())
        })?;
        let numels: Vec<i64> = params.iter().map(|p| p.tensor.numel() as i64).collect();
        let total: i64 = numels.iter().sum();
        let world = comm.world() as i64;
        let shard = (total + world - 1) / world;
        let (lo, hi) = (comm.rank() as i64 * shard, (comm.rank() as i64 + 1) * shard);
        let mut pieces = Vec::new();
        let mut off = 0i64;
        for (i, &n) in numels.iter().enumerate() {
            let (a, b) = (off.max(lo), (off + n).min(hi));
            if a < b {
                pieces.push(Piece {
                    param: i,
                    param_off: a - off,
                    shard_off: a - lo,
                    len: b - a,
                });
            }
            off += n;
        }
        tracing::info!(
            rank = comm.rank(),
            params = total,
            slice = shard,
            pieces = pieces.len(),
            "fsdp (ZeRO-2): this rank holds the optimizer state of {shard} of {total} parameters"
        );
        let slots = pieces.iter().map(|_| None).collect();
        Ok(Self {
            comm,
            numels,
            shard,
            pieces,
            slots,
            device: first.tensor.device(),
        })
    }

    fn padded(&self) -> i64 {
        self.shard * self.comm.world() as i64
    }

    /// `parts` (one flat tensor per parameter) end to end, zero-padded to world × shard.
    fn flatten_padded(&self, parts: Vec<Tensor>) -> Tensor {
        let total: i64 = self.numels.iter().sum();
        let mut parts = parts;
        if self.padded() > total {
            parts.push(Tensor::zeros(
                [self.padded() - total],
                (Kind::Float, self.device),
            ));
        }
        Tensor::cat(&parts, 0)
    }

    fn step(
        &mut self,
        optim: &mut Optim,
        params: &[Param],
        clip: f64,
        inv_scale: f64,
    ) -> Result<StepReport, TrainerError> {
        tch::no_grad(|| {
            let flat = self.flatten_padded(
                params
                    .iter()
                    .map(|p| grad_or_zero(&p.tensor).reshape([-1]))
                    .collect(),
            );
            let mut g = Tensor::zeros([self.shard], (Kind::Float, self.device));
            self.comm.reduce_scatter(&flat, &mut g, ReduceOp::Avg)?;
            drop(flat);
            if inv_scale != 1.0 {
                let _ = g.g_mul_scalar_(inv_scale);
            }
            let mut sq = g
                .to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .reshape([1]);
            self.comm.all_reduce(&mut sq, ReduceOp::Sum)?;
            let norm = sq.double_value(&[0]).sqrt();
            if inv_scale != 1.0 && !norm.is_finite() {
                return Ok(StepReport {
                    grad_norm: norm,
                    skipped: true,
                });
            }
            if clip > 0.0 {
                if let Some(c) = clip_coef(norm, clip) {
                    let _ = g.g_mul_scalar_(c);
                }
            }
            // This rank's slice of the parameters, updated piece by piece.
            let slice = Tensor::zeros([self.shard], (Kind::Float, self.device));
            optim.begin_step();
            for (k, pc) in self.pieces.iter().enumerate() {
                let p = &params[pc.param];
                let w = slice.narrow(0, pc.shard_off, pc.len);
                w.shallow_clone()
                    .copy_(
                        &p.tensor
                            .detach()
                            .reshape([-1])
                            .narrow(0, pc.param_off, pc.len),
                    );
                let gk = g.narrow(0, pc.shard_off, pc.len);
                optim.update(&mut self.slots[k], &w, &gk, p.group);
            }
            let mut full = Tensor::zeros([self.padded()], (Kind::Float, self.device));
            self.comm.all_gather(&slice, &mut full)?;
            let mut off = 0;
            for (p, &n) in params.iter().zip(&self.numels) {
                p.tensor
                    .detach()
                    .copy_(&full.narrow(0, off, n).view(p.tensor.size().as_slice()));
                off += n;
            }
            Ok(StepReport {
                grad_norm: norm,
                skipped: false,
            })
        })
    }

    fn state_tensors(
        &self,
        optim: &Optim,
        params: &[Param],
    ) -> Result<Vec<(String, Tensor)>, TrainerError> {
        let mut out = vec![(
            "optim.steps".to_string(),
            Tensor::from_slice(&[optim.steps as i64]),
        )];
        // Whether any rank has state (ranks agree, but a rank may own no piece).
        let mut has = Tensor::from_slice(&[i64::from(self.slots.iter().any(Option::is_some))]);
        self.comm.all_reduce(&mut has, ReduceOp::Max)?;
        if has.int64_value(&[0]) == 0 {
            return Ok(out);
        }
        let (a, b) = optim.state_names();
        for (which, name) in [(0usize, Some(a)), (1, b)] {
            let Some(name) = name else { continue };
            let slice = Tensor::zeros([self.shard], (Kind::Float, self.device));
            for (pc, slot) in self.pieces.iter().zip(&self.slots) {
                if let Some((x, y)) = slot {
                    let src = if which == 0 { x } else { y };
                    slice.narrow(0, pc.shard_off, pc.len).copy_(src);
                }
            }
            let mut full = Tensor::zeros([self.padded()], (Kind::Float, self.device));
            self.comm.all_gather(&slice, &mut full)?;
            let full = full.to_device(Device::Cpu);
            let mut off = 0;
            for (p, &n) in params.iter().zip(&self.numels) {
                out.push((
                    format!("optim.{}.{name}", p.name),
                    full.narrow(0, off, n)
                        .view(p.tensor.size().as_slice())
                        .copy(),
                ));
                off += n;
            }
        }
        Ok(out)
    }

    fn load_state(
        &mut self,
        optim: &mut Optim,
        params: &[Param],
        saved: &BTreeMap<String, Tensor>,
    ) -> Result<(), TrainerError> {
        optim.load_steps(saved);
        let has_second = optim.state_names().1.is_some();
        for (k, pc) in self.pieces.iter().enumerate() {
            let p = &params[pc.param];
            let Some((x, y)) = optim.saved_state(p, saved)? else {
                self.slots[k] = None;
                continue;
            };
            let piece = |t: &Tensor| {
                t.reshape([-1])
                    .narrow(0, pc.param_off, pc.len)
                    .to_device(self.device)
                    .copy()
            };
            let y = match y {
                Some(y) => piece(y),
                None if has_second => Tensor::zeros([pc.len], (Kind::Float, self.device)),
                None => Tensor::zeros([0], (Kind::Float, self.device)),
            };
            self.slots[k] = Some((piece(x), y));
        }
        Ok(())
    }
}
