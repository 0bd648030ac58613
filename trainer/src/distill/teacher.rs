//! The teacher: a trained network in its own [`VarStore`] (so it is in no optimizer group, no
//! gradient all-reduce and no checkpoint), every variable frozen, run without autograd and in
//! evaluation mode (no dropout, and for DINO no denoising queries — TAO's teacher stays in
//! `eval()`).

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::bindings::level_maps;
use crate::detector::{DeformableDetrDetector, Detector, DinoDetector};
use crate::model::deformable_detr::DetrConfig;
use crate::model::dino::{Dino, DinoConfig, DinoOutput};
use crate::model::{DeformableDetr, DetrOutput, Prediction};
use crate::model_checkpoint::CheckpointReport;
use crate::spec::{Architecture, DistillConfig, ExperimentSpec};
use crate::step::Stages;
use crate::TrainerError;

/// What the bindings compare of one model on a batch.
pub struct Taps {
    /// The projected feature maps, one `[N, d, H, W]` per level (TAO's `srcs`).
    pub srcs: Vec<Tensor>,
    /// The final decoder layer's predictions (matching queries only); None when the model ran
    /// only as far as the feature maps.
    pub last: Option<Prediction>,
}

enum Net {
    Dino(Dino),
    DeformableDetr(DeformableDetr),
}

/// The frozen teacher.
pub struct Teacher {
    /// Holds the teacher's variables (kept alive with the network).
    pub vs: VarStore,
    net: Net,
    pub arch: Architecture,
}

/// The final predictions of a network's output.
pub trait FinalPrediction {
    fn final_prediction(&self) -> &Prediction;
}

impl FinalPrediction for DinoOutput {
    fn final_prediction(&self) -> &Prediction {
        self.last()
    }
}

impl FinalPrediction for DetrOutput {
    fn final_prediction(&self) -> &Prediction {
        self.last()
    }
}

impl Teacher {
    /// Builds `distill.teacher` (with the student's dataset: the same classes) on `device` and
    /// loads `distill.pretrained_teacher_model_path` into it strictly.
    pub fn load(
        spec: &ExperimentSpec,
        d: &DistillConfig,
        device: Device,
    ) -> Result<(Self, CheckpointReport), TrainerError> {
        let path = d
            .pretrained_teacher_model_path
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| {
                TrainerError::Config(
                    "distill.pretrained_teacher_model_path is not set: point it at the teacher's trained checkpoint (ddetr's, or an official or TAO DINO / Deformable DETR .pth)".into(),
                )
            })?;
        let arch = d.teacher_architecture();
        let num_classes = spec.dataset.num_classes;
        let vs = VarStore::new(device);
        let root = vs.root();
        let (net, report) = match arch {
            Architecture::Dino => {
                let net = Dino::new(&root, DinoConfig::from_spec(&d.teacher, num_classes)?);
                (
                    Net::Dino(net),
                    DinoDetector::load_checkpoint(&vs, Path::new(path)),
                )
            }
            Architecture::DeformableDetr => {
                let net =
                    DeformableDetr::new(&root, DetrConfig::from_spec(&d.teacher, num_classes)?);
                (
                    Net::DeformableDetr(net),
                    DeformableDetrDetector::load_checkpoint(&vs, Path::new(path)),
                )
            }
        };
        let report = report.map_err(|e| {
            TrainerError::Config(format!(
                "distill teacher ({} as distill.teacher describes): {e}",
                arch.name()
            ))
        })?;
        let mut vs = vs;
        vs.freeze();
        Ok((Self { vs, net, arch }, report))
    }

    /// The teacher's feature maps and, with `predictions`, its final predictions on a batch,
    /// without autograd. Without them the teacher stops at the feature maps: its encoder and
    /// decoder, the bulk of its cost, do not run (TAO runs the whole teacher every step).
    pub fn taps(&self, images: &Tensor, mask: &Tensor, predictions: bool) -> Taps {
        tch::no_grad(|| match &self.net {
            Net::Dino(m) => Taps::of(m, images, mask, predictions),
            Net::DeformableDetr(m) => Taps::of(m, images, mask, predictions),
        })
    }
}

impl Taps {
    /// `model`'s taps on a batch in evaluation mode (no dropout, no training-only queries),
    /// with autograd when the caller has it on; the final predictions only with `predictions`.
    pub fn of<M: Stages>(model: &M, images: &Tensor, mask: &Tensor, predictions: bool) -> Taps
    where
        M::Output: FinalPrediction,
    {
        if !predictions {
            let features = model.backbone_features(images, mask, false);
            let inputs = model.encoder_inputs(&features, mask);
            return Taps {
                srcs: level_maps(&inputs),
                last: None,
            };
        }
        let (inputs, out) = model.forward_with_inputs(images, mask, None, false);
        let last = out.final_prediction();
        Taps {
            srcs: level_maps(&inputs),
            last: Some(Prediction {
                logits: last.logits.shallow_clone(),
                boxes: last.boxes.shallow_clone(),
            }),
        }
    }
}
