//! The training-step benchmark behind `ddetr bench step`: forward + criterion + backward +
//! gradient clipping + AdamW on the TAO default model (ResNet-50, 4 levels, 6+6 layers, 300
//! queries, box refinement, FFN 1024) with random images and five random boxes per image, the
//! same workload as the peer script `hf_ddetr_step.py`.

use std::time::Instant;

use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

use crate::amp::Amp;
use crate::criterion::{local_num_boxes, normalizer, SetCriterion};
use crate::matcher::Target;
use crate::model::deformable_detr::DetrConfig;
use crate::param_groups::{GROUP_BACKBONE, GROUP_LINEAR_PROJ};
use crate::model::DeformableDetr;
use crate::spec::{ModelConfig, OptimConfig, Precision};
use crate::step::{forward_backward, StepMode};
use crate::TrainerError;

/// COCO's class count (max category id 90 + 1), TAO's default.
pub const BENCH_NUM_CLASSES: u32 = 91;
/// Random boxes per image.
const BOXES_PER_IMAGE: i64 = 5;
/// Global gradient-norm clip (TAO's `train.clip_grad_norm`).
const CLIP_GRAD_NORM: f64 = 0.1;

/// What one benchmark run does.
#[derive(Debug, Clone, Copy)]
pub struct StepBenchConfig {
    pub batch: i64,
    pub height: i64,
    pub width: i64,
    /// Timed steps, after one warm-up step.
    pub steps: usize,
    pub device: Device,
    /// Backbone and encoder recomputed in backward (`train.activation_checkpoint`).
    pub activation_checkpoint: bool,
    /// fp16/bf16 autocast (CUDA only; fp16 with the dynamic loss scaler, as training does).
    pub precision: Precision,
}

/// What one benchmark run measured.
#[derive(Debug, Clone)]
pub struct StepBench {
    /// Seconds of each timed step (the warm-up step excluded).
    pub step_s: Vec<f64>,
    /// Trainable + frozen parameters (FrozenBatchNorm running statistics excluded).
    pub params: i64,
    pub final_loss: f64,
    /// Highest resident set size during the timed steps, bytes (Linux: VmHWM after resetting
    /// it with /proc/self/clear_refs); None where the kernel does not tell.
    pub peak_rss: Option<u64>,
    /// On CUDA: the peak bytes libtorch's caching allocator held for tensors during the timed
    /// steps (`torch.cuda.max_memory_allocated()` after a reset).
    pub peak_device: Option<u64>,
    /// fp16 steps skipped because the scaled gradients overflowed.
    pub skipped_steps: usize,
}

/// Resets the kernel's resident-set high-water mark of this process (Linux ≥ 4.0).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's resident-set high-water mark, bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl StepBench {
    /// Median step time in seconds.
    pub fn median_s(&self) -> f64 {
        let mut s = self.step_s.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }
}

