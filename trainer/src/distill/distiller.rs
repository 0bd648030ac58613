//! [`DinoDistiller`]: a DINO student and a frozen teacher as one [`Detector`]. Training steps
//! add the bindings' terms; everything else (forward, validation, post-processing,
//! checkpoints) is the student's, so a distilled checkpoint is an ordinary DINO checkpoint that
//! `evaluate`, `inference` and `export` take as it is.

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::Tensor;

use super::bindings::Bindings;
use super::teacher::Teacher;
use crate::amp::Amp;
use crate::criterion::Losses;
use crate::detector::{Detector, DinoDetector};
use crate::matcher::Target;
use crate::model::deformable_transformer::EncoderInputs;
use crate::model::dino::DinoOutput;
use crate::model_checkpoint::CheckpointReport;
use crate::post_process::Detections;
use crate::spec::ExperimentSpec;
use crate::step::{forward_backward, StepLoss, StepMode};
use crate::TrainerError;

/// The student (trained), the teacher (frozen) and the bindings between them.
pub struct DinoDistiller {
    pub student: DinoDetector,
    pub teacher: Teacher,
    pub bindings: Bindings,
}

impl Detector for DinoDistiller {
    type Output = DinoOutput;

    /// The student under `root` as `train` builds it, then the teacher in its own store.
    fn build(root: &nn::Path, spec: &ExperimentSpec) -> Result<Self, TrainerError> {
        let d = spec.distill.as_ref().ok_or_else(|| {
            TrainerError::Config(
                "distill needs a distill section (teacher, pretrained_teacher_model_path, bindings): see configs/shapes_dino_distill.yaml".into(),
            )
        })?;
        let student = DinoDetector::build(root, spec)?;
        let (teacher, report) = Teacher::load(spec, d, root.device())?;
        tracing::info!(
            architecture = teacher.arch.name(),
            path = %report.path.display(),
            format = ?report.format,
            tensors = report.loaded,
            bindings = d.bindings.len(),
            "distill: teacher loaded and frozen"
        );
        if d.bindings.is_empty() {
            tracing::warn!("distill.bindings is empty: the teacher runs but adds no loss (TAO's default); bind model.backbone.0.body, pred_logits or pred_boxes");
        }
        Ok(Self {
            student,
            teacher,
            bindings: Bindings {
                bindings: d.bindings.clone(),
                coef: spec.model.distillation_loss_coef,
            },
        })
    }

    fn forward(&self, images: &Tensor, mask: &Tensor, train: bool) -> DinoOutput {
        self.student.forward(images, mask, train)
    }

    /// The student's detection losses (validation).
    fn loss(
        &self,
        out: &DinoOutput,
        targets: &[Target],
        num_boxes: f64,
    ) -> Result<Losses, TrainerError> {
        self.student.loss(out, targets, num_boxes)
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
        self.student.net.check_input(size[2], size[3])?;
        let taps = amp.autocast(|| {
            self.teacher
                .taps(images, mask, self.bindings.on_predictions())
        });
        let on_features = |inputs: &EncoderInputs| self.bindings.features_loss(inputs, &taps);
        forward_backward(
            &self.student.net,
            StepLoss {
                output: &|out: &DinoOutput| {
                    let mut losses = self.student.criterion.forward(out, targets, num_boxes)?;
                    losses.add(self.bindings.predictions_loss(out.last(), &taps));
                    Ok(losses)
                },
                inputs: self
                    .bindings
                    .on_features()
                    .then_some(&on_features as &dyn Fn(&EncoderInputs) -> Losses),
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
        self.student
            .post_process(out, sizes, num_select, conf_threshold)
    }

    fn load_checkpoint(vs: &VarStore, path: &Path) -> Result<CheckpointReport, TrainerError> {
        DinoDetector::load_checkpoint(vs, path)
    }
}
