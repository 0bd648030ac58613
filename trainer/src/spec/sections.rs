//! The typed TAO Deformable DETR experiment spec: `model`, `train` (+`optim`), `evaluate`,
//! `inference`, `export`, and the top level. The `dataset` and `convert` sections live in
//! `ddetr-dataset`, which owns them.
//!
//! Keys and defaults mirror TAO's schema (`nvidia_tao_core/config/deformable_detr/{model,train,
//! default_config}.py` and `config/common/common_config.py`); `../shared/reference/
//! deformable-detr-anchors.md` §3.6 lists them. Where TAO's schema and its model builder disagree,
//! the builder wins (num_select: the schema says 300, `pl_dd_model` builds `PostProcess()` with 100).
//! ddetr's own additions are marked "(ddetr)".

use std::collections::BTreeMap;

use ddetr_dataset::config::{ConvertConfig, DatasetConfig};
use serde::{Deserialize, Serialize};

/// `model.backbone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backbone {
    /// (ddetr) for small CPU configs.
    #[serde(rename = "resnet_18")]
    Resnet18,
    /// (ddetr) for small CPU configs.
    #[serde(rename = "resnet_34")]
    Resnet34,
    #[serde(rename = "resnet_50")]
    Resnet50,
    /// TAO's GCViT family (`trainer/src/model/gcvit.rs`).
    #[serde(rename = "gc_vit_xxtiny")]
    GcVitXxtiny,
    #[serde(rename = "gc_vit_xtiny")]
    GcVitXtiny,
    #[serde(rename = "gc_vit_tiny")]
    GcVitTiny,
    #[serde(rename = "gc_vit_small")]
    GcVitSmall,
    #[serde(rename = "gc_vit_base")]
    GcVitBase,
    #[serde(rename = "gc_vit_large")]
    GcVitLarge,
    #[serde(rename = "gc_vit_large_384")]
    GcVitLarge384,
    /// TAO's FAN-hybrid family (`trainer/src/model/fan.rs`).
    #[serde(rename = "fan_tiny")]
    FanTiny,
    #[serde(rename = "fan_small")]
    FanSmall,
    #[serde(rename = "fan_base")]
    FanBase,
    #[serde(rename = "fan_large")]
    FanLarge,
}

impl Backbone {
    /// Whether this is one of the GCViT sizes.
    pub fn is_gcvit(self) -> bool {
        matches!(
            self,
            Self::GcVitXxtiny
                | Self::GcVitXtiny
                | Self::GcVitTiny
                | Self::GcVitSmall
                | Self::GcVitBase
                | Self::GcVitLarge
                | Self::GcVitLarge384
        )
    }

    /// TAO's stochastic-depth rate for this family (`model.backbone_drop_path_rate` unset).
    pub fn default_drop_path_rate(self) -> f64 {
        if self.is_fan() {
            crate::model::fan::DROP_PATH_RATE
        } else if self.is_gcvit() {
            crate::model::gcvit::DROP_PATH_RATE
        } else {
            0.0
        }
    }

    /// Whether this is one of the FAN sizes.
    pub fn is_fan(self) -> bool {
        matches!(
            self,
            Self::FanTiny | Self::FanSmall | Self::FanBase | Self::FanLarge
        )
    }

    /// Whether this is a ResNet (the one family with frozen BatchNorms and stem).
    pub fn is_resnet(self) -> bool {
        matches!(self, Self::Resnet18 | Self::Resnet34 | Self::Resnet50)
    }

    /// The spec's name (`resnet_50`, `gc_vit_tiny`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Resnet18 => "resnet_18",
            Self::Resnet34 => "resnet_34",
            Self::Resnet50 => "resnet_50",
            Self::GcVitXxtiny => "gc_vit_xxtiny",
            Self::GcVitXtiny => "gc_vit_xtiny",
            Self::GcVitTiny => "gc_vit_tiny",
            Self::GcVitSmall => "gc_vit_small",
            Self::GcVitBase => "gc_vit_base",
            Self::GcVitLarge => "gc_vit_large",
            Self::GcVitLarge384 => "gc_vit_large_384",
            Self::FanTiny => "fan_tiny",
            Self::FanSmall => "fan_small",
            Self::FanBase => "fan_base",
            Self::FanLarge => "fan_large",
        }
    }
}

/// `train.optim.optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Optimizer {
    AdamW,
    SGD,
}

/// `train.optim.lr_scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LrScheduler {
    /// Multiply the lr by `lr_decay` at each epoch of `lr_steps`.
    MultiStep,
    /// Multiply the lr by `lr_decay` every `lr_step_size` epochs.
    StepLR,
}

