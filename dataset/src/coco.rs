//! COCO annotation files: parsing (with line:column on malformed JSON) and the checks that run
//! once, at cache build, so that nothing in a file can stop training mid-epoch.
//!
//! Box handling follows the official `ConvertCocoPolysToMask`: xywh → xyxy, clamp to the image,
//! drop boxes that end up empty. Unlike it, every change is counted and reported.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{first_few, DatasetError, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct CocoFile {
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    #[serde(default)]
    pub categories: Vec<CocoCategory>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CocoImage {
    pub id: i64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CocoAnnotation {
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    #[serde(default)]
    pub area: Option<f64>,
    #[serde(default)]
    pub iscrowd: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CocoCategory {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub supercategory: String,
}

/// Reads and parses a COCO file; a syntax or shape error names the line and column.
pub fn read(path: &Path) -> Result<CocoFile> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    parse(&bytes, path)
}

pub fn parse(bytes: &[u8], path: &Path) -> Result<CocoFile> {
    serde_json::from_slice(bytes).map_err(|e| {
        let full = e.to_string();
        let message = match full.rfind(" at line ") {
            Some(cut) => full[..cut].to_string(),
            None => full,
        };
        DatasetError::MalformedJson {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message,
        }
    })
}

/// Counters of what the checks changed; kept in the cache and printed by `inspect`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BoxReport {
    /// Boxes with w ≤ 0, h ≤ 0 or a non-finite coordinate: dropped.
    pub degenerate: u64,
    pub first_degenerate: Vec<String>,
    /// Boxes reaching outside the image: clipped to it.
    pub clipped: u64,
    pub first_clipped: Vec<String>,
    /// Boxes entirely outside the image: dropped.
    pub outside: u64,
    pub first_outside: Vec<String>,
}

impl BoxReport {
    pub fn merge(&mut self, other: &BoxReport) {
        self.degenerate += other.degenerate;
        self.clipped += other.clipped;
        self.outside += other.outside;
        for (dst, src) in [
            (&mut self.first_degenerate, &other.first_degenerate),
            (&mut self.first_clipped, &other.first_clipped),
            (&mut self.first_outside, &other.first_outside),
        ] {
            for s in src {
                if dst.len() < crate::error::FIRST_FEW {
                    dst.push(s.clone());
                }
            }
        }
    }
}

fn note(list: &mut Vec<String>, count: &mut u64, what: impl FnOnce() -> String) {
    *count += 1;
    if list.len() < crate::error::FIRST_FEW {
        list.push(what());
    }
}

/// A checked box: COCO xywh in pixels, clipped to its image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckedBox {
    pub bbox: [f32; 4],
    pub area: f32,
    pub category_id: u32,
    pub iscrowd: bool,
}

/// One image after the checks, with its boxes in file order.
#[derive(Debug, Clone)]
pub struct CheckedImage {
    pub id: i64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    pub boxes: Vec<CheckedBox>,
}

/// A COCO file that passed the checks.
#[derive(Debug, Clone)]
pub struct Checked {
    pub images: Vec<CheckedImage>,
    pub categories: Vec<CocoCategory>,
    pub max_category_id: u32,
    pub report: BoxReport,
}

