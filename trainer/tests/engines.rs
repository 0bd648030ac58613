//! The strategies of `train.distributed_strategy` ([`Strategy`]) in real processes, with the trainer's
//! own optimizer ([`Optim`]): `fsdp` (ZeRO-2: reduce-scattered gradients, optimizer state
//! sharded across ranks) and `ddp` with N ranks × batch G/N equal one process with batch G after
//! several AdamW steps, and equal each other; a `fsdp` checkpoint saved at world 4 resumes at
//! worlds 2, 1 and 3, and under `ddp`.
//!
//! The reference is independent of the trainer: one process, the whole batch, libtorch's AdamW
//! and clip_grad_norm. The model, the data, the reference and the tolerance (2e-5 absolute +
//! 1e-4 relative, argued there) are shared with `collective/tests/engines.rs`, whose
//! multi-process harness this test reuses: the binary re-runs itself as the ranks, and the
//! harness kills them when a test fails or overruns.

#[path = "../../collective/tests/common/mod.rs"]
mod multiprocess;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use ddetr_collective::Communicator;
use ddetr_trainer::optim::{Optim, Param};
use ddetr_trainer::spec::{DistributedStrategy, OptimConfig, Optimizer};
use ddetr_trainer::strategy::Strategy;
use multiprocess::reference::{
    assert_close, assert_norm, loss, model, params, rank_env, reference, Model, LR, MAX_NORM, WD,
};
use multiprocess::{child_comm, launch_ok, scenario};
use tch::Tensor;

/// Which strategy the `ckpt_load` ranks resume under.
const STRATEGY: &str = "DDETR_TEST_STRATEGY";

/// The trainer's AdamW configured as the reference's libtorch AdamW: lr [`LR`] and weight decay
/// [`WD`] on the one group every parameter here is in (group 0: `train.optim.lr`). Betas (0.9,
/// 0.999) and eps (1e-8) are the trainer's constants and libtorch's defaults alike; no schedule
/// step is taken, so the lr stays `LR`.
fn optim_config() -> OptimConfig {
    OptimConfig {
        optimizer: Optimizer::AdamW,
        lr: LR,
        weight_decay: WD,
        ..OptimConfig::default()
    }
}

/// One rank's training under one strategy: the model, its parameters as the trainer names
/// them, the optimizer and the engine.
struct Run<'c> {
    model: Model,
    params: Vec<Param>,
    optim: Optim,
    engine: Strategy<'c>,
    comm: &'c Communicator,
}

impl<'c> Run<'c> {
    /// Each rank starts from its own initialisation; the engine broadcasts rank 0's (seed 0, the
    /// reference's) parameters and buffer.
    fn start(comm: &'c Communicator, strategy: DistributedStrategy) -> Self {
        let m = model(comm.rank() as i64);
        let params: Vec<Param> = params(&m)
            .into_iter()
            .enumerate()
            .map(|(i, tensor)| Param {
                name: format!("param{i}"),
                tensor,
                group: 0,
            })
            .collect();
        let engine = Strategy::new(strategy, comm, &params, &[m.buffer.shallow_clone()]).unwrap();
        assert!(
            m.buffer.equal(&model(0).buffer),
            "{strategy:?}: buffer not broadcast from rank 0"
        );
        let optim = Optim::new(&optim_config(), params.len());
        Self {
            model: m,
            params,
            optim,
            engine,
            comm,
        }
    }

    fn train(&mut self, steps: Range<i64>) {
        for s in steps {
            for p in &self.params {
                p.tensor.shallow_clone().zero_grad();
            }
            loss(&self.model, s, self.comm.rank(), self.comm.world()).backward();
            let report = self
                .engine
                .step(&mut self.optim, &self.params, MAX_NORM, 1.0)
                .unwrap();
            assert!(!report.skipped, "step {s} skipped without loss scaling");
            if s == 0 {
                assert_norm(self.engine.name(), report.grad_norm);
            }
        }
    }

    fn tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.detach()).collect()
    }
}