/// `train.optim.monitor_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitorName {
    ValLoss,
    TrainLoss,
}

/// `train.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// Autocast fp16 with dynamic loss scaling (CUDA only).
    Fp16,
    /// (ddetr) autocast bf16 (CUDA only).
    Bf16,
}

/// `train.distributed_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistributedStrategy {
    /// Replicated parameters, bucketed gradient all-reduce.
    Ddp,
    /// Sharded optimizer state (ZeRO-2 or more).
    Fsdp,
}

/// `export.format` (TAO: onnx or xdl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    Onnx,
}

/// The `model` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A torchvision ResNet or a GCViT (TAO's or timm's names) state dict loaded into
    /// `backbone.0.body` before training starts (`trainer/src/weights.rs load_backbone`).
    pub pretrained_backbone_path: Option<String>,
    /// TAO DLD export directory (accepted for compatibility; unused).
    pub dld_model_dir_path: Option<String>,
    pub backbone: Backbone,
    /// Train the backbone (ResNet: layer2..layer4, the stem and layer1 stay frozen, as
    /// upstream; GCViT: all of it).
    pub train_backbone: bool,
    pub num_queries: u32,
    pub num_feature_levels: u32,
    /// ResNet stages feeding the transformer: index i is `layer{i+1}`; 4 is the extra stride-2
    /// conv level on top of the last stage. Length equals `num_feature_levels`.
    pub return_interm_indices: Vec<u32>,
    pub cls_loss_coef: f64,
    pub bbox_loss_coef: f64,
    pub giou_loss_coef: f64,
    pub focal_alpha: f64,
    /// TAO keeps this key in the model section; clipping uses `train.clip_grad_norm`.
    pub clip_max_norm: f64,
    pub with_box_refine: bool,
    /// (ddetr) the official two-stage variant (needs `with_box_refine`).
    pub two_stage: bool,
    /// (ddetr) A backbone trained from scratch, set up as the transformers peer's (timm ResNet):
    /// the last FrozenBatchNorm of every residual block starts at zero (timm's `zero_init_last`,
    /// torchvision's `zero_init_residual`), so those branches add nothing and their convs are
    /// frozen and skipped; the stem and layer1 train (upstream freezes them as pretrained).
    pub backbone_from_scratch: bool,
    /// (ddetr) A transformer backbone's stochastic-depth rate: a GCViT's rises linearly over its
    /// blocks from 0 to this, a FAN's is this on every FAN block; unset (null), TAO's fixed value
    /// for the family (GCViT 0.2, FAN 0.3). Unused by a ResNet.
    pub backbone_drop_path_rate: Option<f64>,
    /// Top-k detections kept by the post-process.
    pub num_select: u32,
    pub nheads: u32,
    pub dropout_ratio: f64,
    pub hidden_dim: u32,
    pub enc_layers: u32,
    pub dec_layers: u32,
    pub dim_feedforward: u32,
    pub dec_n_points: u32,
    pub enc_n_points: u32,
    pub aux_loss: bool,
    /// DC5: dilate the last ResNet stage instead of striding.
    pub dilation: bool,
    pub loss_types: Vec<String>,
    /// Parameter-name prefixes trained with `lr_backbone`.
    pub backbone_names: Vec<String>,
    /// Parameter-name substrings trained with `lr × lr_linear_proj_mult`.
    pub linear_proj_names: Vec<String>,
    // DINO only (TAO's `DINOModelConfig`; a Deformable DETR spec that sets one is refused).
    /// DINO: weight of the encoder (interm) proposal losses.
    pub interm_loss_coef: f64,
    /// DINO: no box losses on the encoder proposals (class loss only).
    pub no_interm_box_loss: bool,
    /// DINO: pre-norm layers (TAO's schema keeps the key; only `false`, post-norm, exists).
    pub pre_norm: bool,
    /// DINO: query selection (`standard`: mixed query selection, paper §3.4).
    pub two_stage_type: String,
    /// DINO: decoder self-attention (`sa`).
    pub decoder_sa_type: String,
    /// DINO: learned content queries (`tgt_embed`); false takes the selected encoder features.
    pub embed_init_tgt: bool,
    /// DINO: fixed anchor sizes (−1 = learned; only −1 is supported).
    pub fix_refpoints_hw: i64,
    /// DINO: temperature of the feature maps' sine position embedding along y.
    #[serde(rename = "pe_temperatureH")]
    pub pe_temperature_h: f64,
    /// DINO: the same along x.
    #[serde(rename = "pe_temperatureW")]
    pub pe_temperature_w: f64,
    /// DINO: contrastive denoising training.
    pub use_dn: bool,
    /// DINO: denoising queries per group budget (groups = 2·dn_number // (2·most boxes in an image)).
    pub dn_number: u32,
    /// DINO: box noise λ (corners move by up to λ·(w/2, h/2); negatives by λ to 2λ).
    pub dn_box_noise_scale: f64,
    /// DINO: label noise ratio (a noised query's label is redrawn with probability ratio / 2).
    pub dn_label_noise_ratio: f64,
    /// DINO distill: weight of the distillation loss.
    pub distillation_loss_coef: f64,
    /// (ddetr) DINO: one class head shared by every decoder layer (the official default).
    pub dec_pred_class_embed_share: bool,
    /// (ddetr) DINO: one box head shared by every decoder layer (the official default).
    pub dec_pred_bbox_embed_share: bool,
}

