//! The detector seam: everything the tasks (train, evaluate, inference) need of a detection
//! architecture, as one trait. The training engine ([`crate::train`]), prediction
//! ([`crate::predict`]) and inference drive a [`Detector`] and know nothing of its layers, so a
//! second architecture plugs in by implementing it: Deformable DETR ([`DeformableDetrDetector`])
//! and DINO ([`DinoDetector`]).
//!
//! A detector's variables live in a [`VarStore`] under its official state-dict keys, and each
//! sits in one of the optimizer's [`crate::param_groups`]; [`build_model`] builds one and sorts its
//! variables into trainable parameters and buffers.

mod deformable_detr;
mod dino;

pub use deformable_detr::DeformableDetrDetector;
pub use dino::DinoDetector;

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};

use crate::amp::Amp;
use crate::criterion::Losses;
use crate::matcher::Target;
use crate::model_checkpoint::CheckpointReport;
use crate::optim::Param;
use crate::post_process::Detections;
use crate::spec::ExperimentSpec;
use crate::step::StepMode;
use crate::TrainerError;

/// A detection architecture with its loss and post-processing.
pub trait Detector: Sized {
    /// One forward's result: the predictions of every decoder layer (the last is the final one).
    type Output;

    /// Builds the network under `root` (variables named by the architecture's official
    /// state-dict keys, each in its optimizer group) and its criterion, as `spec` says.
    fn build(root: &nn::Path, spec: &ExperimentSpec) -> Result<Self, TrainerError>;

    /// `images` `[N, 3, H, W]` (normalised), `mask` `[N, H, W]` (true on padding).
    fn forward(&self, images: &Tensor, mask: &Tensor, train: bool) -> Self::Output;

    /// Every loss term of `out` against `targets`; `num_boxes` is the normaliser averaged over
    /// the ranks ([`crate::criterion::normalizer`]).
    fn loss(
        &self,
        out: &Self::Output,
        targets: &[Target],
        num_boxes: f64,
    ) -> Result<Losses, TrainerError>;

    /// Forward, loss and backward of one training batch (gradients accumulate into the
    /// parameters' `.grad`), under `amp`'s autocast, with or without activation checkpointing;
    /// returns the unscaled losses.
    #[allow(clippy::too_many_arguments)]
    fn forward_backward(
        &self,
        images: &Tensor,
        mask: &Tensor,
        targets: &[Target],
        num_boxes: f64,
        amp: &Amp,
        mode: StepMode,
    ) -> Result<Losses, TrainerError>;

    /// The final predictions as detections in each original image's (height, width): the best
    /// `num_select`, scores strictly above `conf_threshold`.
    fn post_process(
        &self,
        out: &Self::Output,
        sizes: &[(f64, f64)],
        num_select: i64,
        conf_threshold: f64,
    ) -> Vec<Detections>;

    /// Loads trained weights in any published layout of the architecture (its own training
    /// checkpoint, the official and other implementations' files) into `vs`, strictly.
    fn load_checkpoint(vs: &VarStore, path: &Path) -> Result<CheckpointReport, TrainerError>;
}

/// A built detector, its named parameters and the frozen variables (buffers).
pub struct Built<D> {
    pub vs: VarStore,
    pub model: D,
    /// Trainable parameters sorted by key (the same order on every rank).
    pub params: Vec<Param>,
    /// Every other variable, sorted by key.
    pub buffers: Vec<(String, Tensor)>,
}

/// The backbone trunk's variable prefix.
const TRUNK: &str = "backbone.0.body";

/// Builds the detector on `device` with `seed` and applies `train.freeze`.
pub fn build_model<D: Detector>(
    spec: &ExperimentSpec,
    device: Device,
    seed: i64,
) -> Result<Built<D>, TrainerError> {
    tch::manual_seed(seed);
    let vs = VarStore::new(device);
    let model = D::build(&vs.root(), spec)?;
    // A GCViT or FAN trains whole, or (`model.train_backbone: false`) not at all, as TAO's
    // `BackboneBase` sets it; a ResNet's frozen stem and layer1 are built frozen.
    let mut freeze = spec.train.freeze.clone();
    if !spec.model.backbone.is_resnet() && !spec.model.train_backbone {
        freeze.push(TRUNK.into());
    }
    let (params, buffers) = split_variables(&vs, &freeze)?;
    Ok(Built {
        vs,
        model,
        params,
        buffers,
    })
}

/// Sorts `vs`'s variables into trainable parameters (with their group) and buffers (frozen by
/// the model or by `freeze`, a list of key prefixes), each sorted by key.
fn split_variables(
    vs: &VarStore,
    freeze: &[String],
) -> Result<(Vec<Param>, Vec<(String, Tensor)>), TrainerError> {
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
    let frozen_by = |name: &str, f: &str| name == f || name.starts_with(&format!("{f}."));
    let mut params = Vec::new();
    let mut buffers = Vec::new();
    for (name, t) in named {
        let group = trainable
            .iter()
            .find(|(p, _)| *p == t.data_ptr() as usize)
            .map(|&(_, g)| g);
        let frozen = freeze.iter().any(|f| frozen_by(&name, f));
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
    if let Some(f) = freeze
        .iter()
        .find(|f| !buffers.iter().any(|(n, _)| frozen_by(n, f)))
    {
        return Err(TrainerError::Config(format!(
            "train.freeze names {f:?} but no model parameter has that prefix: use a prefix such as backbone or transformer.encoder"
        )));
    }
    params.sort_by(|a, b| a.name.cmp(&b.name));
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((params, buffers))
}
