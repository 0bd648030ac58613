//! Deformable DETR (`fundamentalvision/Deformable-DETR`, TAO's `deformable_detr`) as a
//! [`Detector`]: the network of [`crate::model`], upstream's `SetCriterion` with the Hungarian
//! matcher ([`crate::criterion`]), `PostProcess` ([`crate::post_process`]), the staged backward of
//! `train.activation_checkpoint` ([`crate::step`]) and every published checkpoint layout
//! ([`crate::model_checkpoint`]).

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::Tensor;

use super::Detector;
use crate::amp::Amp;
use crate::criterion::{Losses, SetCriterion};
use crate::matcher::Target;
use crate::model::deformable_detr::DetrConfig;
use crate::model::{DeformableDetr, DetrOutput};
use crate::model_checkpoint::{self, CheckpointReport};
use crate::post_process::{post_process, Detections};
use crate::spec::ExperimentSpec;
use crate::step::{forward_backward, StepLoss, StepMode};
use crate::TrainerError;

/// The network and its criterion.
pub struct DeformableDetrDetector {
    pub net: DeformableDetr,
    pub criterion: SetCriterion,
}

impl Detector for DeformableDetrDetector {
    type Output = DetrOutput;

    fn build(root: &nn::Path, spec: &ExperimentSpec) -> Result<Self, TrainerError> {
        let cfg = DetrConfig::from_spec(&spec.model, spec.dataset.num_classes)?;
        Ok(Self {
            net: DeformableDetr::new(root, cfg),
            criterion: SetCriterion::from_spec(&spec.model, spec.dataset.num_classes),
        })
    }

    fn forward(&self, images: &Tensor, mask: &Tensor, train: bool) -> DetrOutput {
        self.net.forward(images, mask, train)
    }

    fn loss(
        &self,
        out: &DetrOutput,
        targets: &[Target],
        num_boxes: f64,
    ) -> Result<Losses, TrainerError> {
        self.criterion.forward(out, targets, num_boxes)
    }

    fn forward_backward(
        &self,
        images: &Tensor,
        mask: &Tensor,
        targets: &[Target],
        num_boxes: f64,
        amp: &Amp,
        mode: StepMode,
    ) -> Result<Losses, TrainerError> {
        forward_backward(
            &self.net,
            StepLoss {
                output: &|out: &DetrOutput| self.criterion.forward(out, targets, num_boxes),
                inputs: None,
            },
            images,
            mask,
            targets,
            amp,
            mode,
        )
    }

    fn post_process(
        &self,
        out: &DetrOutput,
        sizes: &[(f64, f64)],
        num_select: i64,
        conf_threshold: f64,
    ) -> Vec<Detections> {
        let last = out.last();
        post_process(&last.logits, &last.boxes, sizes, num_select, conf_threshold)
    }

    fn load_checkpoint(vs: &VarStore, path: &Path) -> Result<CheckpointReport, TrainerError> {
        model_checkpoint::load_for_task(vs, path)
    }
}