/// `model` keys that only Deformable DETR has.
pub const DEFORMABLE_DETR_ONLY_KEYS: &[&str] = &["with_box_refine", "two_stage"];
/// `model` keys that only DINO has.
pub const DINO_ONLY_KEYS: &[&str] = &[
    "interm_loss_coef",
    "no_interm_box_loss",
    "pre_norm",
    "two_stage_type",
    "decoder_sa_type",
    "embed_init_tgt",
    "fix_refpoints_hw",
    "pe_temperatureH",
    "pe_temperatureW",
    "use_dn",
    "dn_number",
    "dn_box_noise_scale",
    "dn_label_noise_ratio",
    "distillation_loss_coef",
    "dec_pred_class_embed_share",
    "dec_pred_bbox_embed_share",
];

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            pretrained_backbone_path: None,
            dld_model_dir_path: None,
            backbone: Backbone::Resnet50,
            train_backbone: true,
            num_queries: 300,
            num_feature_levels: 4,
            return_interm_indices: vec![1, 2, 3, 4],
            cls_loss_coef: 2.0,
            bbox_loss_coef: 5.0,
            giou_loss_coef: 2.0,
            focal_alpha: 0.25,
            clip_max_norm: 0.1,
            with_box_refine: true,
            two_stage: false,
            backbone_from_scratch: false,
            backbone_drop_path_rate: None,
            num_select: 100,
            nheads: 8,
            dropout_ratio: 0.3,
            hidden_dim: 256,
            enc_layers: 6,
            dec_layers: 6,
            dim_feedforward: 1024,
            dec_n_points: 4,
            enc_n_points: 4,
            aux_loss: true,
            dilation: false,
            loss_types: vec!["labels".into(), "boxes".into()],
            backbone_names: vec!["backbone.0".into()],
            linear_proj_names: vec!["reference_points".into(), "sampling_offsets".into()],
            interm_loss_coef: 1.0,
            no_interm_box_loss: false,
            pre_norm: false,
            two_stage_type: "standard".into(),
            decoder_sa_type: "sa".into(),
            embed_init_tgt: true,
            fix_refpoints_hw: -1,
            pe_temperature_h: 20.0,
            pe_temperature_w: 20.0,
            use_dn: true,
            dn_number: 100,
            dn_box_noise_scale: 1.0,
            dn_label_noise_ratio: 0.5,
            distillation_loss_coef: 1.0,
            dec_pred_class_embed_share: true,
            dec_pred_bbox_embed_share: true,
        }
    }
}

impl ModelConfig {
    /// TAO's DINO defaults (`nvidia_tao_core/config/dino/model.py`): the shared keys where they
    /// differ from Deformable DETR's.
    pub fn dino_default() -> Self {
        Self {
            num_select: 300,
            dropout_ratio: 0.0,
            dim_feedforward: 2048,
            ..Self::default()
        }
    }
}

/// `train.optim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub optimizer: Optimizer,
    pub monitor_name: MonitorName,
    pub lr: f64,
    pub lr_backbone: f64,
    pub lr_linear_proj_mult: f64,
    /// SGD momentum.
    pub momentum: f64,
    pub weight_decay: f64,
    pub lr_scheduler: LrScheduler,
    /// Epochs at which MultiStep decays the lr; strictly increasing.
    pub lr_steps: Vec<u32>,
    /// StepLR period in epochs.
    pub lr_step_size: u32,
    pub lr_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            optimizer: Optimizer::AdamW,
            monitor_name: MonitorName::ValLoss,
            lr: 2e-4,
            lr_backbone: 2e-5,
            lr_linear_proj_mult: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            lr_scheduler: LrScheduler::MultiStep,
            lr_steps: vec![40],
            lr_step_size: 40,
            lr_decay: 0.1,
        }
    }
}

/// `train.cudnn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CudnnConfig {
    pub benchmark: bool,
    pub deterministic: bool,
}

