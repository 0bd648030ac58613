//! Model checkpoints for the tasks that run a trained model (`evaluate`, `inference`, `export`):
//! every published Deformable DETR layout is recognised by its contents, brought to the official
//! state-dict keys, checked against the model the spec builds and copied in, with one log line
//! saying what was loaded.
//!
//! | layout | recognised by |
//! |--------|---------------|
//! | ddetr training checkpoint | safetensors with `ddetr.sha256` in its `__metadata__` (read and verified by [`checkpoint::load`]); its optimizer (`optim.*`) and loss-scaler (`amp.*`) state are not model weights |
//! | official fundamentalvision `.pth` | `torch.save` of `{'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', 'args'}`; a flat state dict of official keys (`.pth` or `.safetensors`) too |
//! | transformers `DeformableDetrForObjectDetection` | `model.safetensors` or `pytorch_model.bin` (a flat `torch.save` dict) with keys such as `model.encoder.layers.*`, `model.input_proj.*`, mapped by [`weights::hf_to_official`] |
//! | TAO / PyTorch Lightning `.pth` | `torch.save` of `{'state_dict', 'pytorch-lightning_version', 'optimizer_states', 'hyper_parameters', …}` |
//!
//! A wrapper prefix (TAO's `model.model.`: its LightningModule holds `model = DDModel`, which holds
//! `model = DeformableDETR`; Lightning's `model.`; DDP's `module.`) is found by structure: the
//! first candidate after which the keys look official (`transformer.*`, `input_proj.*`,
//! `class_embed.*`) or like transformers' (`model.encoder.layers.*`, `model.input_proj.*`).
//! transformers' own keys start with `model.` as well, so no single key decides. Tensors outside
//! the prefix (a Lightning module's other members) are not model weights and are left out.
//!
//! Loading is strict: each model variable comes from the checkpoint with its shape, and each
//! checkpoint tensor has a place in the model or is an alias (upstream's shared heads
//! `class_embed.N`/`bbox_embed.N` holding head 0's values, the decoder's
//! `transformer.decoder.{bbox,class}_embed.*`, `num_batches_tracked`). Where transformers saved a
//! head only under the decoder's alias, or left out the class heads it ties to head 0, those are
//! used. The first difference is one error naming the key (official name) and the spec field that
//! decides it: `class_embed` rows → `dataset.num_classes`, decoder layers → `model.dec_layers`,
//! independent heads → `model.with_box_refine`, and so on (`check_structure`, [`shape_hint`],
//! [`field_hint`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::Tensor;
use tracing::info;

use crate::spec::Architecture;
use crate::train::ema;
use crate::weights::{self, BACKBONE_BODY_PREFIX};
use crate::{checkpoint, torch_pickle, TrainerError};

/// Key prefixes of a ddetr training checkpoint's non-model state: the optimizer's
/// (`optim.<key>.<slot>`, `optim.steps`; see [`crate::optim::Optim::state_tensors`]) and the fp16
/// loss scaler's (`amp.scale`, `amp.growth_tracker`; see [`crate::amp::Amp::state_tensors`]).
pub const TRAINING_STATE_PREFIXES: [&str; 4] = ["optim.", "amp.", "ema.", "ema_updates"];

/// Wrapper prefixes tried, in order: none, DDP, Lightning, TAO (Lightning over `DDModel`), and
/// each of those saved from a DDP-wrapped module.
const PREFIXES: [&str; 6] = [
    "",
    "module.",
    "model.",
    "model.model.",
    "module.model.",
    "module.model.model.",
];

/// The Lightning checkpoint's version entry, which tells it from other `{'state_dict': …}` files.
const LIGHTNING_VERSION_KEY: &str = "pytorch-lightning_version";

/// The prefix TAO's Lightning module gives its Deformable DETR's keys.
const TAO_PREFIX: &str = "model.model.";

/// Where a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// ddetr's own training checkpoint (checksum verified).
    Ddetr,
    /// fundamentalvision/Deformable-DETR's keys: its `{'model': …}` checkpoint or a flat state dict.
    Official,
    /// transformers' `DeformableDetrForObjectDetection` (`model.safetensors`, `pytorch_model.bin`).
    Transformers,
    /// A PyTorch Lightning checkpoint (TAO's), weights under `state_dict`.
    Lightning,
}

