//! Loading and saving model weights under the official Deformable-DETR state-dict keys.
//!
//! * Official keys (`backbone.0.body.layer1.0.conv1.weight`, `transformer.encoder.layers.0.
//!   self_attn.sampling_offsets.weight`, …) load as they are, from `.safetensors` or from a
//!   `torch.save` archive (`.pth`): an official training checkpoint (`{'model', 'optimizer',
//!   'lr_scheduler', 'epoch', 'args'}`, read by [`crate::torch_pickle`] without Python) or a flat
//!   state dict. Upstream's aliases (`transformer.decoder.bbox_embed.*`,
//!   `transformer.decoder.class_embed.*`, `class_embed.N`/`bbox_embed.N`, N > 0, of a model
//!   without box refinement, where all layers share head 0, and `num_batches_tracked`) are
//!   recognised and skipped.
//! * transformers' `DeformableDetrForObjectDetection` keys go through [`hf_to_official`], the one
//!   key map (after transformers' `convert_deformable_detr_to_pytorch.py`, read backwards):
//!
//! | transformers                                           | official                                   |
//! |--------------------------------------------------------|--------------------------------------------|
//! | `model.backbone.conv_encoder.model.*` (v4), `model.backbone.model.*` (v5) | `backbone.0.body.*`     |
//! | `model.input_proj.*`                                   | `input_proj.*`                             |
//! | `model.query_position_embeddings.weight`               | `query_embed.weight`                       |
//! | `model.*` (everything else)                            | `transformer.*`                            |
//! | encoder `self_attn_layer_norm` / `final_layer_norm`    | `norm1` / `norm2`                          |
//! | decoder `encoder_attn_layer_norm` / `self_attn_layer_norm` / `final_layer_norm` | `norm1` / `norm2` / `norm3` |
//! | `fc1` / `fc2` (v4), `mlp.fc1` / `mlp.fc2` (v5)          | `linear1` / `linear2`                      |
//! | decoder `encoder_attn`                                 | `cross_attn`                               |
//! | decoder `self_attn.{q,k,v}_proj.{weight,bias}`          | rows 0..d / d..2d / 2d..3d of `self_attn.in_proj_{weight,bias}` |
//! | decoder `self_attn.out_proj` (v4), `self_attn.o_proj` (v5) | `self_attn.out_proj`                    |
//! | `class_embed.*`, `bbox_embed.*`                         | unchanged                                  |
//! | `model.decoder.bbox_embed.*`, `model.decoder.class_embed.*` | aliases of the heads (skipped)         |
//!
//! `evaluate`, `inference` and `export` load whole-model checkpoints through
//! [`crate::model_checkpoint`], which recognises every published layout (ddetr, official,
//! transformers, TAO Lightning) on top of this map and names the spec field a mismatch calls for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Tensor};
use tracing::{info, warn};

use crate::TrainerError;

/// Prefix of the ResNet trunk inside the model.
pub const BACKBONE_BODY_PREFIX: &str = "backbone.0.body.";

/// Where a transformers tensor goes: an official key, and for the packed decoder self-attention
/// the row block (0 = q, 1 = k, 2 = v) of `in_proj_*` it fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedKey {
    pub key: String,
    pub block: Option<i64>,
}

const ENC_RENAMES: &[(&str, &str)] = &[
    ("self_attn_layer_norm", "norm1"),
    ("final_layer_norm", "norm2"),
    ("mlp.fc1", "linear1"),
    ("mlp.fc2", "linear2"),
    ("fc1", "linear1"),
    ("fc2", "linear2"),
];
const DEC_RENAMES: &[(&str, &str)] = &[
    ("encoder_attn_layer_norm", "norm1"),
    ("self_attn_layer_norm", "norm2"),
    ("final_layer_norm", "norm3"),
    ("encoder_attn", "cross_attn"),
    ("mlp.fc1", "linear1"),
    ("mlp.fc2", "linear2"),
    ("fc1", "linear1"),
    ("fc2", "linear2"),
    ("self_attn.o_proj", "self_attn.out_proj"),
];

