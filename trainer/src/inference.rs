//! `ddetr inference`: TAO's deformable_detr inference task (`model/post_process.py`
//! `save_inference_prediction`). Every `.jpg`/`.jpeg`/`.png` of
//! `dataset.infer_data_sources.image_dir` goes through the val transform and the model; the
//! detections scoring at least `inference.conf_threshold` are written, as TAO lays them out, to
//! `<inference results_dir>/labels/<stem>.txt` (KITTI: `class 0.00 0 0.00 x1 y1 x2 y2 0.00 … score`)
//! and drawn on the original image, saved as `<inference results_dir>/images_annotated/<name>`
//! (boxes `inference.outline_width` pixels wide in the class's `inference.color_map` colour, with a
//! `class: score` label on a filled pad above each box).
//!
//! Class names come from the classmap (line `i` names category id `i + 1`, TAO's
//! `start_from_one`); detections of a category id without a name (the background id 0) are
//! skipped, as TAO does. Two deliberate differences: boxes are clipped to the image (TAO writes
//! them unclipped, so KITTI readers can get negative coordinates), and a class missing from
//! `color_map` is drawn in a default palette colour (TAO leaves it undrawn).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use ddetr_dataset::eval_batches::{eval_size, group_by_size};
use ddetr_dataset::image::{decode_rgb8, probe, Rgb8};
use ddetr_dataset::loader::{collate, LoaderMode, Meta};
use ddetr_dataset::transforms::{self, Sample};
use ddetr_dataset::{AugmentationConfig, EvalPadding};
use fast_image_resize::Resizer;
use image::RgbImage;
use tch::Device;

use crate::detector::{build_model, DeformableDetrDetector, Detector, DinoDetector};
use crate::device::pick_device;
use crate::input_sizes::InputSizes;
use crate::spec::{Architecture, ExperimentSpec, Task};
use crate::TrainerError;

/// Image extensions inference reads (TAO's `VALID_IMAGE_EXTENSIONS` that the decoders handle),
/// compared case-insensitively.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];
/// Height of the label text in pixels (PIL's default bitmap font is about 11 px).
const LABEL_PX: f32 = 12.0;
/// Boxes of classes absent from `color_map` cycle through these (matplotlib's tab10).
const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];
/// Colour names `color_map` accepts (CSS/PIL values); `#rrggbb` and `#rgb` work too.
const NAMED_COLOURS: [(&str, [u8; 3]); 30] = [
    ("black", [0, 0, 0]),
    ("white", [255, 255, 255]),
    ("red", [255, 0, 0]),
    ("green", [0, 128, 0]),
    ("lime", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("cyan", [0, 255, 255]),
    ("aqua", [0, 255, 255]),
    ("magenta", [255, 0, 255]),
    ("fuchsia", [255, 0, 255]),
    ("orange", [255, 165, 0]),
    ("purple", [128, 0, 128]),
    ("pink", [255, 192, 203]),
    ("brown", [165, 42, 42]),
    ("gray", [128, 128, 128]),
    ("grey", [128, 128, 128]),
    ("silver", [192, 192, 192]),
    ("navy", [0, 0, 128]),
    ("teal", [0, 128, 128]),
    ("olive", [128, 128, 0]),
    ("maroon", [128, 0, 0]),
    ("gold", [255, 215, 0]),
    ("violet", [238, 130, 238]),
    ("indigo", [75, 0, 130]),
    ("coral", [255, 127, 80]),
    ("salmon", [250, 128, 114]),
    ("skyblue", [135, 206, 235]),
    ("darkgreen", [0, 100, 0]),
    ("darkred", [139, 0, 0]),
];

/// What `ddetr inference` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceOutcome {
    pub images: usize,
    /// Label lines written (detections at or above the threshold with a class name).
    pub detections: usize,
    /// `<results_dir>/labels`.
    pub labels_dir: PathBuf,
    /// `<results_dir>/images_annotated`.
    pub images_dir: PathBuf,
}

/// One detection in original-image pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledDetection {
    pub class: String,
    /// (x1, y1, x2, y2), clipped to the image.
    pub bbox: [f32; 4],
    pub score: f32,
}

