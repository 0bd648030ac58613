//! The training engine behind `ddetr train`: the dataset cache → loader → model → criterion
//! (num_boxes averaged across ranks) → DDP gradient averaging → global-norm clip → AdamW/SGD with
//! upstream's parameter groups → MultiStep/StepLR per epoch; checkpoints with checksums and
//! auto-resume (mid-epoch after a SIGTERM); COCO mAP validation; `status.json` (JSON lines in
//! TAO's KPI shape) and `experiment.yaml`. A world of one when the launcher's environment is
//! absent; every rank of a `ddetr-launch` job otherwise, bootstrapping through the launcher's
//! rendezvous (DDETR_RDZV=quic://…), or under plain torchrun env through a TCP store that rank 0
//! hosts at MASTER_ADDR:MASTER_PORT.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::amp::Amp;
use crate::budget::{Budget, Measured, Plan, PROBE_STEPS};
use crate::engine::Engine;
use crate::step::{forward_backward, StepMode};
use ddetr_collective::{Communicator, ReduceOp, TcpStoreServer};
use ddetr_dataset::cache::{ensure_split, Split};
use ddetr_dataset::loader::{Batch, Loader, LoaderMode};
use ddetr_dataset::Cache;
use ddetr_launcher::bootstrap::Bootstrap;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointMeta};
use crate::coco_eval::{self, CocoStats, Detection};
use crate::criterion::{local_num_boxes, normalizer, SetCriterion};
use crate::input_sizes::InputSizes;
use crate::matcher::Target;
use crate::model::deformable_detr::DetrConfig;
use crate::model::DeformableDetr;
use crate::optim::{Optim, Param};
use crate::post_process::post_process;
use crate::progress::{Display, Progress, StepStats};
use crate::spec::{ExperimentSpec, Precision, Task};
use crate::TrainerError;

/// The rolling checkpoint every epoch end (and a preemption) rewrites.
pub const LATEST: &str = "dd_model_latest.safetensors";

/// `model_epoch_NNN.safetensors` (epoch 0-based, as Lightning names them).
pub fn epoch_checkpoint_name(epoch: u32) -> String {
    format!("model_epoch_{epoch:03}.safetensors")
}

/// This process's place in the job and its communicator.
pub struct World {
    pub comm: Communicator,
    /// Rank 0 hosts the bootstrap store for the job's lifetime.
    _server: Option<TcpStoreServer>,
}

impl World {
    /// From the launcher's environment (RANK, WORLD_SIZE, … and DDETR_RDZV with DDETR_JOB_TOKEN,
    /// or MASTER_ADDR/MASTER_PORT under plain torchrun; [`ddetr_launcher::bootstrap`]); a world
    /// of one without it. The backend follows the device ([`pick_device`]): NCCL on a GPU.
    pub fn from_env() -> Result<Self, TrainerError> {
        let boot = Bootstrap::from_env()?;
        // NCCL where the trainer runs on a GPU (torchrun's backend choice), the CPU collectives
        // elsewhere; CPU tensors in a NCCL job (loss sums, detections) go through staging copies.
        let comm = match &boot.store {
            None => Communicator::single(),
            Some(store) if pick_device(boot.info.local_rank)?.is_cuda() => {
                Communicator::nccl(store.as_ref(), boot.info, &boot.cfg)?
            }
            Some(store) => Communicator::cpu(store.as_ref(), boot.info, &boot.cfg)?,
        };
        // The bootstrap store (a rendezvous connection) is dropped here; a TCP store server stays.
        Ok(Self {
            comm,
            _server: boot.server,
        })
    }

    pub fn single() -> Self {
        Self {
            comm: Communicator::single(),
            _server: None,
        }
    }
}

/// How a training run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The epoch and step where a SIGTERM stopped the run (a checkpoint holds the position).
    pub stopped_at: Option<(u32, usize)>,
    /// The last validation's (mAP, mAP50), if any ran.
    pub last_map: Option<(f64, f64)>,
    pub results_dir: PathBuf,
    /// Wall seconds of each step this rank ran (see [`crate::progress`]).
    pub step_s: Vec<f64>,
}

/// Wall-clock date and time (UTC) as TAO's status logger writes them.
fn now_date_time() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{m}/{d}/{y}"),
        format!("{}:{}:{}", rem / 3600, (rem / 60) % 60, rem % 60),
    )
}

/// Appends one status record (JSON line) to `<results_dir>/status.json`.
fn status(
    dir: &Path,
    st: &str,
    message: &str,
    kpi: Option<serde_json::Value>,
) -> Result<(), TrainerError> {
    let (date, time) = now_date_time();
    let mut rec = serde_json::json!({
        "date": date, "time": time, "status": st, "verbosity": "INFO", "message": message,
    });
    if let Some(k) = kpi {
        rec["kpi"] = k;
    }
    let path = dir.join("status.json");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| TrainerError::Io(format!("cannot write {}: {e}", path.display())))?;
    writeln!(f, "{rec}")
        .map_err(|e| TrainerError::Io(format!("cannot write {}: {e}", path.display())))
}

