//! Cross-field rules of the experiment spec. Each violation is one [`SpecError::Invalid`] naming the
//! key, what is wrong and what to set; adjustments TAO makes silently are made here with a
//! [`Notice`].

use super::sections::{
    Architecture, DistillConfig, DistillCriterion, EarlyStopMetric, ExperimentSpec, LrScheduler,
    ModelConfig,
};
use super::SpecError;

/// Something validation changed or wants the user to know, printed once by the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice(pub String);

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// OmegaConf's "mandatory value missing" placeholder, as TAO's own experiment specs write it.
const MISSING: &str = "???";

/// Largest ResNet stage index; index 4 is the extra stride-2 conv level on top of stage 3.
const MAX_INTERM_INDEX: u32 = 4;
/// GroupNorm(32, hidden_dim) in `input_proj` needs hidden_dim divisible by this.
const GROUP_NORM_GROUPS: u32 = 32;

fn invalid(key: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Checks the spec, normalising what TAO normalises (num_gpus vs gpu_ids), and returns notices.
pub fn validate(spec: &mut ExperimentSpec) -> Result<Vec<Notice>, SpecError> {
    let mut notices = Vec::new();
    validate_model(spec)?;
    if let Some(d) = &spec.distill {
        validate_distill(spec, d)?;
    }
    validate_dataset(spec)?;
    validate_train(spec)?;
    crate::quantize::Settings::from_spec(&spec.quantize).map_err(|(k, m)| invalid(&k, m))?;
    validate_automl(spec)?;
    for (section, num_gpus, gpu_ids) in [
        ("train", &mut spec.train.num_gpus, &mut spec.train.gpu_ids),
        (
            "evaluate",
            &mut spec.evaluate.num_gpus,
            &mut spec.evaluate.gpu_ids,
        ),
        (
            "inference",
            &mut spec.inference.num_gpus,
            &mut spec.inference.gpu_ids,
        ),
    ] {
        if let Some(n) = reconcile_gpus(section, num_gpus, gpu_ids)? {
            notices.push(n);
        }
    }
    if spec.encryption_key.as_deref() == Some(MISSING) {
        spec.encryption_key = None;
        notices.push(Notice(format!("encryption_key '{MISSING}' (TAO's placeholder for a key to give on the command line) is ignored: ddetr writes plain, unencrypted files")));
    }
    if spec
        .encryption_key
        .as_deref()
        .is_some_and(|k| !k.is_empty())
    {
        return Err(invalid(
            "encryption_key",
            "is set, but ddetr does not encrypt checkpoints (they are plain safetensors): remove encryption_key from the spec",
        ));
    }
    if spec.wandb.is_some() {
        notices.push(Notice("wandb settings are accepted for TAO compatibility but ignored: ddetr logs to results_dir (status.json, plots)".into()));
    }
    if spec.gen_trt_engine.is_some() {
        notices.push(Notice("gen_trt_engine is a TAO-deploy task and is ignored by ddetr: build the engine from the exported ONNX with trtexec".into()));
    }
    Ok(notices)
}

/// The DINO model keys: the variants TAO's schema names that ddetr builds, and the noise ranges.
fn validate_dino(m: &ModelConfig) -> Result<(), SpecError> {
    for (key, value, only) in [
        (
            "model.two_stage_type",
            m.two_stage_type.as_str(),
            "standard",
        ),
        ("model.decoder_sa_type", m.decoder_sa_type.as_str(), "sa"),
    ] {
        if value != only {
            return Err(invalid(
                key,
                format!("is '{value}'; DINO is built with '{only}' (TAO's default and only trained variant): set {key}: {only}"),
            ));
        }
    }
    if m.pre_norm {
        return Err(invalid(
            "model.pre_norm",
            "is true; DINO's layers are post-norm: set model.pre_norm: false",
        ));
    }
    if m.fix_refpoints_hw != -1 {
        return Err(invalid(
            "model.fix_refpoints_hw",
            format!(
                "is {}; with standard query selection the anchors' sizes are learned: set it to -1",
                m.fix_refpoints_hw
            ),
        ));
    }
    for (key, v) in [
        ("model.pe_temperatureH", m.pe_temperature_h),
        ("model.pe_temperatureW", m.pe_temperature_w),
    ] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(invalid(
                key,
                format!("is {v}; a temperature must be positive (TAO uses 20)"),
            ));
        }
    }
    for (key, v) in [
        ("model.dn_box_noise_scale", m.dn_box_noise_scale),
        ("model.interm_loss_coef", m.interm_loss_coef),
        ("model.distillation_loss_coef", m.distillation_loss_coef),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(invalid(key, format!("is {v}; it must be 0 or more")));
        }
    }
    if !(0.0..=1.0).contains(&m.dn_label_noise_ratio) {
        return Err(invalid(
            "model.dn_label_noise_ratio",
            format!(
                "is {}; it must be within [0, 1] (TAO uses 0.5)",
                m.dn_label_noise_ratio
            ),
        ));
    }
    if m.use_dn && m.dn_number == 0 {
        return Err(invalid(
            "model.dn_number",
            "is 0 with model.use_dn: true: set dn_number (TAO uses 100) or use_dn: false",
        ));
    }
    Ok(())
}

