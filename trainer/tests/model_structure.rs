//! Shapes for every configuration combination, upstream's initialisation, official key names,
//! parameter counts, trainability, and the save/load paths of `weights`.

mod common;

use common::*;
use ddetr_trainer::model::deformable_detr::DetrConfig;
use ddetr_trainer::model::ms_deform_attn::sampling_offsets_bias_init;
use ddetr_trainer::model::DeformableDetr;
use ddetr_trainer::spec::{Backbone, ModelConfig};
use ddetr_trainer::weights::{self, LoadMode};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[test]
fn every_configuration_combination_has_the_right_shapes() {
    let (images, mask) = inputs();
    for levels in [1u32, 2, 4, 5] {
        for refine in [false, true] {
            for two_stage in [false, true] {
                // Two-stage needs at least num_queries encoder pixels: 1 level of a 64×72 image has 6.
                if two_stage && (!refine || levels == 1) {
                    continue;
                }
                let mut cfg = model_config(levels, refine, two_stage);
                if levels == 2 {
                    cfg.return_interm_indices = vec![2, 3];
                }
                if levels == 5 {
                    cfg.return_interm_indices = vec![0, 1, 2, 3, 4]; // layer1 (stride 4) included
                }
                let (_vs, model) = build(&cfg);
                let out = tch::no_grad(|| model.forward(&images, &mask, false));
                assert_eq!(out.layers.len(), 2);
                for p in &out.layers {
                    assert_eq!(p.logits.size(), [2, 12, NUM_CLASSES as i64]);
                    assert_eq!(p.boxes.size(), [2, 12, 4]);
                    let (lo, hi) = (
                        p.boxes.min().double_value(&[]),
                        p.boxes.max().double_value(&[]),
                    );
                    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));
                }
                assert_eq!(out.enc_outputs.is_some(), two_stage);
                if let Some(enc) = &out.enc_outputs {
                    assert_eq!(enc.logits.size()[2], NUM_CLASSES as i64);
                    assert_eq!(enc.boxes.size()[2], 4);
                }
            }
        }
    }
}

fn var(vs: &VarStore, key: &str) -> Tensor {
    vs.variables()
        .remove(key)
        .unwrap_or_else(|| panic!("no variable {key}"))
}

#[test]
fn initialisation_follows_upstream() {
    for refine in [false, true] {
        let (vs, _model) = build(&model_config(4, refine, false));
        let ring = var(
            &vs,
            "transformer.encoder.layers.0.self_attn.sampling_offsets.bias",
        );
        assert_eq!(ring.size(), [8 * 4 * 4 * 2]);
        // Head 0 points along +x at distances 1..4, head 2 along +y; head 1 on the diagonal.
        let r = ring.view([8, 4, 4, 2]);
        assert_eq!(
            Vec::<f32>::try_from(&r.get(0).get(1).flatten(0, -1)).unwrap(),
            [1., 0., 2., 0., 3., 0., 4., 0.]
        );
        assert!(max_abs_diff(&r.get(1).get(0).get(2), &Tensor::from_slice(&[3.0f32, 3.0])) < 1e-6);
        assert!(max_abs_diff(&r.get(2).get(0).get(0), &Tensor::from_slice(&[0.0f32, 1.0])) < 1e-6);
        assert_eq!(ring, sampling_offsets_bias_init(8, 4, 4));
        for k in [
            "transformer.decoder.layers.1.cross_attn.sampling_offsets.weight",
            "transformer.decoder.layers.1.cross_attn.attention_weights.weight",
            "transformer.decoder.layers.1.cross_attn.attention_weights.bias",
            "transformer.encoder.layers.0.self_attn.value_proj.bias",
            "transformer.reference_points.bias",
            "input_proj.0.0.bias",
            "transformer.decoder.layers.0.self_attn.in_proj_bias",
            "bbox_embed.0.layers.2.weight",
        ] {
            assert_eq!(
                var(&vs, k).abs().max().double_value(&[]),
                0.0,
                "{k} starts at zero"
            );
        }
        let prior = -((1.0f64 - 0.01) / 0.01).ln();
        let cls = var(&vs, "class_embed.0.bias");
        assert!((cls - prior).abs().max().double_value(&[]) < 1e-6);
        let b = var(&vs, "bbox_embed.0.layers.2.bias");
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [0.0, 0.0, -2.0, -2.0]);
        if refine {
            // Deep copies of head 0 made before its size bias was set (upstream's order).
            assert_eq!(
                Vec::<f32>::try_from(&var(&vs, "bbox_embed.1.layers.2.bias")).unwrap(),
                [0.0; 4]
            );
            assert_eq!(
                var(&vs, "class_embed.1.weight"),
                var(&vs, "class_embed.0.weight")
            );
            assert_eq!(
                var(&vs, "bbox_embed.1.layers.0.weight"),
                var(&vs, "bbox_embed.0.layers.0.weight")
            );
        } else {
            assert!(
                !vs.variables().contains_key("class_embed.1.weight"),
                "one shared head without refinement"
            );
        }
        // xavier_uniform bounds: value_proj 32×32 → √(6/64).
        let bound = (6.0f64 / 64.0).sqrt();
        let vp = var(
            &vs,
            "transformer.encoder.layers.1.self_attn.value_proj.weight",
        )
        .abs()
        .max()
        .double_value(&[]);
        assert!(vp <= bound && vp > 0.5 * bound);
        // FrozenBatchNorm buffers start as identity.
        assert_eq!(
            var(&vs, "backbone.0.body.bn1.running_var")
                .min()
                .double_value(&[]),
            1.0
        );
    }
    let (vs, _model) = build(&model_config(4, true, true));
    for i in 0..3 {
        let b = var(&vs, &format!("bbox_embed.{i}.layers.2.bias"));
        assert_eq!(
            Vec::<f32>::try_from(&b).unwrap(),
            [0.0; 4],
            "two-stage resets every size bias"
        );
    }
    assert!(!vs.variables().contains_key("query_embed.weight"));
    assert!(!vs
        .variables()
        .contains_key("transformer.reference_points.weight"));
    assert!(vs
        .variables()
        .contains_key("transformer.pos_trans_norm.weight"));
}

