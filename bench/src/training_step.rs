//! The training step behind `ddetr bench step`: the one `ddetr train` runs
//! ([`optimizer_step`]: gradients zeroed, the detector's forward + criterion + backward under the
//! fp16 loss scale, the distributed strategy — a world of one — unscaling by 1/scale, clipping to
//! 0.1 and stepping `Optim` with upstream's parameter groups, the loss scaler's update) on the
//! model of [`build_model`] at TAO's defaults (Deformable DETR: ResNet-50, 4 levels, 6+6 layers,
//! 300 queries, box refinement, FFN 1024; DINO: the same backbone and levels, 300 queries from
//! the encoder's proposals, FFN 2048, 100 denoising queries per box budget). The input is random
//! images with five random boxes per image, the workload of the peer script `hf_ddetr_step.py`.

use std::time::Instant;

use ddetr_collective::Communicator;
use ddetr_trainer::amp::Amp;
use ddetr_trainer::criterion::{local_num_boxes, normalizer};
use ddetr_trainer::detector::{build_model, DeformableDetrDetector, Detector, DinoDetector};
use ddetr_trainer::matcher::Target;
use ddetr_trainer::optim::Optim;
use ddetr_trainer::spec::{Architecture, ExperimentSpec, Precision};
use ddetr_trainer::strategy::Strategy;
use ddetr_trainer::train::update::{optimizer_step, MicroBatch, StepState};
use ddetr_trainer::TrainerError;
use tch::{Device, Kind, Tensor};

/// COCO's class count (max category id 90 + 1), TAO's default.
pub const BENCH_NUM_CLASSES: u32 = 91;
/// Random boxes per image.
const BOXES_PER_IMAGE: i64 = 5;
/// Global gradient-norm clip (TAO's `train.clip_grad_norm`).
const CLIP_GRAD_NORM: f64 = 0.1;
/// The model's initialisation seed.
const SEED: i64 = 0;

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
    /// The detector, at TAO's defaults for it.
    pub arch: Architecture,
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
    match cfg.arch {
        Architecture::DeformableDetr => step_bench_of::<DeformableDetrDetector>(cfg),
        Architecture::Dino => step_bench_of::<DinoDetector>(cfg),
    }
}

fn step_bench_of<D: Detector>(cfg: StepBenchConfig) -> Result<StepBench, TrainerError> {
    let StepBenchConfig {
        batch,
        height,
        width,
        steps,
        device,
        activation_checkpoint,
        precision,
        arch,
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
    let spec = bench_spec(arch, activation_checkpoint, precision);
    let built = build_model::<D>(&spec, device, SEED)?;
    let mut optim = Optim::new(&spec.train.optim, built.params.len());
    optim.set_epoch(&spec.train.optim, 0);
    let comm = Communicator::single();
    let mut strategy = Strategy::for_model(spec.train.distributed_strategy, &comm, &built)?;
    let params: i64 = built
        .vs
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
                i64::from(spec.dataset.num_classes),
                [BOXES_PER_IMAGE],
                (Kind::Int64, device),
            ),
            boxes: Tensor::rand([BOXES_PER_IMAGE, 4], (Kind::Float, device)) * 0.5 + 0.25,
        })
        .collect();
    let num_boxes = normalizer(local_num_boxes(&targets));
    let mut step_s = Vec::with_capacity(steps);
    let mut final_loss = f64::NAN;
    let mut amp = Amp::new(spec.train.precision, device);
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
                if let Err(e) = ddetr_trainer::device_memory::cuda_reset_peak(index) {
                    tracing::warn!("peak GPU memory unavailable: {e}");
                }
            }
        }
        let t0 = Instant::now();
        let (losses, report) = optimizer_step(
            &built,
            StepState {
                strategy: &mut strategy,
                optim: &mut optim,
                amp: &mut amp,
            },
            &[MicroBatch {
                images: &images,
                mask: &mask,
                targets: &targets,
            }],
            num_boxes,
            spec.train.clip_grad_norm,
            spec.train.activation_checkpoint,
        )?;
        let skipped = report.skipped;
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
        ddetr_trainer::device_memory::cuda_peak_allocated(index)
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

/// The spec of the measured run: TAO's defaults for `arch` (model, AdamW and its groups, `ddp`)
/// with COCO's classes, clip 0.1, and the asked activation checkpointing and precision.
fn bench_spec(
    arch: Architecture,
    activation_checkpoint: bool,
    precision: Precision,
) -> ExperimentSpec {
    let mut spec = ExperimentSpec::defaults_for(arch);
    spec.dataset.num_classes = BENCH_NUM_CLASSES;
    spec.train.clip_grad_norm = CLIP_GRAD_NORM;
    spec.train.activation_checkpoint = activation_checkpoint;
    spec.train.precision = precision;
    spec
}

#[cfg(test)]
mod tests {
    use ddetr_trainer::optim::Param;
    use ddetr_trainer::spec::{DistributedStrategy, OptimConfig};

    use super::*;

    /// The fp16 path of the step: the strategy multiplies the gradients by 1/scale and reports a
    /// non-finite one, so the update is skipped.
    #[test]
    fn the_strategy_unscales_the_gradients_and_flags_overflow() {
        let comm = Communicator::single();
        let w = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![Param {
            name: "w".into(),
            tensor: w.shallow_clone(),
            group: 0,
        }];
        let cfg = OptimConfig::default();
        let mut optim = Optim::new(&cfg, 1);
        let mut strategy = Strategy::new(DistributedStrategy::Ddp, &comm, &params, &[]).unwrap();
        (&w * Tensor::from_slice(&[4.0f32, 8.0]))
            .sum(Kind::Float)
            .backward();
        assert!(
            !strategy
                .step(&mut optim, &params, 0.0, 0.5)
                .unwrap()
                .skipped
        );
        assert_eq!(Vec::<f32>::try_from(&w.grad()).unwrap(), [2.0, 4.0]);
        let _ = w.grad().zero_();
        (&w * Tensor::from_slice(&[f32::INFINITY, 1.0]))
            .sum(Kind::Float)
            .backward();
        let before = Vec::<f32>::try_from(&w.detach()).unwrap();
        assert!(
            strategy
                .step(&mut optim, &params, 0.0, 0.5)
                .unwrap()
                .skipped
        );
        assert_eq!(Vec::<f32>::try_from(&w.detach()).unwrap(), before);
        let mut empty = Strategy::new(DistributedStrategy::Ddp, &comm, &[], &[]).unwrap();
        let report = empty.step(&mut Optim::new(&cfg, 0), &[], 0.0, 0.5).unwrap();
        assert!(!report.skipped);
    }
}