/// The outputs a distillation binding can name: TAO's special cases.
pub const DISTILL_OUTPUTS: [&str; 3] = ["model.backbone.0.body", "pred_logits", "pred_boxes"];

/// The `distill` section: a DINO student, a valid teacher model (its errors name
/// `distill.teacher.*`), bindings on outputs both models have with equal shapes.
fn validate_distill(spec: &ExperimentSpec, d: &DistillConfig) -> Result<(), SpecError> {
    if spec.architecture() != Architecture::Dino {
        return Err(invalid(
            "distill",
            "is DINO's distill task, but this spec trains deformable_detr: set model_name: dino (ddetr dino distill)",
        ));
    }
    // The teacher never post-processes: its num_select is not checked.
    let teacher = ExperimentSpec {
        model_name: Some(d.teacher_architecture().name().into()),
        model: ModelConfig {
            num_select: 1,
            ..d.teacher.clone()
        },
        distill: None,
        ..spec.clone()
    };
    validate_model(&teacher).map_err(|e| match e {
        SpecError::Invalid { key, message } => SpecError::Invalid {
            key: key.replacen("model.", "distill.teacher.", 1),
            message: message.replace("model.", "distill.teacher."),
        },
        other => other,
    })?;
    let (s, t) = (&spec.model, &d.teacher);
    for (i, b) in d.bindings.iter().enumerate() {
        let key = |k: &str| format!("distill.bindings[{i}].{k}");
        let name = b.student_module_name.as_str();
        if !DISTILL_OUTPUTS.contains(&name) {
            return Err(invalid(
                &key("student_module_name"),
                format!(
                    "is '{name}'; ddetr distills {}: use one of these",
                    DISTILL_OUTPUTS.join(", ")
                ),
            ));
        }
        if b.teacher_module_name != name {
            return Err(invalid(
                &key("teacher_module_name"),
                format!(
                    "is '{}' but the student's is '{name}': a binding compares the same output of both models, so set teacher_module_name: {name}",
                    b.teacher_module_name
                ),
            ));
        }
        if !(b.weight >= 0.0 && b.weight.is_finite()) {
            return Err(invalid(
                &key("weight"),
                format!("is {}; it must be 0 or more", b.weight),
            ));
        }
        let mismatch = |what: &str, sv: u32, tv: u32| {
            invalid(
                &key("student_module_name"),
                format!(
                    "'{name}' compares tensors of equal shape, but the student's model.{what} is {sv} and the teacher's distill.teacher.{what} is {tv}: make them equal or drop the binding"
                ),
            )
        };
        if name == DISTILL_OUTPUTS[0] {
            if s.hidden_dim != t.hidden_dim {
                return Err(mismatch("hidden_dim", s.hidden_dim, t.hidden_dim));
            }
            if s.return_interm_indices != t.return_interm_indices {
                return Err(invalid(
                    &key("student_module_name"),
                    format!(
                        "'{name}' compares the feature maps level by level, but the student's model.return_interm_indices {:?} differ from the teacher's {:?}: make them equal",
                        s.return_interm_indices, t.return_interm_indices
                    ),
                ));
            }
            if s.dilation != t.dilation {
                return Err(invalid(
                    &key("student_module_name"),
                    format!("'{name}' compares the feature maps level by level, but only one model dilates its last stage (model.dilation): make them equal"),
                ));
            }
        } else if s.num_queries != t.num_queries {
            return Err(mismatch("num_queries", s.num_queries, t.num_queries));
        }
        if b.criterion == DistillCriterion::KL && name == "pred_boxes" {
            return Err(invalid(
                &key("criterion"),
                "is KL on pred_boxes, whose 4 numbers are not a distribution: use L1 or L2",
            ));
        }
    }
    Ok(())
}