/// The transformers → official key map (see the module docs). `None` for transformers' aliases.
pub fn hf_to_official(k: &str) -> Option<MappedKey> {
    if k.starts_with("model.decoder.bbox_embed.") || k.starts_with("model.decoder.class_embed.") {
        return None;
    }
    for pre in [
        "model.backbone.conv_encoder.model.",
        "model.backbone.model.",
    ] {
        if let Some(rest) = k.strip_prefix(pre) {
            return Some(MappedKey {
                key: format!("{BACKBONE_BODY_PREFIX}{rest}"),
                block: None,
            });
        }
    }
    if k.starts_with("class_embed.") || k.starts_with("bbox_embed.") {
        return Some(MappedKey {
            key: k.to_string(),
            block: None,
        });
    }
    if let Some(rest) = k.strip_prefix("model.input_proj.") {
        return Some(MappedKey {
            key: format!("input_proj.{rest}"),
            block: None,
        });
    }
    if k == "model.query_position_embeddings.weight" {
        return Some(MappedKey {
            key: "query_embed.weight".into(),
            block: None,
        });
    }
    let rest = k.strip_prefix("model.").unwrap_or(k);
    let mut key = format!("transformer.{rest}");
    let renames = if key.contains(".encoder.layers.") {
        ENC_RENAMES
    } else if key.contains(".decoder.layers.") {
        DEC_RENAMES
    } else {
        &[]
    };
    for (a, b) in renames {
        key = key.replace(&format!(".{a}."), &format!(".{b}."));
    }
    if key.contains(".decoder.layers.") {
        for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            for what in ["weight", "bias"] {
                let suffix = format!(".self_attn.{proj}.{what}");
                if let Some(stem) = key.strip_suffix(&suffix) {
                    return Some(MappedKey {
                        key: format!("{stem}.self_attn.in_proj_{what}"),
                        block: Some(i as i64),
                    });
                }
            }
        }
    }
    Some(MappedKey { key, block: None })
}

/// Whether `key` looks like a transformers checkpoint key.
fn is_hf_key(key: &str) -> bool {
    key.starts_with("model.")
}

/// Reads `{name: tensor}` from a `.safetensors` file or a torch zip archive (`torch.save` of a
/// flat dict of tensors). A full official training checkpoint (`{'model', 'optimizer', 'args'}`)
/// must first be reduced to its `model` dict.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, TrainerError> {
    let p = path.display().to_string();
    let res = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Tensor::read_safetensors(path),
        _ => return crate::torch_pickle::read_state_dict(path),
    };
    res.map_err(|e| TrainerError::ReadWeights {
        path: p,
        reason: e.to_string(),
    })
}

/// Brings checkpoint tensors to official keys: transformers' names through [`hf_to_official`]
/// (packing q/k/v into `in_proj_*`), official names unchanged; aliases dropped.
pub fn to_official_keys(tensors: Vec<(String, Tensor)>) -> BTreeMap<String, Tensor> {
    let hf = tensors.iter().any(|(k, _)| is_hf_key(k));
    let mut out = BTreeMap::new();
    if !hf {
        for (k, t) in tensors {
            out.insert(k, t);
        }
        return out;
    }
    let mut packed: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (k, t) in tensors {
        match hf_to_official(&k) {
            None => {}
            Some(MappedKey { key, block: None }) => {
                out.insert(key, t);
            }
            Some(MappedKey {
                key,
                block: Some(b),
            }) => {
                packed.entry(key).or_default()[b as usize] = Some(t);
            }
        }
    }
    for (key, parts) in packed {
        if let [Some(q), Some(k), Some(v)] = parts {
            out.insert(key, Tensor::cat(&[q, k, v], 0));
        } else {
            warn!(key, "transformers checkpoint lacks one of q_proj/k_proj/v_proj; the packed tensor is left out");
        }
    }
    out
}

/// Whether an official key is an alias of another parameter in a model built from `vars`.
fn is_alias(key: &str, vars: &BTreeSet<String>) -> bool {
    if key.starts_with("transformer.decoder.bbox_embed.")
        || key.starts_with("transformer.decoder.class_embed.")
    {
        return true;
    }
    if key.ends_with("num_batches_tracked") {
        return true;
    }
    // Shared heads (no box refinement): class_embed.N / bbox_embed.N alias head 0.
    for head in ["class_embed.", "bbox_embed."] {
        if let Some(rest) = key.strip_prefix(head) {
            if let Some((idx, tail)) = rest.split_once('.') {
                if idx != "0" && !vars.contains(key) && vars.contains(&format!("{head}0.{tail}")) {
                    return true;
                }
            }
        }
    }
    false
}

