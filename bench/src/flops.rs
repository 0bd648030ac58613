//! `ddetr bench flops -e spec.yaml`: the FLOPs `ddetr model info` counts for the spec's network
//! (`ddetr_trainer::flops`, on the exported graph) beside fvcore's count of the same network in
//! transformers (`bench/peers/fvcore_flops.py`; fvcore's `FlopCountAnalysis` is what
//! detectron2's and mmdet's analysis tools run), operator by operator. transformers computes the
//! heads on every decoder layer (the auxiliary outputs) where a deployed graph computes the
//! last layer's; the peer reports those extra calls and the comparison takes them off. A GCViT
//! backbone is compared alone, with fvcore on timm's GCViT (`bench/peers/fvcore_gcvit_flops.py`),
//! a FAN alone with fvcore on TAO's own FAN (`bench/peers/fvcore_fan_flops.py`, TAO's code from
//! $TAO_PYTORCH_BACKEND).
//!
//! fvcore is installed into the peers' python with pip the first time it is missing there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use clap::Args;
use ddetr_trainer::export::{self, ExportOptions};
use ddetr_trainer::flops::{self, FlopCount};
use ddetr_trainer::spec::{Architecture, Backbone, ExperimentSpec};

use crate::peer::{self, PeerArgs};

/// The peers: fvcore on transformers' Deformable DETR (the detector), on timm's GCViT and on
/// TAO's own FAN (the backbones alone: no library builds a detector on them); `tao_fan.py`, which
/// imports TAO's FAN, is written beside them.
const PEERS: [(&str, &str); 4] = [
    (DETR_PEER, include_str!("../peers/fvcore_flops.py")),
    (GCVIT_PEER, include_str!("../peers/fvcore_gcvit_flops.py")),
    (FAN_PEER, include_str!("../peers/fvcore_fan_flops.py")),
    ("tao_fan.py", include_str!("../peers/tao_fan.py")),
];
pub const DETR_PEER: &str = "fvcore_flops.py";
pub const GCVIT_PEER: &str = "fvcore_gcvit_flops.py";
pub const FAN_PEER: &str = "fvcore_fan_flops.py";
/// Where the FAN peer finds TAO's code.
const TAO_CODE: &str = "TAO_PYTORCH_BACKEND";

/// Which peer script counts the spec's network, and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub script: &'static str,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct FlopsBenchArgs {
    /// The experiment spec (its model section, dataset.num_classes and the export input size).
    #[arg(
        short = 'e',
        long = "experiment-spec",
        default_value = "configs/coco_r50.yaml"
    )]
    pub spec: PathBuf,
    /// Extra `key=value` overrides of the spec (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[command(flatten)]
    pub peer: PeerArgs,
}

/// fvcore's count of the peer, as the peer scripts print it.
#[derive(Debug, serde::Deserialize)]
pub struct FvcoreCount {
    /// `detector`, or `backbone` when the peer counts the backbone alone.
    #[serde(default)]
    pub scope: String,
    /// What was counted (`transformers 5.25.0's Deformable DETR`).
    #[serde(default)]
    pub model: String,
    pub total: f64,
    pub aux_heads: f64,
    pub params: i64,
    pub by_operator: BTreeMap<String, f64>,
    /// The deployed graph's share per module, in `ddetr_trainer::flops::group`'s names.
    #[serde(default)]
    pub by_module_deployed: BTreeMap<String, f64>,
    #[serde(default)]
    pub fvcore: String,
    /// What the peer counted, in a line (a backbone peer's own account).
    #[serde(default)]
    pub note: String,
}

impl FvcoreCount {
    fn op(&self, name: &str) -> f64 {
        self.by_operator.get(name).copied().unwrap_or(0.0)
    }

    /// What transformers computes and a deployed graph does not: the head calls on every
    /// decoder layer, and the pixel mask resized to each level (`upsample_nearest2d`; the
    /// exported graph takes no mask).
    pub fn not_deployed(&self) -> f64 {
        self.aux_heads + self.op("upsample_nearest2d")
    }

