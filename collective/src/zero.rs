//! The sharded engine (`train.distributed_strategy: fsdp`): ZeRO stage 2 (Rajbhandari et al.,
//! arXiv:1910.02054; FSDP's SHARD_GRAD_OP). Gradients are flattened and reduce-scattered (Avg), so
//! each rank receives only its 1/N slice; each rank holds the AdamW state (exp_avg, exp_avg_sq) of
//! that slice only, clips with the global norm (an all-reduce of the slices' squared norms),
//! updates its slice of the parameters, and all-gathers the updated parameters.
//!
//! The flattened length is padded to a multiple of the world size; the padding carries zeros.
//! Checkpoints hold the full, unpadded optimizer state (gathered from every rank), so a run saved
//! at one world size resumes at any other.
//!
//! The update is libtorch's AdamW (`torch/csrc/api/src/optim/adamw.cpp`), step for step.

use tch::{Device, Kind, Tensor};

use crate::ddp::{broadcast_tensor, clip_coef, grad_or_zero};
use crate::{CollectiveError, Communicator, ReduceOp, Result};

/// AdamW hyper-parameters (torch defaults except the learning rate).
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// ZeRO-2 AdamW over a list of f32 parameters.
pub struct ShardedAdamW<'c> {
    comm: &'c Communicator,
    cfg: AdamWConfig,
    numels: Vec<i64>,
    /// Unpadded total.
    total: i64,
    /// Per-rank slice length (padded total / world).
    shard: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
    device: Device,
}

impl<'c> ShardedAdamW<'c> {
    /// Broadcasts `params` and `buffers` from rank 0 and allocates this rank's optimizer slice.
    pub fn new(
        comm: &'c Communicator,
        params: &[Tensor],
        buffers: &[Tensor],
        cfg: AdamWConfig,
    ) -> Result<Self> {
        let Some(first) = params.first() else {
            return Err(CollectiveError::InvalidArgument {
                op: "sharded optimizer",
                what: "no parameters".into(),
            });
        };
        if let Some(p) = params
            .iter()
            .find(|p| p.kind() != Kind::Float || p.device() != first.device())
        {
            return Err(CollectiveError::InvalidArgument {
                op: "sharded optimizer",
                what: format!(
                    "parameters must all be f32 on one device; found {:?} on {:?}",
                    p.kind(),
                    p.device()
                ),
            });
        }
        tch::no_grad(|| -> Result<()> {
            for t in params.iter().chain(buffers) {
                broadcast_tensor(comm, t)?;
            }
            Ok(())
        })?;
        let numels: Vec<i64> = params.iter().map(|p| p.numel() as i64).collect();
        let total: i64 = numels.iter().sum();
        let world = comm.world() as i64;
        let shard = (total + world - 1) / world;
        let device = first.device();
        let zeros = || Tensor::zeros([shard], (Kind::Float, device));
        tracing::info!(
            rank = comm.rank(),
            params = total,
            state_bytes_per_rank = 2 * shard * 4,
            unsharded_state_bytes = 2 * total * 4,
            "sharded AdamW (ZeRO-2): optimizer state per rank"
        );
        Ok(Self {
            comm,
            cfg,
            numels,
            total,
            shard,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            step: 0,
            device,
        })
    }

    /// Bytes of optimizer state this rank holds (exp_avg + exp_avg_sq of its slice).
    pub fn state_bytes(&self) -> usize {
        2 * self.shard as usize * 4
    }

    /// What the same state would take unsharded (every rank, plain DDP).
    pub fn unsharded_state_bytes(&self) -> usize {
        2 * self.total as usize * 4
    }

    fn flatten_padded(&self, parts: Vec<Tensor>) -> Tensor {
        let world = self.comm.world() as i64;
        let pad = self.shard * world - self.total;
        let mut parts: Vec<Tensor> = parts.into_iter().map(|t| t.reshape([-1])).collect();
        if pad > 0 {
            parts.push(Tensor::zeros([pad], (Kind::Float, self.device)));
        }
        Tensor::cat(&parts, 0)
    }