/// What a load did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub loaded: usize,
    /// Model variables the checkpoint did not provide (left as initialised).
    pub missing: Vec<String>,
    /// Checkpoint tensors the model has no place for.
    pub unexpected: Vec<String>,
    /// Tensors skipped because their shape differs (class heads when fine-tuning to other classes).
    pub skipped_shape: Vec<String>,
}

/// How strictly [`load_official`] treats differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Every model variable must be present with its shape.
    Strict,
    /// `train.pretrained_model_path`: load what fits, skip class heads whose shape differs,
    /// report missing/unexpected keys.
    Pretrained,
}

fn is_class_head(key: &str) -> bool {
    key.starts_with("class_embed.")
}

/// Copies `tensors` (official keys) into the var store.
pub fn load_official(
    vs: &VarStore,
    tensors: &BTreeMap<String, Tensor>,
    mode: LoadMode,
    source: &str,
) -> Result<LoadReport, TrainerError> {
    let vars = vs.variables();
    let names: BTreeSet<String> = vars.keys().cloned().collect();
    let mut report = LoadReport::default();
    for (name, var) in &vars {
        let Some(src) = tensors.get(name) else {
            report.missing.push(name.clone());
            continue;
        };
        if src.size() != var.size() {
            if mode == LoadMode::Pretrained && is_class_head(name) {
                info!(key = name.as_str(), found = ?src.size(), expected = ?var.size(), "skipping a class head of another shape (fine-tuning to other classes)");
                report.skipped_shape.push(name.clone());
                continue;
            }
            return Err(TrainerError::ShapeMismatch {
                path: source.to_string(),
                key: name.clone(),
                found: src.size(),
                expected: var.size(),
                hint: "build the model with the configuration the weights were trained with".into(),
            });
        }
        tch::no_grad(|| {
            var.shallow_clone()
                .copy_(&src.to_device(var.device()).to_kind(var.kind()))
        });
        report.loaded += 1;
    }
    report.unexpected = tensors
        .keys()
        .filter(|k| !names.contains(*k) && !is_alias(k, &names))
        .cloned()
        .collect();
    if mode == LoadMode::Strict && !report.missing.is_empty() {
        return Err(TrainerError::MissingKeys {
            path: source.to_string(),
            count: report.missing.len(),
            first: report.missing[0].clone(),
            hint: "the checkpoint belongs to another architecture; check model.* in the spec"
                .into(),
        });
    }
    if !report.missing.is_empty() || !report.unexpected.is_empty() {
        warn!(
            source,
            missing = report.missing.len(),
            unexpected = report.unexpected.len(),
            first_missing = report.missing.first().map(String::as_str),
            first_unexpected = report.unexpected.first().map(String::as_str),
            "weights do not cover the model exactly"
        );
    }
    Ok(report)
}

/// Loads a checkpoint file (official or transformers keys) into the var store.
pub fn load_file(vs: &VarStore, path: &Path, mode: LoadMode) -> Result<LoadReport, TrainerError> {
    let tensors = to_official_keys(read_tensors(path)?);
    load_official(vs, &tensors, mode, &path.display().to_string())
}

/// `model.pretrained_backbone_path`: a torchvision ResNet state dict (`conv1.weight`,
/// `layer1.0.conv1.weight`, …; `fc.*` and `num_batches_tracked` ignored) into `backbone.0.body`.
pub fn load_torchvision_backbone(vs: &VarStore, path: &Path) -> Result<LoadReport, TrainerError> {
    let source = path.display().to_string();
    let tensors: BTreeMap<String, Tensor> = read_tensors(path)?
        .into_iter()
        .filter(|(k, _)| !k.starts_with("fc.") && !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| {
            let k = k
                .strip_prefix(BACKBONE_BODY_PREFIX)
                .map(str::to_string)
                .unwrap_or(k);
            (format!("{BACKBONE_BODY_PREFIX}{k}"), t)
        })
        .collect();
    let vars = vs.variables();
    let mut report = copy_into_body(
        &vars,
        &tensors,
        &source,
        "model.backbone must name the ResNet depth of these weights",
        false,
    )?;
    // Stages the model does not use (e.g. layer4 with return_interm_indices [1, 2]) are expected.
    report.unexpected = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k))
        .cloned()
        .collect();
    if !report.missing.is_empty() {
        return Err(TrainerError::MissingKeys {
            path: source,
            count: report.missing.len(),
            first: report.missing[0].clone(),
            hint: "give a torchvision ResNet state dict of the depth named by model.backbone"
                .into(),
        });
    }
    Ok(report)
}