/// The KITTI label line TAO writes: class, truncation 0.00, occlusion 0, alpha 0.00, the 2D box,
/// seven zero 3D fields, and the score.
pub fn kitti_line(d: &LabeledDetection) -> String {
    let [x1, y1, x2, y2] = d.bbox;
    format!(
        "{} 0.00 0 0.00 {x1:.3} {y1:.3} {x2:.3} {y2:.3} 0.00 0.00 0.00 0.00 0.00 0.00 0.00 {:.3}",
        d.class, d.score
    )
}

/// `#rrggbb`, `#rgb` or a colour name (case-insensitive).
pub fn parse_colour(s: &str) -> Option<[u8; 3]> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix('#') {
        let digit = |i: usize, n: usize| u8::from_str_radix(hex.get(i..i + n)?, 16).ok();
        return match hex.len() {
            6 => Some([digit(0, 2)?, digit(2, 2)?, digit(4, 2)?]),
            3 => Some([digit(0, 1)? * 17, digit(1, 1)? * 17, digit(2, 1)? * 17]),
            _ => None,
        };
    }
    let lower = t.to_ascii_lowercase();
    NAMED_COLOURS
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|&(_, c)| c)
}

/// The classmap's names in category-id order (id = line index + 1); trailing blank lines dropped.
pub fn read_classmap(path: &Path) -> Result<Vec<String>, TrainerError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        TrainerError::Config(format!(
            "dataset.infer_data_sources.classmap {} cannot be read ({e}): give a text file with one class name per line",
            path.display()
        ))
    })?;
    let mut names: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    while names.last().is_some_and(|n| n.is_empty()) {
        names.pop();
    }
    Ok(names)
}

/// The images of `dirs` with an [`IMAGE_EXTENSIONS`] extension, each folder sorted by name.
pub fn list_images(dirs: &[String]) -> Result<Vec<PathBuf>, TrainerError> {
    if dirs.is_empty() {
        return Err(TrainerError::Config(
            "dataset.infer_data_sources.image_dir is empty: give one or more image folders".into(),
        ));
    }
    let mut out = Vec::new();
    for d in dirs {
        let entries = std::fs::read_dir(d).map_err(|e| {
            TrainerError::Config(format!(
                "dataset.infer_data_sources.image_dir {d} cannot be listed ({e}): give an existing image folder"
            ))
        })?;
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                        IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        found.sort();
        out.extend(found);
    }
    if out.is_empty() {
        return Err(TrainerError::Config(format!(
            "dataset.infer_data_sources.image_dir {} holds no .jpg, .jpeg or .png image: point it at a folder of images",
            dirs.join(", ")
        )));
    }
    Ok(out)
}

/// Draws detections on an image: outlines, label pads and text.
struct Painter {
    font: FontRef<'static>,
    outline: u32,
    colours: BTreeMap<String, [u8; 3]>,
}

impl Painter {
    fn colour(&self, class: &str, id: i64) -> [u8; 3] {
        self.colours
            .get(class)
            .copied()
            .unwrap_or(PALETTE[id.rem_euclid(PALETTE.len() as i64) as usize])
    }

    fn fill(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let (w, h) = (i64::from(img.width()), i64::from(img.height()));
        for y in y0.max(0)..y1.min(h) {
            for x in x0.max(0)..x1.min(w) {
                img.put_pixel(x as u32, y as u32, image::Rgb(c));
            }
        }
    }

    /// PIL's `rectangle(outline, width)`: the border grows inwards from the box edges.
    fn outline(&self, img: &mut RgbImage, b: [i64; 4], c: [u8; 3]) {
        let t = i64::from(self.outline.max(1));
        let [x0, y0, x1, y1] = b;
        Self::fill(img, x0, y0, x1 + 1, y0 + t, c);
        Self::fill(img, x0, y1 + 1 - t, x1 + 1, y1 + 1, c);
        Self::fill(img, x0, y0, x0 + t, y1 + 1, c);
        Self::fill(img, x1 + 1 - t, y0, x1 + 1, y1 + 1, c);
    }

