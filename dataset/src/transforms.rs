//! The official Deformable-DETR / TAO image+box transforms (`datasets/transforms.py`), on RGB8
//! images (pixels stay u8 until collation normalizes the whole batch in one libtorch op).
//!
//! Train: `RandomHorizontalFlip(p)` → `RandomSelect(0.5)` between
//! (a) `RandomResize(scales, max_size)` and
//! (b) `RandomResize(train_random_resize)` → `RandomSizeCrop(crop_min, crop_max)` →
//! `RandomResize(scales, max_size)`; with `fixed_random_crop` set, large-scale jitter to that square
//! size replaces the resize/crop. Val/test: `RandomResize([test_random_resize], 1333)`.
//! Boxes follow every step (pixel xyxy); boxes cropped to nothing are dropped. Resizing is
//! PIL's `BILINEAR` (antialiased when shrinking): fast_image_resize's convolution, except that a
//! horizontal stretch (the common case: the TAO scales upsample most sources) on a CPU with AVX2
//! runs its two-tap horizontal pass in `upsample.rs` and only the vertical pass in
//! fast_image_resize.

/// The SIMD resizer the transforms take (it keeps scratch buffers; reuse one per thread).
pub use fast_image_resize::Resizer;
use fast_image_resize::{
    images::Image, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions,
};

use crate::config::AugmentationConfig;
use crate::image::Rgb8;
use crate::rng::Rng;
use crate::upsample;

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
    /// The pixels still owe a horizontal mirror: the fused path ([`apply_fused`]) leaves the
    /// flip to collation, which lays each row out right to left. Boxes are always final.
    pub mirrored: bool,
}

impl Sample {
    pub fn new(image: Rgb8, boxes: Vec<[f32; 4]>, labels: Vec<u32>) -> Self {
        Self {
            image,
            boxes,
            labels,
            mirrored: false,
        }
    }
}

/// One geometric step of a transform. A transform is drawn as a list of these (all random draws
/// depend only on image sizes), then applied to the boxes and, by one of two executors, to the
/// pixels: [`apply_reference`] performs every step on the pixels in order; [`apply_fused`]
/// resamples only the region a following crop keeps and defers flips to collation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Mirror left-right.
    Flip,
    /// Resample to exactly `width` × `height` (never the current size).
    Resize { width: u32, height: u32 },
    /// Keep the region at (`left`, `top`) of `width` × `height`, inside the image.
    Crop {
        left: u32,
        top: u32,
        width: u32,
        height: u32,
    },
}

/// Draws a transform: tracks the current size and records the steps.
struct Planner {
    width: u32,
    height: u32,
    ops: Vec<Op>,
}

impl Planner {
    fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            ops: Vec::with_capacity(4),
        }
    }

    fn flip(&mut self) {
        self.ops.push(Op::Flip);
    }

    fn resize(&mut self, width: u32, height: u32) {
        if (width, height) != (self.width, self.height) {
            self.ops.push(Op::Resize { width, height });
            (self.width, self.height) = (width, height);
        }
    }

    fn resize_shorter(&mut self, size: u32, max_size: Option<u32>) {
        let (w, h) = size_with_aspect_ratio(self.width, self.height, size, max_size);
        self.resize(w, h);
    }

    /// Clamped to the image as upstream's `crop` (a slice) is.
    fn crop(&mut self, left: u32, top: u32, width: u32, height: u32) {
        let (iw, ih) = (self.width, self.height);
        let (left, top) = (left.min(iw), top.min(ih));
        let (width, height) = (width.min(iw - left), height.min(ih - top));
        self.ops.push(Op::Crop {
            left,
            top,
            width,
            height,
        });
        (self.width, self.height) = (width, height);
    }

    /// `RandomSizeCrop(min, max)`: w ~ U[min, min(img_w, max)], h likewise, random position
    /// (`T.RandomCrop.get_params`). An image smaller than `min` is taken whole on that side.
    fn random_size_crop(&mut self, min: u32, max: u32, rng: &mut Rng) {
        let (iw, ih) = (self.width, self.height);
        let draw = |rng: &mut Rng, side: u32| {
            let hi = side.min(max);
            let lo = min.min(hi);
            rng.range_inclusive(lo as u64, hi as u64) as u32
        };
        let w = draw(rng, iw);
        let h = draw(rng, ih);
        let top = rng.range_inclusive(0, (ih - h) as u64) as u32;
        let left = rng.range_inclusive(0, (iw - w) as u64) as u32;
        self.crop(left, top, w, h);
    }

    /// Large-scale jitter: scale the image to fit `out · s` (s ~ U[0.1, 2.0]) keeping its
    /// aspect, then a random `out × out` crop where it is larger; collation pads to `out × out`.
    fn large_scale_jitter(&mut self, out: u32, rng: &mut Rng) {
        let scale = rng.uniform(LSJ_SCALE.0, LSJ_SCALE.1);
        let target = out as f64 * scale;
        let (w, h) = (self.width as f64, self.height as f64);
        let ratio = (target / w).min(target / h);
        let (ow, oh) = (
            ((w * ratio).round() as u32).max(1),
            ((h * ratio).round() as u32).max(1),
        );
        self.resize(ow, oh);
        let (cw, ch) = (ow.min(out), oh.min(out));
        let left = rng.range_inclusive(0, (ow - cw) as u64) as u32;
        let top = rng.range_inclusive(0, (oh - ch) as u64) as u32;
        if (cw, ch) != (ow, oh) {
            self.crop(left, top, cw, ch);
        }
    }
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

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len())]
}