/// The model, its named parameters and the frozen variables (buffers).
pub struct Built {
    pub vs: VarStore,
    pub model: DeformableDetr,
    /// Trainable parameters sorted by key (the same order on every rank).
    pub params: Vec<Param>,
    /// Every other variable, sorted by key.
    pub buffers: Vec<(String, Tensor)>,
}

/// Builds the model on `device` with `seed` and applies `train.freeze`.
pub fn build_model(
    spec: &ExperimentSpec,
    device: Device,
    seed: i64,
) -> Result<Built, TrainerError> {
    tch::manual_seed(seed);
    let vs = VarStore::new(device);
    let cfg = DetrConfig::from_spec(&spec.model, spec.dataset.num_classes)?;
    let model = DeformableDetr::new(&vs.root(), cfg);
    let (named, trainable) = {
        let v = vs.variables_.lock().expect("var store lock");
        let named: Vec<(String, Tensor)> = v
            .named_variables
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        let trainable: Vec<(usize, usize)> = v
            .trainable_variables
            .iter()
            .map(|var| (var.tensor.data_ptr() as usize, var.group))
            .collect();
        (named, trainable)
    };
    let mut params = Vec::new();
    let mut buffers = Vec::new();
    for (name, t) in named {
        let group = trainable
            .iter()
            .find(|(p, _)| *p == t.data_ptr() as usize)
            .map(|&(_, g)| g);
        let frozen = spec
            .train
            .freeze
            .iter()
            .any(|f| name == *f || name.starts_with(&format!("{f}.")));
        match group {
            Some(g) if !frozen => params.push(Param {
                name,
                tensor: t,
                group: g,
            }),
            _ => {
                if group.is_some() {
                    let _ = t.set_requires_grad(false);
                }
                buffers.push((name, t));
            }
        }
    }
    for f in &spec.train.freeze {
        let hits = |n: &str| n == f || n.starts_with(&format!("{f}."));
        if !buffers.iter().any(|(n, _)| hits(n)) {
            return Err(TrainerError::Config(format!(
                "train.freeze names {f:?} but no model parameter has that prefix: use a prefix such as backbone or transformer.encoder"
            )));
        }
    }
    params.sort_by(|a, b| a.name.cmp(&b.name));
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Built {
        vs,
        model,
        params,
        buffers,
    })
}

/// Copies the model tensors of a checkpoint into the model; the first missing or mis-shaped key
/// is an error naming it.
pub fn load_model_tensors(
    built: &Built,
    saved: &std::collections::BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(), TrainerError> {
    tch::no_grad(|| {
        let all = built
            .params
            .iter()
            .map(|p| (&p.name, &p.tensor))
            .chain(built.buffers.iter().map(|(n, t)| (n, t)));
        for (name, t) in all {
            let Some(s) = saved.get(name) else {
                return Err(TrainerError::MissingKeys {
                    path: path.display().to_string(),
                    count: 1,
                    first: name.clone(),
                    hint: "the checkpoint is from another model shape: check the model section or give another checkpoint".into(),
                });
            };
            if s.size() != t.size() {
                return Err(TrainerError::ShapeMismatch {
                    path: path.display().to_string(),
                    key: name.clone(),
                    found: s.size(),
                    expected: t.size(),
                    hint: "the checkpoint is from another model shape: check the model section or give another checkpoint".into(),
                });
            }
            t.shallow_clone().copy_(s);
        }
        Ok(())
    })
}

/// The batch's targets on `device` in the criterion's form.
fn targets_of(batch: &Batch, device: Device) -> Vec<Target> {
    batch
        .targets
        .iter()
        .map(|t| Target {
            labels: t.labels.to_device(device),
            boxes: t.boxes.to_device(device),
        })
        .collect()
}

/// Runs the model over this rank's shard of `loader` (eval mode) and gathers every rank's
/// detections (padding entries excluded) on every rank; also returns the input sizes this rank
/// ran at.
pub fn predict(
    model: &DeformableDetr,
    loader: &Loader,
    comm: &Communicator,
    num_select: i64,
    conf_threshold: f64,
    device: Device,
) -> Result<(Vec<Detection>, InputSizes), TrainerError> {
    let mut rows: Vec<f64> = Vec::new();
    let mut sizes_seen = InputSizes::default();
    tch::no_grad(|| -> Result<(), TrainerError> {
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            let real = batch.targets.len() - batch.padding;
            let shape = batch.images.size();
            let own: Vec<[i64; 2]> = batch.targets[..real].iter().map(|t| t.size).collect();
            sizes_seen.record(shape[2], shape[3], &own);
            let images = batch.normalized(device);
            let out = model.forward(&images, &batch.mask.to_device(device), false);
            let last = out.last();
            let sizes: Vec<(f64, f64)> = batch
                .targets
                .iter()
                .map(|t| (t.orig_size[0] as f64, t.orig_size[1] as f64))
                .collect();
            let dets = post_process(
                &last.logits,
                &last.boxes,
                &sizes,
                num_select,
                conf_threshold,
            );
            for (t, d) in batch.targets.iter().zip(dets).take(real) {
                let scores: Vec<f32> = Vec::try_from(&d.scores.to_device(Device::Cpu))?;
                let labels: Vec<i64> = Vec::try_from(&d.labels.to_device(Device::Cpu))?;
                let boxes: Vec<f32> = Vec::try_from(&d.boxes.to_device(Device::Cpu).reshape([-1]))?;
                for k in 0..scores.len() {
                    let b = &boxes[4 * k..4 * k + 4];
                    let det = Detection {
                        image_id: t.image_id,
                        category_id: labels[k],
                        bbox: [
                            f64::from(b[0]),
                            f64::from(b[1]),
                            f64::from(b[2] - b[0]),
                            f64::from(b[3] - b[1]),
                        ],
                        score: f64::from(scores[k]),
                    };
                    rows.extend_from_slice(&det.to_row());
                }
            }
        }
        Ok(())
    })?;
    let rows = gather_rows(comm, rows)?;
    let dets = rows
        .chunks_exact(Detection::COLS)
        .map(Detection::from_row)
        .collect();
    Ok((dets, sizes_seen))
}