impl Default for CudnnConfig {
    fn default() -> Self {
        Self {
            benchmark: false,
            deterministic: true,
        }
    }
}

/// `train.ema`: after each optimizer step `ema = d·ema + (1 − d)·weights` with
/// `d = decay · (1 − exp(−updates / warmups))` (RT-DETR's `ModelEMA`; `warmups` 0: `d = decay`).
/// Validation runs on the average, checkpoints hold it beside the weights, and `evaluate`,
/// `inference` and `export` of such a checkpoint use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    pub enable: bool,
    pub decay: f64,
    pub warmups: u32,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            enable: false,
            decay: 0.9999,
            warmups: 2000,
        }
    }
}

/// `train.checkpoint_interval_unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntervalUnit {
    Epoch,
    Step,
}

/// `train.early_stopping.monitor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EarlyStopMetric {
    #[serde(rename = "val_mAP50")]
    ValMap50,
    #[serde(rename = "val_mAP")]
    ValMap,
    #[serde(rename = "train_loss")]
    TrainLoss,
}

impl EarlyStopMetric {
    /// The spec's (and status.json's) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ValMap50 => "val_mAP50",
            Self::ValMap => "val_mAP",
            Self::TrainLoss => "train_loss",
        }
    }
}

/// `train.early_stopping`: stop after `patience` observations of `monitor` (validations, or
/// epochs for `train_loss`) without a gain above `min_delta` over the best (Lightning's rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    pub enable: bool,
    pub monitor: EarlyStopMetric,
    pub patience: u32,
    pub min_delta: f64,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        Self {
            enable: false,
            monitor: EarlyStopMetric::ValMap50,
            patience: 3,
            min_delta: 0.0,
        }
    }
}

/// The `train` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub num_gpus: u32,
    pub gpu_ids: Vec<u32>,
    pub num_nodes: u32,
    /// Base seed (rank r uses seed + r); negative disables the fixed seed.
    pub seed: i64,
    pub cudnn: CudnnConfig,
    pub num_epochs: u32,
    /// (ddetr) A wall-clock budget in minutes; 0 = none. The number of epochs and the lr steps are
    /// fitted to the measured throughput so the run ends, validated and checkpointed, within it
    /// (`num_epochs` then only sets the shape of the lr schedule). See `crate::train::budget`.
    pub max_minutes: f64,
    /// (ddetr) Micro batches of `dataset.batch_size` per optimizer step: their gradients add up
    /// (one gradient all-reduce per optimizer step) and the loss is normalised by the boxes of
    /// all of them, so N micro batches of b images step as one batch of N·b would.
    pub grad_accum_steps: u32,
    /// (ddetr) An exponential moving average of the weights (RT-DETR's and D-FINE's `ModelEMA`).
    pub ema: EmaConfig,
    /// Epochs (or, with `checkpoint_interval_unit: step`, optimizer steps) between
    /// `model_epoch_NNN` (`model_step_NNNNNN`) checkpoints.
    pub checkpoint_interval: u32,
    /// (TAO 7) What `checkpoint_interval` counts: `epoch` or `step`.
    pub checkpoint_interval_unit: IntervalUnit,
    /// (ddetr) Stop when a metric stops improving.
    pub early_stopping: EarlyStoppingConfig,
    /// Epochs between validations.
    pub validation_interval: u32,
    pub resume_training_checkpoint_path: Option<String>,
    /// Defaults to `<results_dir>/train`.
    pub results_dir: Option<String>,
    /// Parameter-name prefixes to freeze, e.g. `["backbone", "transformer.encoder"]`.
    pub freeze: Vec<String>,
    /// A full Deformable DETR checkpoint to start from (class heads of another shape are skipped).
    pub pretrained_model_path: Option<String>,
    /// Global gradient L2-norm clip; 0 disables.
    pub clip_grad_norm: f64,
    pub is_dry_run: bool,
    pub optim: OptimConfig,
    pub precision: Precision,
    pub distributed_strategy: DistributedStrategy,
    /// Recompute encoder activations in backward to save memory.
    pub activation_checkpoint: bool,
    pub verbose: bool,
    pub input_width: Option<u32>,
    pub input_height: Option<u32>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            num_gpus: 1,
            gpu_ids: vec![0],
            num_nodes: 1,
            seed: 1234,
            cudnn: CudnnConfig::default(),
            num_epochs: 10,
            max_minutes: 0.0,
            grad_accum_steps: 1,
            ema: EmaConfig::default(),
            checkpoint_interval: 1,
            checkpoint_interval_unit: IntervalUnit::Epoch,
            early_stopping: EarlyStoppingConfig::default(),
            validation_interval: 1,
            resume_training_checkpoint_path: None,
            results_dir: None,
            freeze: Vec::new(),
            pretrained_model_path: None,
            clip_grad_norm: 0.1,
            is_dry_run: false,
            optim: OptimConfig::default(),
            precision: Precision::Fp32,
            distributed_strategy: DistributedStrategy::Ddp,
            activation_checkpoint: true,
            verbose: false,
            input_width: None,
            input_height: None,
        }
    }
}

