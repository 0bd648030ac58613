//! Post-processing — upstream `models/deformable_detr.py` `PostProcess`: sigmoid scores, the top
//! `num_select` over all (query, class) pairs, boxes to absolute xyxy in each original image's
//! size; then TAO's `conf_threshold` filter (scores strictly above it are kept).

use tch::{Kind, Tensor};

use crate::model::box_ops::box_cxcywh_to_xyxy;

/// Detections of one image, best first.
#[derive(Debug)]
pub struct Detections {
    /// `[K]`
    pub scores: Tensor,
    /// `[K]` class ids
    pub labels: Tensor,
    /// `[K, 4]` absolute (x0, y0, x1, y1)
    pub boxes: Tensor,
}

/// `logits` `[B, Q, C]`, `boxes` `[B, Q, 4]` normalised cxcywh; `sizes` the (height, width) of each
/// original image.
pub fn post_process(
    logits: &Tensor,
    boxes: &Tensor,
    sizes: &[(f64, f64)],
    num_select: i64,
    conf_threshold: f64,
) -> Vec<Detections> {
    tch::no_grad(|| {
        let (b, q, c) = logits.size3().expect("logits are [B, Q, C]");
        assert_eq!(b as usize, sizes.len(), "one size per image");
        let prob = logits.to_kind(Kind::Float).sigmoid().view([b, q * c]);
        let k = num_select.min(q * c);
        let (scores, idx) = prob.topk(k, 1, true, true);
        let query = idx.divide_scalar_mode(c, "floor");
        let labels = idx.remainder(c);
        let xyxy = box_cxcywh_to_xyxy(&boxes.to_kind(Kind::Float));
        let xyxy = xyxy.gather(1, &query.unsqueeze(-1).repeat([1, 1, 4]), false);
        sizes
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| {
                let scale = Tensor::from_slice(&[w as f32, h as f32, w as f32, h as f32])
                    .to_device(logits.device());
                let s = scores.get(i as i64);
                let keep = s.gt(conf_threshold).nonzero().squeeze_dim(1);
                Detections {
                    scores: s.index_select(0, &keep),
                    labels: labels.get(i as i64).index_select(0, &keep),
                    boxes: (xyxy.get(i as i64) * scale).index_select(0, &keep),
                }
            })
            .collect()
    })
}
