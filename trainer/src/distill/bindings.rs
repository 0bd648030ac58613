//! The distillation bindings and their criteria, as TAO computes them
//! (`core/distillation/losses.py`, `cv/dino/distillation/distiller.py`):
//!
//! - `model.backbone.0.body`: the projected feature maps (`srcs`, the input projections'
//!   outputs, padding included), the criterion per level, summed over the levels;
//! - `pred_logits`, `pred_boxes`: the final decoder layer's predictions, query `i` against
//!   query `i`;
//! - `L1` / `L2`: mean absolute / squared difference over every element; `KL`: KL(teacher ‖
//!   student) of the softmax over the last dimension, averaged over every element (PyTorch's
//!   `kl_div(…, reduction='mean', log_target=True)`), no temperature;
//! - each binding weighted by `weight²` (TAO multiplies by the weight twice), the sum logged as
//!   `loss_distillation` and added to the total times `model.distillation_loss_coef`.

use std::collections::BTreeMap;

use tch::{Kind, Reduction, Tensor};

use super::teacher::Taps;
use crate::criterion::Losses;
use crate::model::deformable_transformer::EncoderInputs;
use crate::model::Prediction;
use crate::spec::{DistillBinding, DistillCriterion};

/// The name the distillation term is logged under (`train_loss_distillation`).
pub const DISTILL_TERM: &str = "loss_distillation";

/// The feature-map binding's name (TAO's special case for the backbone).
const FEATURES: &str = "model.backbone.0.body";

/// `criterion(student, teacher)`, a scalar.
pub fn criterion(c: DistillCriterion, student: &Tensor, teacher: &Tensor) -> Tensor {
    match c {
        DistillCriterion::L1 => student.l1_loss(teacher, Reduction::Mean),
        DistillCriterion::L2 => student.mse_loss(teacher, Reduction::Mean),
        DistillCriterion::KL => student.log_softmax(-1, Kind::Float).kl_div(
            &teacher.log_softmax(-1, Kind::Float),
            Reduction::Mean,
            true,
        ),
    }
}

/// The encoder's inputs as TAO's `srcs`: one `[N, d, H, W]` map per level.
pub fn level_maps(inputs: &EncoderInputs) -> Vec<Tensor> {
    let sizes: Vec<i64> = inputs.spatial_shapes.iter().map(|(h, w)| h * w).collect();
    let n = inputs.src.size()[0];
    let d = inputs.src.size()[2];
    inputs
        .src
        .split_with_sizes(&sizes, 1)
        .into_iter()
        .zip(&inputs.spatial_shapes)
        .map(|(level, &(h, w))| level.reshape([n, h, w, d]).permute([0, 3, 1, 2]))
        .collect()
}

/// `t` `[N, C, h, w]` at `like`'s spatial size (bilinear, align_corners false) when it differs.
fn fit_to(t: &Tensor, like: &Tensor) -> Tensor {
    let (want, have) = (&like.size()[2..], &t.size()[2..]);
    if want == have {
        t.shallow_clone()
    } else {
        t.upsample_bilinear2d(want, false, None, None)
    }
}

/// The spec's bindings with `model.distillation_loss_coef`.
#[derive(Debug, Clone)]
pub struct Bindings {
    pub bindings: Vec<DistillBinding>,
    pub coef: f64,
}

impl Bindings {
    /// Whether a binding compares the feature maps (a term on the encoder's inputs).
    pub fn on_features(&self) -> bool {
        self.bindings
            .iter()
            .any(|b| b.student_module_name == FEATURES)
    }

    /// Whether a binding compares the final predictions (the teacher must run to the end).
    pub fn on_predictions(&self) -> bool {
        self.bindings
            .iter()
            .any(|b| b.student_module_name != FEATURES)
    }

    /// The feature-map bindings' term: `Σ_b w_b² Σ_levels crit(student_l, teacher_l)`. A
    /// teacher map of another size (another backbone family rounds odd sizes the other way:
    /// a FAN floors, a ResNet ceils; TAO pads every batch to 1344² so that none differ) is
    /// resized to the student's, bilinearly.
    pub fn features_loss(&self, student: &EncoderInputs, teacher: &Taps) -> Losses {
        let maps = level_maps(student);
        let fitted: Vec<Tensor> = maps
            .iter()
            .zip(&teacher.srcs)
            .map(|(s, t)| fit_to(t, s))
            .collect();
        self.sum(|name| (name == FEATURES).then(|| maps.iter().zip(&fitted).collect::<Vec<_>>()))
    }

    /// The prediction bindings' term (zero without one, so `loss_distillation` is always
    /// logged, as TAO does).
    pub fn predictions_loss(&self, student: &Prediction, teacher: &Taps) -> Losses {
        let last = teacher.last.as_ref();
        self.sum(|name| match (name, last) {
            ("pred_logits", Some(t)) => Some(vec![(&student.logits, &t.logits)]),
            ("pred_boxes", Some(t)) => Some(vec![(&student.boxes, &t.boxes)]),
            _ => None,
        })
    }

    /// `Σ w² Σ_pairs crit` over the bindings `pairs` gives tensors for, as the
    /// `loss_distillation` term (raw) and the total (times the coefficient).
    fn sum<'t>(&self, pairs: impl Fn(&str) -> Option<Vec<(&'t Tensor, &'t Tensor)>>) -> Losses {
        let mut raw: Option<Tensor> = None;
        for b in &self.bindings {
            let Some(pairs) = pairs(&b.student_module_name) else {
                continue;
            };
            for (s, t) in pairs {
                let term = criterion(b.criterion, s, t) * (b.weight * b.weight);
                raw = Some(match raw {
                    Some(r) => r + term,
                    None => term,
                });
            }
        }
        let raw = raw.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, tch::Device::Cpu)));
        let total = &raw * self.coef;
        Losses {
            terms: BTreeMap::from([(DISTILL_TERM.to_string(), raw)]),
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_teacher_map_of_another_size_is_resized_to_the_students() {
        let student = Tensor::zeros([2, 8, 17, 9], (Kind::Float, Device::Cpu));
        let same = Tensor::randn([2, 8, 17, 9], (Kind::Float, Device::Cpu));
        assert!(fit_to(&same, &student).equal(&same));
        let other = Tensor::randn([2, 8, 16, 8], (Kind::Float, Device::Cpu));
        let fitted = fit_to(&other, &student);
        assert_eq!(fitted.size(), [2, 8, 17, 9]);
        let want = other.upsample_bilinear2d([17, 9], false, None, None);
        assert!(fitted.equal(&want));
        // The criterion then runs on equal shapes.
        let l = criterion(DistillCriterion::L2, &student, &fitted);
        assert!(
            (l.double_value(&[]) - want.square().mean(Kind::Float).double_value(&[])).abs() < 1e-6
        );
    }
}