fn validate_model(spec: &ExperimentSpec) -> Result<(), SpecError> {
    let m = &spec.model;
    let levels = m.num_feature_levels as usize;
    let idx = &m.return_interm_indices;
    if !(1..=5).contains(&m.num_feature_levels) {
        return Err(invalid(
            "model.num_feature_levels",
            format!("is {}; it must be between 1 and 5", m.num_feature_levels),
        ));
    }
    if idx.len() != levels {
        let example = match levels {
            1 => "[3]",
            2 => "[1, 2]",
            3 => "[1, 2, 3]",
            4 => "[1, 2, 3, 4]",
            _ => "[0, 1, 2, 3, 4]",
        };
        return Err(invalid(
            "model.return_interm_indices",
            format!(
                "has {} entries {:?} but model.num_feature_levels is {}: give one index per level, e.g. return_interm_indices: {}",
                idx.len(),
                idx,
                levels,
                example
            ),
        ));
    }
    if idx.iter().any(|&i| i > MAX_INTERM_INDEX) || idx.windows(2).any(|w| w[0] >= w[1]) {
        return Err(invalid(
            "model.return_interm_indices",
            format!(
                "is {idx:?}: use strictly increasing indices from 0..=4 (i = ResNet layer{{i+1}}, 4 = the extra stride-2 level), e.g. [1, 2, 3, 4] or [1, 2]"
            ),
        ));
    }
    if !(0.0..=1.0).contains(&m.dropout_ratio) {
        return Err(invalid(
            "model.dropout_ratio",
            format!(
                "is {}; a dropout probability must be within [0, 1]",
                m.dropout_ratio
            ),
        ));
    }
    if let Some(rate) = m
        .backbone_drop_path_rate
        .filter(|r| !(0.0..1.0).contains(r))
    {
        return Err(invalid(
            "model.backbone_drop_path_rate",
            format!(
                "is {rate}; a stochastic-depth rate must be within [0, 1) (TAO's GCViT uses 0.2, its FAN 0.3)"
            ),
        ));
    }
    let candidates = u64::from(m.num_queries) * u64::from(spec.dataset.num_classes);
    if u64::from(m.num_select) >= candidates {
        return Err(invalid(
            "model.num_select",
            format!(
                "is {} but num_queries × dataset.num_classes is {} × {} = {}: set model.num_select below {}",
                m.num_select, m.num_queries, spec.dataset.num_classes, candidates, candidates
            ),
        ));
    }
    if m.num_select == 0 || m.num_queries == 0 {
        return Err(invalid(
            "model.num_select",
            "and model.num_queries must be at least 1",
        ));
    }
    if m.nheads == 0 || m.hidden_dim % m.nheads != 0 {
        return Err(invalid(
            "model.hidden_dim",
            format!("is {} which model.nheads = {} does not divide: pick hidden_dim a multiple of nheads", m.hidden_dim, m.nheads),
        ));
    }
    if m.hidden_dim % GROUP_NORM_GROUPS != 0 || m.hidden_dim % 2 != 0 {
        return Err(invalid(
            "model.hidden_dim",
            format!(
                "is {}; input_proj's GroupNorm(32) needs a multiple of 32 (e.g. 128 or 256)",
                m.hidden_dim
            ),
        ));
    }
    for (key, v) in [
        ("model.enc_layers", m.enc_layers),
        ("model.dec_layers", m.dec_layers),
        ("model.dim_feedforward", m.dim_feedforward),
        ("model.enc_n_points", m.enc_n_points),
        ("model.dec_n_points", m.dec_n_points),
    ] {
        if v == 0 {
            return Err(invalid(key, "is 0; it must be at least 1"));
        }
    }
    if spec.architecture() == Architecture::Dino {
        validate_dino(m)?;
    }
    if m.two_stage && !m.with_box_refine {
        return Err(invalid(
            "model.two_stage",
            "needs model.with_box_refine: true (as the official two-stage variant)",
        ));
    }
    let pretrained = [
        (
            "model.pretrained_backbone_path",
            &m.pretrained_backbone_path,
        ),
        (
            "train.pretrained_model_path",
            &spec.train.pretrained_model_path,
        ),
    ];
    if let Some((key, _)) = pretrained
        .iter()
        .find(|(_, p)| m.backbone_from_scratch && p.as_deref().is_some_and(|p| !p.is_empty()))
    {
        return Err(invalid(
            "model.backbone_from_scratch",
            format!("is true but {key} is set: a from-scratch backbone freezes its residual convs, so drop one of the two"),
        ));
    }
    if !(m.focal_alpha > 0.0 && m.focal_alpha < 1.0) {
        return Err(invalid(
            "model.focal_alpha",
            format!(
                "is {}; it must be within (0, 1), usually 0.25",
                m.focal_alpha
            ),
        ));
    }
    for name in &m.loss_types {
        if name != "labels" && name != "boxes" {
            return Err(invalid(
                "model.loss_types",
                format!("contains '{name}'; ddetr knows 'labels' and 'boxes'"),
            ));
        }
    }
    Ok(())
}

