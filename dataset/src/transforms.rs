//! The official Deformable-DETR / TAO image+box transforms (`datasets/transforms.py`), on RGB8
//! images (pixels stay u8 until collation normalizes the whole batch in one libtorch op).
//!
//! Train: `RandomHorizontalFlip(p)` → `RandomSelect(0.5)` between
//! (a) `RandomResize(scales, max_size)` and
//! (b) `RandomResize(train_random_resize)` → `RandomSizeCrop(crop_min, crop_max)` →
//! `RandomResize(scales, max_size)`; with `fixed_random_crop` set, large-scale jitter to that square
//! size replaces the resize/crop. Val/test: `RandomResize([test_random_resize], 1333)`.
//! Boxes follow every step (pixel xyxy); boxes cropped to nothing are dropped. Resizing is
//! fast_image_resize's bilinear convolution (PIL's `BILINEAR`, antialiased when shrinking).

use fast_image_resize::{
    images::Image, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};

use crate::config::AugmentationConfig;
use crate::image::Rgb8;
use crate::rng::Rng;

/// The official val/test longest-side limit.
pub const EVAL_MAX_SIZE: u32 = 1333;
/// Large-scale jitter's scale range (Ghiasi et al. 2021, "Simple Copy-Paste").
pub const LSJ_SCALE: (f64, f64) = (0.1, 2.0);

/// An image with its boxes (pixel xyxy) and their labels (category ids).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: Rgb8,
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<u32>,
}

/// `get_size_with_aspect_ratio`: the (width, height) that gives the shorter side `size`, capped
/// so the longer side stays within `max_size` (integer arithmetic as upstream).
pub fn size_with_aspect_ratio(w: u32, h: u32, size: u32, max_size: Option<u32>) -> (u32, u32) {
    let mut size = size as f64;
    if let Some(max) = max_size {
        let (min_o, max_o) = (w.min(h) as f64, w.max(h) as f64);
        if max_o / min_o * size > max as f64 {
            size = (max as f64 * min_o / max_o).round_ties_even();
        }
    }
    let size = size as u32;
    if (w <= h && w == size) || (h <= w && h == size) {
        return (w, h);
    }
    if w < h {
        (size, (size as u64 * h as u64 / w as u64) as u32)
    } else {
        ((size as u64 * w as u64 / h as u64) as u32, size)
    }
}

/// Horizontal flip: `x1' = w - x2`, `x2' = w - x1`.
pub fn hflip(s: &mut Sample) {
    let (w, h) = (s.image.width as usize, s.image.height as usize);
    for row in s.image.data.chunks_exact_mut(w * 3).take(h) {
        let (mut i, mut j) = (0, w - 1);
        while i < j {
            for c in 0..3 {
                row.swap(i * 3 + c, j * 3 + c);
            }
            i += 1;
            j -= 1;
        }
    }
    let wf = w as f32;
    for b in &mut s.boxes {
        *b = [wf - b[2], b[1], wf - b[0], b[3]];
    }
}

/// Resizes to exactly (`ow`, `oh`); boxes scale by the width and height ratios.
pub fn resize(s: &mut Sample, ow: u32, oh: u32, resizer: &mut Resizer) {
    let (w, h) = (s.image.width, s.image.height);
    if (ow, oh) == (w, h) {
        return;
    }
    let src =
        ImageRef::new(w, h, &s.image.data, PixelType::U8x3).expect("RGB8 buffer matches its size");
    let mut dst = Image::new(ow, oh, PixelType::U8x3);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    resizer
        .resize(&src, &mut dst, &opts)
        .expect("same pixel type, non-empty sizes");
    s.image = Rgb8 {
        width: ow,
        height: oh,
        data: dst.into_vec(),
    };
    let (rw, rh) = (ow as f32 / w as f32, oh as f32 / h as f32);
    for b in &mut s.boxes {
        *b = [b[0] * rw, b[1] * rh, b[2] * rw, b[3] * rh];
    }
}