    /// One optimizer step from the gradients in `params` (same list as at construction);
    /// `max_norm` clips with the global norm. Returns the global gradient norm.
    pub fn step(&mut self, params: &[Tensor], max_norm: Option<f64>) -> Result<f64> {
        if params.len() != self.numels.len() {
            return Err(CollectiveError::InvalidArgument {
                op: "sharded optimizer",
                what: format!(
                    "{} parameters given, {} at construction",
                    params.len(),
                    self.numels.len()
                ),
            });
        }
        tch::no_grad(|| {
            let rank = self.comm.rank() as i64;
            let grads = self.flatten_padded(params.iter().map(grad_or_zero).collect());
            let mut g = Tensor::zeros([self.shard], (Kind::Float, self.device));
            self.comm.reduce_scatter(&grads, &mut g, ReduceOp::Avg)?;
            let mut sq = g
                .to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .reshape([1]);
            self.comm.all_reduce(&mut sq, ReduceOp::Sum)?;
            let norm = sq.double_value(&[0]).sqrt();
            if let Some(c) = max_norm.and_then(|m| clip_coef(norm, m)) {
                let _ = g.g_mul_scalar_(c);
            }
            let mut flat = self.flatten_padded(params.iter().map(|p| p.detach()).collect());
            let mut p = flat.narrow(0, rank * self.shard, self.shard);
            self.adamw(&mut p, &g);
            let slice = flat.narrow(0, rank * self.shard, self.shard);
            self.comm.all_gather(&slice, &mut flat)?;
            let mut off = 0;
            for (param, &n) in params.iter().zip(&self.numels) {
                let mut dst = param.detach();
                dst.copy_(&flat.narrow(0, off, n).view(param.size().as_slice()));
                off += n;
            }
            Ok(norm)
        })
    }

    /// libtorch's AdamW on one slice.
    fn adamw(&mut self, p: &mut Tensor, g: &Tensor) {
        let c = self.cfg;
        self.step += 1;
        if c.weight_decay != 0.0 {
            let _ = p.g_mul_scalar_(1.0 - c.lr * c.weight_decay);
        }
        let _ = self.exp_avg.g_mul_scalar_(c.beta1);
        let _ = self.exp_avg.g_add_(&(g * (1.0 - c.beta1)));
        let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2);
        let _ = self.exp_avg_sq.g_add_(&(g * g * (1.0 - c.beta2)));
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let denom = self.exp_avg_sq.sqrt() / bc2.sqrt() + c.eps;
        let step_size = c.lr / bc1;
        let _ = p.g_sub_(&(&self.exp_avg / &denom * step_size));
    }

    /// The full optimizer state (gathered; unpadded; identical on every rank): names and
    /// tensors for a checkpoint. Collective.
    pub fn state_full(&self) -> Result<Vec<(String, Tensor)>> {
        let world = self.comm.world() as i64;
        let mut out = Vec::new();
        for (name, t) in [
            ("optim.exp_avg", &self.exp_avg),
            ("optim.exp_avg_sq", &self.exp_avg_sq),
        ] {
            let mut full = Tensor::zeros([self.shard * world], (Kind::Float, self.device));
            self.comm.all_gather(t, &mut full)?;
            out.push((
                name.to_string(),
                full.narrow(0, 0, self.total).to_device(Device::Cpu),
            ));
        }
        out.push(("optim.step".to_string(), Tensor::from_slice(&[self.step])));
        Ok(out)
    }

    /// Loads a state written by [`ShardedAdamW::state_full`] at any world size; takes this
    /// rank's slice.
    pub fn load_full(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let get = |name: &str| {
            state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| CollectiveError::InvalidArgument {
                    op: "sharded optimizer",
                    what: format!(
                        "checkpoint lacks {name}: it was not written by the sharded engine"
                    ),
                })
        };
        let rank = self.comm.rank() as i64;
        for (name, dst) in [
            ("optim.exp_avg", &mut self.exp_avg),
            ("optim.exp_avg_sq", &mut self.exp_avg_sq),
        ] {
            let full = get(name)?;
            if full.numel() as i64 != self.total {
                return Err(CollectiveError::InvalidArgument {
                    op: "sharded optimizer",
                    what: format!("checkpoint {name} has {} elements but the model has {} parameters: it belongs to another model", full.numel(), self.total),
                });
            }
            let lo = (rank * self.shard).min(self.total);
            let hi = ((rank + 1) * self.shard).min(self.total);
            let slice = Tensor::zeros([self.shard], (Kind::Float, self.device));
            if hi > lo {
                slice
                    .narrow(0, 0, hi - lo)
                    .copy_(&full.narrow(0, lo, hi - lo).to_device(self.device));
            }
            *dst = slice;
        }
        self.step = get("optim.step")?.int64_value(&[0]);
        Ok(())
    }
}