/// `model.pretrained_backbone_path` for the spec's backbone: a torchvision ResNet state dict
/// ([`load_torchvision_backbone`]), a GCViT one ([`load_gcvit_backbone`]) or a FAN one
/// ([`load_fan_backbone`]).
pub fn load_backbone(
    vs: &VarStore,
    path: &Path,
    kind: crate::spec::Backbone,
) -> Result<LoadReport, TrainerError> {
    if kind.is_gcvit() {
        load_gcvit_backbone(vs, path)
    } else if kind.is_fan() {
        load_fan_backbone(vs, path)
    } else {
        load_torchvision_backbone(vs, path)
    }
}

/// Prefixes a transformer trunk's state dict may carry before the trunk's own keys (a
/// detector's, TAO's classification model's, DDP's).
const TRUNK_PREFIXES: [&str; 5] = [
    BACKBONE_BODY_PREFIX,
    "model.backbone.",
    "backbone.",
    "model.",
    "module.",
];

/// A GCViT state dict into `backbone.0.body`: TAO's names (`levels.0.blocks.0.attn.qkv.weight`,
/// as TAO's classification and detection GCViTs save them) or timm's (`stages.0.blocks.0.…`,
/// mapped by [`crate::model::gcvit::timm_to_tao`]; squeeze-excitation 1×1 convolutions reshaped
/// to TAO's linear layers). As TAO (`load_state_dict(strict=False)`): variables the file lacks —
/// always the detector's `norm{i}` layers when the file is a classifier — keep their
/// initialisation and are reported, as are the file's tensors the detector has no place for
/// (a classifier's `head` and final `norm`). A file that fills none of the trunk is an error.
pub fn load_gcvit_backbone(vs: &VarStore, path: &Path) -> Result<LoadReport, TrainerError> {
    let raw = read_tensors(path)?;
    let timm = raw.iter().any(|(k, _)| {
        let k = strip_any(k, &TRUNK_PREFIXES);
        k.starts_with("stages.") || k.starts_with("stem.")
    });
    // The relative-position index buffers (computed, never loaded) are skipped below.
    let name = |short: &str| {
        if timm {
            crate::model::gcvit::timm_to_tao(short)
        } else {
            Some(short.to_string())
        }
    };
    load_trunk(
        vs,
        path,
        raw,
        name,
        |k| k.ends_with("relative_position_index"),
        |k| is_output_norm(k, "norm"),
        Trunk {
            reshape_4d: true,
            shape_hint: "model.backbone must name the GCViT size of these weights",
            missing_hint: "give a GCViT state dict (TAO's or timm's names) of the size named by model.backbone",
        },
    )
}

/// A FAN state dict into `backbone.0.body` under TAO's names (`patch_embed.backbone.stem.0.…`,
/// `blocks.{i}.attn.q.…`, `cls_attn_blocks.{k}.…`), as TAO's classification FAN-hybrid (the
/// NGC `fan_*_hybrid_nvimagenet` weights) and its DINO save them. As TAO (`strict=False`): the
/// detector's `out_norm{i}` layers and `learnable_downsample`, which a classifier lacks, keep
/// their initialisation and are reported, as are the file's tensors the detector has no place
/// for (a classifier's `head` and `norm`); BatchNorm's `num_batches_tracked` is skipped. A file
/// that misses any other trunk tensor is an error.
pub fn load_fan_backbone(vs: &VarStore, path: &Path) -> Result<LoadReport, TrainerError> {
    let raw = read_tensors(path)?;
    load_trunk(
        vs,
        path,
        raw,
        |short| Some(short.to_string()),
        |k| k.ends_with("num_batches_tracked"),
        |k| {
            is_output_norm(k, "out_norm")
                || k.starts_with(&format!("{BACKBONE_BODY_PREFIX}learnable_downsample."))
        },
        Trunk {
            reshape_4d: false,
            shape_hint: "model.backbone must name the FAN size of these weights",
            missing_hint:
                "give a FAN-hybrid state dict (TAO's names) of the size named by model.backbone",
        },
    )
}

/// What differs between the transformer trunks' loaders.
struct Trunk {
    /// Whether a 4-d tensor may fill a variable of another shape with as many elements.
    reshape_4d: bool,
    shape_hint: &'static str,
    missing_hint: &'static str,
}

