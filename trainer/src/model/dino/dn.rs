//! Contrastive denoising (DINO paper §3.3; official `models/dino/dn_components.py`
//! `prepare_for_cdn`, identical in TAO): noised copies of the ground truth fed to the decoder
//! beside the matching queries, in groups of a positive block (small noise, to reconstruct the
//! box) and a negative block (larger noise, to be rejected as background).
//!
//! Layout (per image, `max_gt` = the most boxes of any image in the batch): group g holds slots
//! `[2g·max_gt, 2g·max_gt + max_gt)` (positives) and the next `max_gt` (negatives); image b's
//! boxes fill the first `n_b` slots of each block, the rest stay zero (content 0, box logit 0,
//! supervised as background). The attention mask keeps the matching queries from seeing any
//! denoising query and each group from seeing the others.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::inverse_sigmoid;
use crate::matcher::Target;
use crate::model::box_ops::{box_cxcywh_to_xyxy, box_xyxy_to_cxcywh};

/// A group count this large or more is divided among the batch's boxes (`prepare_for_cdn`).
const DIVIDED_FROM: i64 = 100;

/// The denoising settings (`model.dn_number`, `dn_label_noise_ratio`, `dn_box_noise_scale`).
#[derive(Debug, Clone, Copy)]
pub struct DnConfig {
    pub dn_number: i64,
    pub label_noise_ratio: f64,
    pub box_noise_scale: f64,
    /// Labels are redrawn in `[0, num_classes)`.
    pub num_classes: i64,
}

/// Where the denoising queries sit in the decoder's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnMeta {
    /// Denoising query slots before the matching queries (`2 · max_gt · groups`).
    pub pad_size: i64,
    /// Groups `G`.
    pub num_groups: i64,
}

impl DnMeta {
    /// `max_gt`: the width of one positive (or negative) block.
    pub fn block(&self) -> i64 {
        self.pad_size / (2 * self.num_groups)
    }

    /// The positive slots of image `b` (with `n` boxes) and the box each reconstructs:
    /// `(g·2·max_gt + j, j)` for every group g and box j — the criterion's fixed assignment.
    pub fn positive_indices(&self, n: i64) -> (Vec<i64>, Vec<i64>) {
        let single = 2 * self.block();
        let mut src = Vec::with_capacity((n * self.num_groups) as usize);
        let mut tgt = Vec::with_capacity(src.capacity());
        for g in 0..self.num_groups {
            for j in 0..n {
                src.push(g * single + j);
                tgt.push(j);
            }
        }
        (src, tgt)
    }
}

/// The decoder's denoising input.
#[derive(Debug)]
pub struct DnQueries {
    /// Content `[N, pad_size, d]`: the label embeddings of the noised labels.
    pub content: Tensor,
    /// Anchors `[N, pad_size, 4]`: the noised boxes in logit space.
    pub anchors: Tensor,
    /// `[pad_size + num_queries, pad_size + num_queries]`, true where a query may not attend.
    pub attn_mask: Tensor,
    pub meta: DnMeta,
}

/// `G`: `2·dn_number // (2·max_gt)` when `2·dn_number ≥ 100`, else `2·dn_number`; 1 when no image
/// has a box (or the division gives 0).
pub fn num_groups(dn_number: i64, max_gt: i64) -> i64 {
    let dn = dn_number * 2;
    let g = if max_gt == 0 {
        1
    } else if dn >= DIVIDED_FROM {
        dn / (max_gt * 2)
    } else if dn < 1 {
        1
    } else {
        dn
    };
    g.max(1)
}

/// The self-attention mask of `pad_size` denoising slots in groups of `2·block` followed by
/// `num_queries` matching queries: true where row may not attend to column. A denoising query
/// sees its own group and every matching query; a matching query sees matching queries only.
pub fn attention_mask(meta: DnMeta, num_queries: i64, device: Device) -> Tensor {
    let pad = meta.pad_size;
    let total = pad + num_queries;
    let group_width = (2 * meta.block()).max(1);
    let idx = Tensor::arange(total, (Kind::Int64, device));
    let is_dn = idx.lt(pad);
    // Group of each slot; matching queries get −1 (no group).
    let group = idx
        .floor_divide_scalar(group_width)
        .where_self(&is_dn, &Tensor::full([total], -1, (Kind::Int64, device)));
    let other_group = group.unsqueeze(1).ne_tensor(&group.unsqueeze(0));
    other_group.logical_and(&is_dn.unsqueeze(0))
}

