//! Shared helpers of the golden-fixture tests: the deterministic weight fill that
//! `tests/golden/make_model_fixtures.py` (`fill`) also implements, fixture loading, and the tiny
//! model configurations the fixtures were made with.
#![allow(dead_code)]

pub mod e2e;

use std::collections::BTreeMap;
use std::path::PathBuf;

use ddetr_trainer::model::deformable_detr::DetrConfig;
use ddetr_trainer::model::DeformableDetr;
use ddetr_trainer::spec::{Backbone, ModelConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub const NUM_CLASSES: u32 = 5;

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

/// All tensors of a fixture file by name.
pub fn read_fixture(name: &str) -> BTreeMap<String, Tensor> {
    let path = golden_dir().join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// n values in [-1, 1): splitmix64 of (fnv1a32(key), i), top 24 bits (mirror of `hash_uniform`).
fn hash_uniform(key: &str, n: usize) -> Vec<f64> {
    let seed = u64::from(fnv1a32(key));
    (1..=n as u64)
        .map(|i| {
            let mut z = seed
                .wrapping_mul(0x1_0000_0001)
                .wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            2.0 * ((z >> 40) as f64 / (1u64 << 24) as f64) - 1.0
        })
        .collect()
}

/// The fixture weight of official key `key` with `shape` (mirror of `fill`).
pub fn fill(key: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let v = hash_uniform(key, n as usize);
    let v: Vec<f32> = if shape.len() >= 2 {
        let fan_in: i64 = shape[1..].iter().product();
        let s = (3.0 / fan_in as f64).sqrt();
        v.iter().map(|x| (x * s) as f32).collect()
    } else if key.ends_with("running_var") {
        v.iter().map(|x| (1.0 + 0.5 * x) as f32).collect()
    } else if key.ends_with("running_mean") {
        v.iter().map(|x| (0.1 * x) as f32).collect()
    } else if key.ends_with("sampling_offsets.bias") {
        v.iter().map(|x| (2.0 * x) as f32).collect()
    } else if key.ends_with("weight") {
        v.iter().map(|x| (1.0 + 0.1 * x) as f32).collect()
    } else {
        v.iter().map(|x| (0.1 * x) as f32).collect()
    };
    Tensor::from_slice(&v).reshape(shape)
}

/// Overwrites every variable of `vs` with its fixture fill.
pub fn fill_model(vs: &VarStore) {
    for (name, var) in vs.variables() {
        let t = fill(&name, &var.size());
        tch::no_grad(|| var.shallow_clone().copy_(&t));
    }
}

/// Rows and vectors the `.pth` checkpoint fixtures' tensors are views of (mirror of
/// `make_checkpoint_fixtures.py`).
const PTH_ROWS: usize = 128;
const PTH_VECS: usize = 1024;

/// The value of official key `key` in the `.pth` checkpoint fixtures (mirror of `pth_fill` in
/// `tests/golden/make_checkpoint_fixtures.py`): with two or more dims one row of
/// `0.05 · hash_uniform("fixture.rows")` repeated (stride 0), a vector a slice of
/// `1 + 0.05 · hash_uniform("fixture.vectors")`, at an offset from the key's hash.
pub fn pth_fill(key: &str, shape: &[i64]) -> Tensor {
    let h = u64::from(fnv1a32(key));
    if shape.len() >= 2 {
        let base: Vec<f32> = hash_uniform("fixture.rows", PTH_ROWS)
            .iter()
            .map(|x| (0.05 * x) as f32)
            .collect();
        let row = shape[shape.len() - 1];
        let off = (h % (PTH_ROWS as u64 - row as u64 + 1)) as i64;
        let row = Tensor::from_slice(&base).narrow(0, off, row);
        return row.expand(shape, false).contiguous();
    }
    let base: Vec<f32> = hash_uniform("fixture.vectors", PTH_VECS)
        .iter()
        .map(|x| (1.0 + 0.05 * x) as f32)
        .collect();
    let off = (h % (PTH_VECS as u64 - shape[0] as u64 + 1)) as i64;
    Tensor::from_slice(&base).narrow(0, off, shape[0])
}

/// The fixture configurations: ResNet-18, d 32, 8 heads, 2+2 layers, FFN 64, 12 queries,
/// 4 encoder / 2 decoder points, 5 classes.
pub fn model_config(levels: u32, refine: bool, two_stage: bool) -> ModelConfig {
    ModelConfig {
        backbone: Backbone::Resnet18,
        num_queries: 12,
        num_feature_levels: levels,
        return_interm_indices: if levels == 1 {
            vec![3]
        } else {
            vec![1, 2, 3, 4]
        },
        with_box_refine: refine,
        two_stage,
        hidden_dim: 32,
        nheads: 8,
        enc_layers: 2,
        dec_layers: 2,
        dim_feedforward: 64,
        enc_n_points: 4,
        dec_n_points: 2,
        dropout_ratio: 0.0,
        ..ModelConfig::default()
    }
}

/// A model on CPU for `cfg` in a fresh var store.
pub fn build(cfg: &ModelConfig) -> (VarStore, DeformableDetr) {
    let vs = VarStore::new(Device::Cpu);
    let model = DeformableDetr::new(
        &vs.root(),
        DetrConfig::from_spec(cfg, NUM_CLASSES).expect("valid config"),
    );
    (vs, model)
}

/// Fixture inputs: images `[2, 3, 64, 72]` (f32), padding mask `[2, 64, 72]` (bool).
pub fn inputs() -> (Tensor, Tensor) {
    let f = read_fixture("model_inputs.safetensors");
    (
        f["images"].to_kind(Kind::Float),
        f["mask"].to_kind(Kind::Bool),
    )
}

/// Fixture targets: per image, (labels `[T]` i64, boxes `[T, 4]` cxcywh).
pub fn targets() -> Vec<(Tensor, Tensor)> {
    let f = read_fixture("model_inputs.safetensors");
    (0..2)
        .map(|i| {
            (
                f[&format!("target{i}.labels")].shallow_clone(),
                f[&format!("target{i}.boxes")].shallow_clone(),
            )
        })
        .collect()
}

/// max |a − b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// `hash_uniform(key, numel)` of the fixture scripts as an f32 tensor of `shape` (values in
/// [-1, 1), exact in f32): deterministic inputs a fixture need not store.
pub fn hash_uniform_tensor(key: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = hash_uniform(key, n as usize)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    Tensor::from_slice(&v).reshape(shape)
}