fn validate_dataset(spec: &ExperimentSpec) -> Result<(), SpecError> {
    let d = &spec.dataset;
    let a = &d.augmentation;
    if d.num_classes < 2 {
        return Err(invalid(
            "dataset.num_classes",
            format!(
                "is {}; it is the largest category_id + 1 (ids start at 1), so at least 2",
                d.num_classes
            ),
        ));
    }
    if d.batch_size == 0 {
        return Err(invalid(
            "dataset.batch_size",
            "is 0; it must be at least 1 image per rank",
        ));
    }
    if a.input_mean.len() != 3 || a.input_std.len() != 3 {
        return Err(invalid(
            "dataset.augmentation.input_mean",
            "and input_std need exactly 3 values (R, G, B)",
        ));
    }
    if a.input_std.iter().any(|&s| s <= 0.0) {
        return Err(invalid(
            "dataset.augmentation.input_std",
            "values must be positive",
        ));
    }
    if !(0.0..=1.0).contains(&a.horizontal_flip_prob) {
        return Err(invalid(
            "dataset.augmentation.horizontal_flip_prob",
            format!(
                "is {}; a probability must be within [0, 1]",
                a.horizontal_flip_prob
            ),
        ));
    }
    if a.train_random_crop_max <= a.train_random_crop_min {
        return Err(invalid(
            "dataset.augmentation.train_random_crop_max",
            format!(
                "is {} but must exceed train_random_crop_min ({})",
                a.train_random_crop_max, a.train_random_crop_min
            ),
        ));
    }
    if a.scales.is_empty() || a.train_random_resize.is_empty() {
        return Err(invalid(
            "dataset.augmentation.scales",
            "and train_random_resize must not be empty",
        ));
    }
    if let Some(&bad) = a.scales.iter().find(|&&s| s > a.random_resize_max_size) {
        return Err(invalid(
            "dataset.augmentation.scales",
            format!(
                "contains {bad}, above random_resize_max_size ({})",
                a.random_resize_max_size
            ),
        ));
    }
    Ok(())
}

