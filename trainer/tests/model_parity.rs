//! Forward parity with transformers' Deformable DETR configured to the official semantics.
//! Fixtures: `tests/golden/make_model_fixtures.py` (run it with the peers venv to regenerate).

mod common;

use common::*;
use ddetr_trainer::weights;
use tch::Tensor;

/// fp32 outputs must agree this closely.
const TOL: f64 = 1e-4;

fn check_case(fixture: &str, levels: u32, refine: bool, two_stage: bool) {
    let fx = read_fixture(fixture);
    let cfg = model_config(levels, refine, two_stage);
    let (vs, model) = build(&cfg);
    fill_model(&vs);

    // The fill rule and the key set agree with the script's.
    let vars = vs.variables();
    let sums: Vec<(&String, &Tensor)> = fx
        .iter()
        .filter(|(k, _)| k.starts_with("checksum."))
        .collect();
    assert_eq!(
        sums.len(),
        vars.len(),
        "{fixture}: the model has {} tensors, the reference {}",
        vars.len(),
        sums.len()
    );
    for (k, s) in sums {
        let key = &k["checksum.".len()..];
        let var = vars
            .get(key)
            .unwrap_or_else(|| panic!("{fixture}: reference key {key} missing from the model"));
        let ours = var
            .to_kind(tch::Kind::Double)
            .sum(tch::Kind::Double)
            .double_value(&[]);
        let theirs = s.double_value(&[0]);
        assert!(
            (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
            "{fixture}: {key} sums {ours} vs {theirs}"
        );
    }

    let (images, mask) = inputs();
    let out = tch::no_grad(|| model.forward(&images, &mask, false));
    assert_eq!(out.layers.len() as i64, fx["logits"].size()[0]);
    for (l, p) in out.layers.iter().enumerate() {
        let dl = max_abs_diff(&p.logits, &fx["logits"].get(l as i64));
        let db = max_abs_diff(&p.boxes, &fx["boxes"].get(l as i64));
        assert!(
            dl <= TOL && db <= TOL,
            "{fixture} layer {l}: logits diff {dl:e}, boxes diff {db:e}"
        );
    }
    match (&out.enc_outputs, fx.get("enc_logits")) {
        (Some(enc), Some(ref_logits)) => {
            let dl = max_abs_diff(&enc.logits, ref_logits);
            let db = max_abs_diff(&enc.boxes, &fx["enc_boxes"]);
            assert!(
                dl <= TOL && db <= TOL,
                "{fixture} encoder: logits diff {dl:e}, boxes diff {db:e}"
            );
        }
        (None, None) => {}
        _ => panic!("{fixture}: two-stage encoder outputs present on one side only"),
    }
}

#[test]
fn one_level_matches_reference() {
    check_case("model_l1.safetensors", 1, false, false);
}

#[test]
fn four_levels_match_reference() {
    check_case("model_l4.safetensors", 4, false, false);
}

#[test]
fn four_levels_with_box_refine_match_reference() {
    check_case("model_l4_refine.safetensors", 4, true, false);
}

#[test]
fn one_level_with_box_refine_matches_reference() {
    check_case("model_l1_refine.safetensors", 1, true, false);
}

#[test]
fn two_stage_matches_reference() {
    check_case("model_l4_two_stage.safetensors", 4, true, true);
}

/// transformers-named weights (the `hf.` tensors of the l1 fixture) load through the key map and
/// reproduce the reference outputs; backbone and input_proj come from the fill.
#[test]
fn transformers_keys_load_through_the_key_map() {
    let fx = read_fixture("model_l1.safetensors");
    let cfg = model_config(1, false, false);
    let (vs, model) = build(&cfg);
    fill_model(&vs);
    // Scramble everything the checkpoint provides, so the test sees the load happen.
    for (name, var) in vs.variables() {
        if !name.starts_with("backbone.") && !name.starts_with("input_proj.") {
            tch::no_grad(|| var.shallow_clone().copy_(&var.zeros_like()));
        }
    }
    let hf: Vec<(String, Tensor)> = fx
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("hf.")
                .map(|k| (k.to_string(), t.shallow_clone()))
        })
        .collect();
    assert!(
        hf.iter().any(|(k, _)| k.contains("self_attn.q_proj")),
        "fixture has transformers' q/k/v names"
    );
    let tensors = weights::to_official_keys(hf);
    let report =
        weights::load_official(&vs, &tensors, weights::LoadMode::Pretrained, "fixture").unwrap();
    assert!(
        report.unexpected.is_empty(),
        "unexpected keys: {:?}",
        report.unexpected
    );
    assert!(
        report
            .missing
            .iter()
            .all(|k| k.starts_with("backbone.") || k.starts_with("input_proj.")),
        "{:?}",
        report.missing
    );
    let (images, mask) = inputs();
    let out = tch::no_grad(|| model.forward(&images, &mask, false));
    let d = max_abs_diff(&out.last().logits, &fx["logits"].get(1));
    assert!(
        d <= TOL,
        "logits diff {d:e} after loading transformers keys"
    );
}