#[test]
fn resnet50_refine_has_the_official_keys_and_about_41m_parameters() {
    let cfg = ModelConfig::default(); // TAO defaults: ResNet-50, 4 levels, refine, 6+6 layers, 300 queries
    let vs = VarStore::new(Device::Cpu);
    let _model = DeformableDetr::new(&vs.root(), DetrConfig::from_spec(&cfg, 91).unwrap());
    let vars = vs.variables();
    for (k, shape) in [
        ("backbone.0.body.layer1.0.conv1.weight", vec![64, 64, 1, 1]),
        ("backbone.0.body.layer4.2.bn3.running_var", vec![2048]),
        (
            "backbone.0.body.layer2.0.downsample.0.weight",
            vec![512, 256, 1, 1],
        ),
        (
            "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
            vec![256, 256],
        ),
        (
            "transformer.encoder.layers.5.self_attn.attention_weights.weight",
            vec![128, 256],
        ),
        (
            "transformer.decoder.layers.5.self_attn.in_proj_weight",
            vec![768, 256],
        ),
        (
            "transformer.decoder.layers.0.self_attn.out_proj.weight",
            vec![256, 256],
        ),
        ("transformer.decoder.layers.0.norm3.weight", vec![256]),
        ("transformer.level_embed", vec![4, 256]),
        ("transformer.reference_points.weight", vec![2, 256]),
        ("input_proj.3.0.weight", vec![256, 2048, 3, 3]),
        ("input_proj.0.1.weight", vec![256]),
        ("query_embed.weight", vec![300, 512]),
        ("class_embed.5.bias", vec![91]),
        ("bbox_embed.5.layers.2.weight", vec![4, 256]),
    ] {
        assert_eq!(
            vars.get(k).unwrap_or_else(|| panic!("missing {k}")).size(),
            shape,
            "{k}"
        );
    }
    assert!(!vars.keys().any(|k| k.contains("__")), "no duplicate names");
    assert!(!vars
        .keys()
        .any(|k| k.contains("fc.") || k.contains("num_batches_tracked")));
    let params: i64 = vars
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    // README: 41M for "+ iterative bounding box refinement" (FrozenBatchNorm weight/bias are
    // buffers upstream but parameters of torchvision's layout; both are counted here).
    assert!(
        (39_500_000..=41_500_000).contains(&params),
        "{params} parameters"
    );
    // Stem and layer1 never train; layer2+ do; FrozenBatchNorm never.
    let frozen = |k: &str| {
        k.starts_with("backbone.0.body.conv1")
            || k.starts_with("backbone.0.body.layer1.")
            || k.contains(".bn")
            || k.contains("downsample.1.")
    };
    let expected: i64 = vars
        .iter()
        .filter(|(k, _)| !frozen(k))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let n_train: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(n_train, expected);
    assert!(!vars["backbone.0.body.layer1.0.conv1.weight"].requires_grad());
    assert!(vars["backbone.0.body.layer2.0.conv1.weight"].requires_grad());
}

