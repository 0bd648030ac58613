//! The set criterion — upstream `models/deformable_detr.py` `SetCriterion` and
//! `models/segmentation.py` `sigmoid_focal_loss`: sigmoid focal class loss (α = focal_alpha,
//! γ = 2), L1 and GIoU box losses on Hungarian-matched pairs, normalised by the number of target
//! boxes, repeated for every auxiliary decoder layer (`_0`, `_1`, …) and, two-stage, for the
//! encoder proposals with every label set to 0 (`_enc`).

use std::collections::BTreeMap;

use tch::{Kind, Reduction, Tensor};

use crate::matcher::{HungarianMatcher, Matching, Target, FOCAL_GAMMA};
use crate::model::box_ops::{box_cxcywh_to_xyxy, generalized_box_iou};
use crate::model::DetrOutput;
use crate::TrainerError;

/// Loss weights (`cls_loss_coef`, `bbox_loss_coef`, `giou_loss_coef`).
#[derive(Debug, Clone, Copy)]
pub struct LossWeights {
    pub ce: f64,
    pub bbox: f64,
    pub giou: f64,
}

/// Every loss term by upstream's name (`loss_ce`, `loss_bbox`, `loss_giou`, `loss_ce_0`, …,
/// `loss_ce_enc`, …) plus `class_error` (logged only), and the weighted total.
#[derive(Debug)]
pub struct Losses {
    pub terms: BTreeMap<String, Tensor>,
    /// Σ weight·term over the loss terms (what backward runs on).
    pub total: Tensor,
}

impl Losses {
    /// Adds `other`'s terms (summed by name) and total.
    pub fn add(&mut self, other: Losses) {
        for (name, t) in other.terms {
            let sum = match self.terms.remove(&name) {
                Some(s) => s + t,
                None => t,
            };
            self.terms.insert(name, sum);
        }
        self.total = &self.total + other.total;
    }
}

/// `SetCriterion(num_classes, matcher, weight_dict, losses=['labels', 'boxes'], focal_alpha)`.
#[derive(Debug, Clone)]
pub struct SetCriterion {
    pub num_classes: i64,
    pub matcher: HungarianMatcher,
    pub weights: LossWeights,
    pub focal_alpha: f64,
    /// Include the auxiliary decoder layers (and the two-stage encoder) in the loss.
    pub aux_loss: bool,
}

/// The local number of target boxes; the trainer all-reduces it, divides by the world size and
/// calls [`normalizer`].
pub fn local_num_boxes(targets: &[Target]) -> f64 {
    targets.iter().map(|t| t.len() as f64).sum()
}

/// Upstream's normaliser: the (all-reduced, averaged) box count clamped to at least 1.
pub fn normalizer(avg_num_boxes: f64) -> f64 {
    avg_num_boxes.max(1.0)
}

/// `sigmoid_focal_loss(inputs, targets, num_boxes)`: `loss.mean(1).sum() / num_boxes`.
pub fn sigmoid_focal_loss(inputs: &Tensor, targets: &Tensor, num_boxes: f64, alpha: f64) -> Tensor {
    let prob = inputs.sigmoid();
    let ce =
        inputs.binary_cross_entropy_with_logits::<Tensor>(targets, None, None, Reduction::None);
    let p_t = &prob * targets + (1.0 - &prob) * (1.0 - targets);
    let one_minus_p_t: Tensor = 1.0 - &p_t;
    let loss = ce * one_minus_p_t.pow_tensor_scalar(FOCAL_GAMMA);
    let alpha_t: Tensor = targets * alpha + (1.0 - targets) * (1.0 - alpha);
    (alpha_t * loss)
        .mean_dim(1, false, None::<Kind>)
        .sum(None::<Kind>)
        / num_boxes
}

/// (batch index, prediction index) and target index tensors of a matching.
fn permutation(indices: &[Matching], device: tch::Device) -> (Tensor, Tensor, Vec<Vec<i64>>) {
    let mut batch = Vec::new();
    let mut src = Vec::new();
    let mut tgt = Vec::new();
    for (b, (s, t)) in indices.iter().enumerate() {
        batch.extend(std::iter::repeat_n(b as i64, s.len()));
        src.extend_from_slice(s);
        tgt.push(t.clone());
    }
    (
        Tensor::from_slice(&batch).to_device(device),
        Tensor::from_slice(&src).to_device(device),
        tgt,
    )
}

impl SetCriterion {
    pub fn from_spec(m: &crate::spec::ModelConfig, num_classes: u32) -> Self {
        Self {
            num_classes: i64::from(num_classes),
            matcher: HungarianMatcher::from_spec(m),
            weights: LossWeights {
                ce: m.cls_loss_coef,
                bbox: m.bbox_loss_coef,
                giou: m.giou_loss_coef,
            },
            focal_alpha: m.focal_alpha,
            aux_loss: m.aux_loss,
        }
    }

