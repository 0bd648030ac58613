//! COCO bbox evaluation in memory with `hotcoco` (a pycocotools-exact port): the ground truth
//! comes from the dataset cache (image ids unique across sources, the annotations' own `area`
//! and `iscrowd`), the detections from the model, and the result is pycocotools' 12 numbers and
//! its printed summary lines.

use ddetr_dataset::Cache;
use hotcoco::params::IouType;
use hotcoco::{Annotation, COCOeval, Dataset, COCO};

use crate::TrainerError;

/// A set's ground truth as COCOeval takes it.
pub type GroundTruth = COCO;

/// One detection: COCO result fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub image_id: i64,
    pub category_id: i64,
    /// Absolute x, y, w, h in the original image.
    pub bbox: [f64; 4],
    pub score: f64,
}

impl Detection {
    /// Columns for a gather: (image_id, x, y, w, h, score, category_id).
    pub const COLS: usize = 7;

    pub fn to_row(&self) -> [f64; 7] {
        let [x, y, w, h] = self.bbox;
        [
            self.image_id as f64,
            x,
            y,
            w,
            h,
            self.score,
            self.category_id as f64,
        ]
    }

    pub fn from_row(r: &[f64]) -> Self {
        Self {
            image_id: r[0] as i64,
            bbox: [r[1], r[2], r[3], r[4]],
            score: r[5],
            category_id: r[6] as i64,
        }
    }

    /// The COCO results JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "image_id": self.image_id,
            "category_id": self.category_id,
            "bbox": self.bbox,
            "score": self.score,
        })
    }
}

/// pycocotools' `stats` and its summary lines.
#[derive(Debug, Clone)]
pub struct CocoStats {
    /// AP, AP50, AP75, AP small/medium/large, AR1, AR10, AR100, AR small/medium/large.
    pub stats: Vec<f64>,
    pub lines: Vec<String>,
}

impl CocoStats {
    pub fn map(&self) -> f64 {
        self.stats[0]
    }
    pub fn map50(&self) -> f64 {
        self.stats[1]
    }

    /// The 12 numbers under pycocotools' names (TAO's evaluate JSON keys).
    pub fn to_json(&self) -> serde_json::Value {
        const NAMES: [&str; 12] = [
            "AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100", "ARs",
            "ARm", "ARl",
        ];
        serde_json::Value::Object(
            NAMES
                .iter()
                .zip(&self.stats)
                .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                .collect(),
        )
    }
}

fn eval_err(e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Evaluation(e.to_string())
}

/// The ground truth of `cache` as a COCO dataset.
pub fn ground_truth(cache: &Cache) -> Result<COCO, TrainerError> {
    let mut images = Vec::with_capacity(cache.len());
    let mut annotations = Vec::new();
    let mut next_id = 1u64;
    for (i, im) in cache.images().iter().enumerate() {
        images.push(serde_json::json!({
            "id": im.id, "file_name": cache.file_name(i), "width": im.width, "height": im.height,
        }));
        for b in cache.boxes_of(i) {
            annotations.push(serde_json::json!({
                "id": next_id, "image_id": im.id, "category_id": b.category_id,
                "bbox": b.bbox.map(f64::from), "area": f64::from(b.area), "iscrowd": b.iscrowd,
            }));
            next_id += 1;
        }
    }
    let categories: Vec<serde_json::Value> = cache
        .meta()
        .categories
        .iter()
        .map(|c| serde_json::json!({"id": c.id, "name": c.name}))
        .collect();
    let ds: Dataset = serde_json::from_value(serde_json::json!({
        "images": images, "annotations": annotations, "categories": categories,
    }))
    .map_err(eval_err)?;
    Ok(COCO::from_dataset(ds))
}

