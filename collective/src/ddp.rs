//! The DDP engine: data parallelism by gradient averaging, after PyTorch DDP's reducer
//! (`torch/csrc/distributed/c10d/reducer.hpp`): parameters and buffers broadcast from rank 0 at
//! start; gradients reduced in buckets — parameters taken in reverse order (roughly the order
//! backward produces them), a small first bucket (1 MiB) so communication can start early, then
//! buckets up to 25 MiB; each bucket is flattened, all-reduced with Avg and copied back. A
//! parameter that got no gradient on this rank counts as zero (and receives the average), so every
//! rank steps the same way. Gradient clipping uses the global norm after reduction.

use tch::{Kind, Tensor};

use crate::{CollectiveError, Communicator, ReduceOp, Result};

/// PyTorch's `kDefaultFirstBucketBytes`.
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;
/// PyTorch's `kDefaultBucketBytesCap` (`bucket_cap_mb` = 25).
pub const BUCKET_CAP_BYTES: usize = 25 << 20;

/// Bucket sizes.
#[derive(Debug, Clone, Copy)]
pub struct BucketConfig {
    pub first_bucket_bytes: usize,
    pub bucket_cap_bytes: usize,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            first_bucket_bytes: FIRST_BUCKET_BYTES,
            bucket_cap_bytes: BUCKET_CAP_BYTES,
        }
    }
}

/// Indices of the parameters in one bucket (all of one dtype).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub params: Vec<usize>,
    pub bytes: usize,
}

/// Assigns parameters (given as (numel, dtype) in model order) to buckets: reverse order, a new
/// bucket when the dtype changes or the cap (first bucket: `first_bucket_bytes`) would be passed.
pub fn assign_buckets(params: &[(usize, Kind)], cfg: BucketConfig) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    let mut kind = None;
    for i in (0..params.len()).rev() {
        let (numel, k) = params[i];
        let bytes = numel * k.elt_size_in_bytes();
        let cap = if out.len() <= 1 {
            cfg.first_bucket_bytes
        } else {
            cfg.bucket_cap_bytes
        };
        let fits = out
            .last()
            .is_some_and(|b| b.bytes + bytes <= cap || b.bytes == 0);
        if out.is_empty() || kind != Some(k) || !fits {
            out.push(Bucket {
                params: Vec::new(),
                bytes: 0,
            });
            kind = Some(k);
        }
        let b = out.last_mut().expect("pushed");
        b.params.push(i);
        b.bytes += bytes;
    }
    out
}

/// The gradient of `p`, created as zeros when backward did not reach it.
pub fn grad_or_zero(p: &Tensor) -> Tensor {
    let g = p.grad();
    if g.defined() {
        return g;
    }
    // A zero-valued backward through `p` makes autograd allocate its .grad (with grad mode on,
    // even when called under no_grad).
    tch::with_grad(|| (p * 0.0).sum(Kind::Float).backward());
    p.grad()
}

/// Global L2 norm of `grads` and the clip coefficient for `max_norm` (as torch's
/// clip_grad_norm_: scale = max_norm / (norm + 1e-6) when below 1).
pub fn clip_coef(norm: f64, max_norm: f64) -> Option<f64> {
    let c = max_norm / (norm + 1e-6);
    (c < 1.0).then_some(c)
}

/// Data-parallel gradient synchronisation for one model.
pub struct Ddp<'c> {
    comm: &'c Communicator,
    buckets: Vec<Bucket>,
    count: usize,
}

