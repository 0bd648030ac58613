//! Padding-free evaluation batches (`dataset.augmentation.eval_padding: none`).
//!
//! Deformable DETR's output depends on padding: the mask downsampled to each level moves the
//! valid ratios, the position-encoding normalisation and the sampling locations, and
//! `input_proj`'s GroupNorm takes its statistics over the padded map. So the official code's
//! COCO numbers change with the evaluation batch size (fundamentalvision/Deformable-DETR
//! issue 17). Here every image runs at its own transformed size: this rank's images are grouped
//! by that size (groups in order of first appearance, file order inside a group) and each group
//! is cut into batches of at most `batch_size`. No batch needs padding, so a detection equals the
//! one a batch of one would give, whatever the batch size, the number of ranks or the mix of
//! sizes; same-size images (most of a camera's frames, a third of COCO) still share a forward.

use std::collections::HashMap;

use crate::config::AugmentationConfig;
use crate::sampler::IndexBatch;
use crate::transforms::{size_with_aspect_ratio, EVAL_MAX_SIZE};

/// (height, width) of a `width` × `height` image after the val/test transform.
pub fn eval_size(width: u32, height: u32, aug: &AugmentationConfig) -> (u32, u32) {
    let (w, h) = size_with_aspect_ratio(width, height, aug.test_random_resize, Some(EVAL_MAX_SIZE));
    (h, w)
}

/// Batches of `items` (an item and its transformed (height, width)) holding one size each, at
/// most `batch_size` items, numbered from step 0; see the module docs for the order.
pub fn group_by_size<T: Copy>(items: &[(T, (u32, u32))], batch_size: usize) -> Vec<Vec<T>> {
    let batch_size = batch_size.max(1);
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut slot: HashMap<(u32, u32), usize> = HashMap::new();
    for &(item, size) in items {
        let g = *slot.entry(size).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(item);
    }
    groups
        .into_iter()
        .flat_map(|g| g.chunks(batch_size).map(<[T]>::to_vec).collect::<Vec<_>>())
        .collect()
}

/// The sampler batches of `indices` (cache indices with their transformed sizes) grouped by size.
pub fn size_grouped_batches(indices: &[(usize, (u32, u32))], batch_size: usize) -> Vec<IndexBatch> {
    group_by_size(indices, batch_size)
        .into_iter()
        .enumerate()
        .map(|(step, indices)| IndexBatch {
            step,
            indices,
            padding: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_one_size_keep_file_order_and_cover_every_item_once() {
        let sizes = [
            (800, 1066),
            (1066, 800),
            (800, 1066),
            (666, 1332),
            (800, 1066),
            (1066, 800),
        ];
        let items: Vec<(usize, (u32, u32))> = sizes.iter().copied().enumerate().collect();
        let b = group_by_size(&items, 2);
        assert_eq!(b, vec![vec![0, 2], vec![4], vec![1, 5], vec![3]]);
        assert_eq!(group_by_size(&items, 1).len(), 6);
        assert_eq!(
            group_by_size(&items, 8),
            vec![vec![0, 2, 4], vec![1, 5], vec![3]]
        );
        let steps: Vec<usize> = size_grouped_batches(&items, 2)
            .iter()
            .map(|b| b.step)
            .collect();
        assert_eq!(steps, [0, 1, 2, 3]);
    }

    #[test]
    fn eval_size_follows_the_val_transform() {
        let aug = AugmentationConfig::default();
        assert_eq!(eval_size(1066, 800, &aug), (800, 1066)); // kept
        assert_eq!(eval_size(600, 400, &aug), (800, 1200)); // shorter side to 800
        assert_eq!(eval_size(1200, 600, &aug), (666, 1332)); // capped at 1333
        assert_eq!(eval_size(384, 512, &aug), (1066, 800)); // portrait
    }
}