/// pycocotools' bbox evaluation of `dets` against `gt`, over the categories `class_ids`
/// (`dataset.eval_class_ids`, pycocotools' `params.catIds`, as TAO sets it) or all of them.
pub fn evaluate(
    gt: &COCO,
    dets: &[Detection],
    class_ids: Option<&[u32]>,
) -> Result<CocoStats, TrainerError> {
    let cat_ids: Vec<u64> = match class_ids {
        Some(ids) => {
            let known = gt.get_cat_ids(&[], &[], &[]);
            if let Some(bad) = ids.iter().find(|&&i| !known.contains(&u64::from(i))) {
                let list: Vec<String> = known.iter().map(u64::to_string).collect();
                return Err(TrainerError::Config(format!(
                    "dataset.eval_class_ids has {bad}, which is no category id of the evaluation set (its ids: {}): list ids from these",
                    list.join(", ")
                )));
            }
            ids.iter().map(|&i| u64::from(i)).collect()
        }
        None => Vec::new(),
    };
    let anns: Vec<Annotation> = dets
        .iter()
        .map(|d| Annotation {
            image_id: d.image_id as u64,
            category_id: d.category_id as u64,
            bbox: Some(d.bbox),
            score: Some(d.score),
            ..Default::default()
        })
        .collect();
    if anns.is_empty() {
        // pycocotools cannot load an empty result list; nothing detected scores -1 → 0.
        return Ok(CocoStats {
            stats: vec![0.0; 12],
            lines: summary_lines(&[0.0; 12]),
        });
    }
    let dt = gt.load_res_anns(anns).map_err(eval_err)?;
    let mut ev = COCOeval::new(gt.clone(), dt, IouType::Bbox);
    ev.params.cat_ids = cat_ids;
    ev.evaluate().map_err(eval_err)?;
    ev.accumulate();
    let _ = ev.summarize_lines();
    let stats = ev
        .stats()
        .map(<[f64]>::to_vec)
        .unwrap_or_else(|| vec![0.0; 12]);
    let lines = summary_lines(&stats);
    Ok(CocoStats { stats, lines })
}

/// pycocotools' `COCOeval.summarize()` lines for the 12 bbox stats, byte for byte
/// (`' {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}'`).
pub fn summary_lines(stats: &[f64]) -> Vec<String> {
    const ROWS: [(bool, &str, &str, u32); 12] = [
        (true, "0.50:0.95", "all", 100),
        (true, "0.50", "all", 100),
        (true, "0.75", "all", 100),
        (true, "0.50:0.95", "small", 100),
        (true, "0.50:0.95", "medium", 100),
        (true, "0.50:0.95", "large", 100),
        (false, "0.50:0.95", "all", 1),
        (false, "0.50:0.95", "all", 10),
        (false, "0.50:0.95", "all", 100),
        (false, "0.50:0.95", "small", 100),
        (false, "0.50:0.95", "medium", 100),
        (false, "0.50:0.95", "large", 100),
    ];
    ROWS.iter()
        .zip(stats)
        .map(|(&(ap, iou, area, max_det), v)| {
            let (title, kind) = if ap {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            format!(" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_det:>3} ] = {v:.3}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt() -> COCO {
        let ds: Dataset = serde_json::from_value(serde_json::json!({
            "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
                {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 40], "area": 800, "iscrowd": 0}
            ],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
        }))
        .unwrap();
        COCO::from_dataset(ds)
    }

    #[test]
    fn perfect_detections_score_one_and_misses_score_lower() {
        let g = gt();
        let perfect = [
            Detection {
                image_id: 1,
                category_id: 1,
                bbox: [10.0, 10.0, 30.0, 30.0],
                score: 0.9,
            },
            Detection {
                image_id: 2,
                category_id: 2,
                bbox: [50.0, 50.0, 20.0, 40.0],
                score: 0.8,
            },
        ];
        let s = evaluate(&g, &perfect, None).unwrap();
        assert!((s.map() - 1.0).abs() < 1e-9, "{:?}", s.stats);
        assert_eq!(s.lines.len(), 12);
        assert_eq!(
            s.lines[0],
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000"
        );
        assert_eq!(
            s.lines[11],
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = -1.000"
        );
        let half = [
            perfect[0],
            Detection {
                category_id: 1,
                ..perfect[1]
            },
        ];
        let s = evaluate(&g, &half, None).unwrap();
        assert!(s.map() < 0.75 && s.map() > 0.25, "{:?}", s.stats);
        assert_eq!(evaluate(&g, &[], None).unwrap().map(), 0.0);
        // dataset.eval_class_ids: class 1 alone is found (its false positive ranks below its
        // true one), class 2 alone is not.
        assert!((evaluate(&g, &half, Some(&[1])).unwrap().map() - 1.0).abs() < 1e-9);
        assert_eq!(evaluate(&g, &half, Some(&[2])).unwrap().map(), 0.0);
        let both = evaluate(&g, &half, Some(&[1, 2])).unwrap().map();
        assert!((both - s.map()).abs() < 1e-12);
        let e = evaluate(&g, &half, Some(&[1, 7])).unwrap_err().to_string();
        assert!(
            e.starts_with("dataset.eval_class_ids has 7, which is no category id")
                && e.contains("1, 2"),
            "{e}"
        );
    }
}