#[test]
fn train_backbone_false_freezes_the_whole_backbone() {
    let mut cfg = model_config(1, false, false);
    cfg.train_backbone = false;
    let (vs, _m) = build(&cfg);
    assert!(vs
        .variables()
        .iter()
        .filter(|(k, _)| k.starts_with("backbone."))
        .all(|(_, t)| !t.requires_grad()));
}

#[test]
fn a_saved_checkpoint_loads_back_to_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cfg = model_config(4, true, false);
    let (vs, model) = build(&cfg);
    fill_model(&vs);
    weights::save_safetensors(&vs, &path).unwrap();
    let (vs2, model2) = build(&cfg);
    let report = weights::load_file(&vs2, &path, LoadMode::Strict).unwrap();
    assert_eq!(report.loaded, vs.variables().len());
    assert!(report.missing.is_empty() && report.unexpected.is_empty());
    let (images, mask) = inputs();
    let a = tch::no_grad(|| model.forward(&images, &mask, false));
    let b = tch::no_grad(|| model2.forward(&images, &mask, false));
    assert_eq!(a.last().logits, b.last().logits);
    assert_eq!(a.last().boxes, b.last().boxes);
}

#[test]
fn official_aliases_are_recognised_and_other_keys_reported() {
    let cfg = model_config(1, false, false);
    let (vs, _model) = build(&cfg);
    let mut tensors: std::collections::BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.detach().copy()))
        .collect();
    // What an official state_dict() also holds: shared-head aliases and the decoder's alias.
    tensors.insert(
        "class_embed.1.weight".into(),
        tensors["class_embed.0.weight"].copy(),
    );
    tensors.insert(
        "transformer.decoder.bbox_embed.0.layers.0.weight".into(),
        Tensor::zeros([32, 32], tch::kind::FLOAT_CPU),
    );
    tensors.insert(
        "backbone.0.body.bn1.num_batches_tracked".into(),
        Tensor::from(0i64),
    );
    tensors.insert("something.else".into(), Tensor::from(1.0f32));
    let report = weights::load_official(&vs, &tensors, LoadMode::Strict, "test").unwrap();
    assert_eq!(report.unexpected, vec!["something.else".to_string()]);
}

#[test]
fn pretrained_model_with_other_classes_skips_the_class_heads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coco.safetensors");
    let cfg = model_config(1, true, false);
    let vs91 = VarStore::new(Device::Cpu);
    let _m91 = DeformableDetr::new(&vs91.root(), DetrConfig::from_spec(&cfg, 91).unwrap());
    fill_model(&vs91);
    weights::save_safetensors(&vs91, &path).unwrap();
    let (vs5, _m5) = build(&cfg);
    let before = var(&vs5, "class_embed.0.weight").copy();
    let report = weights::load_file(&vs5, &path, LoadMode::Pretrained).unwrap();
    assert_eq!(
        report.skipped_shape.len(),
        4,
        "weight and bias of 2 class heads: {:?}",
        report.skipped_shape
    );
    assert_eq!(var(&vs5, "class_embed.0.weight"), before);
    assert_eq!(
        var(&vs5, "transformer.level_embed"),
        var(&vs91, "transformer.level_embed")
    );
    // Strict loading refuses the same file with a one-line reason.
    let err = weights::load_file(&vs5, &path, LoadMode::Strict)
        .unwrap_err()
        .to_string();
    assert!(err.contains("class_embed.") && err.contains("[91"), "{err}");
}