/// `RandomResize([size], max_size)` with the size already drawn.
pub fn resize_shorter(s: &mut Sample, size: u32, max_size: Option<u32>, resizer: &mut Resizer) {
    let (ow, oh) = size_with_aspect_ratio(s.image.width, s.image.height, size, max_size);
    resize(s, ow, oh, resizer);
}

/// Crops the region (`left`, `top`, `w`, `h`), clamped to the image: boxes shift, clip to the
/// region, and those left with no area are dropped (upstream `crop`).
pub fn crop(s: &mut Sample, left: u32, top: u32, w: u32, h: u32) {
    let (iw, ih) = (s.image.width, s.image.height);
    let (w, h) = (w.min(iw - left.min(iw)), h.min(ih - top.min(ih)));
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in top..top + h {
        let start = ((y * iw + left) * 3) as usize;
        data.extend_from_slice(&s.image.data[start..start + (w * 3) as usize]);
    }
    s.image = Rgb8 {
        width: w,
        height: h,
        data,
    };
    let (l, t, wf, hf) = (left as f32, top as f32, w as f32, h as f32);
    let mut keep_boxes = Vec::with_capacity(s.boxes.len());
    let mut keep_labels = Vec::with_capacity(s.labels.len());
    for (b, &label) in s.boxes.iter().zip(&s.labels) {
        let c = [
            (b[0] - l).clamp(0.0, wf),
            (b[1] - t).clamp(0.0, hf),
            (b[2] - l).clamp(0.0, wf),
            (b[3] - t).clamp(0.0, hf),
        ];
        if c[2] > c[0] && c[3] > c[1] {
            keep_boxes.push(c);
            keep_labels.push(label);
        }
    }
    s.boxes = keep_boxes;
    s.labels = keep_labels;
}

/// `RandomSizeCrop(min, max)`: w ~ U[min, min(img_w, max)], h likewise, random position
/// (`T.RandomCrop.get_params`). An image smaller than `min` is taken whole on that side.
pub fn random_size_crop(s: &mut Sample, min: u32, max: u32, rng: &mut Rng) {
    let (iw, ih) = (s.image.width, s.image.height);
    let draw = |rng: &mut Rng, side: u32| {
        let hi = side.min(max);
        let lo = min.min(hi);
        rng.range_inclusive(lo as u64, hi as u64) as u32
    };
    let w = draw(rng, iw);
    let h = draw(rng, ih);
    let top = rng.range_inclusive(0, (ih - h) as u64) as u32;
    let left = rng.range_inclusive(0, (iw - w) as u64) as u32;
    crop(s, left, top, w, h);
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len())]
}

/// The train transform (geometry only; normalization happens at collation).
pub fn train(s: &mut Sample, aug: &AugmentationConfig, rng: &mut Rng, resizer: &mut Resizer) {
    if rng.chance(aug.horizontal_flip_prob) {
        hflip(s);
    }
    if let Some(out) = aug.fixed_random_crop {
        large_scale_jitter(s, out, rng, resizer);
        return;
    }
    let max_size = Some(aug.random_resize_max_size);
    if rng.chance(0.5) {
        let size = pick(rng, &aug.scales);
        resize_shorter(s, size, max_size, resizer);
    } else {
        let size = pick(rng, &aug.train_random_resize);
        resize_shorter(s, size, None, resizer);
        random_size_crop(s, aug.train_random_crop_min, aug.train_random_crop_max, rng);
        let size = pick(rng, &aug.scales);
        resize_shorter(s, size, max_size, resizer);
    }
}

/// Large-scale jitter: scale the image to fit `out · s` (s ~ U[0.1, 2.0]) keeping its aspect,
/// then a random `out × out` crop where it is larger; collation pads to `out × out`.
pub fn large_scale_jitter(s: &mut Sample, out: u32, rng: &mut Rng, resizer: &mut Resizer) {
    let scale = rng.uniform(LSJ_SCALE.0, LSJ_SCALE.1);
    let target = out as f64 * scale;
    let (w, h) = (s.image.width as f64, s.image.height as f64);
    let ratio = (target / w).min(target / h);
    let (ow, oh) = (
        ((w * ratio).round() as u32).max(1),
        ((h * ratio).round() as u32).max(1),
    );
    resize(s, ow, oh, resizer);
    let (cw, ch) = (ow.min(out), oh.min(out));
    let left = rng.range_inclusive(0, (ow - cw) as u64) as u32;
    let top = rng.range_inclusive(0, (oh - ch) as u64) as u32;
    if (cw, ch) != (ow, oh) {
        crop(s, left, top, cw, ch);
    }
}

