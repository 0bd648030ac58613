//! The search space: spec keys (`train.optim.lr`) with bounds and a scale. Every algorithm works
//! in the unit cube; [`Space::decode`] maps a unit point to spec values (log scale for rates,
//! rounding for integers, one of the options for a choice).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// How a parameter's unit coordinate maps to its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Domain {
    /// A float in `[min, max]`, uniform in `ln` when `log`.
    Float { min: f64, max: f64, log: bool },
    /// An integer in `[min, max]`.
    Int { min: i64, max: i64 },
    /// One of the options (the unit interval cut into equal parts).
    Choice { options: Vec<serde_json::Value> },
}

/// One searched spec key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    /// The spec key path (`train.optim.lr`).
    pub name: String,
    pub domain: Domain,
}

/// Why a space cannot be searched. Each is one line naming the parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpaceError {
    #[error(
        "the search space is empty: name at least one parameter in automl.automl_hyperparameters"
    )]
    Empty,
    #[error("{name}: valid_min {min} is above valid_max {max}: swap them")]
    Order { name: String, min: f64, max: f64 },
    #[error("{name}: a log-scale range needs valid_min > 0 (got {min})")]
    LogNonPositive { name: String, min: f64 },
    #[error("{name}: a choice needs at least one option")]
    NoOptions { name: String },
    #[error("{name} is listed twice in the search space")]
    Duplicate { name: String },
}

/// A point of the space: spec key → value.
pub type Point = BTreeMap<String, serde_json::Value>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Space {
    pub params: Vec<Param>,
}

impl Space {
    pub fn new(params: Vec<Param>) -> Result<Self, SpaceError> {
        if params.is_empty() {
            return Err(SpaceError::Empty);
        }
        for (i, p) in params.iter().enumerate() {
            if params[..i].iter().any(|q| q.name == p.name) {
                return Err(SpaceError::Duplicate {
                    name: p.name.clone(),
                });
            }
            match &p.domain {
                Domain::Float { min, max, log } => {
                    if min > max {
                        return Err(SpaceError::Order {
                            name: p.name.clone(),
                            min: *min,
                            max: *max,
                        });
                    }
                    if *log && *min <= 0.0 {
                        return Err(SpaceError::LogNonPositive {
                            name: p.name.clone(),
                            min: *min,
                        });
                    }
                }
                Domain::Int { min, max } => {
                    if min > max {
                        return Err(SpaceError::Order {
                            name: p.name.clone(),
                            min: *min as f64,
                            max: *max as f64,
                        });
                    }
                }
                Domain::Choice { options } => {
                    if options.is_empty() {
                        return Err(SpaceError::NoOptions {
                            name: p.name.clone(),
                        });
                    }
                }
            }
        }
        Ok(Self { params })
    }

    pub fn dims(&self) -> usize {
        self.params.len()
    }

    /// A uniform point of the unit cube.
    pub fn sample_unit(&self, rng: &mut Rng) -> Vec<f64> {
        (0..self.dims()).map(|_| rng.unit()).collect()
    }

    /// The spec values of a unit point.
    pub fn decode(&self, u: &[f64]) -> Point {
        self.params
            .iter()
            .zip(u)
            .map(|(p, &x)| {
                let x = x.clamp(0.0, 1.0);
                let v = match &p.domain {
                    Domain::Float { min, max, log } => {
                        let v = if *log {
                            (min.ln() + x * (max.ln() - min.ln())).exp()
                        } else {
                            min + x * (max - min)
                        };
                        serde_json::json!(round_sig(v.clamp(*min, *max)))
                    }
                    Domain::Int { min, max } => {
                        let span = (max - min + 1) as f64;
                        serde_json::json!((min + (x * span).floor() as i64).min(*max))
                    }
                    Domain::Choice { options } => {
                        let i =
                            ((x * options.len() as f64).floor() as usize).min(options.len() - 1);
                        options[i].clone()
                    }
                };
                (p.name.clone(), v)
            })
            .collect()
    }

    /// The unit point of spec values (inverse of [`Space::decode`], at bin centres for integers
    /// and choices); `None` when a value is missing or outside the space.
    pub fn encode(&self, point: &Point) -> Option<Vec<f64>> {
        self.params
            .iter()
            .map(|p| {
                let v = point.get(&p.name)?;
                match &p.domain {
                    Domain::Float { min, max, log } => {
                        let v = v.as_f64()?;
                        if max == min {
                            return Some(0.5);
                        }
                        Some(if *log {
                            (v.ln() - min.ln()) / (max.ln() - min.ln())
                        } else {
                            (v - min) / (max - min)
                        })
                    }
                    Domain::Int { min, max } => {
                        let v = v.as_i64()?;
                        Some(((v - min) as f64 + 0.5) / (max - min + 1) as f64)
                    }
                    Domain::Choice { options } => {
                        let i = options.iter().position(|o| o == v)?;
                        Some((i as f64 + 0.5) / options.len() as f64)
                    }
                }
            })
            .collect()
    }
}

/// Six significant digits: `0.000123456789` → `0.000123457` (a spec a user can read).
fn round_sig(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let mag = 10f64.powi(5 - v.abs().log10().floor() as i32);
    (v * mag).round() / mag
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Space {
        Space::new(vec![
            Param {
                name: "train.optim.lr".into(),
                domain: Domain::Float {
                    min: 1e-5,
                    max: 1e-3,
                    log: true,
                },
            },
            Param {
                name: "model.num_queries".into(),
                domain: Domain::Int { min: 10, max: 12 },
            },
            Param {
                name: "train.optim.optimizer".into(),
                domain: Domain::Choice {
                    options: vec!["AdamW".into(), "SGD".into()],
                },
            },
        ])
        .unwrap()
    }

    #[test]
    fn decode_maps_the_cube_onto_the_bounds() {
        let s = space();
        let lo = s.decode(&[0.0, 0.0, 0.0]);
        assert_eq!(lo["train.optim.lr"], serde_json::json!(1e-5));
        assert_eq!(lo["model.num_queries"], 10);
        assert_eq!(lo["train.optim.optimizer"], "AdamW");
        let mid = s.decode(&[0.5, 0.5, 0.99]);
        // The log-scale midpoint of 1e-5..1e-3 is 1e-4.
        assert!((mid["train.optim.lr"].as_f64().unwrap() - 1e-4).abs() < 1e-9);
        assert_eq!(mid["model.num_queries"], 11);
        assert_eq!(mid["train.optim.optimizer"], "SGD");
        let hi = s.decode(&[1.0, 1.0, 1.0]);
        assert_eq!(hi["model.num_queries"], 12);
        // encode inverts decode.
        let u = s.encode(&mid).unwrap();
        assert_eq!(s.decode(&u), mid);
    }

    #[test]
    fn bad_spaces_are_one_line_errors() {
        assert_eq!(Space::new(vec![]).unwrap_err(), SpaceError::Empty);
        let bad = |d: Domain| {
            Space::new(vec![Param {
                name: "train.optim.lr".into(),
                domain: d,
            }])
            .unwrap_err()
            .to_string()
        };
        assert!(bad(Domain::Float {
            min: 1.0,
            max: 0.1,
            log: false
        })
        .contains("swap"));
        assert!(bad(Domain::Float {
            min: 0.0,
            max: 0.1,
            log: true
        })
        .contains("log-scale"));
        assert!(bad(Domain::Choice { options: vec![] }).contains("at least one option"));
    }
}