#[test]
fn torchvision_backbone_weights_load_into_backbone_body() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18.safetensors");
    let cfg = model_config(4, false, false);
    let (vs, _m) = build(&cfg);
    // A torchvision-style state dict: body keys without prefix, plus fc and num_batches_tracked.
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("backbone.0.body.")
                .map(|r| (r.to_string(), fill(&k, &t.size())))
        })
        .collect();
    named.push((
        "fc.weight".into(),
        Tensor::zeros([1000, 512], tch::kind::FLOAT_CPU),
    ));
    named.push(("bn1.num_batches_tracked".into(), Tensor::from(3i64)));
    Tensor::write_safetensors(&named, &path).unwrap();
    let report = weights::load_torchvision_backbone(&vs, &path).unwrap();
    assert_eq!(report.loaded, named.len() - 2);
    let k = "backbone.0.body.layer3.1.conv2.weight";
    assert_eq!(var(&vs, k), fill(k, &[256, 256, 3, 3]));
    // A ResNet-50 model refuses ResNet-18 weights with the shape that differs.
    let mut cfg50 = cfg.clone();
    cfg50.backbone = Backbone::Resnet50;
    let (vs50, _m50) = build(&cfg50);
    assert!(weights::load_torchvision_backbone(&vs50, &path).is_err());
}

#[test]
fn training_forward_backward_reaches_every_trainable_parameter_group() {
    use ddetr_trainer::criterion::SetCriterion;
    use ddetr_trainer::matcher::Target;
    let cfg = model_config(4, true, true);
    let (vs, model) = build(&cfg);
    // Upstream's init zeroes the offset/attention-weight matrices (no gradient reaches the
    // queries yet); the fixture fill makes every path live.
    fill_model(&vs);
    let (images, mask) = inputs();
    tch::manual_seed(0);
    let out = model.forward(&images, &mask, true);
    let targets: Vec<Target> = targets()
        .into_iter()
        .map(|(labels, boxes)| Target { labels, boxes })
        .collect();
    let losses = SetCriterion::from_spec(&cfg, NUM_CLASSES)
        .forward(&out, &targets, 5.0)
        .unwrap();
    losses.total.backward();
    let vars = vs.variables();
    for k in [
        "backbone.0.body.layer2.0.conv1.weight",
        "input_proj.3.0.weight",
        "transformer.level_embed",
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        "transformer.decoder.layers.1.self_attn.in_proj_weight",
        "transformer.pos_trans.weight",
        "class_embed.2.weight",
        "bbox_embed.0.layers.0.weight",
    ] {
        let g = vars[k].grad();
        assert!(
            g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{k} gets a gradient"
        );
    }
    assert!(!vars["backbone.0.body.layer1.0.conv1.weight"]
        .grad()
        .defined());
}

#[test]
fn dilation_halves_the_last_stage_stride() {
    use ddetr_trainer::model::backbone::Backbone as ResNet;
    let images = Tensor::zeros([1, 3, 64, 64], tch::kind::FLOAT_CPU);
    let mask = Tensor::zeros([1, 64, 64], (Kind::Bool, Device::Cpu));
    for (dilation, side, stride) in [(false, 2, 32), (true, 4, 16)] {
        let vs = VarStore::new(Device::Cpu);
        let b = ResNet::new(
            &vs.root(),
            Backbone::Resnet50,
            &[3],
            true,
            dilation,
            false,
            0.0,
        );
        assert_eq!(b.strides, [stride]);
        let out = tch::no_grad(|| b.forward(&images, &mask, false));
        assert_eq!(out[0].0.size(), [1, 2048, side, side]);
        // DC5 keeps layer4's weights: a 1×1-stride downsample conv, same shapes.
        let ds = vs.variables()["body.layer4.0.downsample.0.weight"].size();
        assert_eq!(ds, [2048, 1024, 1, 1]);
    }
}

#[test]
#[should_panic(
    expected = "two-stage selects model.num_queries = 12 proposals but the feature maps have only 6"
)]
fn two_stage_on_too_few_positions_says_so() {
    let (_vs, model) = build(&model_config(1, true, true));
    let (images, mask) = inputs();
    let _ = tch::no_grad(|| model.forward(&images, &mask, false));
}

/// The low-precision paths (sampling in f32 and back, position embeddings and reference points
/// cast to the feature dtype) run end to end; bf16 outputs stay close to f32's.
#[test]
fn a_bfloat16_model_runs_and_stays_close_to_float32() {
    let cfg = model_config(4, true, false);
    let (vs, model) = build(&cfg);
    fill_model(&vs);
    let (images, mask) = inputs();
    let full = tch::no_grad(|| model.forward(&images, &mask, false));
    let mut vs = vs;
    vs.bfloat16();
    let half = tch::no_grad(|| model.forward(&images.to_kind(Kind::BFloat16), &mask, false));
    assert_eq!(half.last().logits.kind(), Kind::BFloat16);
    let d = max_abs_diff(&half.last().boxes, &full.last().boxes);
    assert!(d < 0.05, "bf16 boxes differ by {d}");
}
