//! DINO's criterion (official `models/dino/dino.py` `SetCriterion`, TAO's `cv/dino/model/
//! criterion.py`): Deformable DETR's focal/L1/GIoU terms ([`SetCriterion::layer_losses`]) on
//!
//! - the matching queries of every decoder layer, Hungarian-matched (`loss_ce`, `loss_ce_0`, …);
//! - the denoising queries of every layer on their fixed assignment — the positive slots
//!   reconstruct their boxes, the negatives and the padding are background in the class term —
//!   normalised by `num_boxes · groups` (`loss_ce_dn`, `loss_ce_dn_0`, …; zeros when a batch has
//!   no denoising queries, so every rank logs the same terms);
//! - the selected encoder proposals with their real labels (`loss_ce_interm`, …), weighted by
//!   `interm_loss_coef` (box terms off with `no_interm_box_loss`).
//!
//! Each term's weight is its kind's coefficient (`cls_loss_coef`, `bbox_loss_coef`,
//! `giou_loss_coef`), as `build_dino`'s weight dict.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::criterion::{Losses, SetCriterion};
use crate::matcher::{Matching, Target};
use crate::model::deformable_detr::Prediction;
use crate::model::dino::DinoOutput;
use crate::spec::ModelConfig;
use crate::TrainerError;

/// The DINO loss.
#[derive(Debug, Clone)]
pub struct DinoCriterion {
    pub base: SetCriterion,
    /// Log (zero) denoising terms even without denoising queries (`use_dn`).
    pub use_dn: bool,
    pub interm_loss_coef: f64,
    pub no_interm_box_loss: bool,
}

/// Accumulates the named terms and their weighted sum.
struct Sum {
    terms: BTreeMap<String, Tensor>,
    total: Option<Tensor>,
}

impl Sum {
    fn add(&mut self, name: String, value: Tensor, weight: f64) {
        let weighted = &value * weight;
        self.total = Some(match self.total.take() {
            Some(t) => t + weighted,
            None => weighted,
        });
        self.terms.insert(name, value);
    }
}

impl DinoCriterion {
    pub fn from_spec(m: &ModelConfig, num_classes: u32) -> Self {
        Self {
            base: SetCriterion::from_spec(m, num_classes),
            use_dn: m.use_dn,
            interm_loss_coef: m.interm_loss_coef,
            no_interm_box_loss: m.no_interm_box_loss,
        }
    }

    /// The three terms of one prediction set under `suffix`, each weighted by its coefficient
    /// times `scale` (and the box terms by `box_scale`); `class_error` for the final layer.
    #[allow(clippy::too_many_arguments)]
    fn add_set(
        &self,
        sum: &mut Sum,
        p: &Prediction,
        targets: &[Target],
        indices: &[Matching],
        num_boxes: f64,
        suffix: &str,
        scale: f64,
        box_scale: f64,
    ) {
        let (ce, bbox, giou, class_error) = self
            .base
            .layer_losses(&p.logits, &p.boxes, targets, indices, num_boxes);
        let w = self.base.weights;
        sum.add(format!("loss_ce{suffix}"), ce, w.ce * scale);
        sum.add(
            format!("loss_bbox{suffix}"),
            bbox,
            w.bbox * scale * box_scale,
        );
        sum.add(
            format!("loss_giou{suffix}"),
            giou,
            w.giou * scale * box_scale,
        );
        if suffix.is_empty() {
            sum.terms.insert("class_error".into(), class_error);
        }
    }

    /// Every loss term of `out` against `targets`; `num_boxes` is the normaliser
    /// ([`crate::criterion::normalizer`]).
    pub fn forward(
        &self,
        out: &DinoOutput,
        targets: &[Target],
        num_boxes: f64,
    ) -> Result<Losses, TrainerError> {
        let mut sum = Sum {
            terms: BTreeMap::new(),
            total: None,
        };
        let layers = out.layers.len();
        let matcher = &self.base.matcher;
        let aux = self.base.aux_loss;
        // Matching queries: the final layer, then every other layer as `_i`.
        for (i, p) in out.layers.iter().enumerate() {
            let last = i + 1 == layers;
            if !last && !aux {
                continue;
            }
            let suffix = if last { String::new() } else { format!("_{i}") };
            let idx = matcher.matching(&p.logits, &p.boxes, targets)?;
            self.add_set(&mut sum, p, targets, &idx, num_boxes, &suffix, 1.0, 1.0);
        }
        // Denoising queries on their known assignment.
        if self.use_dn {
            for i in 0..layers {
                let last = i + 1 == layers;
                if !last && !aux {
                    continue;
                }
                let suffix = if last {
                    "_dn".to_string()
                } else {
                    format!("_dn_{i}")
                };
                match &out.dn {
                    Some(dn) => {
                        let idx: Vec<Matching> = targets
                            .iter()
                            .map(|t| dn.meta.positive_indices(t.len()))
                            .collect();
                        let norm = num_boxes * dn.meta.num_groups as f64;
                        self.add_set(
                            &mut sum,
                            &dn.layers[i],
                            targets,
                            &idx,
                            norm,
                            &suffix,
                            1.0,
                            1.0,
                        );
                    }
                    None => {
                        let zero = Tensor::zeros([], (Kind::Float, out.last().logits.device()));
                        for kind in ["ce", "bbox", "giou"] {
                            sum.terms
                                .insert(format!("loss_{kind}{suffix}"), zero.shallow_clone());
                        }
                    }
                }
            }
        }
        // The selected encoder proposals, with their real labels.
        let idx = matcher.matching(&out.interm.logits, &out.interm.boxes, targets)?;
        let box_scale = if self.no_interm_box_loss { 0.0 } else { 1.0 };
        self.add_set(
            &mut sum,
            &out.interm,
            targets,
            &idx,
            num_boxes,
            "_interm",
            self.interm_loss_coef,
            box_scale,
        );
        Ok(Losses {
            terms: sum.terms,
            total: sum.total.expect("at least one prediction set"),
        })
    }
}