    /// White text with its top-left corner at (x, y), alpha-blended from the glyph coverage.
    fn text(&self, img: &mut RgbImage, x: i64, y: i64, s: &str) {
        let font = self.font.as_scaled(PxScale::from(LABEL_PX));
        let (w, h) = (i64::from(img.width()), i64::from(img.height()));
        let mut caret = x as f32;
        let mut prev = None;
        for ch in s.chars() {
            let id = font.glyph_id(ch);
            if let Some(p) = prev {
                caret += font.kern(p, id);
            }
            let glyph = id.with_scale_and_position(
                LABEL_PX,
                ab_glyph::point(caret, y as f32 + font.ascent()),
            );
            caret += font.h_advance(id);
            prev = Some(id);
            let Some(outlined) = self.font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outlined.px_bounds();
            outlined.draw(|gx, gy, cov| {
                let px = bounds.min.x as i64 + i64::from(gx);
                let py = bounds.min.y as i64 + i64::from(gy);
                if (0..w).contains(&px) && (0..h).contains(&py) {
                    let p = img.get_pixel_mut(px as u32, py as u32);
                    for c in 0..3 {
                        let v = f32::from(p.0[c]) * (1.0 - cov) + 255.0 * cov;
                        p.0[c] = v.round().clamp(0.0, 255.0) as u8;
                    }
                }
            });
        }
    }

    /// TAO's drawing: the box outline, a filled pad of the box's width above it (inside the box
    /// when there is no room above), and `class: score` on the pad.
    fn draw(&self, img: &mut RgbImage, d: &LabeledDetection, id: i64) {
        let c = self.colour(&d.class, id);
        let b = d.bbox.map(|v| v as i64);
        self.outline(img, b, c);
        let pad = LABEL_PX.ceil() as i64 + 2;
        let top = if b[1] - pad >= 0 { b[1] - pad } else { b[1] };
        Self::fill(img, b[0], top, b[2] + 1, top + pad, c);
        self.text(
            img,
            b[0] + 1,
            top + 1,
            &format!("{}: {:.2}", d.class, d.score),
        );
    }
}

/// Runs inference with the spec's architecture over `dataset.infer_data_sources` with `inference.checkpoint`
/// (a world of one).
pub fn inference(spec: &ExperimentSpec) -> Result<InferenceOutcome, TrainerError> {
    match spec.architecture() {
        Architecture::DeformableDetr => inference_detector::<DeformableDetrDetector>(spec),
        Architecture::Dino => inference_detector::<DinoDetector>(spec),
    }
}