/// The `evaluate` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluateConfig {
    pub num_gpus: u32,
    pub gpu_ids: Vec<u32>,
    pub num_nodes: u32,
    pub checkpoint: Option<String>,
    /// TAO-deploy only (accepted for compatibility; unused).
    pub trt_engine: Option<String>,
    /// Defaults to `<results_dir>/evaluate`.
    pub results_dir: Option<String>,
    pub input_width: Option<u32>,
    pub input_height: Option<u32>,
    pub conf_threshold: f64,
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        Self {
            num_gpus: 1,
            gpu_ids: vec![0],
            num_nodes: 1,
            checkpoint: None,
            trt_engine: None,
            results_dir: None,
            input_width: None,
            input_height: None,
            conf_threshold: 0.0,
        }
    }
}

/// The `inference` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    pub num_gpus: u32,
    pub gpu_ids: Vec<u32>,
    pub num_nodes: u32,
    pub checkpoint: Option<String>,
    /// TAO-deploy only (accepted for compatibility; unused).
    pub trt_engine: Option<String>,
    /// Defaults to `<results_dir>/inference`.
    pub results_dir: Option<String>,
    /// Class name → colour name or `#rrggbb` for the rendered boxes.
    pub color_map: Option<BTreeMap<String, String>>,
    pub conf_threshold: f64,
    pub is_internal: bool,
    pub input_width: Option<u32>,
    pub input_height: Option<u32>,
    pub outline_width: u32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            num_gpus: 1,
            gpu_ids: vec![0],
            num_nodes: 1,
            checkpoint: None,
            trt_engine: None,
            results_dir: None,
            color_map: None,
            conf_threshold: 0.5,
            is_internal: false,
            input_width: None,
            input_height: None,
            outline_width: 3,
        }
    }
}

/// The `export` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// Defaults to `<results_dir>/export`.
    pub results_dir: Option<String>,
    pub gpu_id: u32,
    pub checkpoint: Option<String>,
    pub onnx_file: Option<String>,
    pub on_cpu: bool,
    pub input_channel: u32,
    pub input_width: u32,
    pub input_height: u32,
    pub opset_version: u32,
    /// -1 exports a dynamic batch axis.
    pub batch_size: i32,
    pub verbose: bool,
    pub serialize_nvdsinfer: bool,
    pub format: ExportFormat,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            results_dir: None,
            gpu_id: 0,
            checkpoint: None,
            onnx_file: None,
            on_cpu: false,
            input_channel: 3,
            input_width: 960,
            input_height: 544,
            opset_version: 17,
            batch_size: -1,
            verbose: false,
            serialize_nvdsinfer: false,
            format: ExportFormat::Onnx,
        }
    }
}

/// `quantize.backend` (TAO's names). ddetr quantizes the exported ONNX graph, which is what TAO's
/// `modelopt.onnx` backend does; the PyTorch backends (`torchao`, `modelopt.pytorch`) are
/// refused with a line that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuantizeBackend {
    #[serde(rename = "modelopt.onnx")]
    ModeloptOnnx,
    #[serde(rename = "modelopt.pytorch")]
    ModeloptPytorch,
    #[serde(rename = "torchao")]
    Torchao,
}

/// `quantize.mode`: weights and activations (`static_ptq`) or weights only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantizeMode {
    StaticPtq,
    WeightOnlyPtq,
}

/// `quantize.algorithm`: the activation calibration (TAO's names; `percentile` is ddetr's, its
/// `p` in `backend_kwargs.percentile`). TAO's weight-only LLM methods (`awq_*`, `rtn_dq`) are
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationAlgorithm {
    Minmax,
    Max,
    Entropy,
    Percentile,
    AwqClip,
    AwqLite,
    AwqFull,
    RtnDq,
}

/// `quantize.layers[].weights` / `.activations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TensorQuantization {
    /// `int8` or `native` (keep float); TAO's fp8 types are refused (no CPU kernels).
    pub dtype: String,
    pub observer_or_fake_quant: String,
    pub quant_axis: Option<i64>,
    pub observer_or_fake_quant_kwargs: BTreeMap<String, serde_json::Value>,
}

