//! The Hungarian matcher — upstream `models/matcher.py` (`HungarianMatcher` with the focal class
//! cost). Cost = cls_loss_coef·focal class cost + bbox_loss_coef·L1 + giou_loss_coef·(−GIoU), solved
//! per image by [`crate::lsa::linear_sum_assignment`] (scipy's algorithm and tie-breaking).

use tch::{Kind, Tensor};

use crate::lsa::linear_sum_assignment;
use crate::model::box_ops::{box_cxcywh_to_xyxy, generalized_box_iou};
use crate::TrainerError;

/// Focal exponent γ (upstream fixes it at 2).
pub const FOCAL_GAMMA: f64 = 2.0;
/// Added inside the class cost's logarithms.
const LOG_EPS: f64 = 1e-8;

/// Ground truth of one image: `labels` `[T]` (i64 class ids), `boxes` `[T, 4]` normalised cxcywh.
#[derive(Debug)]
pub struct Target {
    pub labels: Tensor,
    pub boxes: Tensor,
}

impl Target {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Matched (prediction indices, target indices) of one image, prediction indices ascending.
pub type Matching = (Vec<i64>, Vec<i64>);

/// `HungarianMatcher(cost_class, cost_bbox, cost_giou)` with the focal class cost (α, γ = 2).
#[derive(Debug, Clone, Copy)]
pub struct HungarianMatcher {
    pub cost_class: f64,
    pub cost_bbox: f64,
    pub cost_giou: f64,
    pub focal_alpha: f64,
}

impl HungarianMatcher {
    /// From the spec: the matcher costs equal the loss coefficients, as TAO configures them.
    pub fn from_spec(m: &crate::spec::ModelConfig) -> Self {
        Self {
            cost_class: m.cls_loss_coef,
            cost_bbox: m.bbox_loss_coef,
            cost_giou: m.giou_loss_coef,
            focal_alpha: m.focal_alpha,
        }
    }

    /// The `[Q, T]` cost matrix of one image (f32, as upstream computes it).
    pub fn cost_matrix(&self, logits: &Tensor, boxes: &Tensor, target: &Target) -> Tensor {
        let prob = logits.to_kind(Kind::Float).sigmoid();
        let out_bbox = boxes.to_kind(Kind::Float);
        let tgt_bbox = target.boxes.to_kind(Kind::Float).to_device(prob.device());
        let ids = target.labels.to_device(prob.device());
        let a = self.focal_alpha;
        let one_minus_p: Tensor = 1.0 - &prob;
        let neg =
            (prob.pow_tensor_scalar(FOCAL_GAMMA) * (1.0 - a)) * (-(&one_minus_p + LOG_EPS).log());
        let pos = (one_minus_p.pow_tensor_scalar(FOCAL_GAMMA) * a) * (-(&prob + LOG_EPS).log());
        let cost_class = pos.index_select(1, &ids) - neg.index_select(1, &ids);
        let cost_bbox = Tensor::cdist(&out_bbox, &tgt_bbox, 1.0, None);
        let cost_giou = -generalized_box_iou(
            &box_cxcywh_to_xyxy(&out_bbox),
            &box_cxcywh_to_xyxy(&tgt_bbox),
        );
        cost_bbox * self.cost_bbox + cost_class * self.cost_class + cost_giou * self.cost_giou
    }

    /// Matches the predictions `logits` `[B, Q, C]`, `boxes` `[B, Q, 4]` to `targets`.
    pub fn matching(
        &self,
        logits: &Tensor,
        boxes: &Tensor,
        targets: &[Target],
    ) -> Result<Vec<Matching>, TrainerError> {
        tch::no_grad(|| {
            targets
                .iter()
                .enumerate()
                .map(|(b, t)| {
                    if t.is_empty() {
                        return Ok((Vec::new(), Vec::new()));
                    }
                    let c = self.cost_matrix(&logits.get(b as i64), &boxes.get(b as i64), t);
                    let (nr, nc) = (c.size()[0] as usize, c.size()[1] as usize);
                    let flat: Vec<f64> = Vec::<f64>::try_from(
                        &c.to_device(tch::Device::Cpu)
                            .to_kind(Kind::Double)
                            .flatten(0, -1),
                    )
                    .map_err(TrainerError::Torch)?;
                    let (rows, cols) = linear_sum_assignment(&flat, nr, nc)?;
                    Ok((
                        rows.into_iter().map(|r| r as i64).collect(),
                        cols.into_iter().map(|c| c as i64).collect(),
                    ))
                })
                .collect()
        })
    }
}
