//! The AutoML search space of a spec: TAO's AutoML-enabled train-schema parameters for
//! deformable_detr and dino (`automl_enabled="TRUE"` in nvidia_tao_core's `config/<network>/
//! {train,model,dataset}.py`, 6.26) with TAO's bounds, narrowed by `automl.automl_hyperparameters`
//! and changed by `automl.automl_range_override`.
//!
//! Where ddetr differs, on purpose: learning rates, the weight decay and the projection-lr
//! multiplier are searched on a log scale from 1/100 of the spec's value to TAO's maximum (TAO maps
//! `[0, 0.01]` linearly, so nearly every draw of a learning rate lands above 1e-4); a maximum TAO
//! gives as "inf" is the spec's own value (as TAO's `get_valid_range` does); `momentum`,
//! `lr_step_size` (unused by the MultiStep schedule), `workers` (speed only) and `num_select`
//! (bounded by `num_queries`) are not searched unless named; `model.dropout_ratio` is added.

use ddetr_automl::{Domain, Param, Point, Space};

use crate::spec::{Architecture, ExperimentSpec};

/// (key, domain) of the default search space for `spec`.
pub fn default_params(spec: &ExperimentSpec) -> Vec<Param> {
    let o = &spec.train.optim;
    let a = &spec.dataset.augmentation;
    // From 1/100 of the spec's value (1/10⁴ of the maximum when the spec's is 0, e.g. a frozen
    // backbone's lr_backbone) to the maximum.
    let log = |name: &str, default: f64, max: f64| Param {
        name: name.into(),
        domain: Domain::Float {
            min: if default > 0.0 {
                default / 100.0
            } else {
                max / 1e4
            }
            .min(max),
            max,
            log: true,
        },
    };
    let lin = |name: &str, min: f64, max: f64| Param {
        name: name.into(),
        domain: Domain::Float {
            min,
            max,
            log: false,
        },
    };
    let int = |name: &str, min: i64, max: i64| Param {
        name: name.into(),
        domain: Domain::Int {
            min,
            max: max.max(min),
        },
    };
    let lr_max = match spec.architecture() {
        Architecture::DeformableDetr => 0.01,
        Architecture::Dino => 0.01,
    };
    vec![
        log("train.optim.lr", o.lr, lr_max),
        log("train.optim.lr_backbone", o.lr_backbone, 0.001),
        log(
            "train.optim.lr_linear_proj_mult",
            o.lr_linear_proj_mult,
            1.0,
        ),
        log("train.optim.weight_decay", o.weight_decay, 0.1),
        lin("train.optim.lr_decay", 0.01, 1.0),
        lin("model.dropout_ratio", 0.0, 0.5),
        int("model.num_queries", 100, 900),
        int("model.enc_layers", 1, 12),
        int("model.dec_layers", 1, 12),
        lin("dataset.augmentation.horizontal_flip_prob", 0.0, 1.0),
        int(
            "dataset.augmentation.train_random_crop_min",
            32,
            i64::from(a.train_random_crop_min),
        ),
        int("dataset.augmentation.train_random_crop_max", 32, 1333),
        int("dataset.batch_size", 1, i64::from(spec.dataset.batch_size)),
    ]
}

/// Keys TAO marks AutoML-enabled that ddetr leaves out of the default list but searches when
/// named, with TAO's bounds.
fn named_only(spec: &ExperimentSpec, name: &str) -> Option<Param> {
    let domain = match name {
        "train.optim.momentum" => Domain::Float {
            min: 0.0,
            max: 1.0,
            log: false,
        },
        "train.optim.lr_step_size" => Domain::Int { min: 1, max: 10000 },
        "dataset.workers" => Domain::Int {
            min: 1,
            max: i64::from(spec.dataset.workers).max(1),
        },
        "model.num_select" => Domain::Int { min: 1, max: 1000 },
        _ => return None,
    };
    Some(Param {
        name: name.into(),
        domain,
    })
}

/// Whether `key` names a value in the spec (`train.optim.lr`).
fn spec_has(spec: &ExperimentSpec, key: &str) -> bool {
    let mut v = serde_json::to_value(spec).expect("spec serialises");
    for part in key.split('.') {
        match v.get(part) {
            Some(next) => v = next.clone(),
            None => return false,
        }
    }
    v.is_number() || v.is_boolean() || v.is_string()
}

