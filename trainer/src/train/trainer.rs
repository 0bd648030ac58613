//! The training engine: a [`Trainer`] holds one rank's run (detector, optimizer, distributed
//! strategy, loss scaler, schedule, progress) and has a method for each thing a run does — a step,
//! an epoch's end, a validation, a checkpoint. [`super::train`] drives it epoch by epoch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ddetr_collective::{Communicator, ReduceOp};
use ddetr_dataset::loader::Batch;
use tch::{Device, Tensor};

use super::budget::{self, Budget, Measured, Plan, PROBE_STEPS};
use super::data::TrainData;
use super::early_stop::EarlyStop;
use super::ema::Ema;
use super::resume::{find_resume, load_model_tensors};
use super::update::{optimizer_step, MicroBatch, StepState};
use super::{epoch_checkpoint_name, step_checkpoint_name, step_seed, TrainOutcome, LATEST};
use crate::amp::Amp;
use crate::checkpoint::{self, CheckpointMeta};
use crate::coco_eval;
use crate::criterion::{local_num_boxes, normalizer};
use crate::detector::{build_model, Built, Detector};
use crate::device::{pick_device, share_cpu_threads};
use crate::matcher::Target;
use crate::optim::Optim;
use crate::predict::predict;
use crate::progress::{fmt_secs, Display, Progress, StepStats};
use crate::results::ResultsDir;
use crate::spec::{
    EarlyStopMetric, ExperimentSpec, IntervalUnit, LrScheduler, OptimConfig, Precision, Task,
};
use crate::strategy::Strategy;
use crate::TrainerError;

/// How an epoch's loop ended.
pub enum EpochEnd {
    /// Every step ran.
    Complete,
    /// `train.max_minutes` leaves time only for the final validation and checkpoint.
    OutOfBudget,
    /// A signal (or the caller's flag) stopped the run after this (epoch, step); a checkpoint
    /// holds the position.
    Stopped(u32, usize),
}

/// What one step's all-reduce told every rank.
struct StepResult {
    /// Any rank was asked to stop.
    stop: bool,
    /// Any rank's budget leaves only the final validation.
    out_of_time: bool,
    /// This rank's measurements after the step (with a budget).
    measured: Option<Measured>,
}

/// Loss sums of the epoch in progress (rank averages), for its status record: the total and
/// every term the detector's criterion names (the same names on every rank).
#[derive(Default)]
struct EpochLosses {
    total: f64,
    terms: std::collections::BTreeMap<String, f64>,
    steps: usize,
}

/// One rank's training run.
pub struct Trainer<'c, D> {
    spec: &'c ExperimentSpec,
    comm: &'c Communicator,
    device: Device,
    dir: ResultsDir,
    seed: i64,
    spec_yaml: String,
    data: TrainData,
    built: Built<D>,
    /// `train.ema`'s average of the weights.
    ema: Option<Ema>,
    /// `train.early_stopping`'s count (rank 0 decides; a resumed run counts afresh).
    early_stop: Option<EarlyStop>,
    optim: Optim,
    strategy: Strategy<'c>,
    amp: Amp,
    /// The schedule: the spec's, or fitted to `train.max_minutes` as the run measures itself.
    plan: Plan,
    budget: Option<Budget>,
    /// The last validation's wall seconds (the budget's estimate of the next).
    validation_s: Option<f64>,
    fitted: bool,
    out_of_budget: bool,
    progress: Progress,
    run_start: Instant,
    pub(super) epoch: u32,
    start: (u32, usize),
    global_step: u64,
    losses: EpochLosses,
    epoch_start: Instant,
    last_map: Option<(f64, f64)>,
}

