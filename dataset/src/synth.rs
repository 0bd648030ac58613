//! The synthetic shapes dataset (`ddetr dataset synth`): COCO-format JPEGs of filled shapes on
//! textured backgrounds, for the demo, the tests and the benchmarks.
//!
//! The first three classes are those of the convergence peer (`shared/peers/hf_shapes_convergence.py`):
//! rectangle, ellipse, triangle → category ids 1, 2, 3 (so `num_classes: 4`); `--classes` up to
//! [`SHAPES`]`.len()` adds diamond and cross. Objects overlap (a placement may cover at most half
//! of an earlier object's box) and are drawn from every COCO area range that fits the image
//! (small < 32², medium < 96², large ≥ 96²; at 128×128 large does not fit). Each image comes from
//! its own stream `(seed, image index)`, so the output is identical for a seed whatever the
//! thread count.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::{DatasetError, Result};
use crate::rng::Rng;

/// Shape classes in category-id order (id = index + 1).
pub const SHAPES: [&str; 5] = ["rectangle", "ellipse", "triangle", "diamond", "cross"];
/// The peer's class count.
pub const DEFAULT_CLASSES: usize = 3;
/// COCO's area-range bounds (pycocotools `areaRng`): small < 32², medium < 96², large above.
pub const COCO_SMALL_MAX: f64 = 32.0 * 32.0;
pub const COCO_MEDIUM_MAX: f64 = 96.0 * 96.0;
/// Smallest object side in pixels (the default of `--min-side`).
pub const MIN_SIDE: u32 = 6;
/// Largest object side as a fraction of the image side.
const MAX_SIDE_FRACTION: f64 = 0.6;
/// A new object may cover at most this fraction of an earlier object's box.
const MAX_COVER: f64 = 0.5;
/// Background texture: one random colour per this many pixels, bilinearly interpolated.
const TEXTURE_CELL: u32 = 8;
/// Amplitude of the per-pixel noise on backgrounds and shapes.
const PIXEL_NOISE: i32 = 10;
const JPEG_QUALITY: u8 = 90;

#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub images: usize,
    pub width: u32,
    pub height: u32,
    pub classes: usize,
    pub seed: u64,
    /// Also write `images.tar.gz` (entries `images/<file_name>`).
    pub tar: bool,
    /// Smallest object side in pixels (`--min-side`, default [`MIN_SIDE`]). Raising it removes
    /// the tiniest objects (areas below `min_side²`); above 32 the small COCO range is empty.
    pub min_side: u32,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            images: 16,
            width: 640,
            height: 480,
            classes: DEFAULT_CLASSES,
            seed: 0,
            tar: false,
            min_side: MIN_SIDE,
        }
    }
}

/// One drawn object: COCO `bbox` (x, y, w, h in pixels) and its category id (1-based).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthObject {
    pub bbox: [u32; 4],
    pub category_id: u32,
}

/// What `generate` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SynthSummary {
    pub images: usize,
    pub boxes: usize,
    /// Boxes per COCO area range: small, medium, large.
    pub per_area: [usize; 3],
    /// Boxes per class, in category-id order.
    pub per_class: Vec<usize>,
}

impl std::fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [s, m, l] = self.per_area;
        write!(
            f,
            "{} images, {} boxes (small {s}, medium {m}, large {l}; per class",
            self.images, self.boxes
        )?;
        for (name, n) in SHAPES.iter().zip(&self.per_class) {
            write!(f, " {name} {n}")?;
        }
        write!(f, ")")
    }
}

/// COCO area range index of an area: 0 small, 1 medium, 2 large.
pub fn area_range(area: f64) -> usize {
    if area < COCO_SMALL_MAX {
        0
    } else if area < COCO_MEDIUM_MAX {
        1
    } else {
        2
    }
}