/// The search space of `spec` (one line per error: what to change).
pub fn space(spec: &ExperimentSpec) -> Result<Space, String> {
    let a = &spec.automl;
    let defaults = default_params(spec);
    let mut params: Vec<Param> = if a.automl_hyperparameters.is_empty() {
        defaults.clone()
    } else {
        a.automl_hyperparameters
            .iter()
            .map(|name| {
                defaults
                    .iter()
                    .find(|p| &p.name == name)
                    .cloned()
                    .or_else(|| named_only(spec, name))
                    .or_else(|| {
                        a.automl_range_override
                            .iter()
                            .any(|r| &r.parameter == name)
                            .then(|| Param {
                                name: name.clone(),
                                domain: Domain::Float {
                                    min: 0.0,
                                    max: 0.0,
                                    log: false,
                                },
                            })
                    })
                    .ok_or_else(|| unknown(spec, name, &defaults))
            })
            .collect::<Result<_, _>>()?
    };
    for r in &a.automl_range_override {
        let Some(p) = params.iter_mut().find(|p| p.name == r.parameter) else {
            return Err(format!(
                "automl.automl_range_override: {} is not searched: add it to automl.automl_hyperparameters (or remove the override)",
                r.parameter
            ));
        };
        if !spec_has(spec, &r.parameter) {
            return Err(unknown(spec, &r.parameter, &defaults));
        }
        if let Some(options) = &r.valid_options {
            p.domain = Domain::Choice {
                options: options.clone(),
            };
            continue;
        }
        let log = match r.scale.as_deref() {
            None => matches!(p.domain, Domain::Float { log: true, .. }),
            Some("log") => true,
            Some("linear") => false,
            Some(other) => {
                return Err(format!(
                    "automl.automl_range_override: {} has scale {other:?}: use log or linear",
                    r.parameter
                ))
            }
        };
        p.domain = match (&p.domain, r.valid_min, r.valid_max) {
            (Domain::Int { min, max }, lo, hi) => Domain::Int {
                min: lo.map_or(*min, |v| v as i64),
                max: hi.map_or(*max, |v| v as i64),
            },
            (Domain::Float { min, max, .. }, lo, hi) => Domain::Float {
                min: lo.unwrap_or(*min),
                max: hi.unwrap_or(*max),
                log,
            },
            (Domain::Choice { .. }, _, _) => p.domain.clone(),
        };
    }
    for p in &params {
        if !spec_has(spec, &p.name) {
            return Err(unknown(spec, &p.name, &defaults));
        }
    }
    params.dedup_by(|a, b| a.name == b.name);
    Space::new(params).map_err(|e| format!("automl: {e}"))
}

fn unknown(spec: &ExperimentSpec, name: &str, defaults: &[Param]) -> String {
    let known: Vec<&str> = defaults.iter().map(|p| p.name.as_str()).collect();
    let hint = known
        .iter()
        .max_by(|a, b| strsim::jaro_winkler(a, name).total_cmp(&strsim::jaro_winkler(b, name)))
        .copied()
        .unwrap_or("train.optim.lr");
    let what = if spec_has(spec, name) {
        "has no default range: give its valid_min/valid_max (or valid_options) in automl.automl_range_override"
    } else {
        "is not a spec key"
    };
    format!("automl.automl_hyperparameters: {name} {what} (did you mean {hint}?)")
}

/// The overrides that make a trial's spec: each searched value as `key=value`, with the crop
/// pair kept ordered (TAO's `train_random_crop_max > depends_on` rule) and `num_select` kept at
/// most `num_queries`.
pub fn overrides(spec: &ExperimentSpec, point: &Point) -> Vec<String> {
    let mut p = point.clone();
    let get =
        |p: &Point, k: &str, default: i64| p.get(k).and_then(|v| v.as_i64()).unwrap_or(default);
    let a = &spec.dataset.augmentation;
    let cmin = get(
        &p,
        "dataset.augmentation.train_random_crop_min",
        i64::from(a.train_random_crop_min),
    );
    let cmax = get(
        &p,
        "dataset.augmentation.train_random_crop_max",
        i64::from(a.train_random_crop_max),
    );
    if p.contains_key("dataset.augmentation.train_random_crop_max")
        || p.contains_key("dataset.augmentation.train_random_crop_min")
    {
        p.insert(
            "dataset.augmentation.train_random_crop_max".into(),
            serde_json::json!(cmax.max(cmin)),
        );
        p.insert(
            "dataset.augmentation.train_random_crop_min".into(),
            serde_json::json!(cmin.min(cmax.max(cmin))),
        );
    }
    let queries = get(&p, "model.num_queries", i64::from(spec.model.num_queries));
    let select = get(&p, "model.num_select", i64::from(spec.model.num_select));
    if select > queries * i64::from(spec.dataset.num_classes.max(1)) - 1
        || p.contains_key("model.num_queries")
    {
        p.insert(
            "model.num_select".into(),
            serde_json::json!(select.min(queries)),
        );
    }
    p.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Architecture, ExperimentSpec};

    #[test]
    fn the_default_space_is_valid_for_any_valid_spec() {
        for arch in [Architecture::DeformableDetr, Architecture::Dino] {
            let mut spec = ExperimentSpec::defaults_for(arch);
            assert!(space(&spec).is_ok());
            // A frozen backbone (lr_backbone 0), a batch of 1, a crop below TAO's minimum.
            spec.train.optim.lr_backbone = 0.0;
            spec.dataset.batch_size = 1;
            spec.dataset.augmentation.train_random_crop_min = 16;
            let s = space(&spec).unwrap();
            assert_eq!(s.params.len(), default_params(&spec).len());
        }
    }

    #[test]
    fn trial_overrides_keep_the_crop_pair_ordered_and_num_select_within_queries() {
        let spec = ExperimentSpec::default();
        let mut p = Point::new();
        p.insert(
            "dataset.augmentation.train_random_crop_min".into(),
            500.into(),
        );
        p.insert(
            "dataset.augmentation.train_random_crop_max".into(),
            400.into(),
        );
        p.insert("model.num_queries".into(), 80.into());
        let o = overrides(&spec, &p);
        assert!(
            o.contains(&"dataset.augmentation.train_random_crop_max=500".to_string()),
            "{o:?}"
        );
        assert!(
            o.contains(&"dataset.augmentation.train_random_crop_min=500".to_string()),
            "{o:?}"
        );
        assert!(o.contains(&"model.num_select=80".to_string()), "{o:?}");
    }
}