/// The train transform's steps for a `width` × `height` image (geometry only; normalization
/// happens on the batch).
pub fn train_ops(width: u32, height: u32, aug: &AugmentationConfig, rng: &mut Rng) -> Vec<Op> {
    let mut p = Planner::new(width, height);
    if rng.chance(aug.horizontal_flip_prob) {
        p.flip();
    }
    if let Some(out) = aug.fixed_random_crop {
        p.large_scale_jitter(out, rng);
        return p.ops;
    }
    let max_size = Some(aug.random_resize_max_size);
    if rng.chance(0.5) {
        let size = pick(rng, &aug.scales);
        p.resize_shorter(size, max_size);
    } else {
        let size = pick(rng, &aug.train_random_resize);
        p.resize_shorter(size, None);
        p.random_size_crop(aug.train_random_crop_min, aug.train_random_crop_max, rng);
        let size = pick(rng, &aug.scales);
        p.resize_shorter(size, max_size);
    }
    p.ops
}

/// The val/test transform's steps.
pub fn eval_ops(width: u32, height: u32, aug: &AugmentationConfig) -> Vec<Op> {
    let mut p = Planner::new(width, height);
    p.resize_shorter(aug.test_random_resize, Some(EVAL_MAX_SIZE));
    p.ops
}

/// Moves the boxes of a `width` × `height` image through `ops` (pixel xyxy): flips mirror
/// them, resizes scale them by the width and height ratios, crops shift and clip them and drop
/// those left with no area (upstream `crop`), with their labels.
pub fn apply_to_boxes(
    ops: &[Op],
    width: u32,
    height: u32,
    boxes: &mut Vec<[f32; 4]>,
    labels: &mut Vec<u32>,
) {
    let (mut w, mut h) = (width, height);
    for &op in ops {
        match op {
            Op::Flip => {
                let wf = w as f32;
                for b in boxes.iter_mut() {
                    *b = [wf - b[2], b[1], wf - b[0], b[3]];
                }
            }
            Op::Resize { width, height } => {
                let (rw, rh) = (width as f32 / w as f32, height as f32 / h as f32);
                for b in boxes.iter_mut() {
                    *b = [b[0] * rw, b[1] * rh, b[2] * rw, b[3] * rh];
                }
                (w, h) = (width, height);
            }
            Op::Crop {
                left,
                top,
                width,
                height,
            } => {
                let (l, t, wf, hf) = (left as f32, top as f32, width as f32, height as f32);
                let mut keep = 0;
                for k in 0..boxes.len() {
                    let b = boxes[k];
                    let c = [
                        (b[0] - l).clamp(0.0, wf),
                        (b[1] - t).clamp(0.0, hf),
                        (b[2] - l).clamp(0.0, wf),
                        (b[3] - t).clamp(0.0, hf),
                    ];
                    if c[2] > c[0] && c[3] > c[1] {
                        boxes[keep] = c;
                        labels[keep] = labels[k];
                        keep += 1;
                    }
                }
                boxes.truncate(keep);
                labels.truncate(keep);
                (w, h) = (width, height);
            }
        }
    }
}