/// All-gathers variable-length f64 rows: sizes first, then the rows padded to the largest.
fn gather_rows(comm: &Communicator, rows: Vec<f64>) -> Result<Vec<f64>, TrainerError> {
    let world = comm.world();
    if world == 1 {
        return Ok(rows);
    }
    let mut n = Tensor::from_slice(&[rows.len() as i64]);
    let mut all_n = Tensor::zeros([world as i64], (Kind::Int64, Device::Cpu));
    comm.all_gather(&n, &mut all_n)?;
    let sizes: Vec<i64> = Vec::try_from(&all_n)?;
    let max = sizes.iter().copied().max().unwrap_or(0).max(1);
    let mut mine = vec![0.0f64; max as usize];
    mine[..rows.len()].copy_from_slice(&rows);
    n = Tensor::from_slice(&mine);
    let mut all = Tensor::zeros([world as i64 * max], (Kind::Double, Device::Cpu));
    comm.all_gather(&n, &mut all)?;
    let all: Vec<f64> = Vec::try_from(&all)?;
    let mut out = Vec::new();
    for (r, &s) in sizes.iter().enumerate() {
        let lo = r * max as usize;
        out.extend_from_slice(&all[lo..lo + s as usize]);
    }
    Ok(out)
}

/// Which device the tasks run on: `DDETR_DEVICE` (`cpu`, `cuda`, `auto`; ddetr-launch's
/// `--device`), by default the rank's local GPU when CUDA is available, else the CPU.
pub fn pick_device(local_rank: usize) -> Result<Device, TrainerError> {
    let want = std::env::var("DDETR_DEVICE").unwrap_or_else(|_| "auto".into());
    let cuda = crate::cuda_runtime::cuda_available();
    let gpu = || Device::Cuda(local_rank % tch::Cuda::device_count().max(1) as usize);
    match want.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cuda => Ok(gpu()),
        "cuda" => Err(TrainerError::Config(
            "DDETR_DEVICE=cuda but no CUDA GPU is visible to libtorch: run on a GPU machine or set DDETR_DEVICE=cpu".into(),
        )),
        "auto" | "" => Ok(if cuda { gpu() } else { Device::Cpu }),
        other => Err(TrainerError::Config(format!(
            "DDETR_DEVICE={other:?} is not a device: use cpu, cuda or auto"
        ))),
    }
}