impl Default for TensorQuantization {
    fn default() -> Self {
        Self {
            dtype: "int8".into(),
            observer_or_fake_quant: String::new(),
            quant_axis: None,
            observer_or_fake_quant_kwargs: BTreeMap::new(),
        }
    }
}

/// `quantize.layers[]`: modules matched by `module_name` (an `fnmatch` pattern on the module
/// path, else on the class name `Conv2d`/`Linear`) and how they are quantized; a `null`
/// `weights`/`activations` keeps that part float. The last matching entry wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerQuantization {
    pub module_name: String,
    pub weights: Option<TensorQuantization>,
    pub activations: Option<TensorQuantization>,
}

impl Default for LayerQuantization {
    fn default() -> Self {
        Self {
            module_name: String::new(),
            weights: None,
            activations: None,
        }
    }
}

/// The `quantize` section (TAO's `ModelQuantizationConfig`). ddetr's defaults differ from TAO's
/// (`torchao`, `weight_only_ptq`) because ddetr quantizes the ONNX graph: `modelopt.onnx`,
/// `static_ptq`, `minmax`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantizeConfig {
    pub backend: QuantizeBackend,
    pub mode: QuantizeMode,
    pub algorithm: CalibrationAlgorithm,
    /// Empty: every Conv2d and Linear, weights and activations in int8.
    pub layers: Vec<LayerQuantization>,
    /// Modules kept in float besides ddetr's own list (the heads and the deformable sampling).
    pub skip_names: Vec<String>,
    /// The trained checkpoint to quantize; empty: `export.checkpoint`.
    pub model_path: Option<String>,
    /// Defaults to `<results_dir>/quantize`.
    pub results_dir: Option<String>,
    /// (ddetr) `calibration_images` (default 64), `percentile` (default 99.99), `weight_bits`
    /// (8, or 7 for CPUs without VNNI whose u8×s8 kernels saturate; default 8), `latency_runs`
    /// (default 30; 0 skips the timing).
    pub backend_kwargs: BTreeMap<String, serde_json::Value>,
    /// `cpu` (ddetr calibrates with onnxruntime on the CPU; `cuda` is accepted and runs there too).
    pub device: String,
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        Self {
            backend: QuantizeBackend::ModeloptOnnx,
            mode: QuantizeMode::StaticPtq,
            algorithm: CalibrationAlgorithm::Minmax,
            layers: Vec::new(),
            skip_names: Vec::new(),
            model_path: None,
            results_dir: None,
            backend_kwargs: BTreeMap::new(),
            device: "cpu".into(),
        }
    }
}

/// `automl_policy` (TAO's skills): `on` makes `ddetr train` run the search of the `automl`
/// section instead of one training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AutomlPolicy {
    #[default]
    Off,
    On,
}

/// `automl.automl_algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutomlAlgorithm {
    Bayesian,
    Hyperband,
    Random,
}

/// `automl.metric`: what a trial is judged by (`train_loss` is minimised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutomlMetric {
    #[serde(rename = "val_mAP50")]
    ValMap50,
    #[serde(rename = "val_mAP")]
    ValMap,
    #[serde(rename = "train_loss")]
    TrainLoss,
}

impl AutomlMetric {
    /// The `status.json` kpi key.
    pub fn key(self) -> &'static str {
        match self {
            Self::ValMap50 => "val_mAP50",
            Self::ValMap => "val_mAP",
            Self::TrainLoss => "train_loss",
        }
    }
}

/// `automl.automl_range_override[]`: a searched parameter's bounds, options or scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutomlRange {
    /// The spec key (`train.optim.lr`).
    pub parameter: String,
    #[serde(default)]
    pub valid_min: Option<f64>,
    #[serde(default)]
    pub valid_max: Option<f64>,
    /// A choice among these values instead of a range.
    #[serde(default)]
    pub valid_options: Option<Vec<serde_json::Value>>,
    /// (ddetr) `log` or `linear`; the default list's scale otherwise (log for rates and decays).
    #[serde(default)]
    pub scale: Option<String>,
}