/// Inference with any [`Detector`].
pub fn inference_detector<D: Detector>(
    spec: &ExperimentSpec,
) -> Result<InferenceOutcome, TrainerError> {
    let inf = &spec.inference;
    let ckpt = inf
        .checkpoint
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            TrainerError::Config(
                "inference.checkpoint is not set: pass inference.checkpoint=<results>/train/dd_model_latest.safetensors; an official .pth, a transformers model.safetensors/pytorch_model.bin or a TAO .pth works too".into(),
            )
        })?;
    let ckpt = Path::new(ckpt);
    if !ckpt.is_file() {
        return Err(TrainerError::Config(format!(
            "inference.checkpoint {} does not exist: pass the path of a trained checkpoint (e.g. <results>/train/dd_model_latest.safetensors)",
            ckpt.display()
        )));
    }
    let src = spec.dataset.infer_data_sources.as_ref().ok_or_else(|| {
        TrainerError::Config(
            "dataset.infer_data_sources is not set: give its image_dir (a list of folders) and classmap".into(),
        )
    })?;
    if src.classmap.is_empty() {
        return Err(TrainerError::Config(
            "dataset.infer_data_sources.classmap is not set: give a text file with one class name per line, in category-id order".into(),
        ));
    }
    let names = read_classmap(Path::new(&src.classmap))?;
    // Category ids 1..num_classes-1 need a name; id 0 is the background slot.
    let needed = spec.dataset.num_classes.saturating_sub(1) as usize;
    if names.len() < needed {
        return Err(TrainerError::Config(format!(
            "dataset.infer_data_sources.classmap {} names {} classes but the model predicts category ids 1..{} (dataset.num_classes {}): add one name per line for each category id",
            src.classmap,
            names.len(),
            needed,
            spec.dataset.num_classes
        )));
    }
    let mut colours = BTreeMap::new();
    for (class, value) in inf.color_map.iter().flatten() {
        let c = parse_colour(value).ok_or_else(|| {
            TrainerError::Config(format!(
                "inference.color_map.{class} is {value:?}, not a colour: use #rrggbb or a name such as red, green, blue, yellow, orange"
            ))
        })?;
        colours.insert(class.clone(), c);
    }
    let images = list_images(&src.image_dir)?;
    let dir = spec.task_results_dir(Task::Inference);
    let labels_dir = dir.join("labels");
    let images_dir = dir.join("images_annotated");
    for d in [&labels_dir, &images_dir] {
        std::fs::create_dir_all(d).map_err(|e| {
            TrainerError::Config(format!(
                "inference results folder {} cannot be created ({e}): give a writable folder with -r or inference.results_dir",
                d.display()
            ))
        })?;
    }

    let device = pick_device(0)?;
    let built = build_model::<D>(spec, device, 0)?;
    D::load_checkpoint(&built.vs, ckpt)?;
    let painter = Painter {
        font: FontRef::try_from_slice(dejavu::sans::regular()).map_err(|e| TrainerError::Draw {
            what: "with the embedded DejaVu font".into(),
            reason: e.to_string(),
        })?,
        outline: inf.outline_width,
        colours,
    };
    let aug = &spec.dataset.augmentation;
    let mut resizer = Resizer::new();
    let batches = batches(&images, aug, spec.dataset.batch_size.max(1) as usize)?;
    let mut detections = 0usize;
    let mut done = 0usize;
    let mut sizes_seen = InputSizes::default();
    for (step, chunk) in batches.iter().enumerate() {
        let chunk: Vec<&PathBuf> = chunk.iter().map(|&i| &images[i]).collect();
        let mut originals = Vec::with_capacity(chunk.len());
        let mut samples = Vec::with_capacity(chunk.len());
        for (k, path) in chunk.iter().enumerate() {
            let rgb = decode_rgb8(&read(path)?, &path.display().to_string())?;
            let mut s = Sample::new(rgb.clone(), Vec::new(), Vec::new());
            transforms::eval(&mut s, aug, &mut resizer);
            let meta = Meta {
                index: done + k,
                image_id: (done + k) as i64,
                orig_size: [i64::from(rgb.height), i64::from(rgb.width)],
            };
            originals.push(rgb);
            samples.push((s, meta));
        }
        let b = collate(&samples, aug, LoaderMode::Eval, step, 0);
        let shape = b.images.size();
        let own: Vec<[i64; 2]> = b.targets.iter().map(|t| t.size).collect();
        sizes_seen.record(shape[2], shape[3], &own);
        let dets = tch::no_grad(|| {
            let x = b.normalized(device);
            let out = built.model.forward(&x, &b.mask.to_device(device), false);
            let sizes: Vec<(f64, f64)> = originals
                .iter()
                .map(|o| (f64::from(o.height), f64::from(o.width)))
                .collect();
            built.model.post_process(
                &out,
                &sizes,
                i64::from(spec.model.num_select),
                f64::NEG_INFINITY,
            )
        });
        for ((path, rgb), d) in chunk.iter().zip(originals).zip(dets) {
            let scores: Vec<f32> = Vec::try_from(&d.scores.to_device(Device::Cpu))?;
            let labels: Vec<i64> = Vec::try_from(&d.labels.to_device(Device::Cpu))?;
            let boxes: Vec<f32> = Vec::try_from(&d.boxes.to_device(Device::Cpu).reshape([-1]))?;
            let (w, h) = (rgb.width as f32, rgb.height as f32);
            let mut kept = Vec::new();
            for k in 0..scores.len() {
                // TAO keeps scores at or above the threshold and skips ids without a name.
                if f64::from(scores[k]) < inf.conf_threshold || labels[k] < 1 {
                    continue;
                }
                let Some(class) = names.get(labels[k] as usize - 1) else {
                    continue;
                };
                let bb = &boxes[4 * k..4 * k + 4];
                kept.push((
                    labels[k],
                    LabeledDetection {
                        class: class.clone(),
                        bbox: [
                            bb[0].clamp(0.0, w),
                            bb[1].clamp(0.0, h),
                            bb[2].clamp(0.0, w),
                            bb[3].clamp(0.0, h),
                        ],
                        score: scores[k],
                    },
                ));
            }
            write_outputs(path, rgb, &kept, &painter, &labels_dir, &images_dir)?;
            detections += kept.len();
        }
        done += chunk.len();
        tracing::info!("inference: {done}/{} images", images.len());
    }
    tracing::info!(
        "inference: {} ({})",
        sizes_seen.summary(),
        crate::evaluate::eval_padding_name(aug)
    );
    Ok(InferenceOutcome {
        images: images.len(),
        detections,
        labels_dir,
        images_dir,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TrainerError> {
    std::fs::read(path).map_err(|e| TrainerError::io("read", path, e))
}

/// The batches (indices into `images`) inference runs: with `eval_padding: none` grouped by
/// transformed size (read from each file's header) so no image is padded; with `tao` in file
/// order, as TAO batches them.
fn batches(
    images: &[PathBuf],
    aug: &AugmentationConfig,
    batch_size: usize,
) -> Result<Vec<Vec<usize>>, TrainerError> {
    if aug.eval_padding == EvalPadding::Tao {
        let all: Vec<usize> = (0..images.len()).collect();
        return Ok(all.chunks(batch_size).map(<[usize]>::to_vec).collect());
    }
    let mut sized = Vec::with_capacity(images.len());
    for (i, path) in images.iter().enumerate() {
        let info = probe(&read(path)?).map_err(|reason| TrainerError::BadImage {
            path: path.clone(),
            reason,
        })?;
        sized.push((i, eval_size(info.width, info.height, aug)));
    }
    Ok(group_by_size(&sized, batch_size))
}

/// Writes `labels/<stem>.txt` and `images_annotated/<file name>` for one image.
fn write_outputs(
    path: &Path,
    rgb: Rgb8,
    kept: &[(i64, LabeledDetection)],
    painter: &Painter,
    labels_dir: &Path,
    images_dir: &Path,
) -> Result<(), TrainerError> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut text = String::new();
    for (_, d) in kept {
        text.push_str(&kitti_line(d));
        text.push('\n');
    }
    let label_path = labels_dir.join(format!("{stem}.txt"));
    std::fs::write(&label_path, text).map_err(|e| TrainerError::io("write", &label_path, e))?;
    let mut img =
        RgbImage::from_raw(rgb.width, rgb.height, rgb.data).ok_or_else(|| TrainerError::Draw {
            what: path.display().to_string(),
            reason: "decoded size mismatch".into(),
        })?;
    for (id, d) in kept {
        painter.draw(&mut img, d, *id);
    }
    let out = images_dir.join(path.file_name().unwrap_or_default());
    img.save(&out).map_err(|e| TrainerError::Draw {
        what: out.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kitti_lines_follow_tao_layout() {
        let d = LabeledDetection {
            class: "ellipse".into(),
            bbox: [1.0, 2.5, 30.25, 40.0],
            score: 0.8765,
        };
        assert_eq!(
            kitti_line(&d),
            "ellipse 0.00 0 0.00 1.000 2.500 30.250 40.000 0.00 0.00 0.00 0.00 0.00 0.00 0.00 0.877"
        );
        assert_eq!(kitti_line(&d).split(' ').count(), 16);
    }

    #[test]
    fn colours_parse_as_names_and_hex() {
        assert_eq!(parse_colour("Red"), Some([255, 0, 0]));
        assert_eq!(parse_colour("#00ff7f"), Some([0, 255, 127]));
        assert_eq!(parse_colour("#0f0"), Some([0, 255, 0]));
        assert_eq!(parse_colour("#12345"), None);
        assert_eq!(parse_colour("chartreuse-ish"), None);
    }

    #[test]
    fn drawing_marks_the_outline_and_the_label_and_leaves_the_inside() {
        let painter = Painter {
            font: FontRef::try_from_slice(dejavu::sans::regular()).unwrap(),
            outline: 2,
            colours: BTreeMap::from([("box".to_string(), [255, 0, 0])]),
        };
        let mut img = RgbImage::new(64, 64);
        let d = LabeledDetection {
            class: "box".into(),
            bbox: [10.0, 30.0, 50.0, 60.0],
            score: 0.9,
        };
        painter.draw(&mut img, &d, 1);
        let red = image::Rgb([255, 0, 0]);
        assert_eq!(*img.get_pixel(10, 45), red, "left edge");
        assert_eq!(*img.get_pixel(11, 45), red, "2 px wide");
        assert_eq!(*img.get_pixel(12, 45), image::Rgb([0, 0, 0]), "inside");
        assert_eq!(*img.get_pixel(50, 59), red, "right/bottom edge");
        // The label pad above the box carries white-ish text pixels.
        let text_px = (10..50)
            .flat_map(|x| (16..30).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0[1] > 128)
            .count();
        assert!(text_px > 10, "label text drawn ({text_px} px)");
    }
}