/// Checks that `dir` can be created and written.
fn check_writable(dir: &Path) -> Result<(), TrainerError> {
    let bad = |e: std::io::Error| {
        TrainerError::Config(format!(
            "results_dir {} is not writable ({e}): give a writable folder with -r",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(bad)?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(bad)?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Finds the checkpoint to resume from: `train.resume_training_checkpoint_path` when set, else the
/// newest verified one in `dir` (latest first, then the per-epoch files newest first); a
/// checkpoint failing its checksum is reported and skipped.
fn find_resume(
    spec: &ExperimentSpec,
    dir: &Path,
) -> Result<Option<checkpoint::Checkpoint>, TrainerError> {
    if let Some(p) = spec
        .train
        .resume_training_checkpoint_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        return checkpoint::load(Path::new(p)).map(Some);
    }
    let mut candidates = vec![dir.join(LATEST)];
    let mut epochs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with("model_epoch_") && n.ends_with(".safetensors")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    epochs.sort();
    epochs.reverse();
    candidates.extend(epochs);
    // The latest file, when valid, is the newest; else the newest per-epoch file that verifies.
    for p in candidates.iter().filter(|p| p.exists()) {
        match checkpoint::load(p) {
            Ok(c) => return Ok(Some(c)),
            Err(e) => tracing::warn!("skipping checkpoint: {e}"),
        }
    }
    Ok(None)
}

/// Trains as `spec` says. `stop` is raised by a SIGTERM handler (or a test): the current step
/// finishes, a checkpoint is written and the run returns with `stopped_at` set.
pub fn train(
    spec: &ExperimentSpec,
    world: &World,
    stop: Arc<AtomicBool>,
) -> Result<TrainOutcome, TrainerError> {
    let comm = &world.comm;
    let (rank, nworld) = (comm.rank(), comm.world());
    let device = pick_device(comm.local_rank())?;
    if device == Device::Cpu && spec.train.precision != Precision::Fp32 {
        let name = if spec.train.precision == Precision::Fp16 {
            "fp16"
        } else {
            "bf16"
        };
        return Err(TrainerError::Config(format!(
            "train.precision {name} needs a CUDA GPU but this run is on the CPU: set train.precision=fp32"
        )));
    }
    if device == Device::Cpu {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tch::set_num_threads((cores / comm.local_world().max(1)).max(1) as i32);
    }
    let dir = spec.task_results_dir(Task::Train);
    check_writable(&dir)?;
    let seed = if spec.train.seed >= 0 {
        spec.train.seed
    } else {
        0
    };

    // Data (local rank 0 builds the caches; the others wait for it).
    let local_rank = comm.local_rank() as u32;
    let train_cache = Arc::new(ensure_split(
        &spec.dataset,
        Split::Train,
        local_rank,
        false,
    )?);
    let global_batch = spec.dataset.batch_size as usize * nworld;
    if train_cache.len() < global_batch {
        return Err(TrainerError::Config(format!(
            "the training set has {} images but the global batch is {} ({} per rank × {} ranks): lower dataset.batch_size or add images",
            train_cache.len(), global_batch, spec.dataset.batch_size, nworld
        )));
    }
    let loader = Loader::new(
        train_cache.clone(),
        &spec.dataset,
        LoaderMode::Train { seed: seed as u64 },
        nworld,
        rank,
    )?;
    let val: Option<(Arc<Cache>, Loader)> = if spec.dataset.val_data_sources.is_empty() {
        None
    } else {
        let c = Arc::new(ensure_split(&spec.dataset, Split::Val, local_rank, false)?);
        let mut vcfg = spec.dataset.clone();
        vcfg.batch_size = spec.dataset.batch_size.max(1);
        let l = Loader::new(c.clone(), &vcfg, LoaderMode::Eval, nworld, rank)?;
        Some((c, l))
    };
    let gt = match (&val, rank) {
        (Some((c, _)), 0) => Some(coco_eval::ground_truth(c)?),
        _ => None,
    };
    if let (Some((c, _)), 0) = (&val, rank) {
        warn_scale_mismatch(&spec.dataset.augmentation, c);
    }

    // Model, optimizer, resume.
    let built = build_model(spec, device, seed)?;
    let criterion = SetCriterion::from_spec(&spec.model, spec.dataset.num_classes);
    let mut optim = Optim::new(&spec.train.optim, built.params.len());
    let (mut start_epoch, mut start_step) = (0u32, 0usize);
    let mut global_step = 0u64;
    let resume = find_resume(spec, &dir)?;
    if let Some(ck) = &resume {
        load_model_tensors(&built, &ck.tensors, &ck.path)?;
        start_epoch = ck.meta.epoch;
        start_step = ck.meta.step;
        global_step = ck.meta.global_step;
        if ck.meta.world != nworld && start_step > 0 {
            tracing::warn!(
                saved = ck.meta.world,
                now = nworld,
                "resuming mid-epoch with another world size: the rest of the epoch restarts at step 0"
            );
            start_step = 0;
        }
        tracing::info!(path = %ck.path.display(), epoch = start_epoch, step = start_step, "resuming");
    } else if let Some(p) = spec
        .train
        .pretrained_model_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        let r = crate::weights::load_file(
            &built.vs,
            Path::new(p),
            crate::weights::LoadMode::Pretrained,
        )?;
        tracing::info!(
            path = p,
            loaded = r.loaded,
            skipped = r.skipped_shape.len(),
            "pretrained weights loaded"
        );
    }
    tch::manual_seed(seed + rank as i64);
    let buffers: Vec<Tensor> = built
        .buffers
        .iter()
        .map(|(_, t)| t.shallow_clone())
        .collect();
    let mut engine = Engine::new(
        spec.train.distributed_strategy,
        comm,
        &built.params,
        &buffers,
    )?;
    let mut amp = Amp::new(spec.train.precision, device);
    if let Some(ck) = &resume {
        engine.load_state(&mut optim, &built.params, &ck.tensors)?;
        amp.load_state(&ck.tensors);
    }
    drop(resume);
    tracing::info!(
        strategy = engine.name(),
        optimizer_state_bytes_per_rank = engine.state_bytes_per_rank(&optim, &built.params),
        "distributed engine ready"
    );
    let spec_yaml = spec.to_yaml();
    if rank == 0 {
        std::fs::write(dir.join("experiment.yaml"), &spec_yaml)
            .map_err(|e| TrainerError::Io(format!("cannot write experiment.yaml: {e}")))?;
        status(&dir, "STARTED", "Starting Training Loop.", None)?;
    }

    let steps = loader.steps_per_epoch();
    // The schedule: the spec's, or fitted to `train.max_minutes` as the run measures itself.
    let mut plan = Plan {
        epochs: spec.train.num_epochs,
        optim: spec.train.optim.clone(),
    };
    let budget = (spec.train.max_minutes > 0.0).then(|| Budget {
        seconds: spec.train.max_minutes * 60.0,
        spec_epochs: spec.train.num_epochs,
        steps_per_epoch: steps,
        val_batches: val.as_ref().map_or(0, |(_, l)| l.steps_per_epoch()),
        validation_interval: spec.train.validation_interval,
    });
    let mut validation_s: Option<f64> = None;
    let (mut fitted, mut out_of_budget) = (false, false);
    let save = |epoch: u32,
                step: usize,
                gstep: u64,
                optim: &Optim,
                engine: &Engine,
                amp: &Amp,
                names: &[&str]|
     -> Result<(), TrainerError> {
        // Collective under fsdp (the sharded state is gathered), so every rank gets here.
        let state = engine.state_tensors(optim, &built.params)?;
        if rank != 0 {
            return Ok(());
        }
        let mut t: Vec<(String, Tensor)> = built
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .chain(
                built
                    .buffers
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone())),
            )
            .collect();
        t.extend(state);
        t.extend(amp.state_tensors());
        let meta = CheckpointMeta {
            epoch,
            step,
            global_step: gstep,
            seed: spec.train.seed,
            world: nworld,
            spec_yaml: spec_yaml.clone(),
        };
        for n in names {
            checkpoint::save(&dir.join(n), &t, &meta)?;
        }
        Ok(())
    };

    let mut last_map = None;
    let run_start = Instant::now();
    let mut progress = Progress::new(
        Display::auto(rank),
        plan.epochs,
        steps,
        global_batch,
        (start_epoch, start_step),
    );
    let mut epoch = start_epoch;
    while epoch < plan.epochs {
        optim.set_epoch(&plan.optim, epoch);
        let t_epoch = Instant::now();
        let mut sums = [0.0f64; 4];
        let mut counted = 0usize;
        let first = if epoch == start_epoch { start_step } else { 0 };
        progress.start_epoch(epoch);
        for batch in loader.epoch(u64::from(epoch), first) {
            let batch = batch?;
            let step = batch.step;
            let images = batch.normalized(device);
            let mask = batch.mask.to_device(device);
            let targets = targets_of(&batch, device);
            // num_boxes averaged over ranks (upstream's all_reduce / world size).
            let mut nb = Tensor::from_slice(&[local_num_boxes(&targets)]);
            comm.all_reduce(&mut nb, ReduceOp::Sum)?;
            let num_boxes = normalizer(nb.double_value(&[0]) / nworld as f64);
            for p in &built.params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            // libtorch's RNG (dropout) is a function of (seed, rank, step), so a run resumed from
            // a mid-epoch checkpoint draws what the uninterrupted run drew.
            tch::manual_seed(step_seed(seed, rank, global_step));
            let scale = amp.loss_scale();
            let losses = forward_backward(
                &built.model,
                &criterion,
                &images,
                &mask,
                &targets,
                num_boxes,
                &amp,
                StepMode {
                    activation_checkpoint: spec.train.activation_checkpoint,
                    loss_scale: scale,
                },
            )?;
            let report = engine.step(
                &mut optim,
                &built.params,
                spec.train.clip_grad_norm,
                1.0 / scale,
            )?;
            if report.skipped {
                tracing::warn!(
                    step,
                    scale,
                    "fp16 gradients overflowed: step skipped, loss scale halved"
                );
            }
            amp.update(report.skipped);
            global_step += 1;
            // Loss terms averaged over ranks, whether any rank was asked to stop, and whether any
            // rank's budget leaves only the final validation.
            let term = |k: &str| losses.terms.get(k).map_or(0.0, |t| t.double_value(&[]));
            let stop_here = stop.load(Ordering::SeqCst);
            let measured = budget
                .as_ref()
                .and_then(|_| measure(&progress, run_start, validation_s, epoch, step + 1));
            let out_of_time = matches!((&budget, &measured), (Some(b), Some(m)) if b.must_stop(m));
            let mut agg = Tensor::from_slice(&[
                losses.total.double_value(&[]),
                term("loss_ce"),
                term("loss_bbox"),
                term("loss_giou"),
                f64::from(u8::from(stop_here)),
                f64::from(u8::from(out_of_time)),
            ]);
            comm.all_reduce(&mut agg, ReduceOp::Sum)?;
            let agg: Vec<f64> = Vec::try_from(&agg)?;
            for k in 0..4 {
                sums[k] += agg[k] / nworld as f64;
            }
            counted += 1;
            let m = |k: usize| agg[k] / nworld as f64;
            let (loss, loss_ce, loss_bbox, loss_giou) = (m(0), m(1), m(2), m(3));
            let lr = optim.lr(0);
            progress.step(
                epoch,
                step,
                StepStats {
                    loss,
                    loss_ce,
                    loss_bbox,
                    loss_giou,
                    lr,
                },
            );
            if agg[4] > 0.0 {
                let (e, s) = if step + 1 == steps {
                    (epoch + 1, 0)
                } else {
                    (epoch, step + 1)
                };
                save(e, s, global_step, &optim, &engine, &amp, &[LATEST])?;
                if rank == 0 {
                    status(
                        &dir,
                        "RUNNING",
                        &format!(
                            "Stopped by a signal at epoch {epoch} step {}; checkpoint written.",
                            step + 1
                        ),
                        None,
                    )?;
                }
                tracing::info!(
                    epoch,
                    step = step + 1,
                    "stopped by a signal: checkpoint written; run the same command to resume"
                );
                return Ok(TrainOutcome {
                    stopped_at: Some((epoch, step + 1)),
                    last_map,
                    results_dir: dir,
                    step_s: progress.step_seconds().to_vec(),
                });
            }
            if let (Some(b), Some(m), false) = (&budget, &measured, fitted) {
                if progress.step_seconds().len() > PROBE_STEPS {
                    plan = agree_plan(b, &spec.train.optim, m, comm)?;
                    progress.set_epochs(plan.epochs);
                    fitted = true;
                    log_plan(spec, &plan, m, "after the first steps");
                }
            }
            if agg[5] > 0.0 {
                out_of_budget = true;
                plan.epochs = epoch + 1;
                progress.set_epochs(plan.epochs);
                tracing::info!(
                    epoch,
                    step = step + 1,
                    "train.max_minutes: the time left covers only the final validation and checkpoint: this epoch ends here"
                );
                break;
            }
        }
        let time_per_epoch = t_epoch.elapsed().as_secs_f64();
        let mut names = vec![LATEST.to_string()];
        if spec.train.checkpoint_interval > 0 && (epoch + 1) % spec.train.checkpoint_interval == 0 {
            names.push(epoch_checkpoint_name(epoch));
        }
        let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
        save(epoch + 1, 0, global_step, &optim, &engine, &amp, &names_ref)?;
        // With a budget, the schedule is fitted again at every epoch end, with the last
        // validation's measured cost (first fitted here where the epoch was shorter than the
        // probe), before deciding whether this epoch is the last.
        if let (Some(b), false, Some(m)) = (
            &budget,
            out_of_budget,
            measure(&progress, run_start, validation_s, epoch + 1, 0),
        ) {
            let before = plan.epochs;
            plan = agree_plan(b, &spec.train.optim, &m, comm)?;
            progress.set_epochs(plan.epochs);
            if plan.epochs != before || !fitted {
                log_plan(spec, &plan, &m, "at an epoch end");
            }
            fitted = true;
        }
        let validate = val.is_some()
            && ((spec.train.validation_interval > 0
                && (epoch + 1) % spec.train.validation_interval == 0)
                || epoch + 1 == plan.epochs);
        let mut map = None;
        if let (true, Some((_, vloader))) = (validate, &val) {
            let t0 = Instant::now();
            let (dets, _) = predict(
                &built.model,
                vloader,
                comm,
                i64::from(spec.model.num_select),
                0.0,
                device,
            )?;
            validation_s = Some(t0.elapsed().as_secs_f64());
            if let Some(gt) = &gt {
                let s = coco_eval::evaluate(gt, &dets)?;
                tracing::info!(
                    "epoch {}/{} validation: mAP {:.4} mAP50 {:.4} ({} detections, {:.1} s)",
                    epoch + 1,
                    plan.epochs,
                    s.map(),
                    s.map50(),
                    dets.len(),
                    t0.elapsed().as_secs_f64()
                );
                map = Some((s.map(), s.map50()));
                last_map = map;
            }
        }
        if rank == 0 {
            let n = counted.max(1) as f64;
            let done = epoch + 1 - start_epoch;
            let eta = run_start.elapsed().as_secs_f64() / f64::from(done)
                * f64::from(plan.epochs.saturating_sub(epoch + 1));
            let mut kpi = serde_json::json!({
                "epoch": epoch, "max_epoch": plan.epochs, "step": global_step,
                "max_step": u64::from(plan.epochs) * steps as u64,
                "train_loss": sums[0] / n, "train_loss_ce": sums[1] / n,
                "train_loss_bbox": sums[2] / n, "train_loss_giou": sums[3] / n,
                "lr": optim.lr(0), "time_per_epoch": fmt_secs(time_per_epoch),
                "eta": fmt_secs(eta),
            });
            if let Some((m, m50)) = map {
                kpi["val_mAP"] = serde_json::json!(m);
                kpi["val_mAP50"] = serde_json::json!(m50);
            }
            status(&dir, "RUNNING", "Training loop in progress", Some(kpi))?;
            if let Err(e) = crate::plot::training_curves(&dir) {
                tracing::warn!("training plots not written: {e}");
            }
        }
        epoch += 1;
    }
    if rank == 0 {
        status(&dir, "SUCCESS", "Train finished successfully.", None)?;
    }
    comm.barrier()?;
    progress.finish();
    Ok(TrainOutcome {
        stopped_at: None,
        last_map,
        results_dir: dir,
        step_s: progress.step_seconds().to_vec(),
    })
}

