//! Reading a spec: YAML file → tree → `key.path=value` overrides → typed [`ExperimentSpec`] →
//! validation. Every failure is a [`SpecError`] whose message is one line saying what is wrong and
//! how to fix it.

use std::path::Path;

use serde_json::{Map, Value};

use super::sections::{Architecture, ExperimentSpec};
use super::validate::{validate, Notice};
use super::SpecError;

/// A spec after overrides and validation, with the notices validation produced (e.g. num_gpus
/// raised to match gpu_ids).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub spec: ExperimentSpec,
    pub notices: Vec<Notice>,
}

/// Loads `path`, applies `overrides` (`key.path=value`, in order) and `results_dir` (the CLI's
/// `-r`, applied last), and validates.
pub fn load(
    path: &Path,
    overrides: &[String],
    results_dir: Option<&str>,
) -> Result<Resolved, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let tree = parse_yaml(&text).map_err(|reason| SpecError::Parse {
        path: path.display().to_string(),
        reason,
    })?;
    resolve_tree(tree, overrides, results_dir)
}

/// Like [`load`], from YAML text (tests, stdin).
pub fn load_str(
    text: &str,
    overrides: &[String],
    results_dir: Option<&str>,
) -> Result<Resolved, SpecError> {
    let tree = parse_yaml(text).map_err(|reason| SpecError::Parse {
        path: "<spec>".into(),
        reason,
    })?;
    resolve_tree(tree, overrides, results_dir)
}

fn resolve_tree(
    mut tree: Value,
    overrides: &[String],
    results_dir: Option<&str>,
) -> Result<Resolved, SpecError> {
    if tree.is_null() {
        tree = Value::Object(Map::new());
    }
    if !tree.is_object() {
        return Err(SpecError::Parse {
            path: "<spec>".into(),
            reason: "the top level must be a mapping of sections (model:, dataset:, train:, …)"
                .into(),
        });
    }
    let arch = architecture(&tree, overrides)?;
    // Start from the architecture's defaults so that overrides see what a key really is (a
    // section or a value); the other architecture's model keys are not there, so a spec that
    // sets one is told so below.
    let mut base = defaults_tree(arch);
    merge(&mut base, tree);
    let mut tree = base;
    let mut overridden = Vec::new();
    for raw in overrides {
        let (key, value) = parse_override(raw)?;
        set_path(&mut tree, &key, value.clone()).map_err(|e| match e {
            SpecError::BadOverride { reason, .. } => SpecError::BadOverride {
                raw: raw.clone(),
                reason,
            },
            other => other,
        })?;
        overridden.push((
            key,
            value,
            raw.split_once('=')
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default(),
        ));
    }
    if let Some(dir) = results_dir {
        set_path(&mut tree, "results_dir", Value::String(dir.to_string()))?;
    }
    refuse_foreign_model_keys(tree.get("model"), "model", arch)?;
    fill_distill_defaults(&mut tree)?;
    let mut notices: Vec<Notice> = unset_batch_size(&mut tree, arch).into_iter().collect();
    let spec = loop {
        match deserialize(&tree) {
            Ok(spec) => break spec,
            Err(err) => {
                // An override typed as a number/bool for a string key (`model_name=123`) is meant
                // as the string: retry once with the raw text.
                if let SpecError::BadValue { key, .. } = &err {
                    if let Some((k, _, raw)) = overridden
                        .iter()
                        .find(|(k, v, _)| k == key && !v.is_string() && !v.is_array())
                    {
                        let k = k.clone();
                        let raw = Value::String(raw.clone());
                        overridden.retain(|(o, _, _)| *o != k);
                        set_path(&mut tree, &k, raw)?;
                        continue;
                    }
                }
                return Err(err);
            }
        }
    };
    let mut spec = spec;
    notices.extend(validate(&mut spec)?);
    Ok(Resolved { spec, notices })
}

/// TAO's export and gen_trt_engine specs write `dataset.batch_size: -1`, a value TAO's export
/// never reads (its batch is `export.batch_size`): -1 there means "not set", and takes the default.
fn unset_batch_size(tree: &mut Value, arch: Architecture) -> Option<Notice> {
    let slot = tree.get_mut("dataset")?.get_mut("batch_size")?;
    if slot.as_i64() != Some(-1) {
        return None;
    }
    let default = defaults_tree(arch)["dataset"]["batch_size"].clone();
    let notice = Notice(format!(
        "dataset.batch_size -1 (as TAO's export specs write it) means unset: {default} images per rank; the exported batch is export.batch_size"
    ));
    *slot = default;
    Some(notice)
}

