//! The `dataset` and `convert` sections of the TAO Deformable DETR experiment spec.
//!
//! Keys, types and defaults mirror TAO's schema (`nvidia_tao_core/config/deformable_detr/dataset.py`)
//! one to one, so a TAO spec file deserializes unchanged. Every struct denies unknown fields: a typo
//! is an error that names the key (the spec loader in `ddetr-trainer` adds the nearest valid key).

use serde::{Deserialize, Deserializer, Serialize};

/// One COCO source: an image folder (or a TAO `images.tar.gz`) and its annotation file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// Directory holding the images, or a `.tar.gz` of them.
    pub image_dir: String,
    /// COCO-format annotation file.
    pub json_file: String,
}

/// Images to run inference on (TAO: `image_dir` is a list of folders) and the class-name file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferDataSource {
    #[serde(deserialize_with = "one_or_many")]
    pub image_dir: Vec<String>,
    /// A text file with one class name per line, in category-id order.
    #[serde(default)]
    pub classmap: String,
}

/// TAO's quantization-calibration source: the images `ddetr quantize` calibrates on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationDataSource {
    pub image_dir: String,
    #[serde(default)]
    pub json_file: Option<String>,
}

/// `dataset.train_sampler` (TAO): how minibatches are drawn in multi-node jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainSampler {
    DefaultSampler,
    NonUniformSampler,
    UniformSampler,
}

/// `dataset.dataset_type` (TAO). ddetr always serves annotations from one shared memory-mapped
/// cache, which is what TAO's `serialized` type approximates; both values are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetType {
    Serialized,
    Default,
}

/// `dataset.augmentation.eval_padding` (a ddetr key): how validation, `evaluate` and `inference`
/// lay images out in a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalPadding {
    /// Every image runs at its own transformed size: a batch holds images of one size only, so
    /// detections do not depend on the batch size, the number of ranks or the other images.
    #[default]
    None,
    /// TAO's padded evaluation, to reproduce TAO's numbers: every image padded to
    /// `test_random_resize` × 1333 (orientation-aware) when `fixed_padding` is true, to a multiple
    /// of `pad_size_divisor` when that is set, else to the batch's largest image (the official
    /// collate). Deformable DETR's output changes with this padding.
    Tao,
}

/// `dataset.augmentation`: the official/TAO train and test transforms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentationConfig {
    /// Shorter-side sizes for the random resize.
    pub scales: Vec<u32>,
    /// Per-channel RGB mean for normalisation.
    pub input_mean: Vec<f64>,
    /// Per-channel RGB std for normalisation.
    pub input_std: Vec<f64>,
    /// Shorter-side sizes of the resize before the random crop.
    pub train_random_resize: Vec<u32>,
    /// Probability of a horizontal flip in training.
    pub horizontal_flip_prob: f64,
    /// Smallest side of the random crop.
    pub train_random_crop_min: u32,
    /// Largest side of the random crop; must exceed `train_random_crop_min`.
    pub train_random_crop_max: u32,
    /// Longest side allowed after the random resize.
    pub random_resize_max_size: u32,
    /// Shorter side at validation/test time (longest side at most 1333).
    pub test_random_resize: u32,
    /// Pad every training image to the fixed maximum (TAO's guard against allocator growth); in
    /// evaluation only with `eval_padding: tao`.
    pub fixed_padding: bool,
    /// Large-scale jitter to a fixed square size (replaces the random resize/crop when set).
    pub fixed_random_crop: Option<u32>,
    /// Pad val/test images to a multiple of this instead of the fixed padding (with
    /// `eval_padding: tao`).
    pub pad_size_divisor: Option<u32>,
    /// Padding of val/test batches: `none` (every image at its own size) or `tao`.
    pub eval_padding: EvalPadding,
}