/// Warns when training caps images' long side below what validation runs at: the val transform
/// resizes the shorter side to `test_random_resize` with TAO's 1333 cap, the train transform to
/// one of `scales` with `random_resize_max_size`, so a small cap on non-square images trains on
/// objects smaller than the ones it is scored on (a spec made for square images, on 4:3 data:
/// 96×128 in training, 128×170 in validation — measured: mAP50 0.44 vs 0.55 after 5 minutes).
fn warn_scale_mismatch(aug: &ddetr_dataset::AugmentationConfig, val: &Cache) {
    let longest = val
        .images()
        .iter()
        .map(|r| {
            let (h, w) = ddetr_dataset::eval_batches::eval_size(r.width, r.height, aug);
            h.max(w)
        })
        .max()
        .unwrap_or(0);
    if aug.fixed_random_crop.is_none() && longest > aug.random_resize_max_size {
        tracing::warn!(
            "dataset.augmentation.random_resize_max_size is {} but validation runs images at up to {longest} px on the long side (test_random_resize {}): training sees objects smaller than validation scores; set random_resize_max_size to at least {longest}",
            aug.random_resize_max_size,
            aug.test_random_resize
        );
    }
}

/// Steps whose mean gives a `train.max_minutes` run's step time.
const RECENT_STEPS: usize = 200;