impl<'c> Ddp<'c> {
    /// Builds the buckets for `params` (the model's trainable parameters, in the same order on
    /// every rank) and broadcasts `params` and `buffers` from rank 0.
    pub fn new(
        comm: &'c Communicator,
        params: &[Tensor],
        buffers: &[Tensor],
        cfg: BucketConfig,
    ) -> Result<Self> {
        let shapes: Vec<(usize, Kind)> = params.iter().map(|p| (p.numel(), p.kind())).collect();
        let buckets = assign_buckets(&shapes, cfg);
        tch::no_grad(|| -> Result<()> {
            for t in params.iter().chain(buffers) {
                broadcast_tensor(comm, t)?;
            }
            Ok(())
        })?;
        tracing::debug!(buckets = buckets.len(), params = params.len(), "ddp ready");
        Ok(Self {
            comm,
            buckets,
            count: params.len(),
        })
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Averages every parameter's gradient across ranks, bucket by bucket.
    pub fn sync_gradients(&self, params: &[Tensor]) -> Result<()> {
        if params.len() != self.count {
            return Err(CollectiveError::InvalidArgument {
                op: "ddp",
                what: format!(
                    "{} parameters given, {} at construction",
                    params.len(),
                    self.count
                ),
            });
        }
        if self.comm.world() == 1 {
            params.iter().for_each(|p| drop(grad_or_zero(p)));
            return Ok(());
        }
        tch::no_grad(|| {
            for b in &self.buckets {
                let grads: Vec<Tensor> =
                    b.params.iter().map(|&i| grad_or_zero(&params[i])).collect();
                let flats: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
                let mut flat = Tensor::cat(&flats, 0);
                self.comm.all_reduce(&mut flat, ReduceOp::Avg)?;
                let mut off = 0;
                for mut g in grads {
                    let n = g.numel() as i64;
                    g.copy_(&flat.narrow(0, off, n).view(g.size().as_slice()));
                    off += n;
                }
            }
            Ok(())
        })
    }

    /// Clips the (already averaged, so global) gradient norm to `max_norm`; returns the norm.
    pub fn clip_grad_norm(&self, params: &[Tensor], max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| p.grad())
                .filter(|g| g.defined())
                .collect();
            if grads.is_empty() {
                return 0.0;
            }
            let sq: f64 = grads
                .iter()
                .map(|g| {
                    g.to_kind(Kind::Double)
                        .square()
                        .sum(Kind::Double)
                        .double_value(&[])
                })
                .sum();
            let norm = sq.sqrt();
            if let Some(c) = clip_coef(norm, max_norm) {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(c);
                }
            }
            norm
        })
    }
}

/// Broadcasts `t` from rank 0 in place (through a contiguous copy if it is not contiguous).
pub fn broadcast_tensor(comm: &Communicator, t: &Tensor) -> Result<()> {
    let mut dst = t.shallow_clone();
    if t.is_contiguous() {
        comm.broadcast(&mut dst, 0)
    } else {
        let mut c = t.contiguous();
        comm.broadcast(&mut c, 0)?;
        dst.copy_(&c);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_reverse_order_with_a_small_first_bucket() {
        // 10 f32 params of 100 elements (400 bytes); first cap 800 bytes, then 1200.
        let params = vec![(100, Kind::Float); 10];
        let b = assign_buckets(
            &params,
            BucketConfig {
                first_bucket_bytes: 800,
                bucket_cap_bytes: 1200,
            },
        );
        let idx: Vec<Vec<usize>> = b.iter().map(|b| b.params.clone()).collect();
        assert_eq!(
            idx,
            vec![vec![9, 8], vec![7, 6, 5], vec![4, 3, 2], vec![1, 0]]
        );
        // A dtype change starts a bucket; an oversized parameter gets one of its own.
        let mixed = vec![
            (10, Kind::Float),
            (10, Kind::Double),
            (1000, Kind::Float),
            (1, Kind::Float),
        ];
        let b = assign_buckets(
            &mixed,
            BucketConfig {
                first_bucket_bytes: 100,
                bucket_cap_bytes: 100,
            },
        );
        let idx: Vec<Vec<usize>> = b.iter().map(|b| b.params.clone()).collect();
        assert_eq!(idx, vec![vec![3], vec![2], vec![1], vec![0]]);
    }

    #[test]
    fn defaults_are_pytorchs() {
        let c = BucketConfig::default();
        assert_eq!(
            (c.first_bucket_bytes, c.bucket_cap_bytes),
            (1 << 20, 25 << 20)
        );
    }
}
