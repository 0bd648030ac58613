//! What the engine tests train and compare with: a small MLP, a global batch split by rank, and
//! the reference, one process with the whole batch, libtorch's AdamW and clip_grad_norm. Shared
//! by `collective/tests/engines.rs` (the DDP engine) and `trainer/tests/engines.rs` (the
//! trainer's `ddp` and `fsdp` engines, which include this harness through `#[path]`).
//!
//! Tolerance: parameters agree to 2e-5 absolute + 1e-4 relative. The ranks sum gradients in a
//! different order than one process does (per-rank means, then the average across ranks), which
//! changes f32 rounding in the last bits; AdamW's normalised update keeps that at the 1e-6 level
//! over these few steps, well inside the bound, while a wrong average (sum instead of mean, a
//! missed bucket, an unsynchronised rank) moves parameters by about lr = 1e-2 per step.

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

pub const GLOBAL_BATCH: i64 = 12;
pub const LR: f64 = 1e-2;
pub const WD: f64 = 0.01;
pub const MAX_NORM: f64 = 0.1;

pub struct Model {
    pub vs: nn::VarStore,
    pub net: nn::Sequential,
    /// A buffer (not trained) that the engines must broadcast from rank 0.
    pub buffer: Tensor,
}

/// An MLP plus a parameter the forward never uses (its gradient counts as zero). `seed` makes
/// the initialisation differ per rank, so the broadcast from rank 0 is what aligns them.
pub fn model(seed: i64) -> Model {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "fc1", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&root / "fc2", 16, 4, Default::default()));
    let _unused = root.var(
        "unused",
        &[3, 3],
        nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    );
    let buffer = Tensor::randn([5], (Kind::Float, Device::Cpu));
    Model { vs, net, buffer }
}

/// Step `step`'s global batch; rank `r` of `world` takes rows [r·G/world, (r+1)·G/world).
fn batch(step: i64, rank: usize, world: usize) -> (Tensor, Tensor) {
    tch::manual_seed(1000 + step);
    let x = Tensor::randn([GLOBAL_BATCH, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([GLOBAL_BATCH, 4], (Kind::Float, Device::Cpu));
    let b = GLOBAL_BATCH / world as i64;
    (
        x.narrow(0, rank as i64 * b, b),
        y.narrow(0, rank as i64 * b, b),
    )
}

/// The mean squared error of rank `rank`'s share of step `step`'s batch.
pub fn loss(m: &Model, step: i64, rank: usize, world: usize) -> Tensor {
    let (x, y) = batch(step, rank, world);
    (m.net.forward(&x) - y).square().mean(Kind::Float)
}

/// The trainable parameters, in the same order on every rank.
pub fn params(m: &Model) -> Vec<Tensor> {
    m.vs.trainable_variables()
}

fn zero_missing_grads(ps: &[Tensor]) {
    for p in ps {
        if !p.grad().defined() {
            (p * 0.0).sum(Kind::Float).backward();
        }
    }
}

/// libtorch's AdamW (torch's defaults but lr = [`LR`], weight decay [`WD`]) over `m`.
pub fn adamw(m: &Model) -> nn::Optimizer {
    nn::AdamW {
        wd: WD,
        ..Default::default()
    }
    .build(&m.vs, LR)
    .unwrap()
}

/// One process, the whole batch, libtorch's AdamW and clip_grad_norm: the reference.
pub fn reference(steps: std::ops::Range<i64>) -> Vec<Tensor> {
    let m = model(0);
    let mut opt = adamw(&m);
    for s in steps {
        opt.zero_grad();
        loss(&m, s, 0, 1).backward();
        zero_missing_grads(&params(&m));
        opt.clip_grad_norm(MAX_NORM);
        opt.step();
    }
    params(&m)
}

/// The global gradient norm of the reference model's first step: AdamW is blind to the scale of
/// the gradients, so the averaging (mean, not sum) is checked on the gradients themselves.
fn reference_first_grad_norm() -> f64 {
    let m = model(0);
    loss(&m, 0, 0, 1).backward();
    params(&m)
        .iter()
        .filter(|p| p.grad().defined())
        .map(|p| p.grad().square().sum(Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt()
}

/// `got`, an engine's first-step global gradient norm, equals the reference's to 1e-5 relative.
pub fn assert_norm(what: &str, got: f64) {
    let want = reference_first_grad_norm();
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "{what}: first-step gradient norm {got}, reference {want}"
    );
}

/// Every parameter of `got` equals `want`'s within the tolerance of the module docs.
pub fn assert_close(what: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !g.allclose(w, 1e-4, 2e-5, false) {
            let d = (g - w).abs().max().double_value(&[]);
            panic!("{what}: parameter {i} differs from the reference by {d}");
        }
    }
}

/// The environment of an engine test's ranks: a dead peer fails the test in 30 s, not 600.
pub fn rank_env() -> Vec<(&'static str, String)> {
    vec![("DDETR_COLLECTIVE_TIMEOUT_S", "30".into())]
}