/// What [`load_for_task`] loaded; its `Display` is the one log line.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub path: PathBuf,
    pub format: CheckpointFormat,
    /// The top-level entry of a `torch.save` archive holding the weights (`model`, `state_dict`).
    pub container: Option<&'static str>,
    /// The wrapper prefix taken off every key (`model.model.`, `module.`; empty for none).
    pub prefix: String,
    /// Model variables filled (all of them: loading is strict).
    pub loaded: usize,
    /// Checkpoint tensors that repeat a loaded one (shared heads, the decoder's head aliases,
    /// `num_batches_tracked`).
    pub aliases: usize,
    /// Tensors that are not model weights: a ddetr checkpoint's optimizer and loss-scaler state,
    /// tensors outside the prefix.
    pub ignored: usize,
}

impl CheckpointReport {
    /// The layout in words: `TAO Lightning (state_dict, prefix model.model.)`.
    pub fn describe(&self) -> String {
        let name = match self.format {
            CheckpointFormat::Ddetr => "ddetr training checkpoint",
            CheckpointFormat::Official if self.container.is_none() => {
                "official Deformable-DETR state dict"
            }
            CheckpointFormat::Official => "official Deformable-DETR",
            CheckpointFormat::Transformers => "transformers DeformableDetrForObjectDetection",
            CheckpointFormat::Lightning if self.prefix == TAO_PREFIX => "TAO Lightning",
            CheckpointFormat::Lightning => "PyTorch Lightning",
        };
        let mut details: Vec<String> = self.container.iter().map(|c| c.to_string()).collect();
        if !self.prefix.is_empty() {
            details.push(format!("prefix {}", self.prefix));
        }
        if details.is_empty() {
            name.to_string()
        } else {
            format!("{name} ({})", details.join(", "))
        }
    }
}

impl fmt::Display for CheckpointReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checkpoint {}: {} — {} tensors loaded, 0 missing, 0 unexpected",
            self.path.display(),
            self.describe(),
            self.loaded
        )?;
        if self.aliases > 0 {
            write!(f, ", {} aliases skipped", self.aliases)?;
        }
        if self.ignored > 0 {
            write!(f, ", {} non-model tensors ignored", self.ignored)?;
        }
        Ok(())
    }
}

/// Loads the model checkpoint at `path`, in any layout of the module docs, into `vs` (each tensor
/// to its variable's device and kind). Strict: a checkpoint of another model is a one-line error
/// naming the first offending key and the spec field to change. Logs the report at info level.
pub fn load_for_task(vs: &VarStore, path: &Path) -> Result<CheckpointReport, TrainerError> {
    load_for_architecture(vs, path, Architecture::DeformableDetr)
}

/// [`load_for_task`] for a model of `arch`: DINO's layouts are the official IDEA-Research
/// `{'model': …}` checkpoint (its shared heads stored under every layer's name and the decoder's
/// aliases), TAO's Lightning `.pth` and ddetr's own; the structure checks name DINO's fields.
pub fn load_for_architecture(
    vs: &VarStore,
    path: &Path,
    arch: Architecture,
) -> Result<CheckpointReport, TrainerError> {
    let source = path.display().to_string();
    let raw = read(path)?;
    let (style, prefix) = detect_keys(raw.tensors.iter().map(|(k, _)| k.as_str()))
        .ok_or_else(|| not_a_model(&source, "it holds no Deformable DETR weights (no transformer.*, input_proj.* and class_embed.* tensors, nor transformers' model.encoder.*, under any wrapper prefix)"))?;
    let format = match (raw.ddetr, raw.container, style) {
        (true, _, _) => CheckpointFormat::Ddetr,
        (false, Some("state_dict"), _)
            if raw.top_level.iter().any(|k| k == LIGHTNING_VERSION_KEY) =>
        {
            CheckpointFormat::Lightning
        }
        (false, _, KeyStyle::Transformers) => CheckpointFormat::Transformers,
        (false, _, KeyStyle::Official) => CheckpointFormat::Official,
    };
    let mut ignored = raw.ignored;
    let mut stripped = Vec::with_capacity(raw.tensors.len());
    for (k, t) in raw.tensors {
        match k.strip_prefix(prefix) {
            Some(rest) => stripped.push((rest.to_string(), t)),
            None => ignored += 1,
        }
    }
    let ck = to_official(stripped, style);
    let (loaded, aliases) = fit(vs, &source, ck, style == KeyStyle::Transformers, arch)?;
    let report = CheckpointReport {
        path: path.to_path_buf(),
        format,
        container: raw.container,
        prefix: prefix.to_string(),
        loaded,
        aliases,
        ignored,
    };
    info!("{report}");
    Ok(report)
}

fn not_a_model(source: &str, why: &str) -> TrainerError {
    TrainerError::ReadWeights {
        path: source.to_string(),
        reason: format!("not a Deformable DETR checkpoint: {why}; give a ddetr .safetensors, an official or TAO .pth, or a transformers model.safetensors/pytorch_model.bin"),
    }
}

