//! DINO (`IDEA-Research/DINO`, TAO's `dino`) as a [`Detector`]: the network of
//! [`crate::model::dino`], its criterion ([`crate::dino_criterion`]: matching, denoising and
//! encoder-proposal terms), Deformable DETR's `PostProcess` (top-k over queries × classes), the
//! same staged backward for `train.activation_checkpoint` ([`crate::step`]) and the official,
//! TAO and ddetr checkpoint layouts ([`crate::model_checkpoint`]).

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::Tensor;

use super::Detector;
use crate::amp::Amp;
use crate::criterion::Losses;
use crate::dino_criterion::DinoCriterion;
use crate::matcher::Target;
use crate::model::dino::{Dino, DinoConfig, DinoOutput};
use crate::model_checkpoint::{self, CheckpointReport};
use crate::post_process::{post_process, Detections};
use crate::spec::{Architecture, ExperimentSpec};
use crate::step::{forward_backward, StepLoss, StepMode};
use crate::TrainerError;

/// The network and its criterion.
pub struct DinoDetector {
    pub net: Dino,
    pub criterion: DinoCriterion,
}

impl Detector for DinoDetector {
    type Output = DinoOutput;

    fn build(root: &nn::Path, spec: &ExperimentSpec) -> Result<Self, TrainerError> {
        let cfg = DinoConfig::from_spec(&spec.model, spec.dataset.num_classes)?;
        Ok(Self {
            net: Dino::new(root, cfg),
            criterion: DinoCriterion::from_spec(&spec.model, spec.dataset.num_classes),
        })
    }

    fn forward(&self, images: &Tensor, mask: &Tensor, train: bool) -> DinoOutput {
        self.net.forward(images, mask, None, train)
    }

    fn loss(
        &self,
        out: &DinoOutput,
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
        let size = images.size();
        self.net.check_input(size[2], size[3])?;
        forward_backward(
            &self.net,
            StepLoss {
                output: &|out: &DinoOutput| self.criterion.forward(out, targets, num_boxes),
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
        out: &DinoOutput,
        sizes: &[(f64, f64)],
        num_select: i64,
        conf_threshold: f64,
    ) -> Vec<Detections> {
        let last = out.last();
        post_process(&last.logits, &last.boxes, sizes, num_select, conf_threshold)
    }

    fn load_checkpoint(vs: &VarStore, path: &Path) -> Result<CheckpointReport, TrainerError> {
        model_checkpoint::load_for_architecture(vs, path, Architecture::Dino)
    }
}