impl<'c, D: Detector> Trainer<'c, D> {
    /// Sets the run up: device, data, detector, optimizer, resume (or pretrained weights), the
    /// distributed strategy; writes `experiment.yaml` and the STARTED status.
    pub fn new(
        spec: &'c ExperimentSpec,
        comm: &'c Communicator,
        task: Task,
    ) -> Result<Self, TrainerError> {
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
        share_cpu_threads(device, comm.local_world());
        let dir = ResultsDir::create(spec.task_results_dir(task))?;
        let seed = spec.train.seed.max(0);
        let data = TrainData::open(spec, comm, seed)?;

        let built = build_model::<D>(spec, device, seed)?;
        let mut optim = Optim::new(&spec.train.optim, built.params.len());
        let mut start = (0u32, 0usize);
        let mut global_step = 0u64;
        let resume = find_resume(spec, &dir.path)?;
        if let Some(ck) = &resume {
            load_model_tensors(&built, &ck.tensors, &ck.path)?;
            start = (ck.meta.epoch, ck.meta.step);
            global_step = ck.meta.global_step;
            if ck.meta.world != nworld && start.1 > 0 {
                tracing::warn!(
                    saved = ck.meta.world,
                    now = nworld,
                    "resuming mid-epoch with another world size: the rest of the epoch restarts at step 0"
                );
                start.1 = 0;
            }
            tracing::info!(path = %ck.path.display(), epoch = start.0, step = start.1, "resuming");
        } else {
            load_pretrained(spec, &built)?;
        }
        let mut ema = spec
            .train
            .ema
            .enable
            .then(|| Ema::new(&spec.train.ema, &built.params));
        if let (Some(e), Some(ck)) = (&mut ema, &resume) {
            if !e.load_state(&built.params, &ck.tensors)? {
                tracing::warn!(
                    "train.ema: the checkpoint has no average; it starts at the resumed weights"
                );
            }
        }
        tch::manual_seed(seed + rank as i64);
        let mut strategy = Strategy::for_model(spec.train.distributed_strategy, comm, &built)?;
        let mut amp = Amp::new(spec.train.precision, device);
        if let Some(ck) = &resume {
            strategy.load_state(&mut optim, &built.params, &ck.tensors)?;
            amp.load_state(&ck.tensors);
        }
        drop(resume);
        tracing::info!(
            strategy = strategy.name(),
            optimizer_state_bytes_per_rank = strategy.state_bytes_per_rank(&optim, &built.params),
            "distributed engine ready"
        );
        let spec_yaml = spec.to_yaml();
        if rank == 0 {
            dir.write("experiment.yaml", spec_yaml.as_bytes())?;
            dir.status("STARTED", "Starting Training Loop.", None)?;
        }

        let steps = data.train.steps_per_epoch();
        let plan = Plan {
            epochs: spec.train.num_epochs,
            optim: spec.train.optim.clone(),
        };
        let budget = (spec.train.max_minutes > 0.0).then(|| Budget {
            seconds: spec.train.max_minutes * 60.0,
            spec_epochs: spec.train.num_epochs,
            steps_per_epoch: steps,
            val_batches: data.val.as_ref().map_or(0, |l| l.steps_per_epoch()),
            validation_interval: spec.train.validation_interval,
        });
        let run_start = Instant::now();
        let progress = Progress::new(
            Display::auto(rank),
            plan.epochs,
            steps,
            data.global_batch,
            start,
        );
        Ok(Self {
            spec,
            comm,
            device,
            dir,
            seed,
            spec_yaml,
            data,
            built,
            ema,
            early_stop: spec
                .train
                .early_stopping
                .enable
                .then(|| EarlyStop::new(&spec.train.early_stopping)),
            optim,
            strategy,
            amp,
            plan,
            budget,
            validation_s: None,
            fitted: false,
            out_of_budget: false,
            progress,
            run_start,
            epoch: start.0,
            start,
            global_step,
            losses: EpochLosses::default(),
            epoch_start: Instant::now(),
            last_map: None,
        })
    }

    /// The epochs the run will train (fitted under `train.max_minutes`).
    pub fn epochs(&self) -> u32 {
        self.plan.epochs
    }