/// A checkpoint's tensors as stored, before any key mapping.
struct Raw {
    ddetr: bool,
    container: Option<&'static str>,
    top_level: Vec<String>,
    tensors: Vec<(String, Tensor)>,
    ignored: usize,
}

/// What the first bytes of a file say it is.
#[derive(Debug, PartialEq, Eq)]
enum FileKind {
    /// A safetensors file; `true` when it is a ddetr training checkpoint.
    Safetensors {
        ddetr: bool,
    },
    /// A `torch.save` zip archive (PyTorch ≥ 1.6).
    TorchArchive,
    /// `torch.save` of PyTorch < 1.6 (a bare pickle stream).
    LegacyTorch,
    Unknown,
}

/// Upper bound on a safetensors header this reader looks into (the format caps it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

fn sniff(path: &Path) -> Result<FileKind, TrainerError> {
    let err = |e: std::io::Error| TrainerError::ReadWeights {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut head = Vec::with_capacity(9);
    (&mut f).take(9).read_to_end(&mut head).map_err(err)?;
    if head.starts_with(b"PK\x03\x04") {
        return Ok(FileKind::TorchArchive);
    }
    if head.len() == 9 && head[8] == b'{' {
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER {
            return Ok(FileKind::Unknown);
        }
        let mut header = vec![b'{'];
        (&mut f).take(n - 1).read_to_end(&mut header).map_err(err)?;
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&header) else {
            return Ok(FileKind::Unknown);
        };
        let ddetr = json
            .get("__metadata__")
            .and_then(|m| m.get(checkpoint::CHECKSUM_KEY))
            .is_some();
        return Ok(FileKind::Safetensors { ddetr });
    }
    if head.first() == Some(&0x80) {
        return Ok(FileKind::LegacyTorch);
    }
    Ok(FileKind::Unknown)
}

fn read(path: &Path) -> Result<Raw, TrainerError> {
    let source = path.display().to_string();
    match sniff(path)? {
        FileKind::Safetensors { ddetr: true } => {
            let ck = checkpoint::load(path)?;
            let (state, mut model): (Vec<_>, Vec<_>) =
                ck.tensors.into_iter().partition(|(k, _)| {
                    TRAINING_STATE_PREFIXES
                        .iter()
                        .any(|p| k.starts_with(p))
                });
            // A run with train.ema: its average is the model evaluated, inferred and exported.
            let ema: BTreeMap<&str, &Tensor> = state
                .iter()
                .filter_map(|(k, t)| k.strip_prefix(ema::PREFIX).map(|n| (n, t)))
                .collect();
            if !ema.is_empty() {
                for (k, t) in &mut model {
                    if let Some(e) = ema.get(k.as_str()) {
                        *t = e.shallow_clone();
                    }
                }
                tracing::info!(
                    "checkpoint {}: the moving average of the weights (train.ema) is loaded",
                    path.display()
                );
            }
            Ok(Raw {
                ddetr: true,
                container: None,
                top_level: Vec::new(),
                tensors: model,
                ignored: state.len(),
            })
        }
        FileKind::Safetensors { ddetr: false } => {
            let tensors =
                Tensor::read_safetensors(path).map_err(|e| TrainerError::ReadWeights {
                    path: source,
                    reason: e.to_string(),
                })?;
            Ok(Raw {
                ddetr: false,
                container: None,
                top_level: Vec::new(),
                tensors,
                ignored: 0,
            })
        }
        FileKind::TorchArchive => {
            let a = torch_pickle::read_archive(path)?;
            Ok(Raw {
                ddetr: false,
                container: a.container,
                top_level: a.top_level,
                tensors: a.tensors,
                ignored: 0,
            })
        }
        FileKind::LegacyTorch => Err(TrainerError::ReadWeights {
            path: source,
            reason: "written by torch.save of PyTorch before 1.6 (not a zip archive): load and save it again with a newer PyTorch".into(),
        }),
        FileKind::Unknown => Err(not_a_model(
            &source,
            "neither a safetensors file nor a torch.save archive",
        )),
    }
}

/// How a checkpoint names its tensors (after the wrapper prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyStyle {
    Official,
    Transformers,
}

/// The key style and wrapper prefix of a checkpoint, from the structure of its keys: after the
/// prefix, official keys have `transformer.*`, `input_proj.*` and `class_embed.*`; transformers'
/// have `model.encoder.layers.*` and `model.input_proj.*`.
fn detect_keys<'a>(
    keys: impl Iterator<Item = &'a str> + Clone,
) -> Option<(KeyStyle, &'static str)> {
    let has = |prefix: &str, root: &str| {
        keys.clone()
            .any(|k| k.strip_prefix(prefix).is_some_and(|r| r.starts_with(root)))
    };
    for prefix in PREFIXES {
        if has(prefix, "transformer.") && has(prefix, "input_proj.") && has(prefix, "class_embed.")
        {
            return Some((KeyStyle::Official, prefix));
        }
    }
    for prefix in PREFIXES {
        if has(prefix, "model.encoder.layers.") && has(prefix, "model.input_proj.") {
            return Some((KeyStyle::Transformers, prefix));
        }
    }
    None
}