/// The `automl` section (TAO's AutoML settings; ddetr's additions marked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutomlConfig {
    pub automl_algorithm: AutomlAlgorithm,
    /// Trials in all.
    pub automl_max_recommendations: u32,
    /// Trials at once (the machine's cores divided among them).
    pub automl_max_concurrent: u32,
    pub metric: AutomlMetric,
    /// Hyperband's largest epochs per trial (`R`; TAO 6.26 calls it `automl_max_epochs`); 0:
    /// `train.num_epochs`.
    #[serde(rename = "automl_R", alias = "automl_max_epochs")]
    pub automl_r: u32,
    /// Hyperband's reduction factor (`ν`; TAO 6.26: `automl_reduction_factor`).
    #[serde(alias = "automl_reduction_factor")]
    pub automl_nu: u32,
    /// Trial epochs are multiplied by this.
    pub epoch_multiplier: u32,
    /// Spec keys searched; empty: ddetr's default list for the architecture.
    pub automl_hyperparameters: Vec<String>,
    pub automl_range_override: Vec<AutomlRange>,
    /// (ddetr) Wall-clock minutes for the whole search; 0: no limit.
    pub budget_minutes: f64,
    /// (ddetr) Trainer processes per trial (`ddetr-launch --nproc-per-node`).
    pub nproc_per_trial: u32,
    /// (ddetr) Nodes per trial (`ddetr-launch --nodes`); above 1 needs `launch_prefix`, the
    /// command that starts one agent per node (e.g. `[srun, --nodes=2, --ntasks-per-node=1]`).
    pub nodes_per_trial: u32,
    /// (ddetr) A command the trial's `ddetr-launch` runs under (`srun …`, `mpirun …`); empty: the
    /// launcher runs here, pinned to the trial's share of the cores.
    pub launch_prefix: Vec<String>,
    /// (ddetr) Node 0's rendezvous port of a multi-node trial is this + the trial's number.
    pub master_port: u16,
    /// (ddetr) The search's seed.
    pub seed: u64,
    /// Defaults to `<results_dir>/automl`.
    pub results_dir: Option<String>,
    /// TAO: delete the checkpoints of trials that are not the best (ddetr keeps the best's).
    pub automl_delete_intermediate_ckpt: bool,
}

impl Default for AutomlConfig {
    fn default() -> Self {
        Self {
            automl_algorithm: AutomlAlgorithm::Bayesian,
            automl_max_recommendations: 20,
            automl_max_concurrent: 1,
            metric: AutomlMetric::ValMap50,
            automl_r: 0,
            automl_nu: 3,
            epoch_multiplier: 1,
            automl_hyperparameters: Vec::new(),
            automl_range_override: Vec::new(),
            budget_minutes: 0.0,
            nproc_per_trial: 1,
            nodes_per_trial: 1,
            launch_prefix: Vec::new(),
            master_port: 29400,
            seed: 1,
            results_dir: None,
            automl_delete_intermediate_ckpt: false,
        }
    }
}

/// `distill.bindings[].criterion` (TAO's `core/distillation/losses.py`): the mean absolute or
/// squared difference, or KL(teacher ‖ student) of the softmax over the last dimension (element
/// mean, no temperature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DistillCriterion {
    L1,
    L2,
    KL,
}

/// One `distill.bindings` entry: a student output pulled towards the same teacher output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillBinding {
    /// `model.backbone.0.body` (the input projections' feature maps, TAO's `srcs`),
    /// `pred_logits` or `pred_boxes` (the last decoder layer's predictions, query by query).
    pub student_module_name: String,
    /// The same name (TAO ignores it for these three outputs).
    pub teacher_module_name: String,
    pub criterion: DistillCriterion,
    /// The binding's weight. TAO applies it twice, so the term is weighted by its square.
    #[serde(default = "unit_weight")]
    pub weight: f64,
}

fn unit_weight() -> f64 {
    1.0
}

/// The `distill` section (TAO DINO's `DINODistillationConfig`): a frozen teacher and the
/// outputs the student is pulled towards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// (ddetr) The teacher's architecture, `dino` (TAO's, the default) or `deformable_detr`.
    #[serde(default)]
    pub teacher_model_name: Option<String>,
    /// The teacher's `model` section (the teacher architecture's defaults under it).
    pub teacher: ModelConfig,
    /// The teacher's trained weights (any layout `evaluate.checkpoint` takes); required by
    /// `ddetr dino distill`.
    #[serde(default)]
    pub pretrained_teacher_model_path: Option<String>,
    #[serde(default)]
    pub bindings: Vec<DistillBinding>,
    /// Defaults to `<results_dir>/distill`.
    #[serde(default)]
    pub results_dir: Option<String>,
}

impl DistillConfig {
    /// The teacher's architecture (validated).
    pub fn teacher_architecture(&self) -> Architecture {
        Architecture::from_model_name(Some(self.teacher_model_name.as_deref().unwrap_or("dino")))
            .expect("validation accepts known teacher model names only")
    }
}

/// The detection architecture a spec trains: its `model_name` (TAO's model-agnostic entry
/// point's key), or the `ddetr dino …` command group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `deformable_detr` (also when `model_name` is unset).
    DeformableDetr,
    /// `dino`.
    Dino,
}