/// Mirrors RGB8 pixels left-right in place.
fn flip_pixels(img: &mut Rgb8) {
    let w = img.width as usize;
    for row in img.data.chunks_exact_mut(w * 3) {
        let (mut i, mut j) = (0, w.saturating_sub(1));
        while i < j {
            for c in 0..3 {
                row.swap(i * 3 + c, j * 3 + c);
            }
            i += 1;
            j -= 1;
        }
    }
}

/// The region (`left`, `top`, `width`, `height`) of `img`, copied row by row.
fn crop_pixels(img: &Rgb8, left: u32, top: u32, width: u32, height: u32) -> Rgb8 {
    let iw = img.width as usize;
    let (l, t, w, h) = (left as usize, top as usize, width as usize, height as usize);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in t..t + h {
        let start = (y * iw + l) * 3;
        data.extend_from_slice(&img.data[start..start + w * 3]);
    }
    Rgb8 {
        width,
        height,
        data,
    }
}

/// Resamples the window (`left`, `top`, `width`, `height`) of `img`, in source pixels, to
/// `out_w` × `out_h` with PIL's bilinear convolution (antialiased when shrinking). The filter
/// reads source pixels outside the window as the full-image resize would, so the result is
/// that window of the full resize. Stretching horizontally on a CPU with AVX2 takes the two-tap
/// fast path of [`upsample`](crate::upsample) (within one level of [`resample_convolution`]).
fn resample(img: &Rgb8, window: [f64; 4], out_w: u32, out_h: u32, resizer: &mut Resizer) -> Rgb8 {
    if window[2] <= out_w as f64 && upsample::available() {
        upsample::resample(img, window, out_w, out_h, resizer)
    } else {
        resample_convolution(img, window, out_w, out_h, resizer)
    }
}

/// [`resample`] by fast_image_resize alone.
pub(crate) fn resample_convolution(
    img: &Rgb8,
    window: [f64; 4],
    out_w: u32,
    out_h: u32,
    resizer: &mut Resizer,
) -> Rgb8 {
    let src = ImageRef::new(img.width, img.height, &img.data, PixelType::U8x3)
        .expect("RGB8 buffer matches its size");
    let mut dst = Image::new(out_w, out_h, PixelType::U8x3);
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(window[0], window[1], window[2], window[3]);
    resizer
        .resize(&src, &mut dst, &opts)
        .expect("same pixel type, non-empty sizes, window inside the image");
    Rgb8 {
        width: out_w,
        height: out_h,
        data: dst.into_vec(),
    }
}

/// Performs `op` on the pixels and the boxes.
fn apply_op(s: &mut Sample, op: Op, resizer: &mut Resizer) {
    let (w, h) = (s.image.width, s.image.height);
    apply_to_boxes(&[op], w, h, &mut s.boxes, &mut s.labels);
    match op {
        Op::Flip => flip_pixels(&mut s.image),
        Op::Resize { width, height } => {
            s.image = resample(
                &s.image,
                [0.0, 0.0, w as f64, h as f64],
                width,
                height,
                resizer,
            )
        }
        Op::Crop {
            left,
            top,
            width,
            height,
        } => s.image = crop_pixels(&s.image, left, top, width, height),
    }
}

/// The reference executor: every step on the pixels, in order (a sample already `mirrored` is
/// mirrored for real first).
pub fn apply_reference(s: &mut Sample, ops: &[Op], resizer: &mut Resizer) {
    if s.mirrored {
        flip_pixels(&mut s.image);
        s.mirrored = false;
    }
    for &op in ops {
        apply_op(s, op, resizer);
    }
}

