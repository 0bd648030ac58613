//! The end-to-end fixtures of `tests/golden/make_e2e_fixtures.py` (`tests/golden/e2e/`): the
//! configurations, the transformers checkpoint rebuilt from a manifest of transformers' own
//! state-dict keys, and the reference detections. Shared by `trainer/tests/e2e_layers.rs` and the
//! workspace's `tests/e2e_golden.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ddetr_trainer::spec::{Backbone, ModelConfig};
use tch::Tensor;

use super::{fill, golden_dir};

/// The folder of images, annotations, manifests and reference outputs (from the trainer crate's
/// tests or, through `#[path]`, the workspace's).
pub fn e2e_dir() -> PathBuf {
    let trainer = Path::new(env!("CARGO_MANIFEST_DIR")).join("trainer");
    if trainer.join("tests/golden").is_dir() {
        trainer.join("tests/golden/e2e")
    } else {
        golden_dir().join("e2e")
    }
}

/// `meta.json`: images (sizes, SHA-256 of the transformed pixels) and per case the levels,
/// refine/two-stage flags, `num_select` and per mode the pycocotools stats.
pub fn meta() -> serde_json::Value {
    let p = e2e_dir().join("meta.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("meta.json is JSON")
}

/// TAO's model defaults at `levels` feature levels (ResNet-50, 6+6 layers, 300 queries,
/// d_model 256, 8 heads, FFN 1024, 4+4 points), dropout 0.
pub fn r50_config(levels: u32, refine: bool, two_stage: bool) -> ModelConfig {
    ModelConfig {
        backbone: Backbone::Resnet50,
        num_feature_levels: levels,
        return_interm_indices: if levels == 1 {
            vec![3]
        } else {
            vec![1, 2, 3, 4]
        },
        with_box_refine: refine,
        two_stage,
        dropout_ratio: 0.0,
        ..ModelConfig::default()
    }
}

/// Writes the transformers checkpoint of `case` (safetensors, transformers' key names) to `path`:
/// each tensor is the fill of its official key (its q/k/v row block for the decoder's packed
/// self-attention) times the manifest's factor — what the fixture script loaded into transformers.
pub fn write_transformers_checkpoint(case: &str, path: &Path) {
    let p = e2e_dir().join(format!("manifest_{case}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let manifest: Vec<serde_json::Value> = serde_json::from_str(&text).expect("manifest is JSON");
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .expect("a shape")
            .iter()
            .map(|x| x.as_i64().expect("an int"))
            .collect()
    };
    let mut filled: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut out: Vec<(String, Tensor)> = Vec::with_capacity(manifest.len());
    for e in &manifest {
        let official = e["official"].as_str().expect("official key");
        let full = filled
            .entry(official.to_string())
            .or_insert_with(|| fill(official, &ints(&e["fill_shape"])))
            .shallow_clone();
        let shape = ints(&e["shape"]);
        let t = match e["block"].as_i64() {
            Some(b) => full.narrow(0, b * shape[0], shape[0]),
            None => full,
        };
        let t = (t * e["scale"].as_f64().expect("scale")).contiguous();
        assert_eq!(t.size(), shape, "{}", e["hf"]);
        out.push((e["hf"].as_str().expect("hf key").to_string(), t));
    }
    Tensor::write_safetensors(&out, path).expect("write the transformers checkpoint");
}

/// One image's reference detections: scores `[k]`, labels `[k]` (i64), boxes `[k, 4]` xyxy in
/// original pixels.
pub struct RefDetections {
    pub scores: Vec<f32>,
    pub labels: Vec<i64>,
    pub boxes: Vec<[f32; 4]>,
}

/// The reference detections of `case` in `mode` (`none`, `tao_b1`, `tao_b3`) by image file name.
pub fn reference(case: &str, mode: &str) -> BTreeMap<String, RefDetections> {
    let path = e2e_dir().join(format!("detections_{case}.safetensors"));
    let all: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect();
    let mut out = BTreeMap::new();
    for name in image_names() {
        let get = |k: &str| &all[&format!("{mode}.{name}.{k}")];
        let boxes: Vec<f32> = Vec::try_from(&get("boxes").reshape([-1])).expect("f32 boxes");
        out.insert(
            name.clone(),
            RefDetections {
                scores: Vec::try_from(get("scores")).expect("f32 scores"),
                labels: Vec::try_from(get("labels")).expect("i64 labels"),
                boxes: boxes
                    .chunks_exact(4)
                    .map(|b| [b[0], b[1], b[2], b[3]])
                    .collect(),
            },
        );
    }
    out
}

/// The fixture's image file names in file (and COCO id) order.
pub fn image_names() -> Vec<String> {
    let m = meta();
    let mut names: Vec<String> = m["images"]
        .as_object()
        .expect("images")
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}
