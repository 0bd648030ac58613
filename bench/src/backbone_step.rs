//! `ddetr bench step --backbone gc_vit_*|fan_*`: a training step of a transformer backbone alone,
//! ours (the returned levels 1–3 as a 4-scale detector takes them) against its reference
//! implementation: a GCViT against timm's `GlobalContextVit` (`bench/peers/timm_gcvit_step.py`,
//! built for the image size, stochastic depth 0.2); a FAN against TAO's own `FANFPN`
//! (`bench/peers/tao_fan.py`, from the checkout $TAO_PYTORCH_BACKEND names; stochastic depth
//! 0.3, BatchNorm on batch statistics, TAO's per-block activation checkpointing off as ours is).
//! Both sides: random images, loss = Σ over levels 1–3 of the mean squared output, backward,
//! AdamW. transformers carries neither backbone, so the backbone alone is the peer.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;
use ddetr_trainer::model::fan::{Fan, FanConfig, Pass};
use ddetr_trainer::model::gcvit::{GcVit, GcVitConfig};
use ddetr_trainer::spec::Backbone;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::peer::{self, PeerArgs};

const GCVIT_PEER: &str = include_str!("../peers/timm_gcvit_step.py");
const FAN_PEER: &str = include_str!("../peers/tao_fan.py");
/// The levels a 4-scale detector returns.
const LEVELS: [usize; 3] = [1, 2, 3];

/// Our backbone step: (seconds of each timed step, parameters, last loss).
fn ours(kind: Backbone, batch: i64, size: (i64, i64), steps: usize) -> (Vec<f64>, i64, f64) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let forward: Box<dyn Fn(&Tensor) -> Vec<Option<Tensor>>> = match GcVitConfig::of(kind) {
        Some(c) => {
            let net = GcVit::new(&vs.root(), c, &LEVELS);
            Box::new(move |x| net.forward(x, true))
        }
        None => {
            let net = Fan::new(&vs.root(), FanConfig::of(kind).expect("a FAN"), &LEVELS);
            Box::new(move |x| net.forward(x, Pass::Train))
        }
    };
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(Tensor::numel)
        .sum::<usize>() as i64;
    let mut opt = nn::AdamW::default()
        .wd(1e-4)
        .build(&vs, 2e-4)
        .expect("AdamW");
    let x = Tensor::randn([batch, 3, size.0, size.1], (Kind::Float, Device::Cpu));
    let mut times = Vec::new();
    let mut loss = 0.0;
    for _ in 0..=steps {
        let t0 = Instant::now();
        let total = forward(&x)
            .into_iter()
            .flatten()
            .map(|o| o.square().mean(Kind::Float))
            .reduce(|a, b| a + b)
            .expect("three levels");
        opt.zero_grad();
        total.backward();
        opt.step();
        loss = total.double_value(&[]);
        times.push(t0.elapsed().as_secs_f64());
    }
    times.remove(0);
    (times, params, loss)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
}

/// Runs the comparison `rounds` times (ours, peer, ours, peer, …) and prints the figures.
pub fn run(
    kind: Backbone,
    batch: i64,
    size: (i64, i64),
    steps: usize,
    threads: i32,
    rounds: usize,
    peers: &PeerArgs,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let peer = if kind.is_gcvit() {
        let variant = kind.name().trim_start_matches("gc_vit_");
        if variant == "large_384" {
            bail!("--backbone gc_vit_large_384: timm has no such GCViT; compare gc_vit_large");
        }
        let script = dir.path().join("timm_gcvit_step.py");
        std::fs::write(&script, GCVIT_PEER)?;
        let python = if size.0 == size.1 {
            peers.python(&[&script])
        } else {
            peer::unavailable("timm's GCViT takes square img_size only");
            None
        };
        let args = vec![
            variant.to_string(),
            batch.to_string(),
            size.0.to_string(),
            steps.to_string(),
            threads.to_string(),
        ];
        python.map(|py| (py, script, args, format!("timm gcvit_{variant}")))
    } else if kind.is_fan() {
        let variant = kind.name().trim_start_matches("fan_");
        let script = dir.path().join("tao_fan.py");
        std::fs::write(&script, FAN_PEER)?;
        let python = match std::env::var_os("TAO_PYTORCH_BACKEND") {
            Some(_) => peers.python(&[&script]),
            None => {
                peer::unavailable(
                    "TAO's FAN is the peer: set TAO_PYTORCH_BACKEND to a checkout of NVIDIA/tao_pytorch_backend",
                );
                None
            }
        };
        let args = vec![
            variant.to_string(),
            batch.to_string(),
            size.0.to_string(),
            size.1.to_string(),
            steps.to_string(),
            threads.to_string(),
        ];
        python.map(|py| (py, script, args, format!("TAO fan_{variant}")))
    } else {
        bail!(
            "--backbone {}: the backbone-alone step compares transformer backbones (gc_vit_*, fan_*) with their reference; drop --backbone for the detector step",
            kind.name()
        );
    };
    let mut figures = Vec::new();
    let mut params = 0;
    let mut peer_params = None;
    for round in 1..=rounds {
        let (times, p, loss) = ours(kind, batch, size, steps);
        params = p;
        let ours_s = median(&times);
        println!(
            "round {round}: ddetr {}: params={p} batch={batch} size={}x{} steps={:?} median_step={ours_s:.3}s loss={loss:.4}",
            kind.name(),
            size.0,
            size.1,
            times.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>()
        );
        let peer_s = match &peer {
            Some((py, script, args, label)) => {
                let stdout = peer::output(Command::new(py).arg(script).args(args), script)?;
                let pp = peer::figure(peer::line_with(&stdout, "params")?, "params")? as i64;
                peer_params = Some(pp);
                let s = peer::figure(peer::line_with(&stdout, "median_step")?, "median_step")?;
                println!(
                    "round {round}: peer ({label}): params={pp} median_step={s:.3}s  ratio={:.3}",
                    ours_s / s
                );
                Some(s)
            }
            None => None,
        };
        figures.push((ours_s, peer_s));
    }
    let ours_s = median(&figures.iter().map(|f| f.0).collect::<Vec<_>>());
    let mut line = format!(
        "backbone={} step_s={ours_s:.3} imgs_per_s={:.2} params={params}",
        kind.name(),
        batch as f64 / ours_s
    );
    let peer_s: Vec<f64> = figures.iter().filter_map(|f| f.1).collect();
    if !peer_s.is_empty() {
        let ratios: Vec<f64> = figures
            .iter()
            .filter_map(|(o, p)| p.map(|p| o / p))
            .collect();
        line.push_str(&format!(
            " peer_step_s={:.3} peer_params={} ratio={:.3}",
            median(&peer_s),
            peer_params.unwrap_or(0),
            median(&ratios)
        ));
    }
    line.push_str(&format!(
        " batch={batch} size={}x{} threads={threads} rounds={rounds}",
        size.0, size.1
    ));
    println!("{line}");
    Ok(())
}