/// The fast executor, equal to [`apply_reference`] up to resampling round-off: a resize
/// followed by a crop resamples only the kept region, and flips are not done on the pixels but
/// recorded in [`Sample::mirrored`] for collation to lay the rows out right to left (mirroring
/// commutes with resampling; later crops are mirrored to match). Boxes are final.
pub fn apply_fused(s: &mut Sample, ops: &[Op], resizer: &mut Resizer) {
    apply_to_boxes(
        ops,
        s.image.width,
        s.image.height,
        &mut s.boxes,
        &mut s.labels,
    );
    let mut i = 0;
    while i < ops.len() {
        match ops[i] {
            Op::Flip => s.mirrored = !s.mirrored,
            Op::Resize { width, height } => {
                let (sx, sy) = (
                    s.image.width as f64 / width as f64,
                    s.image.height as f64 / height as f64,
                );
                let (window, out) = match ops.get(i + 1) {
                    Some(&Op::Crop {
                        left,
                        top,
                        width: cw,
                        height: ch,
                    }) => {
                        i += 1;
                        let left = if s.mirrored { width - left - cw } else { left };
                        let (l, t) = (left as f64 * sx, top as f64 * sy);
                        // A window reaching the far edge may overshoot it by round-off.
                        let (iw, ih) = (s.image.width as f64, s.image.height as f64);
                        (
                            [
                                l,
                                t,
                                (cw as f64 * sx).min(iw - l),
                                (ch as f64 * sy).min(ih - t),
                            ],
                            (cw, ch),
                        )
                    }
                    _ => (
                        [0.0, 0.0, s.image.width as f64, s.image.height as f64],
                        (width, height),
                    ),
                };
                s.image = resample(&s.image, window, out.0, out.1, resizer);
            }
            Op::Crop {
                left,
                top,
                width,
                height,
            } => {
                let left = if s.mirrored {
                    s.image.width - left - width
                } else {
                    left
                };
                s.image = crop_pixels(&s.image, left, top, width, height);
            }
        }
        i += 1;
    }
}

/// Horizontal flip: `x1' = w - x2`, `x2' = w - x1`.
pub fn hflip(s: &mut Sample) {
    apply_reference(s, &[Op::Flip], &mut Resizer::new());
}

/// Resizes to exactly (`ow`, `oh`); boxes scale by the width and height ratios.
pub fn resize(s: &mut Sample, ow: u32, oh: u32, resizer: &mut Resizer) {
    let mut p = Planner::new(s.image.width, s.image.height);
    p.resize(ow, oh);
    apply_reference(s, &p.ops, resizer);
}

/// `RandomResize([size], max_size)` with the size already drawn.
pub fn resize_shorter(s: &mut Sample, size: u32, max_size: Option<u32>, resizer: &mut Resizer) {
    let mut p = Planner::new(s.image.width, s.image.height);
    p.resize_shorter(size, max_size);
    apply_reference(s, &p.ops, resizer);
}

/// Crops the region (`left`, `top`, `w`, `h`), clamped to the image: boxes shift, clip to the
/// region, and those left with no area are dropped (upstream `crop`).
pub fn crop(s: &mut Sample, left: u32, top: u32, w: u32, h: u32) {
    let mut p = Planner::new(s.image.width, s.image.height);
    p.crop(left, top, w, h);
    apply_reference(s, &p.ops, &mut Resizer::new());
}

/// `RandomSizeCrop(min, max)` on a sample.
pub fn random_size_crop(s: &mut Sample, min: u32, max: u32, rng: &mut Rng) {
    let mut p = Planner::new(s.image.width, s.image.height);
    p.random_size_crop(min, max, rng);
    apply_reference(s, &p.ops, &mut Resizer::new());
}

/// The train transform on a sample, every step on the pixels in order (the reference; the
/// loader runs the same steps through [`apply_fused`]).
pub fn train(s: &mut Sample, aug: &AugmentationConfig, rng: &mut Rng, resizer: &mut Resizer) {
    let ops = train_ops(s.image.width, s.image.height, aug, rng);
    apply_reference(s, &ops, resizer);
}

/// Large-scale jitter to the `out` square on a sample (see `fixed_random_crop`).
pub fn large_scale_jitter(s: &mut Sample, out: u32, rng: &mut Rng, resizer: &mut Resizer) {
    let mut p = Planner::new(s.image.width, s.image.height);
    p.large_scale_jitter(out, rng);
    apply_reference(s, &p.ops, resizer);
}