fn validate_train(spec: &ExperimentSpec) -> Result<(), SpecError> {
    let t = &spec.train;
    let o = &t.optim;
    if t.num_epochs == 0 {
        return Err(invalid(
            "train.num_epochs",
            "is 0; train for at least 1 epoch",
        ));
    }
    if !(t.ema.decay > 0.0 && t.ema.decay < 1.0) {
        return Err(invalid(
            "train.ema.decay",
            format!(
                "is {}; it must be within (0, 1), e.g. 0.9999 (RT-DETR) or 0.999 for short runs",
                t.ema.decay
            ),
        ));
    }
    let es = &t.early_stopping;
    if es.enable {
        if es.patience == 0 {
            return Err(invalid(
                "train.early_stopping.patience",
                "is 0; give the observations without improvement to wait for, at least 1",
            ));
        }
        if !(es.min_delta >= 0.0 && es.min_delta.is_finite()) {
            return Err(invalid(
                "train.early_stopping.min_delta",
                format!("is {}; it must be 0 or more", es.min_delta),
            ));
        }
        if es.monitor != EarlyStopMetric::TrainLoss && spec.dataset.val_data_sources.is_empty() {
            return Err(invalid(
                "train.early_stopping.monitor",
                "watches a validation metric but dataset.val_data_sources is empty: add a validation set or monitor train_loss",
            ));
        }
    }
    if t.grad_accum_steps == 0 {
        return Err(invalid(
            "train.grad_accum_steps",
            "is 0; give the micro batches per optimizer step, at least 1 (1 = no accumulation)",
        ));
    }
    if !(t.max_minutes >= 0.0 && t.max_minutes.is_finite()) {
        return Err(invalid(
            "train.max_minutes",
            "must be a number of minutes, at least 0 (0 = no budget)",
        ));
    }
    if t.checkpoint_interval == 0 || t.validation_interval == 0 {
        return Err(invalid(
            "train.checkpoint_interval",
            "and train.validation_interval must be at least 1 (epochs)",
        ));
    }
    if t.num_nodes == 0 {
        return Err(invalid("train.num_nodes", "is 0; it must be at least 1"));
    }
    if o.lr_scheduler == LrScheduler::MultiStep {
        if let Some(w) = o.lr_steps.windows(2).find(|w| w[0] >= w[1]) {
            return Err(invalid(
                "train.optim.lr_steps",
                format!(
                    "is {:?}: {} is followed by {}; list the decay epochs in increasing order",
                    o.lr_steps, w[0], w[1]
                ),
            ));
        }
    }
    if o.lr_scheduler == LrScheduler::StepLR && o.lr_step_size == 0 {
        return Err(invalid(
            "train.optim.lr_step_size",
            "is 0; StepLR needs a period of at least 1 epoch",
        ));
    }
    for (key, v) in [
        ("train.optim.lr", o.lr),
        ("train.optim.lr_linear_proj_mult", o.lr_linear_proj_mult),
        ("train.optim.lr_decay", o.lr_decay),
    ] {
        if !(v > 0.0) || !v.is_finite() {
            return Err(invalid(
                key,
                format!("is {v}; it must be a positive number"),
            ));
        }
    }
    for (key, v) in [
        ("train.optim.lr_backbone", o.lr_backbone),
        ("train.optim.weight_decay", o.weight_decay),
        ("train.optim.momentum", o.momentum),
        ("train.clip_grad_norm", t.clip_grad_norm),
    ] {
        if !(v >= 0.0) || !v.is_finite() {
            return Err(invalid(key, format!("is {v}; it must be zero or positive")));
        }
    }
    Ok(())
}