/// Runs `cfg.steps` timed training steps (after one warm-up step) at
/// `batch` × 3 × `height` × `width`.
pub fn step_bench(cfg: StepBenchConfig) -> Result<StepBench, TrainerError> {
    let StepBenchConfig {
        batch,
        height,
        width,
        steps,
        device,
        activation_checkpoint,
        precision,
    } = cfg;
    if device == Device::Cpu && precision != Precision::Fp32 {
        let name = if precision == Precision::Fp16 {
            "fp16"
        } else {
            "bf16"
        };
        return Err(TrainerError::Config(format!(
            "precision {name} runs under CUDA autocast only: use fp32 on the CPU"
        )));
    }
    tch::manual_seed(0);
    let cfg = ModelConfig::default();
    let vs = VarStore::new(device);
    let model = DeformableDetr::new(&vs.root(), DetrConfig::from_spec(&cfg, BENCH_NUM_CLASSES)?);
    let criterion = SetCriterion::from_spec(&cfg, BENCH_NUM_CLASSES);
    let optim = OptimConfig::default();
    let mut opt = nn::AdamW {
        wd: optim.weight_decay,
        ..Default::default()
    }
    .build(&vs, optim.lr)?;
    opt.set_lr_group(GROUP_BACKBONE, optim.lr_backbone);
    opt.set_lr_group(GROUP_LINEAR_PROJ, optim.lr * optim.lr_linear_proj_mult);
    let params: i64 = vs
        .variables()
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(_, t)| t.numel() as i64)
        .sum();

    let images = Tensor::randn([batch, 3, height, width], (Kind::Float, device));
    let mask = Tensor::zeros([batch, height, width], (Kind::Bool, device));
    let targets: Vec<Target> = (0..batch)
        .map(|_| Target {
            labels: Tensor::randint(
                i64::from(BENCH_NUM_CLASSES),
                [BOXES_PER_IMAGE],
                (Kind::Int64, device),
            ),
            boxes: Tensor::rand([BOXES_PER_IMAGE, 4], (Kind::Float, device)) * 0.5 + 0.25,
        })
        .collect();
    let num_boxes = normalizer(local_num_boxes(&targets));
    let mut step_s = Vec::with_capacity(steps);
    let mut final_loss = f64::NAN;
    let mut amp = Amp::new(precision, device);
    let cuda_index = match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let mut rss_ok = false;
    let mut skipped_steps = 0;
    for i in 0..=steps {
        if i == 1 {
            rss_ok = reset_peak_rss();
            if let Some(index) = cuda_index {
                tch::Cuda::synchronize(index as i64);
                if let Err(e) = crate::device_memory::cuda_reset_peak(index) {
                    tracing::warn!("peak GPU memory unavailable: {e}");
                }
            }
        }
        let t0 = Instant::now();
        opt.zero_grad();
        let scale = amp.loss_scale();
        let mode = StepMode {
            activation_checkpoint,
            loss_scale: scale,
        };
        let losses = forward_backward(
            &model, &criterion, &images, &mask, &targets, num_boxes, &amp, mode,
        )?;
        // fp16: unscale, and skip the update when the gradients overflowed (GradScaler's rule).
        let skipped = scale != 1.0 && !unscale_finite(&vs, 1.0 / scale);
        if !skipped {
            opt.clip_grad_norm(CLIP_GRAD_NORM);
            opt.step();
        }
        amp.update(skipped);
        final_loss = losses.total.double_value(&[]);
        if let Some(index) = cuda_index {
            tch::Cuda::synchronize(index as i64);
        }
        let dt = t0.elapsed().as_secs_f64();
        tracing::info!(
            step = i,
            loss = final_loss,
            seconds = dt,
            skipped,
            "bench step"
        );
        if i > 0 {
            step_s.push(dt);
            skipped_steps += usize::from(skipped);
        }
    }
    // A figure, not a reason to lose the run: where the statistics cannot be read, say so.
    let peak_device = cuda_index.and_then(|index| {
        crate::device_memory::cuda_peak_allocated(index)
            .map_err(|e| tracing::warn!("peak GPU memory unavailable: {e}"))
            .ok()
    });
    Ok(StepBench {
        step_s,
        params,
        final_loss,
        peak_rss: if rss_ok { peak_rss() } else { None },
        peak_device,
        skipped_steps,
    })
}

/// Multiplies every trainable gradient by `factor`; false when any is not finite (one device
/// sync: the norms are summed on the device, where a NaN or inf carries through).
fn unscale_finite(vs: &VarStore, factor: f64) -> bool {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = vs
            .trainable_variables()
            .iter()
            .filter_map(|var| {
                let mut g = var.grad();
                g.defined().then(|| {
                    let _ = g.g_mul_scalar_(factor);
                    g.norm()
                })
            })
            .collect();
        norms.is_empty()
            || Tensor::stack(&norms, 0)
                .sum(Kind::Float)
                .double_value(&[])
                .is_finite()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unscale_divides_the_gradients_and_flags_overflow() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2], nn::Init::Const(1.0));
        (&w * Tensor::from_slice(&[4.0f32, 8.0]))
            .sum(Kind::Float)
            .backward();
        assert!(unscale_finite(&vs, 0.5));
        assert_eq!(Vec::<f32>::try_from(&w.grad()).unwrap(), [2.0, 4.0]);
        (&w * Tensor::from_slice(&[f32::INFINITY, 1.0]))
            .sum(Kind::Float)
            .backward();
        assert!(!unscale_finite(&vs, 0.5));
        let empty = VarStore::new(Device::Cpu);
        assert!(unscale_finite(&empty, 0.5));
    }
}