/// Loads `raw` (from `path`) into `backbone.0.body`: each key without its [`TRUNK_PREFIXES`]
/// named by `name` (None: no place for it, reported unless `skip` says it is expected to have
/// none); every trunk variable must be filled except those `may_miss` allows.
fn load_trunk(
    vs: &VarStore,
    path: &Path,
    raw: Vec<(String, Tensor)>,
    name: impl Fn(&str) -> Option<String>,
    skip: impl Fn(&str) -> bool,
    may_miss: impl Fn(&str) -> bool,
    trunk: Trunk,
) -> Result<LoadReport, TrainerError> {
    let source = path.display().to_string();
    let mut unexpected = Vec::new();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, t) in raw {
        if skip(&k) {
            continue;
        }
        match name(strip_any(&k, &TRUNK_PREFIXES)) {
            Some(name) => {
                tensors.insert(format!("{BACKBONE_BODY_PREFIX}{name}"), t);
            }
            None => unexpected.push(k),
        }
    }
    let vars = vs.variables();
    let mut report = copy_into_body(&vars, &tensors, &source, trunk.shape_hint, trunk.reshape_4d)?;
    unexpected.extend(tensors.keys().filter(|k| !vars.contains_key(*k)).cloned());
    // Sorted: the file's order is not the report's (a safetensors read is unordered).
    unexpected.sort();
    report.unexpected = unexpected;
    // Only the detector's own additions may be missing: anything else means another size.
    let trunk_missing: Vec<&String> = report.missing.iter().filter(|k| !may_miss(k)).collect();
    if report.loaded == 0 || !trunk_missing.is_empty() {
        return Err(TrainerError::MissingKeys {
            path: source,
            count: trunk_missing.len().max(report.missing.len()),
            first: trunk_missing
                .first()
                .copied()
                .or(report.missing.first())
                .cloned()
                .unwrap_or_default(),
            hint: trunk.missing_hint.into(),
        });
    }
    Ok(report)
}

/// `backbone.0.body.{stem}{i}.*`: a detection trunk's per-level output norm (GCViT's `norm{i}`,
/// FAN's `out_norm{i}`), which classifier weights never hold.
fn is_output_norm(key: &str, stem: &str) -> bool {
    key.strip_prefix(BACKBONE_BODY_PREFIX)
        .and_then(|k| k.strip_prefix(stem))
        .is_some_and(|k| k.len() > 1 && k.as_bytes()[0].is_ascii_digit() && k.as_bytes()[1] == b'.')
}

/// Copies `tensors` (named as the variables) into every variable under `backbone.0.body.`;
/// with `reshape_4d`, a 4-d tensor of the right element count takes its variable's shape (timm's
/// 1×1 convolutions for TAO's linear layers). The report lists the variables `tensors` lacks; a
/// shape that differs is an error with `hint`.
fn copy_into_body(
    vars: &HashMap<String, Tensor>,
    tensors: &BTreeMap<String, Tensor>,
    source: &str,
    hint: &str,
    reshape_4d: bool,
) -> Result<LoadReport, TrainerError> {
    let mut report = LoadReport::default();
    for (name, var) in vars
        .iter()
        .filter(|(k, _)| k.starts_with(BACKBONE_BODY_PREFIX))
    {
        let Some(src) = tensors.get(name) else {
            report.missing.push(name.clone());
            continue;
        };
        let src = if reshape_4d && src.dim() == 4 && src.numel() == var.numel() {
            src.reshape(var.size())
        } else {
            src.shallow_clone()
        };
        if src.size() != var.size() {
            return Err(TrainerError::ShapeMismatch {
                path: source.to_string(),
                key: name.clone(),
                found: src.size(),
                expected: var.size(),
                hint: hint.into(),
            });
        }
        tch::no_grad(|| {
            var.shallow_clone()
                .copy_(&src.to_device(var.device()).to_kind(var.kind()))
        });
        report.loaded += 1;
    }
    report.missing.sort();
    Ok(report)
}

/// `key` without the first of `prefixes` it starts with.
fn strip_any<'a>(key: &'a str, prefixes: &[&str]) -> &'a str {
    prefixes
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key)
}