/// Label noise: each label is redrawn uniformly in `[0, num_classes)` with probability
/// `ratio / 2` (it may draw itself).
pub fn noise_labels(labels: &Tensor, ratio: f64, num_classes: i64) -> Tensor {
    if ratio <= 0.0 {
        return labels.shallow_clone();
    }
    let p = Tensor::rand(labels.size(), (Kind::Float, labels.device()));
    let chosen = p.lt(ratio * 0.5);
    let redrawn = Tensor::randint_low(
        0,
        num_classes,
        labels.size(),
        (Kind::Int64, labels.device()),
    );
    redrawn.where_self(&chosen, labels)
}

/// Box noise on `boxes` `[M, 4]` (cxcywh): each corner moves by `±u·(w/2 or h/2)·scale`, u in
/// [0, 1) where `negative` `[M]` is false and in [1, 2) where it is true; corners are clamped to
/// the image and the box converted back (a box can turn inside out: w or h ≤ 0, as upstream).
pub fn noise_boxes(boxes: &Tensor, negative: &Tensor, scale: f64) -> Tensor {
    if scale <= 0.0 {
        return boxes.shallow_clone();
    }
    let xyxy = box_cxcywh_to_xyxy(boxes);
    let half_wh = boxes.narrow(1, 2, 2) / 2.0;
    let diff = Tensor::cat(&[&half_wh, &half_wh], 1);
    let sign = Tensor::randint_low(0, 2, boxes.size(), (Kind::Float, boxes.device())) * 2.0 - 1.0;
    let part = Tensor::rand(boxes.size(), (Kind::Float, boxes.device()))
        + negative.to_kind(Kind::Float).unsqueeze(1);
    let moved = (xyxy + part * sign * diff * scale).clamp(0.0, 1.0);
    box_xyxy_to_cxcywh(&moved)
}

/// `prepare_for_cdn` in training: the noised queries, their mask and layout; None when no image
/// of the batch has a box (the decoder then sees the matching queries alone).
pub fn prepare_for_cdn(
    targets: &[Target],
    cfg: &DnConfig,
    num_queries: i64,
    label_enc: &nn::Embedding,
    device: Device,
) -> Option<DnQueries> {
    let counts: Vec<i64> = targets.iter().map(Target::len).collect();
    let max_gt = counts.iter().copied().max().unwrap_or(0);
    if max_gt == 0 {
        return None;
    }
    let groups = num_groups(cfg.dn_number, max_gt);
    let meta = DnMeta {
        pad_size: 2 * max_gt * groups,
        num_groups: groups,
    };
    let total: i64 = counts.iter().sum();
    let blocks = 2 * groups;

    let labels = Tensor::cat(
        &targets
            .iter()
            .map(|t| t.labels.to_device(device))
            .collect::<Vec<_>>(),
        0,
    );
    let boxes = Tensor::cat(
        &targets
            .iter()
            .map(|t| t.boxes.to_device(device).to_kind(Kind::Float))
            .collect::<Vec<_>>(),
        0,
    );
    // Block k (k = 0..2G) holds every box of the batch; odd blocks are the negatives.
    let known_labels = labels.repeat([blocks]);
    let known_boxes = boxes.repeat([blocks, 1]);
    let negative = Tensor::arange(blocks * total, (Kind::Int64, device))
        .floor_divide_scalar(total)
        .remainder(2)
        .eq(1);
    let noised_labels = noise_labels(&known_labels, cfg.label_noise_ratio, cfg.num_classes);
    let noised_boxes = noise_boxes(&known_boxes, &negative, cfg.box_noise_scale);

    // Slot of each entry: image b's j-th box of block k goes to (b, k·max_gt + j).
    let mut batch_idx = Vec::with_capacity((blocks * total) as usize);
    let mut slot_idx = Vec::with_capacity(batch_idx.capacity());
    for k in 0..blocks {
        for (b, &n) in counts.iter().enumerate() {
            for j in 0..n {
                batch_idx.push(b as i64);
                slot_idx.push(k * max_gt + j);
            }
        }
    }
    let index = [
        Some(Tensor::from_slice(&batch_idx).to_device(device)),
        Some(Tensor::from_slice(&slot_idx).to_device(device)),
    ];
    let bs = targets.len() as i64;
    let d = label_enc.ws.size()[1];
    let content = Tensor::zeros([bs, meta.pad_size, d], (label_enc.ws.kind(), device)).index_put(
        &index,
        &label_enc.forward(&noised_labels),
        false,
    );
    let anchors = Tensor::zeros([bs, meta.pad_size, 4], (Kind::Float, device)).index_put(
        &index,
        &inverse_sigmoid(&noised_boxes),
        false,
    );
    Some(DnQueries {
        content,
        anchors,
        attn_mask: attention_mask(meta, num_queries, device),
        meta,
    })
}