    /// fvcore's total less [`Self::not_deployed`].
    pub fn deployed(&self) -> f64 {
        self.total - self.not_deployed()
    }

    /// fvcore's figures in ddetr's kinds, without [`Self::not_deployed`]:
    /// (conv, linear, attention, norms, sampling, other).
    pub fn kinds(&self) -> [f64; 6] {
        let known = [
            "conv",
            "linear",
            "matmul",
            "bmm",
            "layer_norm",
            "group_norm",
            "batch_norm",
            "grid_sampler",
            "upsample_nearest2d",
        ];
        let other: f64 = self
            .by_operator
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .fold(0.0, |a, (_, v)| a + v); // (an empty f64 sum is -0.0)
        [
            self.op("conv"),
            self.op("linear") - self.aux_heads,
            self.op("matmul") + self.op("bmm"),
            self.op("layer_norm") + self.op("group_norm") + self.op("batch_norm"),
            self.op("grid_sampler"),
            other,
        ]
    }
}

/// ddetr's count in the same kinds (`other` is its pooling).
pub fn kinds(c: &FlopCount) -> [f64; 6] {
    [c.conv, c.linear, c.attention, c.norm, c.sampling, c.pool]
}

/// The peer that counts the spec's network (a GCViT backbone: timm's, alone) and its arguments,
/// or why no library builds it.
pub fn peer_args(spec: &ExperimentSpec) -> Result<Peer, String> {
    let m = &spec.model;
    if m.backbone.is_gcvit() {
        return gcvit_peer_args(spec);
    }
    if m.backbone.is_fan() {
        return fan_peer_args(spec);
    }
    if spec.architecture() != Architecture::DeformableDetr {
        return Err("transformers has no DINO; the FLOPs peer is its Deformable DETR".into());
    }
    let backbone = match m.backbone {
        Backbone::Resnet18 => "resnet18",
        Backbone::Resnet34 => "resnet34",
        Backbone::Resnet50 => "resnet50",
        other => {
            return Err(format!(
                "transformers' Deformable DETR takes timm's ResNets here, not {}",
                other.name()
            ))
        }
    };
    let levels_ok = match m.num_feature_levels {
        1 => m.return_interm_indices == [3],
        4 => m.return_interm_indices == [1, 2, 3, 4],
        _ => false,
    };
    if !levels_ok {
        return Err(format!(
            "transformers' Deformable DETR reads the last backbone level (num_feature_levels 1, \
             return_interm_indices [3]) or the last three plus one (4, [1, 2, 3, 4]), not {} {:?}",
            m.num_feature_levels, m.return_interm_indices
        ));
    }
    let (h, w) = (spec.export.input_height, spec.export.input_width);
    let mut args: Vec<String> = [
        ("--height", h.to_string()),
        ("--width", w.to_string()),
        ("--backbone", backbone.into()),
        ("--levels", m.num_feature_levels.to_string()),
        ("--classes", spec.dataset.num_classes.to_string()),
        ("--queries", m.num_queries.to_string()),
        ("--enc", m.enc_layers.to_string()),
        ("--dec", m.dec_layers.to_string()),
        ("--ffn", m.dim_feedforward.to_string()),
        ("--d-model", m.hidden_dim.to_string()),
        ("--heads", m.nheads.to_string()),
        ("--enc-points", m.enc_n_points.to_string()),
        ("--dec-points", m.dec_n_points.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect();
    if m.with_box_refine {
        args.push("--refine".into());
    }
    if m.two_stage {
        args.push("--two-stage".into());
    }
    Ok(Peer {
        script: DETR_PEER,
        args,
    })
}

/// `fvcore_gcvit_flops.py`'s arguments: timm's GCViT is TAO's at 224×224 only (timm sizes its
/// windows to the image).
fn gcvit_peer_args(spec: &ExperimentSpec) -> Result<Peer, String> {
    let m = &spec.model;
    let variant = m.backbone.name().trim_start_matches("gc_vit_");
    if variant == "large_384" {
        return Err("timm has no GCViT large_384; compare gc_vit_large".into());
    }
    let (h, w) = (spec.export.input_height, spec.export.input_width);
    if (h, w) != (224, 224) {
        return Err(format!(
            "timm's GCViT is TAO's at 224x224 only (timm sizes its windows to the image), not \
             {h}x{w}: set export.input_height=224 export.input_width=224"
        ));
    }
    Ok(Peer {
        script: GCVIT_PEER,
        args: vec![
            "--variant".into(),
            variant.into(),
            "--size".into(),
            "224".into(),
            "--levels".into(),
            backbone_levels(m),
        ],
    })
}

/// The backbone levels a transformer backbone's peer returns (`return_interm_indices` without
/// the extra level), as `1,2,3`.
fn backbone_levels(m: &ddetr_trainer::spec::ModelConfig) -> String {
    let levels: Vec<String> = m
        .return_interm_indices
        .iter()
        .filter(|&&i| i < 4)
        .map(|i| i.to_string())
        .collect();
    levels.join(",")
}

/// fvcore on TAO's FAN (the backbone alone) at the export size (run only where TAO's code is at
/// hand: [`TAO_CODE`]).
fn fan_peer_args(spec: &ExperimentSpec) -> Result<Peer, String> {
    let m = &spec.model;
    Ok(Peer {
        script: FAN_PEER,
        args: vec![
            "--variant".into(),
            m.backbone.name().trim_start_matches("fan_").into(),
            "--height".into(),
            spec.export.input_height.to_string(),
            "--width".into(),
            spec.export.input_width.to_string(),
            "--levels".into(),
            backbone_levels(m),
        ],
    })
}

/// The peers' python with fvcore importable (pip-installed the first time), or why not.
fn with_fvcore(py: PathBuf) -> Result<PathBuf, String> {
    let has = |py: &PathBuf| {
        Command::new(py)
            .args(["-c", "import fvcore"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(&py) {
        return Ok(py);
    }
    println!(
        "installing fvcore into {} (pip install fvcore)",
        py.display()
    );
    let ok = Command::new(&py)
        .args(["-m", "pip", "install", "-q", "fvcore"])
        .status()
        .is_ok_and(|s| s.success());
    if ok && has(&py) {
        Ok(py)
    } else {
        Err(format!(
            "fvcore could not be installed into {}",
            py.display()
        ))
    }
}

pub fn run(args: &FlopsBenchArgs) -> anyhow::Result<()> {
    let spec = ddetr_trainer::spec::load(&args.spec, &args.overrides, None)?.spec;
    let opts = ExportOptions::from_spec(&spec.export);
    let hw = (opts.input_height, opts.input_width);
    let modules = flops::count_by_module(&export::spec_graph(&spec, None, &opts)?, hw)?;
    let dir = tempfile::tempdir()?;
    let peer_args = peer_args(&spec);
    let name = peer_args.as_ref().map_or(DETR_PEER, |p| p.script);
    let script = dir.path().join(name);
    for (file, text) in PEERS {
        std::fs::write(dir.path().join(file), text)?;
    }
    let peer_args = peer_args.and_then(|p| {
        if p.script == FAN_PEER && std::env::var_os(TAO_CODE).is_none() {
            Err(format!(
                "TAO's FAN is the peer: set {TAO_CODE} to a checkout of NVIDIA/tao_pytorch_backend"
            ))
        } else {
            Ok(p)
        }
    });
    let python = match &peer_args {
        Ok(_) => args
            .peer
            .python(&[&script])
            .and_then(|py| with_fvcore(py).map_err(|why| peer::unavailable(&why)).ok()),
        Err(why) if !args.peer.no_peer => {
            peer::unavailable(why);
            None
        }
        Err(_) => None,
    };
    let theirs = match (python, peer_args) {
        (Some(py), Ok(a)) => {
            let stdout = peer::output(Command::new(py).arg(&script).args(&a.args), &script)?;
            let json = stdout.lines().last().unwrap_or("");
            Some(
                serde_json::from_str::<FvcoreCount>(json)
                    .with_context(|| format!("reading the fvcore peer's line {json:?}"))?,
            )
        }
        _ => None,
    };
    print!("{}", report(&spec, hw, &modules, theirs.as_ref()));
    Ok(())
}

/// Each module group's total.
pub fn module_totals(modules: &BTreeMap<String, FlopCount>) -> BTreeMap<String, f64> {
    modules
        .iter()
        .map(|(m, c)| (m.clone(), c.total()))
        .collect()
}

/// The tables (GFLOPs per kind and per module, ours and fvcore's) and the `key=value` line.
fn report(
    spec: &ExperimentSpec,
    (h, w): (u32, u32),
    modules: &BTreeMap<String, FlopCount>,
    theirs: Option<&FvcoreCount>,
) -> String {
    let detector = FlopCount::sum(modules.values());
    // A backbone-alone peer is compared with the backbone's share.
    let backbone_only = theirs.is_some_and(|t| t.scope == "backbone");
    let ours = &if backbone_only {
        modules.get("backbone").copied().unwrap_or_default()
    } else {
        detector
    };
    let g = |x: f64| x / 1e9;
    let names = [
        "conv",
        "linear",
        "attention",
        "norms",
        "deformable sampling",
        "other",
    ];
    let mine = kinds(ours);
    let mut out = format!(
        "{} with {} at {h}x{w}, batch 1, GFLOPs by fvcore's rules\n",
        spec.architecture().name(),
        spec.model.backbone.name()
    );
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.4}", g(v)));
    let row = |name: &str, o: Option<f64>, t: Option<f64>| {
        format!("{name:<28} {:>12} {:>12}\n", cell(o), cell(t))
    };
    let kind_title = if backbone_only {
        "kind (backbone)"
    } else {
        "kind"
    };
    out += &format!("{kind_title:<28} {:>12} {:>12}\n", "ddetr", "fvcore");
    let theirs_kinds = theirs.map(FvcoreCount::kinds);
    for (i, name) in names.iter().enumerate() {
        out += &row(name, Some(mine[i]), theirs_kinds.map(|k| k[i]));
    }
    out += &row(
        "total",
        Some(ours.total()),
        theirs.map(FvcoreCount::deployed),
    );
    out += &format!("{:<28} {:>12} {:>12}\n", "module", "ddetr", "fvcore");
    let mine_m = module_totals(modules);
    let mut names_m: Vec<&String> = mine_m.keys().collect();
    if let Some(t) = theirs {
        names_m.extend(t.by_module_deployed.keys());
    }
    names_m.sort();
    names_m.dedup();
    for m in names_m {
        let t = theirs.and_then(|t| t.by_module_deployed.get(m).copied());
        out += &row(m, mine_m.get(m).copied(), t);
    }
    let mut line = format!("input={h}x{w} gflops={:.4}", g(detector.total()));
    match theirs {
        Some(t) if backbone_only => {
            let note = if t.note.is_empty() {
                "the stages the detector reads, TAO's output norm on each returned level and its pooled squeeze-excitation added"
            } else {
                &t.note
            };
            out += &format!("(fvcore {} on {}: {note})\n", t.fvcore, t.model);
            line += &format!(
                " backbone_gflops={:.4} peer_backbone_gflops={:.4} ratio={:.4}",
                g(ours.total()),
                g(t.total),
                ours.total() / t.total
            );
        }
        Some(t) => {
            let deployed = t.deployed();
            out += &format!(
                "(fvcore {} on {}: {:.4} G in all, with {:.4} G a deployed graph does not spend: the heads on every decoder layer and the pixel mask resized to each level)\n",
                t.fvcore,
                t.model,
                g(t.total),
                g(t.not_deployed())
            );
            line += &format!(
                " peer_gflops={:.4} peer_gflops_all={:.4} ratio={:.4} peer_params={}",
                g(deployed),
                g(t.total),
                ours.total() / deployed,
                t.params
            );
        }
        None => {}
    }
    out + &line + "\n"
}