/// Saves every variable (parameters and FrozenBatchNorm buffers) under its official key.
pub fn save_safetensors(vs: &VarStore, path: &Path) -> Result<(), TrainerError> {
    let vars = vs.variables();
    let named: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(k, t)| (k, t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&named, path).map_err(|e| TrainerError::WriteWeights {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(k: &str) -> (String, Option<i64>) {
        let m = hf_to_official(k).unwrap_or_else(|| panic!("{k} maps"));
        (m.key, m.block)
    }

    #[test]
    fn transformers_v4_names_map_to_official_keys() {
        let cases = [
            (
                "model.backbone.conv_encoder.model.layer2.0.conv1.weight",
                "backbone.0.body.layer2.0.conv1.weight",
                None,
            ),
            (
                "model.backbone.model.bn1.running_var",
                "backbone.0.body.bn1.running_var",
                None,
            ),
            ("model.input_proj.3.1.bias", "input_proj.3.1.bias", None),
            (
                "model.query_position_embeddings.weight",
                "query_embed.weight",
                None,
            ),
            ("model.level_embed", "transformer.level_embed", None),
            (
                "model.reference_points.weight",
                "transformer.reference_points.weight",
                None,
            ),
            (
                "model.enc_output_norm.weight",
                "transformer.enc_output_norm.weight",
                None,
            ),
            (
                "model.encoder.layers.2.self_attn_layer_norm.bias",
                "transformer.encoder.layers.2.norm1.bias",
                None,
            ),
            (
                "model.encoder.layers.2.final_layer_norm.weight",
                "transformer.encoder.layers.2.norm2.weight",
                None,
            ),
            (
                "model.encoder.layers.0.fc1.weight",
                "transformer.encoder.layers.0.linear1.weight",
                None,
            ),
            (
                "model.encoder.layers.0.mlp.fc2.bias",
                "transformer.encoder.layers.0.linear2.bias",
                None,
            ),
            (
                "model.encoder.layers.1.self_attn.sampling_offsets.weight",
                "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
                None,
            ),
            (
                "model.decoder.layers.4.encoder_attn.attention_weights.bias",
                "transformer.decoder.layers.4.cross_attn.attention_weights.bias",
                None,
            ),
            (
                "model.decoder.layers.4.encoder_attn_layer_norm.weight",
                "transformer.decoder.layers.4.norm1.weight",
                None,
            ),
            (
                "model.decoder.layers.4.self_attn_layer_norm.weight",
                "transformer.decoder.layers.4.norm2.weight",
                None,
            ),
            (
                "model.decoder.layers.4.final_layer_norm.bias",
                "transformer.decoder.layers.4.norm3.bias",
                None,
            ),
            (
                "model.decoder.layers.0.self_attn.q_proj.weight",
                "transformer.decoder.layers.0.self_attn.in_proj_weight",
                Some(0),
            ),
            (
                "model.decoder.layers.0.self_attn.k_proj.bias",
                "transformer.decoder.layers.0.self_attn.in_proj_bias",
                Some(1),
            ),
            (
                "model.decoder.layers.0.self_attn.v_proj.weight",
                "transformer.decoder.layers.0.self_attn.in_proj_weight",
                Some(2),
            ),
            (
                "model.decoder.layers.0.self_attn.out_proj.weight",
                "transformer.decoder.layers.0.self_attn.out_proj.weight",
                None,
            ),
            (
                "model.decoder.layers.0.self_attn.o_proj.bias",
                "transformer.decoder.layers.0.self_attn.out_proj.bias",
                None,
            ),
            ("class_embed.3.weight", "class_embed.3.weight", None),
            (
                "bbox_embed.1.layers.2.bias",
                "bbox_embed.1.layers.2.bias",
                None,
            ),
        ];
        for (hf, official, block) in cases {
            assert_eq!(mapped(hf), (official.to_string(), block), "{hf}");
        }
        assert!(hf_to_official("model.decoder.bbox_embed.0.layers.0.weight").is_none());
        assert!(hf_to_official("model.decoder.class_embed.6.bias").is_none());
    }

    #[test]
    fn q_k_v_pack_into_in_proj_in_order() {
        let q = Tensor::from_slice(&[1.0f32, 2.0]).view([1, 2]);
        let k = Tensor::from_slice(&[3.0f32, 4.0]).view([1, 2]);
        let v = Tensor::from_slice(&[5.0f32, 6.0]).view([1, 2]);
        let pre = "model.decoder.layers.0.self_attn";
        let out = to_official_keys(vec![
            (format!("{pre}.v_proj.weight"), v),
            (format!("{pre}.q_proj.weight"), q),
            (format!("{pre}.k_proj.weight"), k),
        ]);
        let packed = &out["transformer.decoder.layers.0.self_attn.in_proj_weight"];
        assert_eq!(
            Vec::<f32>::try_from(&packed.flatten(0, -1)).unwrap(),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
    }
}