/// Official keys for every tensor. transformers' decoder aliases of the heads
/// (`model.decoder.{bbox,class}_embed.*`) become `transformer.decoder.*` like upstream's, kept so
/// a head saved only there can be used.
fn to_official(tensors: Vec<(String, Tensor)>, style: KeyStyle) -> BTreeMap<String, Tensor> {
    if style == KeyStyle::Official {
        return tensors.into_iter().collect();
    }
    let (aliases, rest): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|(k, _)| {
        k.starts_with("model.decoder.bbox_embed.") || k.starts_with("model.decoder.class_embed.")
    });
    let mut out = weights::to_official_keys(rest);
    for (k, t) in aliases {
        let rest = k.strip_prefix("model.").unwrap_or(&k);
        out.insert(format!("transformer.{rest}"), t);
    }
    out
}

/// `("class_embed" | "bbox_embed", N, tail)` of a head key.
fn head(key: &str) -> Option<(&str, usize, &str)> {
    for name in ["class_embed", "bbox_embed"] {
        if let Some(rest) = key.strip_prefix(name).and_then(|r| r.strip_prefix('.')) {
            let (idx, tail) = rest.split_once('.')?;
            return Some((name, idx.parse().ok()?, tail));
        }
    }
    None
}

/// The key of head 0 for head key `key`.
fn head0(key: &str) -> Option<String> {
    head(key).map(|(name, _, tail)| format!("{name}.0.{tail}"))
}

/// The distinct `N` of keys `<stem>N.…`.
fn indices<'a>(keys: impl Iterator<Item = &'a String>, stem: &str) -> BTreeSet<usize> {
    keys.filter_map(|k| k.strip_prefix(stem)?.split_once('.')?.0.parse().ok())
        .collect()
}

/// Copies the checkpoint (official keys) into `vs` after [`check_structure`] and the per-tensor
/// checks; returns (variables loaded, checkpoint tensors that were aliases).
fn fit(
    vs: &VarStore,
    source: &str,
    mut ck: BTreeMap<String, Tensor>,
    tied_class_heads: bool,
    arch: Architecture,
) -> Result<(usize, usize), TrainerError> {
    let total = ck.len();
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    ck.retain(|k, _| !k.ends_with("num_batches_tracked"));
    let mut dec_alias: BTreeMap<String, Tensor> = BTreeMap::new();
    ck.retain(|k, t| match k.strip_prefix("transformer.decoder.") {
        Some(rest) if head(rest).is_some() => {
            dec_alias.insert(rest.to_string(), t.shallow_clone());
            false
        }
        _ => true,
    });
    check_structure(source, &vars, &ck, &dec_alias, arch)?;

    // Where each variable comes from: its own key, else the decoder's alias of that head, else
    // (transformers) head 0, to which it ties the class heads and leaves them out of its files.
    let mut plan: Vec<(&String, &Tensor, String, &Tensor)> = Vec::new();
    let mut missing: Vec<&String> = Vec::new();
    for (name, var) in &vars {
        let alias_key = format!("transformer.decoder.{name}");
        let src = if let Some(t) = ck.get(name) {
            Some((name.clone(), t))
        } else if let Some(t) = dec_alias.get(name) {
            Some((alias_key, t))
        } else if tied_class_heads && name.starts_with("class_embed.") {
            head0(name).and_then(|h| ck.get(&h).map(|t| (h, t)))
        } else {
            None
        };
        match src {
            Some((key, t)) => plan.push((name, var, key, t)),
            None => missing.push(name),
        }
    }
    if let Some((name, var, _, t)) = plan.iter().find(|(_, var, _, t)| t.size() != var.size()) {
        return Err(TrainerError::ShapeMismatch {
            path: source.to_string(),
            key: name.to_string(),
            found: t.size(),
            expected: var.size(),
            hint: shape_hint(name, &t.size(), &var.size(), &ck),
        });
    }
    if let Some(first) = missing.first() {
        return Err(TrainerError::MissingKeys {
            path: source.to_string(),
            count: missing.len(),
            first: first.to_string(),
            hint: field_hint(first, &ck),
        });
    }
    // Checkpoint tensors with no variable: upstream's shared heads (head 0's values) are aliases.
    let unexpected: Vec<&String> = ck
        .iter()
        .filter(|(k, t)| {
            !vars.contains_key(*k)
                && !head0(k)
                    .and_then(|h| ck.get(&h))
                    .is_some_and(|h0| h0.size() == t.size() && h0.equal(t))
        })
        .map(|(k, _)| k)
        .collect();
    if let Some(first) = unexpected.first() {
        return Err(TrainerError::UnexpectedKeys {
            path: source.to_string(),
            count: unexpected.len(),
            first: first.to_string(),
            hint: field_hint(first, &ck),
        });
    }
    let used: BTreeSet<&String> = plan.iter().map(|(_, _, key, _)| key).collect();
    tch::no_grad(|| {
        for (_, var, _, t) in &plan {
            var.shallow_clone()
                .copy_(&t.to_device(var.device()).to_kind(var.kind()));
        }
    });
    Ok((plan.len(), total - used.len()))
}