fn run_engines() {
    let comm = child_comm();
    let want = reference(0..4);
    let mut fsdp = Run::start(&comm, DistributedStrategy::Fsdp);
    fsdp.train(0..4);
    let total: usize = fsdp.params.iter().map(|p| p.tensor.numel()).sum();
    let per_rank = total.div_ceil(comm.world());
    let bytes = fsdp.engine.state_bytes_per_rank(&fsdp.optim, &fsdp.params);
    assert_eq!(bytes, 2 * 4 * per_rank, "fsdp: AdamW state of 1/N per rank");
    assert_close("fsdp vs reference", &fsdp.tensors(), &want);

    let mut ddp = Run::start(&comm, DistributedStrategy::Ddp);
    ddp.train(0..4);
    let unsharded = ddp.engine.state_bytes_per_rank(&ddp.optim, &ddp.params);
    assert_eq!(
        unsharded,
        2 * 4 * total,
        "ddp: the whole AdamW state per rank"
    );
    eprintln!("optimizer state bytes per rank: {bytes} (unsharded {unsharded})");
    assert_close("ddp vs reference", &ddp.tensors(), &want);
    assert_close("fsdp vs ddp", &fsdp.tensors(), &ddp.tensors());
}

fn checkpoint() -> PathBuf {
    PathBuf::from(std::env::var("DDETR_TEST_DIR").unwrap()).join("ckpt.safetensors")
}

/// Two `fsdp` steps, then rank 0 writes the parameters (under their names) and the gathered
/// optimizer state (`optim.*`), as the trainer's checkpoints hold them.
fn run_ckpt_save() {
    let comm = child_comm();
    let mut run = Run::start(&comm, DistributedStrategy::Fsdp);
    run.train(0..2);
    let mut state = run.engine.state_tensors(&run.optim, &run.params).unwrap();
    state.extend(
        run.params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.detach().copy())),
    );
    if comm.rank() == 0 {
        Tensor::write_safetensors(&state, checkpoint()).unwrap();
    }
    comm.barrier().unwrap();
}

/// Resumes the checkpoint under `DDETR_TEST_STRATEGY` at this world size and takes steps 2 and 3.
fn run_ckpt_load() {
    let comm = child_comm();
    let strategy = match std::env::var(STRATEGY).unwrap().as_str() {
        "fsdp" => DistributedStrategy::Fsdp,
        "ddp" => DistributedStrategy::Ddp,
        other => panic!("unknown strategy {other}"),
    };
    let mut run = Run::start(&comm, strategy);
    let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(checkpoint())
        .unwrap()
        .into_iter()
        .collect();
    tch::no_grad(|| {
        for p in &run.params {
            let t = saved.get(&p.name).expect("parameter in the checkpoint");
            p.tensor.detach().copy_(t);
        }
    });
    run.engine
        .load_state(&mut run.optim, &run.params, &saved)
        .unwrap();
    run.train(2..4);
    // Uninterrupted: the reference run of all four steps.
    assert_close(
        &format!(
            "resumed under {} at world {}",
            run.engine.name(),
            comm.world()
        ),
        &run.tensors(),
        &reference(0..4),
    );
}

#[test]
#[ignore = "entry point of the ranks the other tests spawn"]
fn child() {
    match scenario().as_str() {
        "engines" => run_engines(),
        "ckpt_save" => run_ckpt_save(),
        "ckpt_load" => run_ckpt_load(),
        other => panic!("unknown scenario {other}"),
    }
}

/// Runs `scenario` in `world` ranks for at most 60 s; asserts that every rank passed.
fn launch(scenario: &str, world: usize, env: &[(&str, String)]) {
    launch_ok("engines", scenario, world, env, Duration::from_secs(60));
}

#[test]
fn fsdp_and_ddp_over_n_ranks_equal_one_process_with_the_whole_batch() {
    for world in [1, 2, 3, 4] {
        launch("engines", world, &rank_env());
    }
}

#[test]
fn fsdp_checkpoint_from_world_4_resumes_at_worlds_2_and_1_and_under_ddp() {
    let tmp = tempfile::tempdir().unwrap();
    let mut env = rank_env();
    env.push(("DDETR_TEST_DIR", tmp.path().display().to_string()));
    launch("ckpt_save", 4, &env);
    for (strategy, world) in [("fsdp", 2), ("fsdp", 1), ("fsdp", 3), ("ddp", 2)] {
        let mut env = env.clone();
        env.push((STRATEGY, strategy.into()));
        launch("ckpt_load", world, &env);
    }
}