/// TAO's rule: when num_gpus and gpu_ids disagree, the larger one wins.
fn reconcile_gpus(
    section: &str,
    num_gpus: &mut u32,
    gpu_ids: &mut Vec<u32>,
) -> Result<Option<Notice>, SpecError> {
    if *num_gpus == 0 {
        return Err(invalid(
            &format!("{section}.num_gpus"),
            "is 0; it must be at least 1",
        ));
    }
    let mut sorted = gpu_ids.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid(
            &format!("{section}.gpu_ids"),
            format!("is {gpu_ids:?} and lists a GPU twice: list each GPU once"),
        ));
    }
    let n = *num_gpus as usize;
    if gpu_ids.len() == n {
        return Ok(None);
    }
    let before =
        format!("{section}.num_gpus = {num_gpus} and {section}.gpu_ids = {gpu_ids:?} disagree");
    if gpu_ids.len() > n {
        *num_gpus = gpu_ids.len() as u32;
        Ok(Some(Notice(format!(
            "{before}: using the larger, num_gpus = {num_gpus}"
        ))))
    } else {
        let next = gpu_ids.iter().max().map_or(0, |m| m + 1);
        let extra = n - gpu_ids.len();
        gpu_ids.extend(next..next + extra as u32);
        Ok(Some(Notice(format!(
            "{before}: using the larger, gpu_ids = {gpu_ids:?}"
        ))))
    }
}

/// The `automl` section: its numbers, and a search space that can be searched.
fn validate_automl(spec: &ExperimentSpec) -> Result<(), SpecError> {
    let a = &spec.automl;
    if a.automl_max_recommendations == 0 {
        return Err(invalid(
            "automl.automl_max_recommendations",
            "is 0: give the number of trials, at least 1",
        ));
    }
    if a.automl_max_concurrent == 0 {
        return Err(invalid(
            "automl.automl_max_concurrent",
            "is 0: give how many trials run at once, at least 1",
        ));
    }
    if a.automl_nu < 2 {
        return Err(invalid(
            "automl.automl_nu",
            format!(
                "is {}: Hyperband's reduction factor must be at least 2",
                a.automl_nu
            ),
        ));
    }
    if a.epoch_multiplier == 0 {
        return Err(invalid("automl.epoch_multiplier", "is 0: give at least 1"));
    }
    if a.nproc_per_trial == 0 {
        return Err(invalid(
            "automl.nproc_per_trial",
            "is 0: give at least 1 trainer process per trial",
        ));
    }
    if a.nodes_per_trial == 0 {
        return Err(invalid(
            "automl.nodes_per_trial",
            "is 0: give at least 1 node per trial",
        ));
    }
    if a.nodes_per_trial > 1 && a.launch_prefix.is_empty() {
        return Err(invalid(
            "automl.nodes_per_trial",
            format!(
                "is {n} but automl.launch_prefix is empty: one process cannot start agents on other nodes; set e.g. automl.launch_prefix=[srun,--nodes={n},--ntasks-per-node=1]",
                n = a.nodes_per_trial
            ),
        ));
    }
    if !(a.budget_minutes >= 0.0) {
        return Err(invalid(
            "automl.budget_minutes",
            format!("is {}: give minutes ≥ 0 (0: no limit)", a.budget_minutes),
        ));
    }
    crate::automl_space::space(spec).map_err(|m| {
        let (key, rest) = m.split_once(": ").unwrap_or(("automl", m.as_str()));
        invalid(key, rest.to_string())
    })?;
    Ok(())
}