impl SynthOptions {
    fn check(&self) -> Result<()> {
        if self.images == 0 {
            return Err(DatasetError::InvalidArgument(
                "--images must be at least 1".into(),
            ));
        }
        if !(1..=SHAPES.len()).contains(&self.classes) {
            return Err(DatasetError::InvalidArgument(format!(
                "--classes {} is out of range: the shapes set has 1 to {} classes ({})",
                self.classes,
                SHAPES.len(),
                SHAPES.join(", ")
            )));
        }
        if self.min_side == 0 {
            return Err(DatasetError::InvalidArgument(
                "--min-side must be at least 1 pixel".into(),
            ));
        }
        let min_image = (self.min_side as f64 / MAX_SIDE_FRACTION).ceil() as u32 * 2;
        if self.width < min_image
            || self.height < min_image
            || self.width > 8192
            || self.height > 8192
        {
            return Err(DatasetError::InvalidArgument(format!(
                "--size {}x{} is out of range for --min-side {}: each side must be between {min_image} and 8192",
                self.width, self.height, self.min_side
            )));
        }
        Ok(())
    }
}

/// Draws image `index` (0-based): RGB8 pixels, row-major, and its objects.
pub fn render(opts: &SynthOptions, index: usize) -> (Vec<u8>, Vec<SynthObject>) {
    let (w, h) = (opts.width, opts.height);
    let mut rng = Rng::derive(opts.seed, &[index as u64]);
    let mut pixels = background(&mut rng, w, h);
    let max_objects = if w.min(h) < 256 { 4 } else { 8 };
    let count = rng.range_inclusive(1, max_objects) as usize;
    let mut objects: Vec<SynthObject> = Vec::with_capacity(count);
    for _ in 0..count {
        let class = rng.below(opts.classes);
        let Some((bw, bh)) = object_size(&mut rng, w, h, opts.min_side) else {
            continue;
        };
        let mut placed = None;
        for _try in 0..20 {
            let x = rng.range_inclusive(0, (w - bw) as u64) as u32;
            let y = rng.range_inclusive(0, (h - bh) as u64) as u32;
            let cand = [x, y, bw, bh];
            if objects
                .iter()
                .all(|o| covered_fraction(&o.bbox, &cand) <= MAX_COVER)
            {
                placed = Some(cand);
                break;
            }
        }
        let Some(bbox) = placed else { continue };
        let colour = [
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
        ];
        draw(&mut pixels, w, &bbox, class, colour, &mut rng);
        objects.push(SynthObject {
            bbox,
            category_id: class as u32 + 1,
        });
    }
    (pixels, objects)
}

/// A size from a uniformly chosen feasible COCO area range, log-uniform area, aspect in [1/2, 2].
fn object_size(rng: &mut Rng, w: u32, h: u32, min_side: u32) -> Option<(u32, u32)> {
    let max_w = ((w as f64 * MAX_SIDE_FRACTION) as u32).max(min_side);
    let max_h = ((h as f64 * MAX_SIDE_FRACTION) as u32).max(min_side);
    let max_area = (max_w * max_h) as f64;
    let bounds = [
        (min_side as f64 * min_side as f64, COCO_SMALL_MAX),
        (COCO_SMALL_MAX, COCO_MEDIUM_MAX),
        (COCO_MEDIUM_MAX, f64::MAX),
    ];
    let feasible: Vec<(f64, f64)> = bounds
        .iter()
        .map(|&(lo, hi)| (lo, hi.min(max_area)))
        .filter(|&(lo, hi)| hi > lo * 1.2)
        .collect();
    if feasible.is_empty() {
        return None;
    }
    let (lo, hi) = feasible[rng.below(feasible.len())];
    for _ in 0..20 {
        let area = rng.uniform(lo.ln(), hi.ln()).exp();
        let aspect = rng.uniform(0.5f64.ln(), 2f64.ln()).exp();
        let bw = ((area * aspect).sqrt().round() as u32).clamp(min_side, max_w);
        let bh = ((area / aspect).sqrt().round() as u32).clamp(min_side, max_h);
        let a = (bw * bh) as f64;
        if a >= lo && a < hi.max(lo + 1.0) {
            return Some((bw, bh));
        }
    }
    None
}

