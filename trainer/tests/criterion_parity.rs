//! Matcher assignments, loss terms and post-processing against the official criterion, matcher
//! (scipy) and PostProcess, on the reference model outputs stored in the fixtures.
//! Fixtures: `tests/golden/make_model_fixtures.py`.

mod common;

use common::*;
use ddetr_trainer::criterion::{local_num_boxes, normalizer, SetCriterion};
use ddetr_trainer::matcher::Target;
use ddetr_trainer::model::{DetrOutput, Prediction};
use ddetr_trainer::post_process::post_process;
use tch::Tensor;

/// Losses must agree to this relative error.
const REL_TOL: f64 = 1e-4;

fn fixture_targets() -> Vec<Target> {
    targets()
        .into_iter()
        .map(|(labels, boxes)| Target { labels, boxes })
        .collect()
}

fn fixture_output(fx: &std::collections::BTreeMap<String, Tensor>) -> DetrOutput {
    let n = fx["logits"].size()[0];
    let layers = (0..n)
        .map(|l| Prediction {
            logits: fx["logits"].get(l),
            boxes: fx["boxes"].get(l),
        })
        .collect();
    let enc_outputs = fx.get("enc_logits").map(|l| Prediction {
        logits: l.shallow_clone(),
        boxes: fx["enc_boxes"].shallow_clone(),
    });
    DetrOutput {
        layers,
        enc_outputs,
    }
}

fn to_vec(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t).unwrap()
}

fn check(fixture: &str, two_stage: bool) {
    let fx = read_fixture(fixture);
    let cfg = model_config(if fixture.contains("l1") { 1 } else { 4 }, false, two_stage);
    let criterion = SetCriterion::from_spec(&cfg, NUM_CLASSES);
    let out = fixture_output(&fx);
    let targets = fixture_targets();
    let num_boxes = normalizer(local_num_boxes(&targets));

    // Assignments of every decoder layer (and the encoder) equal scipy's.
    let n = out.layers.len();
    for (l, p) in out.layers.iter().enumerate() {
        let idx = criterion
            .matcher
            .matching(&p.logits, &p.boxes, &targets)
            .unwrap();
        for (b, (src, tgt)) in idx.iter().enumerate() {
            assert_eq!(
                src,
                &to_vec(&fx[&format!("match.{l}.{b}.src")]),
                "{fixture} layer {l} image {b}"
            );
            assert_eq!(
                tgt,
                &to_vec(&fx[&format!("match.{l}.{b}.tgt")]),
                "{fixture} layer {l} image {b}"
            );
        }
    }

    let losses = criterion.forward(&out, &targets, num_boxes).unwrap();
    let mut expect = Vec::new();
    for l in 0..n {
        let suffix = if l + 1 == n {
            String::new()
        } else {
            format!("_{l}")
        };
        expect.push((suffix, fx[&format!("loss.{l}")].shallow_clone()));
    }
    if two_stage {
        expect.push(("_enc".to_string(), fx["loss.enc"].shallow_clone()));
    }
    let mut total = 0.0;
    for (suffix, reference) in &expect {
        for (i, name) in ["loss_ce", "loss_bbox", "loss_giou"].iter().enumerate() {
            let key = format!("{name}{suffix}");
            let ours = losses.terms[&key].double_value(&[]);
            let theirs = reference.double_value(&[i as i64]);
            assert!(
                (ours - theirs).abs() <= REL_TOL * theirs.abs(),
                "{fixture} {key}: {ours} vs {theirs}"
            );
            total += theirs * [2.0, 5.0, 2.0][i];
        }
    }
    let ours_total = losses.total.double_value(&[]);
    assert!(
        (ours_total - total).abs() <= REL_TOL * total,
        "{fixture} total {ours_total} vs {total}"
    );
    assert_eq!(
        losses.terms.len(),
        expect.len() * 3 + 1,
        "one term per loss and layer, plus class_error"
    );
}

#[test]
fn one_level_losses_and_matches_equal_official() {
    check("model_l1.safetensors", false);
}

#[test]
fn four_level_losses_and_matches_equal_official() {
    check("model_l4.safetensors", false);
}

#[test]
fn refine_losses_and_matches_equal_official() {
    check("model_l4_refine.safetensors", false);
    check("model_l1_refine.safetensors", false);
}

#[test]
fn two_stage_losses_include_the_encoder_term() {
    check("model_l4_two_stage.safetensors", true);
}

#[test]
fn post_process_equals_official_topk_and_scaling() {
    let fx = read_fixture("model_l4.safetensors");
    let logits = fx["logits"].get(-1);
    let boxes = fx["boxes"].get(-1);
    let sizes = [(480.0, 640.0), (300.0, 200.0)];
    let dets = post_process(&logits, &boxes, &sizes, 7, 0.0);
    for (i, d) in dets.iter().enumerate() {
        let i = i as i64;
        assert!(max_abs_diff(&d.scores, &fx["post.scores"].get(i)) <= 1e-6);
        assert_eq!(to_vec(&d.labels), to_vec(&fx["post.labels"].get(i)));
        assert!(max_abs_diff(&d.boxes, &fx["post.boxes"].get(i)) <= 1e-3);
    }
    // conf_threshold keeps only scores strictly above it.
    let threshold = fx["post.scores"].get(0).double_value(&[3]);
    let dets = post_process(&logits, &boxes, &sizes, 7, threshold);
    assert_eq!(dets[0].scores.size()[0], 3);
    assert!(dets[0].scores.min().double_value(&[]) > threshold);
}

#[test]
fn images_without_targets_give_zero_box_losses() {
    let fx = read_fixture("model_l4.safetensors");
    let cfg = model_config(4, false, false);
    let criterion = SetCriterion::from_spec(&cfg, NUM_CLASSES);
    let out = fixture_output(&fx);
    let empty: Vec<Target> = (0..2)
        .map(|_| Target {
            labels: Tensor::zeros([0], (tch::Kind::Int64, tch::Device::Cpu)),
            boxes: Tensor::zeros([0, 4], tch::kind::FLOAT_CPU),
        })
        .collect();
    let losses = criterion
        .forward(&out, &empty, normalizer(local_num_boxes(&empty)))
        .unwrap();
    assert_eq!(losses.terms["loss_bbox"].double_value(&[]), 0.0);
    assert_eq!(losses.terms["loss_giou"].double_value(&[]), 0.0);
    assert!(
        losses.terms["loss_ce"].double_value(&[]) > 0.0,
        "every query is a negative"
    );
}