    /// `loss_labels` + `loss_boxes` of one prediction set → (loss_ce, loss_bbox, loss_giou,
    /// class_error).
    pub fn layer_losses(
        &self,
        logits: &Tensor,
        boxes: &Tensor,
        targets: &[Target],
        indices: &[Matching],
        num_boxes: f64,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let device = logits.device();
        let (b, q, c) = logits.size3().expect("logits are [B, Q, C]");
        let (batch_idx, src_idx, tgt_lists) = permutation(indices, device);
        let gather = |what: &dyn Fn(&Target) -> &Tensor| -> Tensor {
            let parts: Vec<Tensor> = targets
                .iter()
                .zip(&tgt_lists)
                .map(|(t, j)| {
                    what(t)
                        .to_device(device)
                        .index_select(0, &Tensor::from_slice(j).to_device(device))
                })
                .collect();
            Tensor::cat(&parts, 0)
        };
        let target_classes_o = gather(&|t| &t.labels);
        let target_classes = Tensor::full([b, q], self.num_classes, (Kind::Int64, device))
            .index_put(
                &[
                    Some(batch_idx.shallow_clone()),
                    Some(src_idx.shallow_clone()),
                ],
                &target_classes_o,
                false,
            );
        let onehot = Tensor::zeros([b, q, c + 1], (logits.kind(), device)).scatter_value(
            2,
            &target_classes.unsqueeze(-1),
            1.0,
        );
        let onehot = onehot.narrow(2, 0, c);
        let loss_ce = sigmoid_focal_loss(logits, &onehot, num_boxes, self.focal_alpha) * q as f64;

        let src_boxes = boxes.index(&[
            Some(batch_idx.shallow_clone()),
            Some(src_idx.shallow_clone()),
        ]);
        let target_boxes = gather(&|t| &t.boxes).to_kind(src_boxes.kind());
        let loss_bbox = src_boxes
            .l1_loss(&target_boxes, Reduction::None)
            .sum(None::<Kind>)
            / num_boxes;
        let giou = if src_boxes.size()[0] > 0 {
            generalized_box_iou(
                &box_cxcywh_to_xyxy(&src_boxes),
                &box_cxcywh_to_xyxy(&target_boxes),
            )
            .diag(0)
        } else {
            src_boxes.sum_dim_intlist(1, false, None::<Kind>)
        };
        let one_minus_giou: Tensor = 1.0 - &giou;
        let loss_giou = one_minus_giou.sum(None::<Kind>) / num_boxes;

        let class_error = tch::no_grad(|| {
            let n = target_classes_o.size()[0];
            if n == 0 {
                return Tensor::from(100.0f32).to_device(device);
            }
            let matched = logits.index(&[Some(batch_idx), Some(src_idx)]);
            let correct = matched
                .argmax(-1, false)
                .eq_tensor(&target_classes_o)
                .to_kind(Kind::Float)
                .sum(Kind::Float);
            100.0 - correct * (100.0 / n as f64)
        });
        (loss_ce, loss_bbox, loss_giou, class_error)
    }

    /// All loss terms of a model output. `num_boxes` is the normaliser (see [`normalizer`]).
    pub fn forward(
        &self,
        out: &DetrOutput,
        targets: &[Target],
        num_boxes: f64,
    ) -> Result<Losses, TrainerError> {
        let mut terms = BTreeMap::new();
        let mut total: Option<Tensor> = None;
        let mut add = |terms: &mut BTreeMap<String, Tensor>,
                       suffix: &str,
                       l: (Tensor, Tensor, Tensor, Tensor)| {
            let (ce, bbox, giou, class_error) = l;
            let weighted =
                &ce * self.weights.ce + &bbox * self.weights.bbox + &giou * self.weights.giou;
            total = Some(match total.take() {
                Some(t) => t + weighted,
                None => weighted,
            });
            terms.insert(format!("loss_ce{suffix}"), ce);
            terms.insert(format!("loss_bbox{suffix}"), bbox);
            terms.insert(format!("loss_giou{suffix}"), giou);
            if suffix.is_empty() {
                terms.insert("class_error".into(), class_error);
            }
        };
        let last = out.last();
        let idx = self.matcher.matching(&last.logits, &last.boxes, targets)?;
        add(
            &mut terms,
            "",
            self.layer_losses(&last.logits, &last.boxes, targets, &idx, num_boxes),
        );
        if self.aux_loss {
            for (i, p) in out.aux().iter().enumerate() {
                let idx = self.matcher.matching(&p.logits, &p.boxes, targets)?;
                add(
                    &mut terms,
                    &format!("_{i}"),
                    self.layer_losses(&p.logits, &p.boxes, targets, &idx, num_boxes),
                );
            }
            if let Some(enc) = &out.enc_outputs {
                let bin: Vec<Target> = targets
                    .iter()
                    .map(|t| Target {
                        labels: t.labels.zeros_like(),
                        boxes: t.boxes.shallow_clone(),
                    })
                    .collect();
                let idx = self.matcher.matching(&enc.logits, &enc.boxes, &bin)?;
                add(
                    &mut terms,
                    "_enc",
                    self.layer_losses(&enc.logits, &enc.boxes, &bin, &idx, num_boxes),
                );
            }
        }
        Ok(Losses {
            terms,
            total: total.expect("at least one prediction set"),
        })
    }
}