/// The architecture a spec tree names (its `model_name`, or a `model_name=` override). An
/// override that contradicts the file's own `model_name` is refused: `ddetr dino train` on a
/// Deformable DETR spec is a mistake, not a request.
fn architecture(tree: &Value, overrides: &[String]) -> Result<Architecture, SpecError> {
    let in_file = tree.get("model_name").and_then(Value::as_str);
    let mut name = in_file.map(str::to_string);
    for raw in overrides {
        let (key, value) = parse_override(raw)?;
        if key != "model_name" {
            continue;
        }
        let value = match value {
            Value::String(v) => v,
            other => other.to_string(),
        };
        if let Some(file) = in_file.filter(|f| !f.trim().is_empty() && f.trim() != value.trim()) {
            return Err(SpecError::Invalid {
                key: "model_name".into(),
                message: format!(
                    "is '{file}' in the spec but '{value}' was asked for (a `model_name=` override or the `ddetr dino` command group): use a {value} spec, or drop the override"
                ),
            });
        }
        name = Some(value);
    }
    Architecture::from_model_name(name.as_deref()).ok_or_else(|| {
        let value = name.unwrap_or_default();
        let valid: Vec<String> = Architecture::NAMES.iter().map(|n| n.to_string()).collect();
        SpecError::UnknownValue {
            key: "model_name".into(),
            suggestion: nearest(&value, &valid),
            value,
            valid,
        }
    })
}

/// `arch`'s defaults as a tree, without the other architecture's model keys.
pub(crate) fn defaults_tree(arch: Architecture) -> Value {
    let mut tree =
        serde_json::to_value(ExperimentSpec::defaults_for(arch)).expect("defaults serialize");
    drop_foreign_model_keys(&mut tree, arch);
    tree
}

/// Removes the model keys `arch` does not have from a spec tree (and the teacher keys its
/// teacher's architecture does not have).
pub(crate) fn drop_foreign_model_keys(tree: &mut Value, arch: Architecture) {
    if let Some(Value::Object(model)) = tree.get_mut("model") {
        for key in arch.foreign_model_keys() {
            model.remove(*key);
        }
    }
    let teacher_arch = tree
        .get("distill")
        .and_then(|d| d.get("teacher_model_name"))
        .and_then(Value::as_str)
        .map_or(Some(Architecture::Dino), |n| {
            Architecture::from_model_name(Some(n))
        });
    if let (Some(arch), Some(Value::Object(teacher))) = (
        teacher_arch,
        tree.get_mut("distill").and_then(|d| d.get_mut("teacher")),
    ) {
        for key in arch.foreign_model_keys() {
            teacher.remove(*key);
        }
    }
}

/// A model key of the other architecture in `section` (`model`, or `distill.teacher`) is
/// refused, saying whose key it is.
fn refuse_foreign_model_keys(
    section: Option<&Value>,
    name: &str,
    arch: Architecture,
) -> Result<(), SpecError> {
    let Some(Value::Object(model)) = section else {
        return Ok(());
    };
    match arch
        .foreign_model_keys()
        .iter()
        .find(|k| model.contains_key(**k))
    {
        Some(key) => {
            let other = match arch {
                Architecture::DeformableDetr => Architecture::Dino,
                Architecture::Dino => Architecture::DeformableDetr,
            };
            let (what, fix) = if name == "model" {
                ("spec trains", "model_name")
            } else {
                ("teacher is", "distill.teacher_model_name")
            };
            Err(SpecError::Invalid {
                key: format!("{name}.{key}"),
                message: format!(
                    "is a {} key, but this {what} {}: drop it, or set {fix}: {}",
                    other.name(),
                    arch.name(),
                    other.name()
                ),
            })
        }
        None => Ok(()),
    }
}

/// A `distill` section gets its defaults: the teacher's architecture (`teacher_model_name`,
/// DINO unless set) picks the defaults under `teacher`, whose foreign keys are refused; TAO's
/// backend spec misplaces `pretrained_teacher_model_path` under `teacher`, which is named.
fn fill_distill_defaults(tree: &mut Value) -> Result<(), SpecError> {
    let Some(distill) = tree.get_mut("distill") else {
        return Ok(());
    };
    if distill.is_null() {
        *distill = Value::Object(Map::new());
    }
    let Value::Object(section) = distill else {
        return Err(SpecError::BadValue {
            key: "distill".into(),
            reason: "must be a section (teacher:, pretrained_teacher_model_path:, bindings:)"
                .into(),
        });
    };
    let name = match section.get("teacher_model_name") {
        None | Some(Value::Null) => "dino".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let Some(teacher_arch) = Architecture::from_model_name(Some(&name)) else {
        let valid: Vec<String> = Architecture::NAMES.iter().map(|n| n.to_string()).collect();
        return Err(SpecError::UnknownValue {
            key: "distill.teacher_model_name".into(),
            suggestion: nearest(&name, &valid),
            value: name,
            valid,
        });
    };
    let teacher = section.get("teacher");
    if teacher.is_some_and(|t| t.get("pretrained_teacher_model_path").is_some()) {
        return Err(SpecError::Invalid {
            key: "distill.teacher.pretrained_teacher_model_path".into(),
            message: "is a key of distill, not of its teacher model: move it one level up, to distill.pretrained_teacher_model_path".into(),
        });
    }
    refuse_foreign_model_keys(teacher, "distill.teacher", teacher_arch)?;
    let mut defaults = defaults_tree(teacher_arch)
        .get("model")
        .cloned()
        .expect("the defaults have a model section");
    if let Some(t) = section.remove("teacher") {
        merge(&mut defaults, t);
    }
    section.insert("teacher".into(), defaults);
    Ok(())
}

/// Deep-merges `over` into `base`: mappings merge key by key, null leaves a mapping alone, anything
/// else replaces.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        // An empty section (`train:` with nothing under it) keeps the defaults.
        (Value::Object(_), Value::Null) => {}
        (slot, v) => *slot = v,
    }
}