/// What a `train.max_minutes` run knows of itself at `epoch` after `steps_into_epoch` steps;
/// `None` until a step past the warm-up has been timed.
fn measure(
    progress: &Progress,
    run_start: Instant,
    validation_s: Option<f64>,
    epoch: u32,
    steps_into_epoch: usize,
) -> Option<Measured> {
    let s = progress.step_seconds();
    // The recent steps (past the warm-up): the throughput the rest of the run will see.
    let timed = s
        .get(1.max(s.len().saturating_sub(RECENT_STEPS))..)
        .filter(|t| !t.is_empty())?;
    Some(Measured {
        elapsed_s: run_start.elapsed().as_secs_f64(),
        step_s: timed.iter().sum::<f64>() / timed.len() as f64,
        validation_s,
        epochs_done: epoch,
        steps_into_epoch,
    })
}

/// The budget's schedule, the same on every rank (the longest any rank's measurements allow is
/// taken; ranks run in lockstep, so their step times agree).
fn agree_plan(
    b: &Budget,
    optim: &crate::spec::OptimConfig,
    m: &Measured,
    comm: &Communicator,
) -> Result<Plan, TrainerError> {
    let mine = b.fit(optim, m);
    let mut t = Tensor::from_slice(&[f64::from(mine.epochs)]);
    comm.all_reduce(&mut t, ReduceOp::Max)?;
    let epochs = t.double_value(&[0]) as u32;
    Ok(Plan {
        epochs,
        optim: crate::budget::scaled(optim, b.spec_epochs, epochs),
    })
}

