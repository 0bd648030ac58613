//! The input sizes an evaluation or inference ran its images at, for the one line it logs: with
//! `dataset.augmentation.eval_padding: none` every image runs at its own transformed size, with
//! `tao` at the padded batch size (which changes Deformable DETR's detections).

use std::collections::BTreeMap;

/// Sizes shown by name in [`InputSizes::summary`]; the rest are counted.
const SHOWN: usize = 6;

/// Images per model input size (height, width), and how many of them ran padded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputSizes {
    counts: BTreeMap<(i64, i64), usize>,
    padded: usize,
}

impl InputSizes {
    /// Records a batch input of `height` × `width` holding images of the given (transformed,
    /// unpadded) sizes.
    pub fn record(&mut self, height: i64, width: i64, images: &[[i64; 2]]) {
        *self.counts.entry((height, width)).or_default() += images.len();
        self.padded += images.iter().filter(|s| **s != [height, width]).count();
    }

    /// Images recorded.
    pub fn images(&self) -> usize {
        self.counts.values().sum()
    }

    /// Images that ran inside a larger, padded input.
    pub fn padded(&self) -> usize {
        self.padded
    }

    /// `5 images at 4 input sizes, none padded: 800x1066 ×2, 1066x800, 666x1332, 800x1200`
    /// (most frequent first).
    pub fn summary(&self) -> String {
        let mut by_count: Vec<(&(i64, i64), &usize)> = self.counts.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut sizes: Vec<String> = by_count
            .iter()
            .take(SHOWN)
            .map(|((h, w), n)| {
                if **n == 1 {
                    format!("{h}x{w}")
                } else {
                    format!("{h}x{w} ×{n}")
                }
            })
            .collect();
        if by_count.len() > SHOWN {
            sizes.push(format!("… {} more", by_count.len() - SHOWN));
        }
        let padded = match self.padded {
            0 => "none padded".to_string(),
            n if n == self.images() => "all padded".to_string(),
            n => format!("{n} padded"),
        };
        format!(
            "{} images at {} input sizes, {padded}: {}",
            self.images(),
            self.counts.len(),
            sizes.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_sizes_and_padded_images() {
        let mut s = InputSizes::default();
        s.record(800, 1066, &[[800, 1066], [800, 1066]]);
        s.record(1066, 800, &[[1066, 800]]);
        assert_eq!(
            s.summary(),
            "3 images at 2 input sizes, none padded: 800x1066 ×2, 1066x800"
        );
        s.record(800, 1333, &[[800, 1200], [800, 1333]]);
        assert_eq!(s.padded(), 1);
        assert!(s
            .summary()
            .starts_with("5 images at 3 input sizes, 1 padded"));
        let mut all = InputSizes::default();
        for k in 0..8 {
            all.record(800, 1333, &[[800, 1000 + k]]);
        }
        assert_eq!(
            all.summary(),
            "8 images at 1 input sizes, all padded: 800x1333 ×8"
        );
    }
}