impl Default for AugmentationConfig {
    fn default() -> Self {
        Self {
            scales: vec![480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
            input_mean: vec![0.485, 0.456, 0.406],
            input_std: vec![0.229, 0.224, 0.225],
            train_random_resize: vec![400, 500, 600],
            horizontal_flip_prob: 0.5,
            train_random_crop_min: 384,
            train_random_crop_max: 600,
            random_resize_max_size: 1333,
            test_random_resize: 800,
            fixed_padding: true,
            fixed_random_crop: None,
            pad_size_divisor: None,
            eval_padding: EvalPadding::None,
        }
    }
}

/// The `dataset` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    pub train_sampler: TrainSampler,
    pub train_data_sources: Vec<DataSource>,
    pub val_data_sources: Vec<DataSource>,
    /// TAO writes this as one mapping; a list of them is accepted too.
    #[serde(deserialize_with = "one_or_many")]
    pub test_data_sources: Vec<DataSource>,
    pub infer_data_sources: Option<InferDataSource>,
    pub quant_calibration_data_sources: Option<CalibrationDataSource>,
    /// Images per rank per step.
    pub batch_size: u32,
    /// Decode threads per rank.
    pub workers: u32,
    pub pin_memory: bool,
    pub dataset_type: DatasetType,
    /// Largest category id + 1 (category ids start at 1).
    pub num_classes: u32,
    pub eval_class_ids: Option<Vec<u32>>,
    pub augmentation: AugmentationConfig,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            train_sampler: TrainSampler::DefaultSampler,
            train_data_sources: Vec::new(),
            val_data_sources: Vec::new(),
            test_data_sources: Vec::new(),
            infer_data_sources: None,
            quant_calibration_data_sources: None,
            batch_size: 4,
            workers: 8,
            pin_memory: true,
            dataset_type: DatasetType::Serialized,
            num_classes: 91,
            eval_class_ids: None,
            augmentation: AugmentationConfig::default(),
        }
    }
}

/// How `convert` splits KITTI sequences into partitions (TAO `partition_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionMode {
    Random,
    Sequence,
}

/// The `convert` section: TAO's KITTI → sharded COCO JSON conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvertConfig {
    /// A .txt file listing the data sources (dataset roots), one per line.
    pub input_source: Option<String>,
    /// Directory holding the datasets.
    pub data_root: Option<String>,
    /// Where the converted shards are written.
    pub results_dir: Option<String>,
    /// Image folder name relative to each dataset root.
    pub image_dir_name: Option<String>,
    /// KITTI label folder name relative to each dataset root.
    pub label_dir_name: Option<String>,
    /// Index of the validation partition when `num_partitions` > 1.
    pub val_split: u32,
    /// Shards per partition.
    pub num_shards: u32,
    /// Number of partitions.
    pub num_partitions: u32,
    pub partition_mode: Option<PartitionMode>,
    pub image_extension: String,
    /// JSON file mapping KITTI class names to output classes.
    pub mapping_path: Option<String>,
}

impl Default for ConvertConfig {
    fn default() -> Self {
        Self {
            input_source: None,
            data_root: None,
            results_dir: None,
            image_dir_name: None,
            label_dir_name: None,
            val_split: 0,
            num_shards: 20,
            num_partitions: 1,
            partition_mode: None,
            image_extension: ".jpg".to_string(),
            mapping_path: None,
        }
    }
}

/// Accepts either one value or a list of them (TAO writes some sources as a single mapping and
/// `infer_data_sources.image_dir` as a list).
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    // Through a Value rather than an untagged enum, so that an error inside an entry (a typo'd
    // key) keeps serde's message instead of becoming "did not match any variant".
    let value = serde_json::Value::deserialize(deserializer)?;
    let parsed = match value {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(_) => serde_json::from_value(value),
        one => serde_json::from_value(one).map(|x| vec![x]),
    };
    parsed.map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_data_sources_accepts_a_mapping_or_a_list() {
        let one: DatasetConfig = serde_json::from_str(
            r#"{"test_data_sources": {"image_dir": "a", "json_file": "b.json"}}"#,
        )
        .unwrap();
        let many: DatasetConfig = serde_json::from_str(
            r#"{"test_data_sources": [{"image_dir": "a", "json_file": "b.json"}]}"#,
        )
        .unwrap();
        assert_eq!(one.test_data_sources, many.test_data_sources);
        assert_eq!(one.test_data_sources.len(), 1);
    }

    #[test]
    fn infer_image_dir_accepts_a_string_or_a_list() {
        let s: InferDataSource =
            serde_json::from_str(r#"{"image_dir": "x", "classmap": "c.txt"}"#).unwrap();
        let l: InferDataSource =
            serde_json::from_str(r#"{"image_dir": ["x"], "classmap": "c.txt"}"#).unwrap();
        assert_eq!(s, l);
    }
}