    /// Runs the steps of the current epoch (from the resumed step in the first), or until
    /// `stop` is raised on any rank or the budget runs out.
    pub fn run_epoch(&mut self, stop: &AtomicBool) -> Result<EpochEnd, TrainerError> {
        let epoch = self.epoch;
        self.optim.set_epoch(&self.plan.optim, epoch);
        self.epoch_start = Instant::now();
        self.losses = EpochLosses::default();
        let first = if epoch == self.start.0 {
            self.start.1
        } else {
            0
        };
        self.progress.start_epoch(epoch);
        let steps = self.data.train.steps_per_epoch();
        let accum = self.spec.train.grad_accum_steps.max(1) as usize;
        let mut group: Vec<Batch> = Vec::with_capacity(accum);
        for batch in self.data.train.epoch(u64::from(epoch), first) {
            let batch = batch?;
            let step = batch.step;
            group.push(batch);
            // An optimizer step every `accum` loader steps of the epoch (counted from step 0, so
            // a resumed epoch keeps the boundaries) and at the epoch's last.
            if (step + 1) % accum != 0 && step + 1 != steps {
                continue;
            }
            let r = self.step(&group, stop.load(Ordering::SeqCst))?;
            group.clear();
            if r.stop {
                let at = if step + 1 == steps {
                    (epoch + 1, 0)
                } else {
                    (epoch, step + 1)
                };
                self.save(at.0, at.1, &[LATEST])?;
                if self.comm.rank() == 0 {
                    self.dir.status(
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
                return Ok(EpochEnd::Stopped(epoch, step + 1));
            }
            self.fit_after_probe(r.measured)?;
            let t = &self.spec.train;
            if t.checkpoint_interval_unit == IntervalUnit::Step
                && t.checkpoint_interval > 0
                && self
                    .global_step
                    .is_multiple_of(u64::from(t.checkpoint_interval))
            {
                // The position after this step, as a signal's checkpoint records it.
                let at = if step + 1 == steps {
                    (epoch + 1, 0)
                } else {
                    (epoch, step + 1)
                };
                let name = step_checkpoint_name(self.global_step);
                self.save(at.0, at.1, &[LATEST, &name])?;
            }
            if r.out_of_time {
                self.out_of_budget = true;
                self.plan.epochs = epoch + 1;
                self.progress.set_epochs(self.plan.epochs);
                tracing::info!(
                    epoch,
                    step = step + 1,
                    "train.max_minutes: the time left covers only the final validation and checkpoint: this epoch ends here"
                );
                return Ok(EpochEnd::OutOfBudget);
            }
        }
        Ok(EpochEnd::Complete)
    }

    /// One optimizer step on `batches` (its micro batches): the box count of all of them
    /// averaged over ranks, forward + loss + backward of each, the strategy's gradient sync, clip
    /// and update, the loss scaler, then one all-reduce of the losses and of the stop and
    /// out-of-time flags.
    fn step(&mut self, batches: &[Batch], stop_here: bool) -> Result<StepResult, TrainerError> {
        let (comm, device, spec) = (self.comm, self.device, self.spec);
        let nworld = comm.world();
        let last = batches.last().expect("a step has a batch");
        let (epoch, step) = (self.epoch, last.step);
        let inputs: Vec<(Tensor, Tensor, Vec<Target>)> = batches
            .iter()
            .map(|b| {
                (
                    b.normalized(device),
                    b.mask.to_device(device),
                    targets_of(b, device),
                )
            })
            .collect();
        let micro: Vec<MicroBatch<'_>> = inputs
            .iter()
            .map(|(images, mask, targets)| MicroBatch {
                images,
                mask,
                targets,
            })
            .collect();
        let local_boxes: f64 = inputs.iter().map(|(_, _, t)| local_num_boxes(t)).sum();
        // num_boxes averaged over ranks (upstream's all_reduce / world size).
        let mut nb = Tensor::from_slice(&[local_boxes]);
        comm.all_reduce(&mut nb, ReduceOp::Sum)?;
        let num_boxes = normalizer(nb.double_value(&[0]) / nworld as f64);
        // libtorch's RNG (dropout) is a function of (seed, rank, step), so a run resumed from a
        // mid-epoch checkpoint draws what the uninterrupted run drew.
        tch::manual_seed(step_seed(self.seed, comm.rank(), self.global_step));
        let (losses, report) = optimizer_step(
            &self.built,
            StepState {
                strategy: &mut self.strategy,
                optim: &mut self.optim,
                amp: &mut self.amp,
            },
            &micro,
            num_boxes,
            spec.train.clip_grad_norm,
            spec.train.activation_checkpoint,
        )?;
        if let (Some(e), false) = (&mut self.ema, report.skipped) {
            e.update(&self.built.params);
        }
        self.global_step += 1;
        let measured = self.measure(epoch, step + 1);
        let out_of_time = matches!((&self.budget, &measured), (Some(b), Some(m)) if b.must_stop(m));
        // [stop, out of time, total, every term by name]
        let mut values = vec![
            f64::from(u8::from(stop_here)),
            f64::from(u8::from(out_of_time)),
            losses.total.double_value(&[]),
        ];
        values.extend(losses.terms.values().map(|t| t.double_value(&[])));
        let mut agg = Tensor::from_slice(&values);
        comm.all_reduce(&mut agg, ReduceOp::Sum)?;
        let agg: Vec<f64> = Vec::try_from(&agg)?;
        let mean: Vec<f64> = agg.iter().map(|v| v / nworld as f64).collect();
        self.losses.total += mean[2];
        for (name, v) in losses.terms.keys().zip(&mean[3..]) {
            *self.losses.terms.entry(name.clone()).or_default() += v;
        }
        self.losses.steps += 1;
        let term = |k: &str| {
            losses
                .terms
                .keys()
                .position(|n| n == k)
                .map_or(0.0, |i| mean[3 + i])
        };
        let lr = self.optim.lr(0);
        self.progress.step(
            epoch,
            step,
            batches.len(),
            StepStats {
                loss: mean[2],
                loss_ce: term("loss_ce"),
                loss_bbox: term("loss_bbox"),
                loss_giou: term("loss_giou"),
                lr,
            },
        );
        Ok(StepResult {
            stop: agg[0] > 0.0,
            out_of_time: agg[1] > 0.0,
            measured,
        })
    }

    /// The epoch's end: checkpoints, the budget's refit, a validation when due, the status
    /// record and the curves.
    pub fn end_epoch(&mut self) -> Result<(), TrainerError> {
        let epoch = self.epoch;
        let time_per_epoch = self.epoch_start.elapsed().as_secs_f64();
        let mut names = vec![LATEST.to_string()];
        let interval = self.spec.train.checkpoint_interval;
        let by_epoch = self.spec.train.checkpoint_interval_unit == IntervalUnit::Epoch;
        if by_epoch && interval > 0 && (epoch + 1).is_multiple_of(interval) {
            names.push(epoch_checkpoint_name(epoch));
        }
        let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
        self.save(epoch + 1, 0, &names_ref)?;
        self.refit_at_epoch_end()?;
        let interval = self.spec.train.validation_interval;
        let due = (interval > 0 && (epoch + 1) % interval == 0) || epoch + 1 == self.plan.epochs;
        let map = if due { self.validate()? } else { None };
        if self.comm.rank() == 0 {
            self.write_epoch_status(time_per_epoch, map)?;
        }
        self.early_stopping(map)?;
        self.epoch += 1;
        Ok(())
    }

    /// `train.early_stopping` after an epoch: rank 0 observes the metric (it alone scores the
    /// validation), every rank learns its decision; a stop makes this the last epoch.
    fn early_stopping(&mut self, map: Option<(f64, f64)>) -> Result<(), TrainerError> {
        let Some(es) = &mut self.early_stop else {
            return Ok(());
        };
        let monitor = self.spec.train.early_stopping.monitor;
        let value = match monitor {
            EarlyStopMetric::TrainLoss => Some(self.losses.total / self.losses.steps.max(1) as f64),
            EarlyStopMetric::ValMap => map.map(|m| m.0),
            EarlyStopMetric::ValMap50 => map.map(|m| m.1),
        };
        let stop = self.comm.rank() == 0 && value.is_some_and(|v| es.observe(v));
        let mut flag = Tensor::from_slice(&[f64::from(u8::from(stop))]);
        self.comm.all_reduce(&mut flag, ReduceOp::Sum)?;
        if flag.double_value(&[0]) == 0.0 || self.epoch + 1 >= self.plan.epochs {
            return Ok(());
        }
        let epoch = self.epoch;
        self.plan.epochs = epoch + 1;
        self.progress.set_epochs(self.plan.epochs);
        let es = &self.spec.train.early_stopping;
        let what = format!(
            "Early stopping after epoch {}: {} did not improve by more than {} for {} observation(s).",
            epoch + 1,
            monitor.name(),
            es.min_delta,
            es.patience
        );
        tracing::info!("{what}");
        if self.comm.rank() == 0 {
            self.dir.status("RUNNING", &what, None)?;
        }
        Ok(())
    }

    /// COCO mAP of the validation set (rank 0 scores; every rank predicts its shard); `None`
    /// without a validation set and on other ranks.
    pub fn validate(&mut self) -> Result<Option<(f64, f64)>, TrainerError> {
        let Some(loader) = &self.data.val else {
            return Ok(None);
        };
        let t0 = Instant::now();
        self.sync_running_stats()?;
        // With train.ema, on the average (swapped in, and back whatever the outcome).
        if let Some(e) = &mut self.ema {
            e.swap(&self.built.params);
        }
        let predicted = predict(
            &self.built.model,
            loader,
            self.comm,
            i64::from(self.spec.model.num_select),
            0.0,
            self.device,
        );
        if let Some(e) = &mut self.ema {
            e.swap(&self.built.params);
        }
        let (dets, _) = predicted?;
        self.validation_s = Some(t0.elapsed().as_secs_f64());
        let Some(gt) = &self.data.ground_truth else {
            return Ok(None);
        };
        let s = coco_eval::evaluate(gt, &dets, self.spec.dataset.eval_class_ids.as_deref())?;
        tracing::info!(
            "epoch {}/{} validation: mAP {:.4} mAP50 {:.4} ({} detections, {:.1} s)",
            self.epoch + 1,
            self.plan.epochs,
            s.map(),
            s.map50(),
            dets.len(),
            t0.elapsed().as_secs_f64()
        );
        let map = (s.map(), s.map50());
        self.last_map = Some(map);
        Ok(Some(map))
    }

    /// A FAN's BatchNorm running statistics follow each rank's own batches; as DDP's
    /// `broadcast_buffers` makes them, rank 0's are every rank's before they are used
    /// (validation) or saved. Training passes use batch statistics, so nothing else differs.
    fn sync_running_stats(&self) -> Result<(), TrainerError> {
        if self.comm.world() == 1 || self.spec.model.backbone.is_resnet() {
            return Ok(());
        }
        for (name, t) in &self.built.buffers {
            if name.ends_with(".running_mean") || name.ends_with(".running_var") {
                ddetr_collective::ddp::broadcast_tensor(self.comm, t)?;
            }
        }
        Ok(())
    }

    /// Writes a checkpoint (model, optimizer, loss scaler, position) under each of `names`.
    /// Collective under fsdp (the sharded state is gathered), so every rank calls it; rank 0
    /// writes.
    pub fn save(&self, epoch: u32, step: usize, names: &[&str]) -> Result<(), TrainerError> {
        self.sync_running_stats()?;
        let state = self
            .strategy
            .state_tensors(&self.optim, &self.built.params)?;
        if self.comm.rank() != 0 {
            return Ok(());
        }
        let built = &self.built;
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
        t.extend(self.amp.state_tensors());
        if let Some(e) = &self.ema {
            t.extend(e.state_tensors(&built.params));
        }
        let meta = CheckpointMeta {
            epoch,
            step,
            global_step: self.global_step,
            seed: self.spec.train.seed,
            world: self.comm.world(),
            spec_yaml: self.spec_yaml.clone(),
        };
        for n in names {
            checkpoint::save(&self.dir.join(n), &t, &meta)?;
        }
        Ok(())
    }

    /// Ends the run: the SUCCESS status, a barrier, the progress display closed.
    pub fn finish(mut self) -> Result<TrainOutcome, TrainerError> {
        if self.comm.rank() == 0 {
            self.dir
                .status("SUCCESS", "Train finished successfully.", None)?;
        }
        self.comm.barrier()?;
        self.progress.finish();
        Ok(self.outcome(None))
    }

    /// The run's outcome so far.
    pub fn outcome(&self, stopped_at: Option<(u32, usize)>) -> TrainOutcome {
        TrainOutcome {
            stopped_at,
            last_map: self.last_map,
            results_dir: self.dir.path.clone(),
            step_s: self.progress.step_seconds().to_vec(),
        }
    }

    /// The status record of an epoch (rank 0) and the curves drawn from all records so far.
    fn write_epoch_status(
        &self,
        time_per_epoch: f64,
        map: Option<(f64, f64)>,
    ) -> Result<(), TrainerError> {
        let epoch = self.epoch;
        let n = self.losses.steps.max(1) as f64;
        let done = epoch + 1 - self.start.0;
        let eta = self.run_start.elapsed().as_secs_f64() / f64::from(done)
            * f64::from(self.plan.epochs.saturating_sub(epoch + 1));
        let steps = self.data.train.steps_per_epoch();
        let mut kpi = serde_json::json!({
            "epoch": epoch, "max_epoch": self.plan.epochs, "step": self.global_step,
            "max_step": u64::from(self.plan.epochs) * steps as u64,
            "train_loss": self.losses.total / n,
            "lr": self.optim.lr(0), "time_per_epoch": fmt_secs(time_per_epoch),
            "eta": fmt_secs(eta),
        });
        // Every term: train_loss_ce, train_loss_bbox_0, train_loss_ce_dn, train_class_error, …
        for (name, sum) in &self.losses.terms {
            kpi[format!("train_{name}")] = serde_json::json!(sum / n);
        }
        if let Some((m, m50)) = map {
            kpi["val_mAP"] = serde_json::json!(m);
            kpi["val_mAP50"] = serde_json::json!(m50);
        }
        self.dir
            .status("RUNNING", "Training loop in progress", Some(kpi))?;
        if let Err(e) = crate::plot::training_curves(&self.dir.path) {
            tracing::warn!("training plots not written: {e}");
        }
        Ok(())
    }

    /// What a `train.max_minutes` run knows of itself (None without a budget or before a step
    /// past the warm-up was timed).
    fn measure(&self, epoch: u32, steps_into_epoch: usize) -> Option<Measured> {
        self.budget.as_ref()?;
        budget::measure(
            self.progress.step_seconds(),
            self.run_start.elapsed().as_secs_f64(),
            self.validation_s,
            epoch,
            steps_into_epoch,
        )
    }

    /// With a budget, the first fit once the probe steps are timed (`m`: measured at the step).
    fn fit_after_probe(&mut self, m: Option<Measured>) -> Result<(), TrainerError> {
        let Some(m) = m else { return Ok(()) };
        if self.fitted || self.progress.step_seconds().len() <= PROBE_STEPS {
            return Ok(());
        }
        self.agree_plan(&m)?;
        self.fitted = true;
        self.log_plan(&m, "after the first steps");
        Ok(())
    }

    /// With a budget, the schedule is fitted again at every epoch end with the last
    /// validation's measured cost (first fitted here where the epoch was shorter than the
    /// probe), before deciding whether this epoch is the last.
    fn refit_at_epoch_end(&mut self) -> Result<(), TrainerError> {
        if self.out_of_budget {
            return Ok(());
        }
        let Some(m) = self.measure(self.epoch + 1, 0) else {
            return Ok(());
        };
        let before = self.plan.epochs;
        self.agree_plan(&m)?;
        if self.plan.epochs != before || !self.fitted {
            self.log_plan(&m, "at an epoch end");
        }
        self.fitted = true;
        Ok(())
    }

    /// The budget's schedule, the same on every rank (the longest any rank's measurements
    /// allow is taken; ranks run in lockstep, so their step times agree).
    fn agree_plan(&mut self, m: &Measured) -> Result<(), TrainerError> {
        let b = self.budget.as_ref().expect("a budget");
        let optim = &self.spec.train.optim;
        let mine = b.fit(optim, m);
        let mut t = Tensor::from_slice(&[f64::from(mine.epochs)]);
        self.comm.all_reduce(&mut t, ReduceOp::Max)?;
        let epochs = t.double_value(&[0]) as u32;
        self.plan = Plan {
            epochs,
            optim: budget::scaled(optim, b.spec_epochs, epochs),
        };
        self.progress.set_epochs(epochs);
        Ok(())
    }

    fn log_plan(&self, m: &Measured, when: &str) {
        let optim: &OptimConfig = &self.plan.optim;
        tracing::info!(
            "train.max_minutes {}: {:.2} s a step{} {when}: {} epochs, lr steps {:?}",
            self.spec.train.max_minutes,
            m.step_s,
            m.validation_s
                .map_or(String::new(), |v| format!(", {v:.1} s a validation")),
            self.plan.epochs,
            match optim.lr_scheduler {
                LrScheduler::MultiStep => optim.lr_steps.clone(),
                LrScheduler::StepLR => vec![optim.lr_step_size],
            }
        );
    }
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

/// A fresh run's starting weights, as TAO builds them: `model.pretrained_backbone_path` into
/// the backbone, then `train.pretrained_model_path` over the whole model.
fn load_pretrained<D: Detector>(
    spec: &ExperimentSpec,
    built: &Built<D>,
) -> Result<(), TrainerError> {
    if let Some(p) = spec
        .model
        .pretrained_backbone_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        let r =
            crate::weights::load_backbone(&built.vs, std::path::Path::new(p), spec.model.backbone)?;
        tracing::info!(
            path = p,
            loaded = r.loaded,
            missing = r.missing.len(),
            unexpected = r.unexpected.len(),
            first_missing = r.missing.first().map(String::as_str),
            first_unexpected = r.unexpected.first().map(String::as_str),
            "pretrained backbone loaded"
        );
    }
    if let Some(p) = spec
        .train
        .pretrained_model_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        let r = crate::weights::load_file(
            &built.vs,
            std::path::Path::new(p),
            crate::weights::LoadMode::Pretrained,
        )?;
        tracing::info!(
            path = p,
            loaded = r.loaded,
            skipped = r.skipped_shape.len(),
            "pretrained weights loaded"
        );
    }
    Ok(())
}