/// Parses YAML into a JSON-like tree; the error says where (line:column).
pub(crate) fn parse_yaml(text: &str) -> Result<Value, String> {
    serde_yaml_ng::from_str::<Value>(text).map_err(|e| match e.location() {
        Some(loc) => format!(
            "line {} column {}: {}",
            loc.line(),
            loc.column(),
            strip_location(&e.to_string())
        ),
        None => e.to_string(),
    })
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// `key.path=value`: the value is read as a YAML scalar or flow sequence (`3`, `1e-4`, `true`,
/// `[0,1]`, `resnet_50`, `"quoted"`).
pub fn parse_override(raw: &str) -> Result<(String, Value), SpecError> {
    let Some((key, value)) = raw.split_once('=') else {
        return Err(SpecError::BadOverride {
            raw: raw.to_string(),
            reason: "expected key.path=value, e.g. train.num_epochs=3".into(),
        });
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|part| part.is_empty()) {
        return Err(SpecError::BadOverride {
            raw: raw.to_string(),
            reason: "the key is empty or has an empty component; write e.g. train.optim.lr=1e-4"
                .into(),
        });
    }
    let text = value.trim();
    let parsed = if text.is_empty() {
        Value::String(String::new())
    } else {
        parse_yaml(text).map_err(|reason| SpecError::BadOverride {
            raw: raw.to_string(),
            reason,
        })?
    };
    Ok((key.to_string(), parsed))
}

/// Sets `a.b.c` in the tree, creating mappings on the way (a null section becomes a mapping).
fn set_path(tree: &mut Value, key: &str, value: Value) -> Result<(), SpecError> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = tree;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(map) = node else {
            return Err(SpecError::BadOverride {
                raw: key.to_string(),
                reason: format!(
                    "{} is not a section, so it has no key '{}'",
                    parts[..i].join("."),
                    part
                ),
            });
        };
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return Ok(());
        }
        node = map.entry(part.to_string()).or_insert(Value::Null);
    }
    unreachable!("a key has at least one component")
}

/// Tree → typed spec, with errors that name the key path.
fn deserialize(tree: &Value) -> Result<ExperimentSpec, SpecError> {
    serde_path_to_error::deserialize::<_, ExperimentSpec>(tree).map_err(|err| {
        let path = clean_path(&err.path().to_string());
        let message = err.inner().to_string();
        classify(path, &message)
    })
}

/// serde_path_to_error writes `?` for the root and `[0]` for list entries.
fn clean_path(path: &str) -> String {
    if path == "." || path == "?" {
        String::new()
    } else {
        path.to_string()
    }
}

/// Turns serde's message into the user-facing error: unknown keys and unknown enum values get
/// the nearest valid name.
fn classify(path: String, message: &str) -> SpecError {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (key, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let valid = backticked(tail);
        // For unknown fields serde_path_to_error's path already ends with the unknown key.
        let parent = match path.rsplit_once('.') {
            Some((parent, last)) if last == key => parent.to_string(),
            _ if path == key => String::new(),
            _ => path.clone(),
        };
        let full = if parent.is_empty() {
            key.to_string()
        } else {
            format!("{parent}.{key}")
        };
        return SpecError::UnknownKey {
            suggestion: nearest(key, &valid),
            key: full,
            section: parent,
            valid,
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (value, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let valid = backticked(tail);
        return SpecError::UnknownValue {
            suggestion: nearest(value, &valid),
            key: path,
            value: value.to_string(),
            valid,
        };
    }
    SpecError::BadValue {
        key: path,
        reason: message.to_string(),
    }
}

/// Names between backticks in serde's "expected one of `a`, `b`".
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The valid name closest to `got`, if any is close enough to be a plausible typo.
pub(crate) fn nearest(got: &str, valid: &[String]) -> Option<String> {
    valid
        .iter()
        .map(|v| {
            (
                strsim::normalized_damerau_levenshtein(&got.to_lowercase(), &v.to_lowercase()),
                v,
            )
        })
        .filter(|(score, _)| *score >= 0.5)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v.clone())
}