/// The whole-model differences, before any per-tensor check, in the order that names the real
/// cause: decoder and encoder depth, two-stage, feature levels, hidden size, box refinement.
fn check_structure(
    source: &str,
    vars: &BTreeMap<String, Tensor>,
    ck: &BTreeMap<String, Tensor>,
    dec_alias: &BTreeMap<String, Tensor>,
    arch: Architecture,
) -> Result<(), TrainerError> {
    let extra = |keys: Vec<&String>, hint: String| TrainerError::UnexpectedKeys {
        path: source.to_string(),
        count: keys.len(),
        first: keys.first().map(|k| k.to_string()).unwrap_or_default(),
        hint,
    };
    let lacking = |keys: Vec<&String>, hint: String| TrainerError::MissingKeys {
        path: source.to_string(),
        count: keys.len(),
        first: keys.first().map(|k| k.to_string()).unwrap_or_default(),
        hint,
    };
    // The architecture: DINO's anchor-conditioned decoder has `ref_point_head`, Deformable
    // DETR's does not.
    let is_dino = |m: &BTreeMap<String, Tensor>| {
        m.keys()
            .any(|k| k.starts_with("transformer.decoder.ref_point_head."))
    };
    let ck_arch = if is_dino(ck) {
        Architecture::Dino
    } else {
        Architecture::DeformableDetr
    };
    if ck_arch != arch {
        let theirs: Vec<&String> = ck.keys().filter(|k| !vars.contains_key(*k)).collect();
        return Err(extra(
            theirs,
            format!(
                "the checkpoint is a {} model: set model_name: {} (or run `ddetr{} <task>`)",
                ck_arch.name(),
                ck_arch.name(),
                if ck_arch == Architecture::Dino {
                    " dino"
                } else {
                    ""
                }
            ),
        ));
    }
    // Numbered blocks: decoder layers, encoder layers, feature levels (input_proj.N).
    let blocks = [
        (
            "transformer.decoder.layers.",
            "decoder layers",
            "model.dec_layers",
            "",
        ),
        (
            "transformer.encoder.layers.",
            "encoder layers",
            "model.enc_layers",
            "",
        ),
        (
            "input_proj.",
            "feature levels",
            "model.num_feature_levels",
            " and model.return_interm_indices to as many backbone stages",
        ),
    ];
    for (stem, what, field, also) in blocks {
        let in_ck = indices(ck.keys(), stem);
        let in_model = indices(vars.keys(), stem);
        if in_ck.is_empty() || in_ck == in_model {
            continue;
        }
        let n = in_ck.len();
        let hint = format!("the checkpoint has {n} {what}: set {field} to {n}{also}");
        let index =
            |k: &String| -> Option<usize> { k.strip_prefix(stem)?.split_once('.')?.0.parse().ok() };
        let surplus: Vec<&String> = ck
            .keys()
            .filter(|k| index(k).is_some_and(|i| !in_model.contains(&i)))
            .collect();
        if !surplus.is_empty() {
            return Err(extra(surplus, hint));
        }
        let short: Vec<&String> = vars
            .keys()
            .filter(|k| index(k).is_some_and(|i| !in_ck.contains(&i)))
            .collect();
        return Err(lacking(short, hint));
    }
    if arch == Architecture::Dino {
        return check_dino_heads(source, vars, ck);
    }
    // Two-stage: the encoder's proposal layers.
    let ck_two = two_stage_keys(ck);
    let model_two = two_stage_keys(vars);
    if !ck_two.is_empty() && model_two.is_empty() {
        return Err(extra(
            ck_two,
            "the checkpoint is two-stage: set model.two_stage to true".into(),
        ));
    }
    if ck_two.is_empty() && !model_two.is_empty() {
        return Err(lacking(
            model_two,
            "the checkpoint is not two-stage: set model.two_stage to false".into(),
        ));
    }
    // Hidden size, read off the level embedding [levels, d].
    if let (Some(c), Some(m)) = (
        ck.get("transformer.level_embed"),
        vars.get("transformer.level_embed"),
    ) {
        let (cs, ms) = (c.size(), m.size());
        if cs.len() == 2 && ms.len() == 2 && cs[1] != ms[1] {
            return Err(TrainerError::ShapeMismatch {
                path: source.to_string(),
                key: "transformer.level_embed".into(),
                found: cs.clone(),
                expected: ms,
                hint: format!(
                    "the checkpoint's hidden size is {}: set model.hidden_dim to {}",
                    cs[1], cs[1]
                ),
            });
        }
    }
    // Box refinement: a head per decoder layer (upstream's decoder then aliases the box heads)
    // against one head shared by all layers (heads N > 0 repeat head 0, or are absent).
    let model_refine = vars.keys().any(|k| head(k).is_some_and(|(_, i, _)| i > 0));
    let differing: Vec<&String> = ck
        .iter()
        .filter(|(k, t)| {
            head(k).is_some_and(|(_, i, _)| i > 0)
                && !head0(k)
                    .and_then(|h| ck.get(&h))
                    .is_some_and(|h0| h0.size() == t.size() && h0.equal(t))
        })
        .map(|(k, _)| k)
        .collect();
    let box_aliases: Vec<&String> = dec_alias
        .keys()
        .filter(|k| k.starts_with("bbox_embed."))
        .collect();
    let ck_refine = !differing.is_empty() || !box_aliases.is_empty();
    let has_heads = ck.keys().any(|k| head(k).is_some()) || !dec_alias.is_empty();
    if ck_refine && !model_refine {
        // The heads that differ from head 0, else (transformers keeps the box heads only under
        // the decoder's alias) those aliases.
        let names: Vec<String> = if differing.is_empty() {
            box_aliases
                .iter()
                .map(|k| format!("transformer.decoder.{k}"))
                .collect()
        } else {
            differing.iter().map(|k| k.to_string()).collect()
        };
        return Err(extra(
            names.iter().collect(),
            "the checkpoint was trained with box refinement (a class and box head per decoder layer): set model.with_box_refine to true".into(),
        ));
    }
    if !ck_refine && model_refine && has_heads {
        let heads: Vec<&String> = vars
            .keys()
            .filter(|k| head(k).is_some_and(|(_, i, _)| i > 0))
            .collect();
        return Err(lacking(
            heads,
            "the checkpoint has one class and box head shared by all decoder layers (trained without box refinement): set model.with_box_refine to false".into(),
        ));
    }
    Ok(())
}