/// Runs every check on a parsed file. Errors (one line each, with counts and the first few
/// offenders): duplicate image or annotation ids, category_id 0 or not in `categories`,
/// annotations whose image does not exist, and `num_classes` too small for the largest
/// category id. Degenerate boxes are dropped and out-of-image boxes clipped, both counted.
pub fn check(file: CocoFile, json: &Path, num_classes: Option<u32>) -> Result<Checked> {
    let json_buf = json.to_path_buf();
    // Duplicate image ids.
    let mut index: HashMap<i64, usize> = HashMap::with_capacity(file.images.len());
    let mut dups = Vec::new();
    for (i, im) in file.images.iter().enumerate() {
        if index.insert(im.id, i).is_some() {
            dups.push(im.id);
        }
    }
    if !dups.is_empty() {
        return Err(DatasetError::DuplicateImageIds {
            json: json_buf,
            count: dups.len(),
            first: first_few(&dups, dups.len()),
        });
    }
    // Duplicate annotation ids.
    let mut seen: HashSet<i64> = HashSet::with_capacity(file.annotations.len());
    let dups: Vec<i64> = file
        .annotations
        .iter()
        .filter(|a| !seen.insert(a.id))
        .map(|a| a.id)
        .collect();
    if !dups.is_empty() {
        return Err(DatasetError::DuplicateAnnotationIds {
            json: json_buf,
            count: dups.len(),
            first: first_few(&dups, dups.len()),
        });
    }
    // Categories: ids ≥ 1, annotations only use listed ones.
    let zero_cats = file.categories.iter().filter(|c| c.id <= 0).count();
    let zero_anns: Vec<String> = file
        .annotations
        .iter()
        .filter(|a| a.category_id == 0)
        .map(|a| format!("annotation {} of image {}", a.id, a.image_id))
        .collect();
    if zero_cats > 0 || !zero_anns.is_empty() {
        let mut first: Vec<String> = file
            .categories
            .iter()
            .filter(|c| c.id <= 0)
            .map(|c| format!("category '{}' has id {}", c.name, c.id))
            .collect();
        first.extend(zero_anns.iter().cloned());
        let count = zero_anns.len().max(zero_cats);
        return Err(DatasetError::CategoryZero {
            json: json_buf,
            count,
            first: first_few(&first, first.len()),
        });
    }
    let known: HashSet<i64> = file.categories.iter().map(|c| c.id).collect();
    let unknown: Vec<String> = file
        .annotations
        .iter()
        .filter(|a| !known.contains(&a.category_id))
        .map(|a| format!("annotation {} has category_id {}", a.id, a.category_id))
        .collect();
    if !unknown.is_empty() {
        return Err(DatasetError::UnknownCategory {
            json: json_buf,
            count: unknown.len(),
            first: first_few(&unknown, unknown.len()),
        });
    }
    if known.is_empty() && !file.annotations.is_empty() {
        return Err(DatasetError::BadAnnotationFile {
            json: json_buf,
            message: "has annotations but no `categories`; list them with their ids".into(),
        });
    }
    let orphans: Vec<String> = file
        .annotations
        .iter()
        .filter(|a| !index.contains_key(&a.image_id))
        .map(|a| format!("annotation {} → image {}", a.id, a.image_id))
        .collect();
    if !orphans.is_empty() {
        return Err(DatasetError::OrphanAnnotations {
            json: json_buf,
            count: orphans.len(),
            first: first_few(&orphans, orphans.len()),
        });
    }
    let max_category_id = file.categories.iter().map(|c| c.id).max().unwrap_or(0);
    let max_category_id =
        u32::try_from(max_category_id).map_err(|_| DatasetError::BadAnnotationFile {
            json: json_buf.clone(),
            message: format!("category id {max_category_id} is too large"),
        })?;
    if let Some(n) = num_classes {
        let used = file
            .annotations
            .iter()
            .map(|a| a.category_id)
            .max()
            .unwrap_or(0)
            .max(max_category_id as i64) as u32;
        if n < used + 1 {
            return Err(DatasetError::NumClassesTooSmall {
                num_classes: n,
                max_category_id: used,
            });
        }
    }
    for im in &file.images {
        if im.width == 0 || im.height == 0 {
            return Err(DatasetError::BadAnnotationFile {
                json: json_buf,
                message: format!(
                    "image {} ({}) has size {}x{}; width and height must be positive",
                    im.id, im.file_name, im.width, im.height
                ),
            });
        }
    }

    let mut images: Vec<CheckedImage> = file
        .images
        .into_iter()
        .map(|im| CheckedImage {
            id: im.id,
            file_name: im.file_name,
            width: im.width,
            height: im.height,
            boxes: Vec::new(),
        })
        .collect();
    let mut report = BoxReport::default();
    for a in &file.annotations {
        let im = &mut images[index[&a.image_id]];
        let [x, y, w, h] = a.bbox;
        if !(x.is_finite() && y.is_finite() && w.is_finite() && h.is_finite())
            || w <= 0.0
            || h <= 0.0
        {
            note(&mut report.first_degenerate, &mut report.degenerate, || {
                format!("annotation {} (w={w}, h={h})", a.id)
            });
            continue;
        }
        let (iw, ih) = (im.width as f64, im.height as f64);
        let (x1, y1) = (x.clamp(0.0, iw), y.clamp(0.0, ih));
        let (x2, y2) = ((x + w).clamp(0.0, iw), (y + h).clamp(0.0, ih));
        if x2 <= x1 || y2 <= y1 {
            note(&mut report.first_outside, &mut report.outside, || {
                format!("annotation {} of image {}", a.id, a.image_id)
            });
            continue;
        }
        if (x1, y1, x2, y2) != (x, y, x + w, y + h) {
            note(&mut report.first_clipped, &mut report.clipped, || {
                format!("annotation {} of image {}", a.id, a.image_id)
            });
        }
        im.boxes.push(CheckedBox {
            bbox: [x1 as f32, y1 as f32, (x2 - x1) as f32, (y2 - y1) as f32],
            area: a.area.unwrap_or(w * h) as f32,
            category_id: a.category_id as u32,
            iscrowd: a.iscrowd != 0,
        });
    }
    if report.degenerate > 0 {
        tracing::warn!(
            "{}: dropped {} box(es) with w or h <= 0: {}",
            json.display(),
            report.degenerate,
            first_few(&report.first_degenerate, report.degenerate as usize)
        );
    }
    if report.clipped + report.outside > 0 {
        tracing::warn!(
            "{}: clipped {} box(es) to their image, dropped {} entirely outside: {}",
            json.display(),
            report.clipped,
            report.outside,
            first_few(
                report.first_clipped.iter().chain(&report.first_outside),
                (report.clipped + report.outside) as usize
            )
        );
    }
    Ok(Checked {
        images,
        categories: file.categories,
        max_category_id,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<CocoFile> {
        parse(s.as_bytes(), Path::new("a.json"))
    }

    fn file(anns: &str) -> CocoFile {
        parse_str(&format!(
            r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}},
                           {{"id": 2, "file_name": "b.jpg", "width": 100, "height": 50}}],
                "categories": [{{"id": 1, "name": "x"}}, {{"id": 2, "name": "y"}}],
                "annotations": [{anns}]}}"#
        ))
        .unwrap()
    }

    fn ann(id: i64, image: i64, cat: i64, bbox: [f64; 4]) -> String {
        format!(
            r#"{{"id": {id}, "image_id": {image}, "category_id": {cat}, "bbox": [{}, {}, {}, {}]}}"#,
            bbox[0], bbox[1], bbox[2], bbox[3]
        )
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let e = parse_str("{\"images\": [\n  {\"id\": 1,, }\n]}")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a.json: malformed JSON at line 2 column 12:"),
            "{e}"
        );
        let e = parse_str("{\"images\": [{\"id\": 1}]}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `file_name`"), "{e}");
    }

    #[test]
    fn duplicate_ids_are_errors_with_offenders() {
        let e = check(
            parse_str(r#"{"images": [{"id": 3, "file_name": "a", "width": 1, "height": 1}, {"id": 3, "file_name": "b", "width": 1, "height": 1}]}"#).unwrap(),
            Path::new("a.json"),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.json: 1 duplicate image id(s) (3); image ids must be unique within a file"
        );
        let a = ann(7, 1, 1, [0.0, 0.0, 5.0, 5.0]);
        let e = check(file(&format!("{a}, {a}")), Path::new("a.json"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a.json: 1 duplicate annotation id(s) (7)"),
            "{e}"
        );
    }

    #[test]
    fn category_zero_unknown_and_num_classes_are_errors() {
        let e = check(
            file(&ann(1, 1, 0, [0.0, 0.0, 5.0, 5.0])),
            Path::new("a.json"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("1 annotation(s) use category_id 0")
                && e.contains("annotation 1 of image 1"),
            "{e}"
        );
        let e = check(
            file(&ann(1, 1, 9, [0.0, 0.0, 5.0, 5.0])),
            Path::new("a.json"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not listed in `categories` (annotation 1 has category_id 9)"),
            "{e}"
        );
        let e = check(
            file(&ann(1, 1, 2, [0.0, 0.0, 5.0, 5.0])),
            Path::new("a.json"),
            Some(2),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "dataset.num_classes is 2 but annotations use category_id 2: set dataset.num_classes to at least 3");
        assert!(check(
            file(&ann(1, 1, 2, [0.0, 0.0, 5.0, 5.0])),
            Path::new("a.json"),
            Some(3)
        )
        .is_ok());
        let e = check(
            file(&ann(1, 5, 2, [0.0, 0.0, 5.0, 5.0])),
            Path::new("a.json"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("refer to image ids that are not in `images` (annotation 1 → image 5)"),
            "{e}"
        );
    }

    #[test]
    fn boxes_are_dropped_or_clipped_and_counted() {
        let anns = [
            ann(1, 1, 1, [10.0, 10.0, 0.0, 5.0]),   // degenerate
            ann(2, 1, 1, [10.0, 10.0, 5.0, -1.0]),  // degenerate
            ann(3, 1, 1, [90.0, 40.0, 20.0, 20.0]), // clipped → [90, 40, 10, 10]
            ann(4, 2, 2, [150.0, 0.0, 5.0, 5.0]),   // outside
            ann(5, 2, 2, [1.5, 2.5, 3.0, 4.0]),     // kept as is
        ]
        .join(",");
        let c = check(file(&anns), Path::new("a.json"), None).unwrap();
        assert_eq!(
            (c.report.degenerate, c.report.clipped, c.report.outside),
            (2, 1, 1)
        );
        assert_eq!(c.images[0].boxes.len(), 1);
        assert_eq!(c.images[0].boxes[0].bbox, [90.0, 40.0, 10.0, 10.0]);
        assert_eq!(c.images[1].boxes[0].bbox, [1.5, 2.5, 3.0, 4.0]);
        assert_eq!(c.images[1].boxes[0].area, 12.0);
        assert_eq!(c.max_category_id, 2);
    }
}