impl Architecture {
    /// Every `model_name` ddetr trains.
    pub const NAMES: [&'static str; 2] = ["deformable_detr", "dino"];

    /// The architecture a `model_name` names; None for an unknown name.
    pub fn from_model_name(name: Option<&str>) -> Option<Self> {
        match name.map(str::trim) {
            None | Some("") | Some("deformable_detr") => Some(Self::DeformableDetr),
            Some("dino") => Some(Self::Dino),
            Some(_) => None,
        }
    }

    /// The `model_name` of this architecture.
    pub fn name(self) -> &'static str {
        match self {
            Self::DeformableDetr => "deformable_detr",
            Self::Dino => "dino",
        }
    }

    /// The `model` keys the other architecture has and this one does not.
    pub fn foreign_model_keys(self) -> &'static [&'static str] {
        match self {
            Self::DeformableDetr => DINO_ONLY_KEYS,
            Self::Dino => DEFORMABLE_DETR_ONLY_KEYS,
        }
    }
}

/// The whole experiment spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentSpec {
    /// The architecture: `deformable_detr` (the default) or `dino` (see [`Architecture`]).
    pub model_name: Option<String>,
    /// TAO's checkpoint encryption key. ddetr does not encrypt: must be empty.
    pub encryption_key: Option<String>,
    /// Where every task writes; each task uses `<results_dir>/<task>` unless its own is set.
    pub results_dir: String,
    pub model: ModelConfig,
    pub dataset: DatasetConfig,
    pub train: TrainConfig,
    pub evaluate: EvaluateConfig,
    pub inference: InferenceConfig,
    pub export: ExportConfig,
    /// TAO's `quantize` task: INT8 QDQ ONNX from a trained checkpoint.
    pub quantize: QuantizeConfig,
    /// `on`: `ddetr train` runs the `automl` search.
    pub automl_policy: AutomlPolicy,
    /// `ddetr automl`'s search.
    pub automl: AutomlConfig,
    pub convert: ConvertConfig,
    /// TAO's Weights & Biases settings (accepted; ddetr does not upload anywhere).
    pub wandb: Option<serde_json::Value>,
    /// TAO-deploy's TensorRT engine settings (accepted; not a ddetr task).
    pub gen_trt_engine: Option<serde_json::Value>,
    /// DINO's `distill` task: the teacher and the bindings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

impl Default for ExperimentSpec {
    fn default() -> Self {
        Self {
            model_name: None,
            encryption_key: None,
            results_dir: "results".into(),
            model: ModelConfig::default(),
            dataset: DatasetConfig::default(),
            train: TrainConfig::default(),
            evaluate: EvaluateConfig::default(),
            inference: InferenceConfig::default(),
            export: ExportConfig::default(),
            quantize: QuantizeConfig::default(),
            automl_policy: AutomlPolicy::Off,
            automl: AutomlConfig::default(),
            convert: ConvertConfig::default(),
            wandb: None,
            gen_trt_engine: None,
            distill: None,
        }
    }
}

/// The tasks that own a results sub-folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Train,
    Evaluate,
    Inference,
    Export,
    Distill,
    Quantize,
    Automl,
}

impl ExperimentSpec {
    /// The defaults of `arch`'s spec (TAO's schema for that model).
    pub fn defaults_for(arch: Architecture) -> Self {
        match arch {
            Architecture::DeformableDetr => Self::default(),
            Architecture::Dino => {
                let mut spec = Self {
                    model_name: Some(arch.name().into()),
                    model: ModelConfig::dino_default(),
                    ..Self::default()
                };
                spec.train.optim.lr_steps = vec![11];
                spec.train.optim.lr_step_size = 11;
                spec
            }
        }
    }

    /// The architecture of this (validated) spec.
    pub fn architecture(&self) -> Architecture {
        Architecture::from_model_name(self.model_name.as_deref())
            .expect("validation accepts known model names only")
    }

    /// The folder a task writes to: its own `results_dir` if set, else `<results_dir>/<task>`
    /// (TAO's layout).
    pub fn task_results_dir(&self, task: Task) -> std::path::PathBuf {
        let (own, name) = match task {
            Task::Train => (&self.train.results_dir, "train"),
            Task::Evaluate => (&self.evaluate.results_dir, "evaluate"),
            Task::Inference => (&self.inference.results_dir, "inference"),
            Task::Export => (&self.export.results_dir, "export"),
            Task::Quantize => (&self.quantize.results_dir, "quantize"),
            Task::Automl => (&self.automl.results_dir, "automl"),
            Task::Distill => (
                self.distill.as_ref().map_or(&None, |d| &d.results_dir),
                "distill",
            ),
        };
        match own {
            Some(dir) if !dir.is_empty() => dir.into(),
            _ => std::path::Path::new(&self.results_dir).join(name),
        }
    }
}