/// DINO's decoder heads: shared by every layer (the checkpoint's heads N > 0 repeat head 0)
/// or one per layer, as the model is built (`model.dec_pred_{class,bbox}_embed_share`).
fn check_dino_heads(
    source: &str,
    vars: &BTreeMap<String, Tensor>,
    ck: &BTreeMap<String, Tensor>,
) -> Result<(), TrainerError> {
    for (stem, field) in [
        ("class_embed.", "model.dec_pred_class_embed_share"),
        ("bbox_embed.", "model.dec_pred_bbox_embed_share"),
    ] {
        let model_shared = !vars
            .keys()
            .any(|k| k.starts_with(stem) && head(k).is_some_and(|(_, i, _)| i > 0));
        let differing: Vec<&String> = ck
            .iter()
            .filter(|(k, t)| {
                k.starts_with(stem)
                    && head(k).is_some_and(|(_, i, _)| i > 0)
                    && !head0(k)
                        .and_then(|h| ck.get(&h))
                        .is_some_and(|h0| h0.size() == t.size() && h0.equal(t))
            })
            .map(|(k, _)| k)
            .collect();
        if model_shared && !differing.is_empty() {
            return Err(TrainerError::UnexpectedKeys {
                path: source.to_string(),
                count: differing.len(),
                first: differing[0].to_string(),
                hint: format!(
                    "the checkpoint has a separate {}head per decoder layer: set {field} to false",
                    stem.trim_end_matches('.').replace('_', " ") + " "
                ),
            });
        }
        if !model_shared && differing.is_empty() && ck.keys().any(|k| k.starts_with(stem)) {
            let heads: Vec<&String> = vars
                .keys()
                .filter(|k| k.starts_with(stem) && head(k).is_some_and(|(_, i, _)| i > 0))
                .collect();
            // Shared heads saved under every layer's name load into per-layer heads too.
            if heads.iter().any(|k| !ck.contains_key(*k)) {
                return Err(TrainerError::MissingKeys {
                    path: source.to_string(),
                    count: heads.len(),
                    first: heads[0].to_string(),
                    hint: format!(
                        "the checkpoint has one {}head shared by all decoder layers: set {field} to true",
                        stem.trim_end_matches('.').replace('_', " ") + " "
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The keys of the two-stage proposal layers (`transformer.enc_output*`, `transformer.pos_trans*`).
fn two_stage_keys(map: &BTreeMap<String, Tensor>) -> Vec<&String> {
    map.keys()
        .filter(|k| {
            k.starts_with("transformer.enc_output") || k.starts_with("transformer.pos_trans")
        })
        .collect()
}

/// The backbone a checkpoint's `backbone.0.body.*` keys describe, as `model.backbone` names it.
fn backbone_name(ck: &BTreeMap<String, Tensor>) -> Option<&'static str> {
    let proj = ck.get(&format!("{BACKBONE_BODY_PREFIX}patch_embed.proj.weight"));
    if ck.contains_key(&format!(
        "{BACKBONE_BODY_PREFIX}patch_embed.backbone.stem.0.weight"
    )) {
        // A FAN-hybrid: its width names the size.
        return match proj.map(|p| p.size()[0]) {
            Some(192) => Some("fan_tiny"),
            Some(384) => Some("fan_small"),
            Some(448) => Some("fan_base"),
            Some(480) => Some("fan_large"),
            _ => None,
        };
    }
    if let Some(proj) = proj {
        let blocks = |l: usize| {
            indices(
                ck.keys(),
                &format!("{BACKBONE_BODY_PREFIX}levels.{l}.blocks."),
            )
            .len()
        };
        let table = ck
            .get(&format!(
                "{BACKBONE_BODY_PREFIX}levels.0.blocks.0.attn.relative_position_bias_table"
            ))
            .map_or(0, |t| t.size()[0]);
        // (2·window − 1)² rows: 169 for window 7, 529 for window 12.
        return match (proj.size()[0], blocks(0), blocks(2), table) {
            (64, 2, 6, 169) => Some("gc_vit_xxtiny"),
            (64, 3, 6, 169) => Some("gc_vit_xtiny"),
            (64, 3, 19, 169) => Some("gc_vit_tiny"),
            (96, 3, 19, 169) => Some("gc_vit_small"),
            (128, 3, 19, 169) => Some("gc_vit_base"),
            (192, 3, 19, 169) => Some("gc_vit_large"),
            (192, 3, 19, 529) => Some("gc_vit_large_384"),
            _ => None,
        };
    }
    let bottleneck = ck.contains_key(&format!("{BACKBONE_BODY_PREFIX}layer1.0.conv3.weight"));
    let blocks = indices(ck.keys(), &format!("{BACKBONE_BODY_PREFIX}layer3.")).len();
    match (bottleneck, blocks) {
        (false, 2) => Some("resnet_18"),
        (false, 6) => Some("resnet_34"),
        (true, 6) => Some("resnet_50"),
        _ => None,
    }
}

fn backbone_hint(ck: &BTreeMap<String, Tensor>) -> String {
    match backbone_name(ck) {
        Some(name) => format!("the checkpoint's backbone is {name}: set model.backbone to {name}"),
        None => "the checkpoint's backbone is not one model.backbone names (resnet_18, resnet_34, resnet_50, gc_vit_*, fan_*)".into(),
    }
}

/// What to change when checkpoint tensor `key` has shape `found` where the model has `expected`.
pub fn shape_hint(
    key: &str,
    found: &[i64],
    expected: &[i64],
    ck: &BTreeMap<String, Tensor>,
) -> String {
    let differs = |i: usize| found.get(i) != expected.get(i);
    let dim = |i: usize| found.get(i).copied().unwrap_or(0);
    if key.starts_with(BACKBONE_BODY_PREFIX) {
        return backbone_hint(ck);
    }
    if head(key).is_some_and(|(name, _, _)| name == "class_embed") && differs(0) {
        return format!(
            "the checkpoint predicts {} classes: set dataset.num_classes to {}",
            dim(0),
            dim(0)
        );
    }
    if key == "query_embed.weight" && differs(0) {
        return format!(
            "the checkpoint has {} queries: set model.num_queries to {}",
            dim(0),
            dim(0)
        );
    }
    let ffn = if key.ends_with(".linear1.weight") || key.ends_with(".linear1.bias") {
        Some(0)
    } else if key.ends_with(".linear2.weight") {
        Some(1)
    } else {
        None
    };
    if let Some(i) = ffn.filter(|i| differs(*i)) {
        return format!(
            "the checkpoint's feed-forward size is {}: set model.dim_feedforward to {}",
            dim(i),
            dim(i)
        );
    }
    if (key.contains(".sampling_offsets.") || key.contains(".attention_weights.")) && differs(0) {
        let points = if key.contains(".encoder.") {
            "model.enc_n_points"
        } else {
            "model.dec_n_points"
        };
        let per = if key.contains(".sampling_offsets.") {
            " × 2"
        } else {
            ""
        };
        return format!(
            "the checkpoint has {} rows where the model has {} (nheads × num_feature_levels × n_points{per}): set model.nheads and {points} to the checkpoint's",
            dim(0),
            expected.first().copied().unwrap_or(0)
        );
    }
    if let Some(level) = key
        .strip_prefix("input_proj.")
        .filter(|k| k.ends_with(".0.weight"))
        .and_then(|k| k.split('.').next())
    {
        if differs(1) {
            return format!(
                "the checkpoint's feature level {level} takes {} channels: check model.backbone and model.return_interm_indices",
                dim(1)
            );
        }
    }
    "a layer of another size: compare model.hidden_dim, model.nheads and model.dim_feedforward with the checkpoint's configuration".into()
}

/// The spec field deciding whether the model has a variable named `key` (layer counts and the
/// other whole-model differences are checked before, in `check_structure`).
pub fn field_hint(key: &str, ck: &BTreeMap<String, Tensor>) -> String {
    if key.starts_with(BACKBONE_BODY_PREFIX) {
        return backbone_hint(ck);
    }
    if key.starts_with("input_proj.") || key == "transformer.level_embed" {
        return "check model.num_feature_levels and model.return_interm_indices".into();
    }
    if key == "query_embed.weight"
        || key.starts_with("transformer.reference_points")
        || key.starts_with("transformer.enc_output")
        || key.starts_with("transformer.pos_trans")
    {
        return "check model.two_stage".into();
    }
    if head(key).is_some() {
        return "check model.with_box_refine (and model.two_stage, which adds a head)".into();
    }
    "the checkpoint is of another architecture: compare the model section of the spec with it"
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> Option<(KeyStyle, &'static str)> {
        detect_keys(list.iter().copied())
    }

    #[test]
    fn the_prefix_is_found_by_structure_not_by_one_key() {
        let official = [
            "backbone.0.body.conv1.weight",
            "transformer.level_embed",
            "input_proj.0.0.weight",
            "class_embed.0.weight",
        ];
        assert_eq!(keys(&official), Some((KeyStyle::Official, "")));
        for prefix in ["module.", "model.", "model.model.", "module.model.model."] {
            let wrapped: Vec<String> = official.iter().map(|k| format!("{prefix}{k}")).collect();
            let mut refs: Vec<&str> = wrapped.iter().map(String::as_str).collect();
            refs.push("criterion.empty_weight");
            assert_eq!(keys(&refs), Some((KeyStyle::Official, prefix)), "{prefix}");
        }
        // transformers' keys start with `model.` but are not official after it.
        let hf = [
            "model.backbone.conv_encoder.model.conv1.weight",
            "model.input_proj.0.0.weight",
            "model.encoder.layers.0.fc1.weight",
            "model.level_embed",
            "class_embed.0.weight",
        ];
        assert_eq!(keys(&hf), Some((KeyStyle::Transformers, "")));
        let wrapped: Vec<String> = hf.iter().map(|k| format!("model.{k}")).collect();
        let refs: Vec<&str> = wrapped.iter().map(String::as_str).collect();
        assert_eq!(keys(&refs), Some((KeyStyle::Transformers, "model.")));
        assert_eq!(keys(&["conv1.weight", "fc.weight"]), None);
        assert_eq!(keys(&["model.input_proj.0.0.weight"]), None);
    }

    #[test]
    fn head_keys_split_into_name_index_and_tail() {
        assert_eq!(
            head("bbox_embed.3.layers.2.bias"),
            Some(("bbox_embed", 3, "layers.2.bias"))
        );
        assert_eq!(
            head("class_embed.0.weight"),
            Some(("class_embed", 0, "weight"))
        );
        assert_eq!(head("class_embedding.0.weight"), None);
        assert_eq!(
            head0("class_embed.4.bias").as_deref(),
            Some("class_embed.0.bias")
        );
    }

    #[test]
    fn the_report_is_one_line_naming_the_layout() {
        let r = CheckpointReport {
            path: "results/x.pth".into(),
            format: CheckpointFormat::Lightning,
            container: Some("state_dict"),
            prefix: "model.model.".into(),
            loaded: 312,
            aliases: 0,
            ignored: 0,
        };
        assert_eq!(
            r.to_string(),
            "checkpoint results/x.pth: TAO Lightning (state_dict, prefix model.model.) — 312 tensors loaded, 0 missing, 0 unexpected"
        );
    }
}
