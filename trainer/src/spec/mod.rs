//! The TAO Deformable DETR and DINO experiment spec (one layout; `model_name` picks the
//! architecture, its defaults and its model keys): typed sections with TAO's defaults
//! ([`sections`]), loading with `key.path=value` overrides and nearest-key suggestions ([`load`]),
//! and cross-field validation ([`validate`]).

pub mod load;
pub mod sections;
pub mod validate;

pub use load::{load, load_str, Resolved};
pub use sections::*;
pub use validate::Notice;

use sha2::{Digest, Sha256};

/// Why a spec could not be used. Each message is one line: what is wrong, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read spec {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("spec {path} is not valid YAML: {reason}")]
    Parse { path: String, reason: String },
    #[error("bad override '{raw}': {reason}")]
    BadOverride { raw: String, reason: String },
    #[error("{}", unknown_key_message(.key, .section, .suggestion, .valid))]
    UnknownKey {
        key: String,
        section: String,
        suggestion: Option<String>,
        valid: Vec<String>,
    },
    #[error("{}", unknown_value_message(.key, .value, .suggestion, .valid))]
    UnknownValue {
        key: String,
        value: String,
        suggestion: Option<String>,
        valid: Vec<String>,
    },
    #[error("{key}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("{key} {message}")]
    Invalid { key: String, message: String },
}

fn unknown_key_message(
    key: &str,
    section: &str,
    suggestion: &Option<String>,
    valid: &[String],
) -> String {
    let place = if section.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in {section}")
    };
    match suggestion {
        Some(s) => {
            let fixed = if section.is_empty() {
                s.clone()
            } else {
                format!("{section}.{s}")
            };
            format!("unknown key '{key}' {place}: did you mean '{fixed}'?")
        }
        None => format!(
            "unknown key '{key}' {place}: valid keys are {}",
            valid.join(", ")
        ),
    }
}

fn unknown_value_message(
    key: &str,
    value: &str,
    suggestion: &Option<String>,
    valid: &[String],
) -> String {
    let hint = suggestion
        .as_ref()
        .map(|s| format!(" (did you mean '{s}'?)"))
        .unwrap_or_default();
    format!(
        "{key}: unknown value '{value}'{hint}; valid values are {}",
        valid.join(", ")
    )
}

impl ExperimentSpec {
    /// The resolved spec as YAML, every key present (what `ddetr spec show` prints and
    /// `experiment.yaml` holds).
    pub fn to_yaml(&self) -> String {
        // Through YAML's own (ordered) mapping, so the keys keep the sections' order.
        let mut tree = serde_yaml_ng::to_value(self).expect("a spec always serializes");
        if let Some(model) = tree.get_mut("model").and_then(|m| m.as_mapping_mut()) {
            for key in self.architecture().foreign_model_keys() {
                model.shift_remove(*key);
            }
        }
        if let (Some(d), Some(teacher)) = (
            &self.distill,
            tree.get_mut("distill")
                .and_then(|d| d.get_mut("teacher"))
                .and_then(|m| m.as_mapping_mut()),
        ) {
            for key in d.teacher_architecture().foreign_model_keys() {
                teacher.shift_remove(*key);
            }
        }
        serde_yaml_ng::to_string(&tree).expect("a spec always serializes")
    }

    /// SHA-256 of the resolved spec's canonical JSON, hex. Ranks of one job must agree on it.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(&self.to_tree()).expect("a spec always serializes");
        hex::encode(Sha256::digest(json))
    }

    /// The spec as a tree with the keys of its architecture only.
    fn to_tree(&self) -> serde_json::Value {
        let mut tree = serde_json::to_value(self).expect("a spec always serializes");
        load::drop_foreign_model_keys(&mut tree, self.architecture());
        tree
    }
}
