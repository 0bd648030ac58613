//! `train.activation_checkpoint`: the staged backward (backbone recomputed: a ResNet or FAN
//! whole, a GCViT level by level) gives the gradients of the one-graph backward, for every trainable
//! parameter.

mod common;

use std::collections::BTreeMap;

use common::*;
use ddetr_trainer::amp::Amp;
use ddetr_trainer::criterion::{local_num_boxes, normalizer, SetCriterion};
use ddetr_trainer::matcher::Target;
use ddetr_trainer::spec::{Backbone, ModelConfig, Precision};
use ddetr_trainer::step::{forward_backward, StepLoss, StepMode};
use tch::{Device, Tensor};

fn gradients(cfg: &ModelConfig, activation_checkpoint: bool) -> (f64, BTreeMap<String, Tensor>) {
    let (vs, model) = build(cfg);
    fill_model(&vs);
    let (images, mask) = inputs();
    let targets: Vec<Target> = targets()
        .into_iter()
        .map(|(labels, boxes)| Target { labels, boxes })
        .collect();
    let criterion = SetCriterion::from_spec(cfg, NUM_CLASSES);
    let num_boxes = normalizer(local_num_boxes(&targets));
    let losses = forward_backward(
        &model,
        StepLoss {
            output: &|out| criterion.forward(out, &targets, num_boxes),
            inputs: None,
        },
        &images,
        &mask,
        &targets,
        &Amp::new(Precision::Fp32, Device::Cpu),
        StepMode {
            activation_checkpoint,
            loss_scale: 1.0,
        },
    )
    .unwrap();
    let grads = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| (n, t.grad()))
        .collect();
    (losses.total.double_value(&[]), grads)
}

fn staged_equals_one_graph(cfg: &ModelConfig) {
    let (loss_a, plain) = gradients(cfg, false);
    let (loss_b, staged) = gradients(cfg, true);
    assert_eq!(loss_a, loss_b);
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        staged.keys().collect::<Vec<_>>()
    );
    let backbone = plain
        .iter()
        .filter(|(n, g)| n.starts_with("backbone.") && g.defined())
        .count();
    assert!(backbone > 10, "the backbone trains in this config");
    for (name, a) in &plain {
        let b = &staged[name];
        assert_eq!(a.defined(), b.defined(), "{name}");
        if !a.defined() {
            continue;
        }
        let scale = a.abs().max().double_value(&[]).max(1e-12);
        let diff = max_abs_diff(a, b);
        assert!(
            diff <= 1e-5 * scale,
            "{name}: staged gradient differs by {diff} (max |g| {scale})"
        );
    }
}

#[test]
fn staged_backward_gives_the_one_graph_gradients() {
    staged_equals_one_graph(&model_config(4, true, false));
}

#[test]
fn gcvit_level_by_level_backward_gives_the_one_graph_gradients() {
    // Stochastic depth off: the one-graph path draws its masks unseeded.
    staged_equals_one_graph(&ModelConfig {
        backbone: Backbone::GcVitXxtiny,
        backbone_drop_path_rate: Some(0.0),
        ..model_config(4, true, false)
    });
}

#[test]
fn fan_recomputed_backward_gives_the_one_graph_gradients() {
    // Training-mode BatchNorm: the recomputation uses the same batch statistics (and leaves the
    // running ones as the first pass left them). Stochastic depth off, as above.
    staged_equals_one_graph(&ModelConfig {
        backbone: Backbone::FanTiny,
        backbone_drop_path_rate: Some(0.0),
        ..model_config(4, true, false)
    });
}