fn log_plan(spec: &ExperimentSpec, plan: &Plan, m: &Measured, when: &str) {
    tracing::info!(
        "train.max_minutes {}: {:.2} s a step{} {when}: {} epochs, lr steps {:?}",
        spec.train.max_minutes,
        m.step_s,
        m.validation_s
            .map_or(String::new(), |v| format!(", {v:.1} s a validation")),
        plan.epochs,
        match plan.optim.lr_scheduler {
            crate::spec::LrScheduler::MultiStep => plan.optim.lr_steps.clone(),
            crate::spec::LrScheduler::StepLR => vec![plan.optim.lr_step_size],
        }
    );
}

/// The libtorch seed of training step `step` on `rank` (splitmix64 of the three).
pub fn step_seed(seed: i64, rank: usize, step: u64) -> i64 {
    let mut z = (seed as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((rank as u64) << 40)
        .wrapping_add(step);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// `H:MM:SS`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// How evaluation lays out its batches, for the log: `dataset.augmentation.eval_padding` and,
/// for TAO's, what the padding goes to.
pub fn eval_padding_name(aug: &ddetr_dataset::AugmentationConfig) -> String {
    use ddetr_dataset::EvalPadding;
    match (aug.eval_padding, aug.pad_size_divisor, aug.fixed_padding) {
        (EvalPadding::None, ..) => "eval_padding none: each image at its own size".into(),
        (EvalPadding::Tao, Some(d), _) => format!("eval_padding tao: padded to multiples of {d}"),
        (EvalPadding::Tao, None, true) => format!(
            "eval_padding tao: padded to {}x{} (fixed_padding)",
            aug.test_random_resize,
            ddetr_dataset::transforms::EVAL_MAX_SIZE
        ),
        (EvalPadding::Tao, None, false) => {
            "eval_padding tao: padded to the batch's largest image".into()
        }
    }
}

/// What `ddetr evaluate` produced.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    pub stats: CocoStats,
    pub results_dir: PathBuf,
}

/// `ddetr evaluate`: loads `evaluate.checkpoint`, runs `test_data_sources`, and on rank 0 writes
/// `results.json` (COCO detections) and `metrics.json` (the 12 numbers).
pub fn evaluate(spec: &ExperimentSpec, world: &World) -> Result<Option<EvalOutcome>, TrainerError> {
    let comm = &world.comm;
    let rank = comm.rank();
    let device = pick_device(comm.local_rank())?;
    let ckpt = spec
        .evaluate
        .checkpoint
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| TrainerError::Config("evaluate.checkpoint is not set: pass evaluate.checkpoint=<results>/train/dd_model_latest.safetensors; an official .pth, a transformers model.safetensors/pytorch_model.bin or a TAO .pth works too".into()))?;
    let dir = spec.task_results_dir(Task::Evaluate);
    check_writable(&dir)?;
    // The checkpoint first: a wrong one is reported before the dataset cache is built.
    let built = build_model(spec, device, 0)?;
    crate::model_checkpoint::load_for_task(&built.vs, Path::new(ckpt))?;
    let cache = Arc::new(ensure_split(
        &spec.dataset,
        Split::Test,
        comm.local_rank() as u32,
        false,
    )?);
    let loader = Loader::new(
        cache.clone(),
        &spec.dataset,
        LoaderMode::Eval,
        comm.world(),
        rank,
    )?;
    let (dets, sizes_seen) = predict(
        &built.model,
        &loader,
        comm,
        i64::from(spec.model.num_select),
        spec.evaluate.conf_threshold,
        device,
    )?;
    tracing::info!(
        "evaluate: {} ({})",
        sizes_seen.summary(),
        eval_padding_name(&spec.dataset.augmentation)
    );
    if rank != 0 {
        return Ok(None);
    }
    let gt = coco_eval::ground_truth(&cache)?;
    let stats = coco_eval::evaluate(&gt, &dets)?;
    let results: Vec<serde_json::Value> = dets.iter().map(Detection::to_json).collect();
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).expect("json")).map_err(|e| {
            TrainerError::Io(format!("cannot write {}: {e}", dir.join(name).display()))
        })
    };
    write("results.json", &serde_json::Value::Array(results))?;
    write("metrics.json", &stats.to_json())?;
    std::fs::write(dir.join("experiment.yaml"), spec.to_yaml())
        .map_err(|e| TrainerError::Io(format!("cannot write experiment.yaml: {e}")))?;
    status(
        &dir,
        "SUCCESS",
        "Evaluation metrics generated.",
        Some(serde_json::json!({"test_mAP": stats.map(), "test_mAP50": stats.map50()})),
    )?;
    Ok(Some(EvalOutcome {
        stats,
        results_dir: dir,
    }))
}
