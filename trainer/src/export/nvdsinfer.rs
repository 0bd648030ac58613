//! `export.serialize_nvdsinfer`: the DeepStream files TAO's export writes beside the ONNX model
//! — `labels.txt` (one class name per line, the model's class index order) and
//! `nvdsinfer_config.yaml`, TAO's `DDETRNvDSInferConfig` serialized as TAO does it
//! (`nvidia_tao_pytorch/core/types/nvdsinfer.py`: keys with `-` for `_`, lists joined by `;`,
//! null keys dropped, `property` and `class-attrs-all` sections, keys sorted as `yaml.safe_dump`
//! sorts them). The parser named is TAO's `NvDsInferParseCustomDDETRTAO`, which reads
//! `pred_logits` and `pred_boxes` as ddetr exports them (Deformable DETR and DINO alike).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ExportError;

/// The labels file's name, beside the ONNX model.
pub const LABELS_FILE: &str = "labels.txt";
/// The nvinfer config's name, beside the ONNX model.
pub const CONFIG_FILE: &str = "nvdsinfer_config.yaml";

/// One name per class index `0..num_classes` from a COCO json's categories (index = category
/// id, as the model's logits are laid out); an index no category has is `class_<i>`.
pub fn class_names(json_file: &Path, num_classes: u32) -> Result<Vec<String>, ExportError> {
    #[derive(serde::Deserialize)]
    struct Category {
        id: i64,
        name: String,
    }
    #[derive(serde::Deserialize)]
    struct Coco {
        categories: Vec<Category>,
    }
    let bad = |reason: String| ExportError::Labels {
        path: json_file.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(json_file).map_err(|e| bad(e.to_string()))?;
    let coco: Coco = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut names: Vec<String> = (0..num_classes).map(|i| format!("class_{i}")).collect();
    for c in coco.categories {
        match usize::try_from(c.id).ok().filter(|&i| i < names.len()) {
            Some(i) => names[i] = c.name,
            None => {
                return Err(bad(format!(
                    "category {} ({}) is outside dataset.num_classes = {num_classes}",
                    c.id, c.name
                )))
            }
        }
    }
    Ok(names)
}

/// The nvinfer config for `onnx_name` with `num_classes` outputs and input `[c, h, w]`.
pub fn config_yaml(onnx_name: &str, num_classes: u32, chw: [i64; 3]) -> String {
    let join = |v: &[String]| Value::String(v.join(";"));
    let property: BTreeMap<&str, Value> = BTreeMap::from([
        ("cluster-mode", Value::from(4)),
        (
            "custom-lib-path",
            Value::from("/opt/nvidia/deepstream/deepstream/lib/libnvds_infercustomparser_tao.so"),
        ),
        ("gie-unique-id", Value::from(1)),
        ("infer-dims", join(&chw.map(|d| d.to_string()))),
        ("labelfile-path", Value::from(LABELS_FILE)),
        ("maintain-aspect-ratio", Value::from(1)),
        ("model-color-format", Value::from(0)),
        ("net-scale-factor", Value::from(0.0173520735728)),
        ("network-mode", Value::from(2)),
        ("network-type", Value::from(0)),
        ("num-detected-classes", Value::from(num_classes)),
        (
            "offsets",
            join(&["123.675", "116.28", "103.53"].map(String::from)),
        ),
        ("onnx-file", Value::from(onnx_name)),
        (
            "output-blob-names",
            join(&["pred_logits", "pred_boxes"].map(String::from)),
        ),
        ("output-tensor-meta", Value::from(1)),
        (
            "parse-bbox-func-name",
            Value::from("NvDsInferParseCustomDDETRTAO"),
        ),
        ("workspace-size", Value::from(1_048_576)),
    ]);
    let class_attrs: BTreeMap<&str, Value> = BTreeMap::from([
        ("pre-cluster-threshold", Value::from(0.5)),
        ("topk", Value::from(20)),
    ]);
    let doc = BTreeMap::from([
        (
            "class-attrs-all",
            serde_json::to_value(class_attrs).expect("json"),
        ),
        ("property", serde_json::to_value(property).expect("json")),
    ]);
    serde_yaml_ng::to_string(&doc).expect("a map always serializes")
}

/// Writes `labels.txt` (`names`, one per line) and `nvdsinfer_config.yaml` beside `onnx_file`;
/// returns their paths.
pub fn write(
    onnx_file: &Path,
    names: &[String],
    chw: [i64; 3],
) -> Result<(PathBuf, PathBuf), ExportError> {
    let dir = onnx_file.parent().unwrap_or(Path::new("."));
    let onnx_name = onnx_file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let labels = dir.join(LABELS_FILE);
    let config = dir.join(CONFIG_FILE);
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| ExportError::Write {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    write(&labels, names.iter().map(|n| format!("{n}\n")).collect())?;
    write(&config, config_yaml(&onnx_name, names.len() as u32, chw))?;
    Ok((labels, config))
}