/// The val/test transform.
pub fn eval(s: &mut Sample, aug: &AugmentationConfig, resizer: &mut Resizer) {
    resize_shorter(s, aug.test_random_resize, Some(EVAL_MAX_SIZE), resizer);
}

/// Boxes as normalized (cx, cy, w, h) of the transformed image (upstream `Normalize`).
pub fn normalized_cxcywh(s: &Sample) -> Vec<[f32; 4]> {
    let (w, h) = (s.image.width as f32, s.image.height as f32);
    s.boxes
        .iter()
        .map(|b| {
            [
                (b[0] + b[2]) / 2.0 / w,
                (b[1] + b[3]) / 2.0 / h,
                (b[2] - b[0]) / w,
                (b[3] - b[1]) / h,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A black image with one white filled rectangle per box, so geometry can be read back
    /// from the pixels.
    fn painted(w: u32, h: u32, boxes: &[[u32; 4]]) -> Sample {
        let mut data = vec![0u8; (w * h * 3) as usize];
        for b in boxes {
            for y in b[1]..b[3] {
                for x in b[0]..b[2] {
                    let i = ((y * w + x) * 3) as usize;
                    data[i..i + 3].copy_from_slice(&[255, 255, 255]);
                }
            }
        }
        Sample {
            image: Rgb8 {
                width: w,
                height: h,
                data,
            },
            boxes: boxes
                .iter()
                .map(|b| [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32])
                .collect(),
            labels: (1..=boxes.len() as u32).collect(),
        }
    }

    /// The bounding box of pixels brighter than 127.
    fn bright_bbox(img: &Rgb8) -> Option<[f32; 4]> {
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for y in 0..img.height {
            for x in 0..img.width {
                if img.data[((y * img.width + x) * 3) as usize] > 127 {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
                }
            }
        }
        (x0 != u32::MAX).then_some([x0 as f32, y0 as f32, x1 as f32, y1 as f32])
    }

    fn close(a: [f32; 4], b: [f32; 4], tol: f32) -> bool {
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn size_with_aspect_ratio_matches_upstream() {
        // Values from datasets/transforms.py get_size_with_aspect_ratio (w, h order swapped to ours).
        assert_eq!(
            size_with_aspect_ratio(640, 480, 800, Some(1333)),
            (1066, 800)
        );
        assert_eq!(
            size_with_aspect_ratio(480, 640, 800, Some(1333)),
            (800, 1066)
        );
        assert_eq!(
            size_with_aspect_ratio(640, 480, 480, Some(1333)),
            (640, 480)
        );
        // 1000x200 at 800 would be 4000 long: the size shrinks to round(1333*200/1000) = 267.
        assert_eq!(
            size_with_aspect_ratio(1000, 200, 800, Some(1333)),
            (1335, 267)
        );
        assert_eq!(size_with_aspect_ratio(333, 500, 600, None), (600, 900));
        assert_eq!(size_with_aspect_ratio(128, 128, 112, Some(128)), (112, 112));
    }

    #[test]
    fn flip_moves_pixels_and_boxes_together() {
        let mut s = painted(40, 20, &[[2, 3, 10, 8]]);
        hflip(&mut s);
        assert_eq!(s.boxes[0], [30.0, 3.0, 38.0, 8.0]);
        assert_eq!(bright_bbox(&s.image), Some(s.boxes[0]));
        hflip(&mut s);
        assert_eq!(s, painted(40, 20, &[[2, 3, 10, 8]]));
    }

    #[test]
    fn resize_scales_boxes_with_the_pixels() {
        let mut s = painted(80, 60, &[[20, 10, 60, 40]]);
        let mut r = Resizer::new();
        resize_shorter(&mut s, 120, Some(1333), &mut r);
        assert_eq!((s.image.width, s.image.height), (160, 120));
        assert_eq!(s.boxes[0], [40.0, 20.0, 120.0, 80.0]);
        assert!(
            close(bright_bbox(&s.image).unwrap(), s.boxes[0], 1.0),
            "{:?}",
            bright_bbox(&s.image)
        );
    }

    #[test]
    fn crop_shifts_clips_and_drops_boxes() {
        let mut s = painted(50, 50, &[[5, 5, 15, 15], [30, 30, 45, 45], [0, 0, 50, 2]]);
        crop(&mut s, 10, 3, 30, 30);
        assert_eq!((s.image.width, s.image.height), (30, 30));
        assert_eq!(s.boxes, [[0.0, 2.0, 5.0, 12.0], [20.0, 27.0, 30.0, 30.0]]);
        assert_eq!(s.labels, [1, 2]); // the strip at y < 2 is cropped away
        let mut only = painted(50, 50, &[[5, 5, 15, 15]]);
        crop(&mut only, 10, 3, 30, 30);
        assert_eq!(bright_bbox(&only.image), Some(only.boxes[0]));
    }

    #[test]
    fn train_transform_keeps_boxes_on_their_pixels_over_many_seeds() {
        let aug = AugmentationConfig {
            scales: vec![96, 112, 128],
            train_random_resize: vec![80, 100],
            train_random_crop_min: 64,
            train_random_crop_max: 96,
            random_resize_max_size: 160,
            ..AugmentationConfig::default()
        };
        let mut r = Resizer::new();
        let (mut flipped, mut cropped) = (0, 0);
        for seed in 0..200 {
            let mut s = painted(120, 90, &[[30, 20, 70, 60]]);
            let mut rng = Rng::new(seed);
            train(&mut s, &aug, &mut rng, &mut r);
            let (w, h) = (s.image.width, s.image.height);
            assert_eq!(s.image.data.len(), (w * h * 3) as usize);
            assert!(
                aug.scales.contains(&w.min(h)) || w.max(h) <= aug.random_resize_max_size,
                "{w}x{h}"
            );
            assert!(w.max(h) <= aug.random_resize_max_size);
            match (s.boxes.first(), bright_bbox(&s.image)) {
                (Some(&b), Some(px)) => {
                    assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= w as f32 && b[3] <= h as f32);
                    // Resampling blurs edges by about a source pixel times the scale.
                    assert!(close(b, px, 2.5), "seed {seed}: box {b:?} pixels {px:?}");
                    flipped += (b[0] > w as f32 - b[2]) as u32;
                    let aspect = (b[2] - b[0]) / (b[3] - b[1]);
                    cropped += ((aspect - 1.0).abs() > 0.05) as u32;
                }
                (None, px) => assert!(px.is_none(), "seed {seed}: box dropped but pixels remain"),
                (Some(b), None) => panic!("seed {seed}: box {b:?} without pixels"),
            }
        }
        assert!(flipped > 50 && flipped < 150, "flip rate {flipped}/200");
        assert!(cropped > 10, "some crops cut the square object: {cropped}");
    }

    #[test]
    fn eval_transform_and_normalized_targets() {
        let mut s = painted(64, 48, &[[16, 12, 48, 36]]);
        let aug = AugmentationConfig {
            test_random_resize: 96,
            ..AugmentationConfig::default()
        };
        eval(&mut s, &aug, &mut Resizer::new());
        assert_eq!((s.image.width, s.image.height), (128, 96));
        assert_eq!(normalized_cxcywh(&s), [[0.5, 0.5, 0.5, 0.5]]);
    }

    #[test]
    fn large_scale_jitter_fits_the_fixed_square() {
        let mut r = Resizer::new();
        for seed in 0..50 {
            let mut s = painted(100, 60, &[[10, 10, 90, 50]]);
            large_scale_jitter(&mut s, 64, &mut Rng::new(seed), &mut r);
            assert!(s.image.width <= 64 && s.image.height <= 64);
            for b in &s.boxes {
                assert!(b[2] <= s.image.width as f32 && b[3] <= s.image.height as f32);
            }
        }
    }
}