/// The val/test transform on a sample.
pub fn eval(s: &mut Sample, aug: &AugmentationConfig, resizer: &mut Resizer) {
    let ops = eval_ops(s.image.width, s.image.height, aug);
    apply_reference(s, &ops, resizer);
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
            mirrored: false,
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

    /// A smooth random image (so resampling keeps detail) with two boxes.
    fn textured(w: u32, h: u32, seed: u64) -> Sample {
        let mut rng = Rng::new(seed);
        let (fx, fy) = (rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3));
        let data = (0..w * h)
            .flat_map(|i| {
                let (x, y) = ((i % w) as f64, (i / w) as f64);
                let v =
                    |p: f64| ((x * fx + y * fy + p).sin() * 120.0 + 128.0 + (x * 7.0 % 11.0)) as u8;
                [v(0.0), v(2.0), v(4.0)]
            })
            .collect();
        Sample::new(
            Rgb8 {
                width: w,
                height: h,
                data,
            },
            vec![[5.0, 6.0, 50.0, 40.0], [60.0, 30.0, 110.0, 85.0]],
            vec![1, 2],
        )
    }

    /// Resampling a window of the image instead of all of it, and mirroring after resampling
    /// instead of before, change only the round-off of fast_image_resize's fixed-point passes
    /// (horizontal, then vertical): a value moves by at most 2 u8 levels, rarely by one.
    #[test]
    fn fused_executor_matches_the_reference_within_two_levels() {
        let plain = AugmentationConfig {
            scales: vec![96, 112, 150],
            train_random_resize: vec![80, 100],
            train_random_crop_min: 50,
            train_random_crop_max: 96,
            random_resize_max_size: 200,
            ..AugmentationConfig::default()
        };
        let lsj = AugmentationConfig {
            fixed_random_crop: Some(100),
            ..plain.clone()
        };
        let mut r = Resizer::new();
        let (mut mirrored, mut windowed, mut off, mut total, mut two) =
            (0, 0, 0usize, 0usize, 0usize);
        for aug in [&plain, &lsj] {
            for seed in 0..60 {
                let ops = train_ops(120, 90, aug, &mut Rng::new(seed));
                windowed += ops
                    .windows(2)
                    .any(|w| matches!(w, [Op::Resize { .. }, Op::Crop { .. }]))
                    as u32;
                let mut want = textured(120, 90, seed);
                apply_reference(&mut want, &ops, &mut r);
                let mut got = textured(120, 90, seed);
                apply_fused(&mut got, &ops, &mut r);
                assert_eq!(
                    (got.boxes.clone(), got.labels.clone()),
                    (want.boxes.clone(), want.labels.clone())
                );
                if got.mirrored {
                    mirrored += 1;
                    got.mirrored = false;
                    flip_pixels(&mut got.image);
                }
                assert_eq!(
                    (got.image.width, got.image.height),
                    (want.image.width, want.image.height)
                );
                for (a, b) in got.image.data.iter().zip(&want.image.data) {
                    assert!(a.abs_diff(*b) <= 2, "seed {seed} {ops:?}: {a} vs {b}");
                    off += (a != b) as usize;
                    two += (a.abs_diff(*b) == 2) as usize;
                }
                total += got.image.data.len();
            }
        }
        assert!(
            mirrored > 30 && windowed > 30,
            "{mirrored} mirrored, {windowed} windowed"
        );
        // Measured: 0.4% of values differ, none by two (fast_image_resize alone, before the
        // two-tap horizontal pass: 0.7%, 53 of 4.4 M by two).
        assert!(off * 50 < total, "{off} of {total} values differ");
        assert!(
            two * 10_000 < total,
            "{two} of {total} values differ by two"
        );
    }

    #[test]
    fn windows_reaching_the_far_edges_stay_inside_the_image() {
        let mut r = Resizer::new();
        for (w, h) in [(640u32, 480u32), (97, 61), (333, 500), (1242, 375)] {
            for size in [400u32, 500, 533, 600, 71] {
                let (rw, rh) = size_with_aspect_ratio(w, h, size, None);
                let (cw, ch) = (rw.clamp(1, 384) - rw.min(384) / 3, rh.min(384) / 2 + 1);
                let ops = [
                    Op::Resize {
                        width: rw,
                        height: rh,
                    },
                    Op::Crop {
                        left: rw - cw,
                        top: rh - ch,
                        width: cw,
                        height: ch,
                    },
                ];
                for flip in [false, true] {
                    let mut s = textured(w, h, size as u64);
                    let mut want = s.clone();
                    let ops: Vec<Op> = flip.then_some(Op::Flip).into_iter().chain(ops).collect();
                    apply_fused(&mut s, &ops, &mut r);
                    apply_reference(&mut want, &ops, &mut r);
                    if s.mirrored {
                        flip_pixels(&mut s.image);
                    }
                    assert_eq!((s.image.width, s.image.height), (cw, ch));
                    let max = s
                        .image
                        .data
                        .iter()
                        .zip(&want.image.data)
                        .map(|(a, b)| a.abs_diff(*b))
                        .max();
                    assert!(max <= Some(2), "{w}x{h} {ops:?}: {max:?}");
                }
            }
        }
    }
}