/// Fraction of `old`'s box area that `new` covers.
fn covered_fraction(old: &[u32; 4], new: &[u32; 4]) -> f64 {
    let ix = (old[0] + old[2])
        .min(new[0] + new[2])
        .saturating_sub(old[0].max(new[0]));
    let iy = (old[1] + old[3])
        .min(new[1] + new[3])
        .saturating_sub(old[1].max(new[1]));
    (ix as f64 * iy as f64) / (old[2] as f64 * old[3] as f64)
}

/// Smooth random colour field (one colour per [`TEXTURE_CELL`] pixels, bilinear) plus pixel noise.
fn background(rng: &mut Rng, w: u32, h: u32) -> Vec<u8> {
    let gw = (w / TEXTURE_CELL + 2) as usize;
    let gh = (h / TEXTURE_CELL + 2) as usize;
    let grid: Vec<[f32; 3]> = (0..gw * gh)
        .map(|_| {
            [
                rng.f64() as f32 * 255.0,
                rng.f64() as f32 * 255.0,
                rng.f64() as f32 * 255.0,
            ]
        })
        .collect();
    let mut out = vec![0u8; (w * h * 3) as usize];
    let cell = TEXTURE_CELL as f32;
    for y in 0..h as usize {
        let gy = y as f32 / cell;
        let y0 = gy as usize;
        let fy = gy - y0 as f32;
        for x in 0..w as usize {
            let gx = x as f32 / cell;
            let x0 = gx as usize;
            let fx = gx - x0 as f32;
            let (a, b, c, d) = (
                grid[y0 * gw + x0],
                grid[y0 * gw + x0 + 1],
                grid[(y0 + 1) * gw + x0],
                grid[(y0 + 1) * gw + x0 + 1],
            );
            let noise = noise(rng);
            let px = &mut out[(y * w as usize + x) * 3..][..3];
            for ch in 0..3 {
                let top = a[ch] + (b[ch] - a[ch]) * fx;
                let bottom = c[ch] + (d[ch] - c[ch]) * fx;
                px[ch] = (top + (bottom - top) * fy + noise as f32).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

fn noise(rng: &mut Rng) -> i32 {
    rng.range_inclusive(0, 2 * PIXEL_NOISE as u64) as i32 - PIXEL_NOISE
}

/// Whether the point (u, v) of the unit box lies inside shape `class`.
fn inside(class: usize, u: f64, v: f64) -> bool {
    let (cu, cv) = (2.0 * u - 1.0, 2.0 * v - 1.0);
    match class {
        0 => true,
        1 => cu * cu + cv * cv <= 1.0,
        // Apex at the top centre, base along the bottom edge (the peer's polygon).
        2 => cu.abs() <= v,
        3 => cu.abs() + cv.abs() <= 1.0,
        _ => cu.abs() <= 1.0 / 3.0 || cv.abs() <= 1.0 / 3.0,
    }
}

fn draw(
    pixels: &mut [u8],
    width: u32,
    bbox: &[u32; 4],
    class: usize,
    colour: [u8; 3],
    rng: &mut Rng,
) {
    let [x0, y0, bw, bh] = *bbox;
    for y in y0..y0 + bh {
        let v = (y - y0) as f64 / (bh - 1).max(1) as f64;
        for x in x0..x0 + bw {
            let u = (x - x0) as f64 / (bw - 1).max(1) as f64;
            if inside(class, u, v) {
                let n = noise(rng) / 2;
                let px = &mut pixels[((y * width + x) * 3) as usize..][..3];
                for ch in 0..3 {
                    px[ch] = (colour[ch] as i32 + n).clamp(0, 255) as u8;
                }
            }
        }
    }
}

/// Encodes RGB8 pixels as a baseline JPEG.
pub fn encode_jpeg(pixels: &[u8], width: u32, height: u32, quality: u8) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(pixels.len() / 8);
    let encoder = jpeg_encoder::Encoder::new(&mut buf, quality);
    encoder
        .encode(
            pixels,
            width as u16,
            height as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .map_err(|e| DatasetError::InvalidArgument(format!("JPEG encoding failed: {e}")))?;
    Ok(buf)
}

#[derive(Serialize)]
struct CocoOut<'a> {
    images: Vec<ImageOut>,
    annotations: Vec<AnnOut>,
    categories: Vec<CategoryOut<'a>>,
}

#[derive(Serialize)]
struct ImageOut {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct AnnOut {
    id: u64,
    image_id: u64,
    category_id: u32,
    bbox: [u32; 4],
    area: u64,
    iscrowd: u8,
}

#[derive(Serialize)]
struct CategoryOut<'a> {
    id: u32,
    name: &'a str,
    supercategory: &'a str,
}

/// File name of image `index` (0-based); image ids are `index + 1`.
pub fn file_name(index: usize) -> String {
    format!("{:06}.jpg", index + 1)
}

/// Writes `out/images/*.jpg`, `out/annotations.json`, `out/label_map.txt` and, with `tar`,
/// `out/images.tar.gz`. Uses every available core; the bytes do not depend on the core count.
pub fn generate(out: &Path, opts: &SynthOptions) -> Result<SynthSummary> {
    opts.check()?;
    let image_dir = out.join("images");
    fs::create_dir_all(&image_dir).map_err(|e| DatasetError::io(&image_dir, e))?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(opts.images);
    type Drawn = Vec<(usize, Vec<SynthObject>)>;
    let per_thread: Vec<Result<Drawn>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let image_dir = &image_dir;
                s.spawn(move || {
                    let mut done = Vec::new();
                    for i in (t..opts.images).step_by(threads) {
                        let (pixels, objects) = render(opts, i);
                        let jpeg = encode_jpeg(&pixels, opts.width, opts.height, JPEG_QUALITY)?;
                        let path = image_dir.join(file_name(i));
                        fs::write(&path, jpeg).map_err(|e| DatasetError::io(&path, e))?;
                        done.push((i, objects));
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("synth worker panicked"))
            .collect()
    });
    let mut all = Vec::with_capacity(opts.images);
    for part in per_thread {
        all.extend(part?);
    }
    all.sort_by_key(|(i, _)| *i);

    let mut summary = SynthSummary {
        images: opts.images,
        per_class: vec![0; opts.classes],
        ..Default::default()
    };
    let mut coco = CocoOut {
        images: Vec::with_capacity(opts.images),
        annotations: Vec::new(),
        categories: (0..opts.classes)
            .map(|c| CategoryOut {
                id: c as u32 + 1,
                name: SHAPES[c],
                supercategory: "shape",
            })
            .collect(),
    };
    for (i, objects) in &all {
        coco.images.push(ImageOut {
            id: *i as u64 + 1,
            file_name: file_name(*i),
            width: opts.width,
            height: opts.height,
        });
        for o in objects {
            let area = o.bbox[2] as u64 * o.bbox[3] as u64;
            summary.boxes += 1;
            summary.per_area[area_range(area as f64)] += 1;
            summary.per_class[o.category_id as usize - 1] += 1;
            coco.annotations.push(AnnOut {
                id: coco.annotations.len() as u64 + 1,
                image_id: *i as u64 + 1,
                category_id: o.category_id,
                bbox: o.bbox,
                area,
                iscrowd: 0,
            });
        }
    }
    let json_path = out.join("annotations.json");
    let json = serde_json::to_vec(&coco).expect("COCO output always serializes");
    fs::write(&json_path, json).map_err(|e| DatasetError::io(&json_path, e))?;
    let label_path = out.join("label_map.txt");
    let labels: String = SHAPES[..opts.classes]
        .iter()
        .map(|n| format!("{n}\n"))
        .collect();
    fs::write(&label_path, labels).map_err(|e| DatasetError::io(&label_path, e))?;
    if opts.tar {
        write_tar_gz(&image_dir, &out.join("images.tar.gz"), opts.images)?;
    }
    tracing::debug!(out = %out.display(), "synthetic dataset: {summary}");
    Ok(summary)
}

/// `images.tar.gz` with entries `images/<file_name>` in id order; fixed metadata (mtime 0,
/// mode 0644, uid/gid 0) so the archive is reproducible.
fn write_tar_gz(image_dir: &Path, tar_path: &Path, images: usize) -> Result<()> {
    let file = fs::File::create(tar_path).map_err(|e| DatasetError::io(tar_path, e))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for i in 0..images {
        let name = file_name(i);
        let path = image_dir.join(&name);
        let data = fs::read(&path).map_err(|e| DatasetError::io(&path, e))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, format!("images/{name}"), data.as_slice())
            .map_err(|e| DatasetError::io(tar_path, e))?;
    }
    let gz = builder
        .into_inner()
        .map_err(|e| DatasetError::io(tar_path, e))?;
    let mut w = gz.finish().map_err(|e| DatasetError::io(tar_path, e))?;
    w.flush().map_err(|e| DatasetError::io(tar_path, e))?;
    w.into_inner()
        .map_err(|e| DatasetError::io(tar_path, e.into_error()))?
        .sync_all()
        .map_err(|e| DatasetError::io(tar_path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(w: u32, h: u32, n: usize, seed: u64) -> SynthOptions {
        SynthOptions {
            images: n,
            width: w,
            height: h,
            classes: 3,
            seed,
            tar: false,
            min_side: MIN_SIDE,
        }
    }

    #[test]
    fn render_is_deterministic_per_seed_and_differs_across_seeds() {
        let o = opts(128, 128, 4, 5);
        assert_eq!(render(&o, 2), render(&o, 2));
        assert_ne!(render(&o, 2).0, render(&opts(128, 128, 4, 6), 2).0);
        assert_ne!(render(&o, 2).0, render(&o, 3).0);
    }

    #[test]
    fn objects_lie_inside_the_image_and_are_not_hidden() {
        for i in 0..200 {
            let o = opts(160, 120, 200, 1);
            let (_, objs) = render(&o, i);
            assert!(!objs.is_empty());
            for (k, a) in objs.iter().enumerate() {
                assert!(
                    a.bbox[0] + a.bbox[2] <= 160 && a.bbox[1] + a.bbox[3] <= 120,
                    "{a:?}"
                );
                assert!(a.bbox[2] >= MIN_SIDE && a.bbox[3] >= MIN_SIDE);
                assert!((1..=3).contains(&a.category_id));
                for b in &objs[k + 1..] {
                    assert!(covered_fraction(&a.bbox, &b.bbox) <= MAX_COVER);
                }
            }
        }
    }

    #[test]
    fn min_side_bounds_every_object_and_keeps_small_and_medium() {
        let o = SynthOptions {
            min_side: 16,
            ..opts(128, 128, 100, 4)
        };
        let mut per_area = [0; 3];
        let mut smallest = u32::MAX;
        for i in 0..100 {
            for a in render(&o, i).1 {
                smallest = smallest.min(a.bbox[2].min(a.bbox[3]));
                per_area[area_range((a.bbox[2] * a.bbox[3]) as f64)] += 1;
            }
        }
        assert!(smallest >= 16, "{smallest}");
        assert!(per_area[0] > 20 && per_area[1] > 20, "{per_area:?}");
        // The default draws sides below 16 at this size.
        let tiny = (0..100)
            .flat_map(|i| render(&opts(128, 128, 100, 4), i).1)
            .filter(|a| a.bbox[2].min(a.bbox[3]) < 16)
            .count();
        assert!(tiny > 20, "{tiny}");
        let zero = SynthOptions {
            min_side: 0,
            ..opts(128, 128, 1, 4)
        };
        assert!(zero.check().is_err());
        let too_big = SynthOptions {
            min_side: 60,
            ..opts(128, 128, 1, 4)
        };
        assert!(too_big.check().is_err());
    }

    #[test]
    fn all_area_ranges_classes_and_some_overlaps_appear_at_640x480() {
        let o = SynthOptions {
            classes: 5,
            ..opts(640, 480, 60, 3)
        };
        let mut per_area = [0; 3];
        let mut per_class = [0; 5];
        let mut overlaps = 0;
        for i in 0..60 {
            let (_, objs) = render(&o, i);
            for (k, a) in objs.iter().enumerate() {
                per_area[area_range((a.bbox[2] * a.bbox[3]) as f64)] += 1;
                per_class[a.category_id as usize - 1] += 1;
                overlaps += objs[k + 1..]
                    .iter()
                    .filter(|b| covered_fraction(&a.bbox, &b.bbox) > 0.0)
                    .count();
            }
        }
        assert!(per_area.iter().all(|&n| n > 10), "{per_area:?}");
        assert!(per_class.iter().all(|&n| n > 5), "{per_class:?}");
        assert!(overlaps > 5, "{overlaps}");
    }

    #[test]
    fn shapes_fill_their_boxes_differently() {
        // The fraction of the unit box each shape covers: 1, π/4, 1/2, 1/2, 5/9.
        let expect = [1.0, std::f64::consts::FRAC_PI_4, 0.5, 0.5, 5.0 / 9.0];
        for (class, want) in expect.iter().enumerate() {
            let n = 300;
            let inside_count = (0..n * n)
                .filter(|k| {
                    inside(
                        class,
                        (k % n) as f64 / n as f64 + 0.5 / n as f64,
                        (k / n) as f64 / n as f64 + 0.5 / n as f64,
                    )
                })
                .count();
            let got = inside_count as f64 / (n * n) as f64;
            assert!((got - want).abs() < 0.01, "class {class}: {got} vs {want}");
        }
    }

    #[test]
    fn generate_writes_coco_json_labels_jpegs_and_tar() {
        let dir = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            tar: true,
            ..opts(128, 96, 6, 9)
        };
        let summary = generate(dir.path(), &o).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("annotations.json")).unwrap())
                .unwrap();
        assert_eq!(json["images"].as_array().unwrap().len(), 6);
        assert_eq!(json["annotations"].as_array().unwrap().len(), summary.boxes);
        let cats: Vec<u64> = json["categories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_u64().unwrap())
            .collect();
        assert_eq!(cats, [1, 2, 3]);
        assert_eq!(
            fs::read_to_string(dir.path().join("label_map.txt")).unwrap(),
            "rectangle\nellipse\ntriangle\n"
        );
        let jpeg = fs::read(dir.path().join("images/000001.jpg")).unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        // Same bytes again from the same seed (determinism end to end, archive included).
        let dir2 = tempfile::tempdir().unwrap();
        generate(dir2.path(), &o).unwrap();
        for f in ["annotations.json", "images/000006.jpg", "images.tar.gz"] {
            assert_eq!(
                fs::read(dir.path().join(f)).unwrap(),
                fs::read(dir2.path().join(f)).unwrap(),
                "{f}"
            );
        }
    }

    #[test]
    fn bad_options_are_rejected_with_the_valid_range() {
        let e = SynthOptions {
            classes: 9,
            ..opts(64, 64, 1, 0)
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(e.contains("1 to 5 classes"), "{e}");
        assert!(opts(8, 64, 1, 0).check().is_err());
        assert!(opts(64, 64, 0, 0).check().is_err());
    }
}
