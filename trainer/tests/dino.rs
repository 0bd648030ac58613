//! DINO's components against the paper and the official code (`docs/reference/dino.md` cites
//! each rule): the denoising groups, their layout, noise and attention mask; mixed query
//! selection; look forward twice; the criterion's terms; checkpoints in the official layout.

use ddetr_trainer::criterion::normalizer;
use ddetr_trainer::detector::{build_model, Detector, DinoDetector};
use ddetr_trainer::dino_criterion::DinoCriterion;
use ddetr_trainer::matcher::Target;
use ddetr_trainer::model::dino::dn::{
    attention_mask, noise_boxes, noise_labels, num_groups, prepare_for_cdn, DnConfig, DnMeta,
};
use ddetr_trainer::model::dino::{inverse_sigmoid, Dino, DinoConfig, DinoOutput};
use ddetr_trainer::spec::{self, ExperimentSpec};
use ddetr_trainer::step::Stages;
use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

const NUM_CLASSES: u32 = 4;

/// A tiny DINO spec: ResNet-18 from scratch, d 64, 2 heads, 2+3 layers, 3 levels, 20 queries.
fn tiny_spec(extra: &[&str]) -> ExperimentSpec {
    let mut overrides: Vec<String> = [
        "model_name=dino",
        "model.backbone=resnet_18",
        "model.backbone_from_scratch=true",
        "model.num_feature_levels=3",
        "model.return_interm_indices=[1,2,3]",
        "model.hidden_dim=64",
        "model.nheads=2",
        "model.enc_layers=2",
        "model.dec_layers=3",
        "model.dim_feedforward=64",
        "model.num_queries=20",
        "model.num_select=20",
        "model.dn_number=10",
        "dataset.num_classes=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    overrides.extend(extra.iter().map(|s| s.to_string()));
    spec::load_str("", &overrides, None)
        .expect("tiny spec")
        .spec
}

fn target(labels: &[i64], boxes: &[[f32; 4]]) -> Target {
    let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
    Target {
        labels: Tensor::from_slice(labels),
        boxes: Tensor::from_slice(&flat).view([-1, 4]),
    }
}

fn targets() -> Vec<Target> {
    vec![
        target(&[1, 3], &[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.2]]),
        target(&[2], &[[0.5, 0.5, 0.4, 0.4]]),
    ]
}

#[test]
fn group_count_follows_prepare_for_cdn() {
    // 2·dn_number ≥ 100: divided among the most boxes of an image.
    assert_eq!(num_groups(100, 3), 33);
    assert_eq!(num_groups(100, 1), 100);
    assert_eq!(num_groups(100, 101), 1, "0 groups become 1");
    // Below 100 it is not divided (the official pitfall).
    assert_eq!(num_groups(10, 3), 20);
    assert_eq!(num_groups(1, 5), 2);
    // No box in the batch.
    assert_eq!(num_groups(100, 0), 1);
}

#[test]
fn attention_mask_matches_the_official_example() {
    // docs/reference/dino.md §1.5: 2 images with 2 and 1 boxes, dn_number 1 (2 groups), 3
    // queries: pad 8, mask 11×11.
    let meta = DnMeta {
        pad_size: 8,
        num_groups: 2,
    };
    let m = attention_mask(meta, 3, Device::Cpu);
    let rows: Vec<Vec<i64>> = (0..11)
        .map(|r| Vec::<i64>::try_from(m.get(r).to_kind(Kind::Int64)).unwrap())
        .collect();
    let g0 = vec![0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0];
    let g1 = vec![1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    let matching = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0];
    for r in 0..4 {
        assert_eq!(rows[r], g0, "row {r}");
    }
    for r in 4..8 {
        assert_eq!(rows[r], g1, "row {r}");
    }
    for r in 8..11 {
        assert_eq!(rows[r], matching, "row {r}");
    }
}

#[test]
fn positive_indices_are_the_first_slots_of_each_group() {
    let meta = DnMeta {
        pad_size: 12,
        num_groups: 2,
    };
    assert_eq!(meta.block(), 3);
    assert_eq!(
        meta.positive_indices(2),
        (vec![0, 1, 6, 7], vec![0, 1, 0, 1])
    );
    assert_eq!(meta.positive_indices(0), (vec![], vec![]));
}

#[test]
fn denoising_queries_are_laid_out_group_by_group() {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let label_enc = nn::embedding(vs.root() / "label_enc", 5, 8, Default::default());
    let cfg = DnConfig {
        dn_number: 2, // 2·2 < 100: 4 groups
        label_noise_ratio: 0.0,
        box_noise_scale: 0.0,
        num_classes: 4,
    };
    let t = targets();
    let q = prepare_for_cdn(&t, &cfg, 5, &label_enc, Device::Cpu).expect("boxes present");
    assert_eq!(
        q.meta,
        DnMeta {
            pad_size: 16,
            num_groups: 4
        }
    );
    assert_eq!(q.content.size(), [2, 16, 8]);
    assert_eq!(q.anchors.size(), [2, 16, 4]);
    assert_eq!(q.attn_mask.size(), [21, 21]);
    // Without noise every block (positive and negative) repeats the ground truth; image 1's
    // second slot of each block is padding (zero content, zero logit box).
    for k in 0..8 {
        for (b, tb) in t.iter().enumerate() {
            for j in 0..tb.len() {
                let slot = k * 2 + j;
                let want_box = inverse_sigmoid(&tb.boxes.get(j));
                assert!(
                    q.anchors
                        .get(b as i64)
                        .get(slot)
                        .allclose(&want_box, 1e-6, 1e-6, false),
                    "box of image {b} block {k} slot {j}"
                );
                let want_label = label_enc.ws.get(tb.labels.int64_value(&[j]));
                assert!(q.content.get(b as i64).get(slot).equal(&want_label));
            }
        }
        let pad = k * 2 + 1;
        assert_eq!(
            q.content
                .get(1)
                .get(pad)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_eq!(
            q.anchors
                .get(1)
                .get(pad)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }
    // An empty batch has no denoising queries.
    let empty = vec![target(&[], &[])];
    assert!(prepare_for_cdn(&empty, &cfg, 5, &label_enc, Device::Cpu).is_none());
}

#[test]
fn label_noise_redraws_a_quarter_at_ratio_one_half() {
    tch::manual_seed(1);
    let n = 200_000;
    let labels = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
    let noised = noise_labels(&labels, 0.5, 4);
    let changed = noised
        .ne(0)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    // Redrawn with probability 0.25, uniformly over 4 classes (one of them the old label).
    let want = 0.25 * 3.0 / 4.0;
    assert!(
        (changed - want).abs() < 0.005,
        "changed {changed}, want {want}"
    );
    let max = noised.max().int64_value(&[]);
    assert!(max <= 3 && noised.min().int64_value(&[]) >= 0);
}

#[test]
fn box_noise_moves_positives_within_and_negatives_beyond_half_the_size() {
    tch::manual_seed(2);
    let n = 20_000;
    // Small central boxes: no corner reaches the image border even at twice the noise.
    let boxes = Tensor::from_slice(&[0.5f32, 0.5, 0.1, 0.2]).repeat([n, 1]);
    let negative = Tensor::arange(n, (Kind::Int64, Device::Cpu))
        .remainder(2)
        .eq(1);
    let scale = 1.0;
    let noised = noise_boxes(&boxes, &negative, scale);
    let corners = |b: &Tensor| {
        let (cx, cy, w, h) = (
            b.select(1, 0),
            b.select(1, 1),
            b.select(1, 2),
            b.select(1, 3),
        );
        Tensor::stack(
            &[
                &cx - &w / 2.0,
                &cy - &h / 2.0,
                &cx + &w / 2.0,
                &cy + &h / 2.0,
            ],
            1,
        )
    };
    let moved = (corners(&noised) - corners(&boxes)).abs();
    let half = Tensor::from_slice(&[0.05f32, 0.1, 0.05, 0.1]).view([1, 4]);
    let rel = moved / half / scale; // in units of (w/2, h/2)
    let pos = rel.index(&[Some(negative.logical_not())]);
    let neg = rel.index(&[Some(negative.shallow_clone())]);
    let eps = 1e-3;
    assert!(pos.max().double_value(&[]) < 1.0 + eps);
    assert!(neg.min().double_value(&[]) > 1.0 - eps);
    assert!(neg.max().double_value(&[]) < 2.0 + eps);
    // Uniform magnitudes: means 0.5 and 1.5.
    let (mp, mn) = (
        pos.mean(Kind::Float).double_value(&[]),
        neg.mean(Kind::Float).double_value(&[]),
    );
    assert!(
        (mp - 0.5).abs() < 0.01 && (mn - 1.5).abs() < 0.01,
        "{mp} {mn}"
    );
    // Both directions.
    let signed = corners(&noised) - corners(&boxes);
    let up = signed
        .gt(0.0)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!((up - 0.5).abs() < 0.02, "{up}");
}

fn tiny_model(extra: &[&str]) -> (VarStore, Dino, ExperimentSpec) {
    tch::manual_seed(3);
    let spec = tiny_spec(extra);
    let vs = VarStore::new(Device::Cpu);
    let cfg = DinoConfig::from_spec(&spec.model, spec.dataset.num_classes).unwrap();
    let net = Dino::new(&vs.root(), cfg);
    (vs, net, spec)
}

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(4);
    let images = Tensor::randn([2, 3, 96, 128], (Kind::Float, Device::Cpu));
    let mask = Tensor::zeros([2, 96, 128], (Kind::Bool, Device::Cpu));
    // Image 1 is padded on the right and bottom.
    let _ = mask.get(1).narrow(1, 100, 28).fill_(1);
    let _ = mask.get(1).narrow(0, 80, 16).fill_(1);
    (images, mask)
}

#[test]
fn forward_shapes_in_training_and_inference() {
    let (_vs, net, _) = tiny_model(&[]);
    let (images, mask) = batch();
    let t = targets();
    let out: DinoOutput = net.forward(&images, &mask, Some(&t), true);
    assert_eq!(out.layers.len(), 3);
    for p in &out.layers {
        assert_eq!(p.logits.size(), [2, 20, 4]);
        assert_eq!(p.boxes.size(), [2, 20, 4]);
    }
    let dn = out.dn.as_ref().expect("denoising in training");
    // dn_number 10: 20 groups of 2·2 slots.
    assert_eq!(
        dn.meta,
        DnMeta {
            pad_size: 80,
            num_groups: 20
        }
    );
    assert_eq!(dn.layers[0].logits.size(), [2, 80, 4]);
    assert_eq!(out.interm.logits.size(), [2, 20, 4]);
    assert_eq!(out.interm.boxes.size(), [2, 20, 4]);
    assert!(out
        .layers
        .iter()
        .all(|p| p.boxes.isfinite().all().int64_value(&[]) == 1));
    // Inference: no denoising, same matching predictions as a training forward without targets
    // (dropout is 0).
    let eval = net.forward(&images, &mask, None, false);
    assert!(eval.dn.is_none());
    let no_dn = net.forward(&images, &mask, None, true);
    assert!(eval
        .last()
        .boxes
        .allclose(&no_dn.last().boxes, 1e-6, 1e-6, false));
}

#[test]
fn denoising_queries_do_not_change_the_matching_predictions() {
    // The mask keeps the matching queries from seeing the denoising ones, so adding them leaves
    // the matching part's outputs as they were.
    let (_vs, net, _) = tiny_model(&[]);
    let (images, mask) = batch();
    let t = targets();
    let with = net.forward(&images, &mask, Some(&t), true);
    let without = net.forward(&images, &mask, None, true);
    for (a, b) in with.layers.iter().zip(&without.layers) {
        assert!(a.logits.allclose(&b.logits, 1e-5, 1e-5, false));
        assert!(a.boxes.allclose(&b.boxes, 1e-5, 1e-5, false));
    }
}

#[test]
fn query_selection_takes_the_top_encoder_proposals_by_best_class() {
    let (_vs, net, _) = tiny_model(&[]);
    let (images, mask) = batch();
    let features = net.backbone_features(&images, &mask, false);
    let inputs = net.encoder_inputs(&features, &mask);
    let mut memory = inputs.src.shallow_clone();
    for i in 0..net.num_encoder_layers() {
        memory = net.encoder_layer(i, &memory, &inputs.pos, &inputs, false);
    }
    let out = net.decode(&memory, &inputs, None, false);
    // By hand: every encoder position's best class logit; the 20 best positions' logits are the
    // interm logits (in descending order of that score).
    let hand = tch::no_grad(|| net.encoder_proposals(&memory, &inputs));
    let (best, _) = hand.0.max_dim(-1, false);
    for b in 0..2 {
        let mut scores: Vec<(f32, i64)> = Vec::<f32>::try_from(best.get(b))
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, i as i64))
            .collect();
        scores.sort_by(|x, y| y.0.total_cmp(&x.0));
        let top: Vec<i64> = scores[..20].iter().map(|s| s.1).collect();
        let want_logits = hand.0.get(b).index_select(0, &Tensor::from_slice(&top));
        let want_boxes = hand
            .1
            .get(b)
            .index_select(0, &Tensor::from_slice(&top))
            .sigmoid();
        assert!(out
            .interm
            .logits
            .get(b)
            .allclose(&want_logits, 1e-6, 1e-6, false));
        assert!(out
            .interm
            .boxes
            .get(b)
            .allclose(&want_boxes, 1e-6, 1e-6, false));
    }
}

#[test]
fn boxes_look_forward_twice() {
    // Per-layer box heads, so each layer's head is its own parameter.
    let (vs, net, _) = tiny_model(&["model.dec_pred_bbox_embed_share=false"]);
    let (images, mask) = batch();
    let grad_of_head0 = |layer: usize| {
        for (_, v) in vs.variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let out = net.forward(&images, &mask, None, true);
        out.layers[layer].boxes.sum(Kind::Float).backward();
        let w = vs
            .variables()
            .remove("bbox_embed.0.layers.2.weight")
            .expect("per-layer box heads");
        let g = w.grad();
        if g.defined() {
            g.abs().sum(Kind::Float).double_value(&[])
        } else {
            0.0
        }
    };
    // Layer 1's boxes refine layer 0's anchor undetached: layer 0's head gets a gradient.
    assert!(grad_of_head0(1) > 0.0);
    // Layer 2's boxes build on layer 1's refinement, whose input anchor was detached.
    assert_eq!(grad_of_head0(2), 0.0);
}

#[test]
fn criterion_terms_and_denoising_normalisation() {
    let (_vs, net, spec) = tiny_model(&[]);
    let crit = DinoCriterion::from_spec(&spec.model, NUM_CLASSES);
    let (images, mask) = batch();
    let t = targets();
    let out = net.forward(&images, &mask, Some(&t), true);
    let losses = crit.forward(&out, &t, normalizer(3.0)).unwrap();
    let mut names: Vec<&str> = losses.terms.keys().map(String::as_str).collect();
    names.sort();
    for want in [
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "loss_ce_0",
        "loss_giou_1",
        "loss_ce_dn",
        "loss_bbox_dn",
        "loss_giou_dn",
        "loss_ce_dn_0",
        "loss_bbox_dn_1",
        "loss_ce_interm",
        "loss_bbox_interm",
        "loss_giou_interm",
        "class_error",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(
        !names.contains(&"loss_ce_2"),
        "the final layer has no suffix"
    );
    // The total is Σ weight·term: ce ×2, bbox ×5, giou ×2 (TAO), interm ×1 of those.
    let w = |k: &str| {
        if k.starts_with("loss_ce") {
            2.0
        } else if k.starts_with("loss_bbox") {
            5.0
        } else {
            2.0
        }
    };
    let total: f64 = losses
        .terms
        .iter()
        .filter(|(k, _)| k.starts_with("loss_"))
        .map(|(k, v)| w(k) * v.double_value(&[]))
        .sum();
    assert!((total - losses.total.double_value(&[])).abs() < 1e-4 * total.abs());

    // Denoising boxes predicted exactly: positive slots' box terms are zero; dividing by
    // num_boxes · groups.
    let dn = out.dn.as_ref().unwrap();
    let exact = dn.layers[2].boxes.detach().copy();
    for (b, tb) in t.iter().enumerate() {
        let (src, tgt) = dn.meta.positive_indices(tb.len());
        for (s, j) in src.iter().zip(tgt) {
            exact.get(b as i64).get(*s).copy_(&tb.boxes.get(j));
        }
    }
    let (_, bbox, giou, _) = crit.base.layer_losses(
        &dn.layers[2].logits,
        &exact,
        &t,
        &t.iter()
            .map(|tb| dn.meta.positive_indices(tb.len()))
            .collect::<Vec<_>>(),
        3.0 * dn.meta.num_groups as f64,
    );
    assert!(bbox.double_value(&[]).abs() < 1e-6);
    assert!(giou.double_value(&[]).abs() < 1e-5);
    // The logged dn box term is the same sum over 3·G boxes (mean L1 per box × 1).
    let l1 = losses.terms["loss_bbox_dn"].double_value(&[]);
    let mut sum = 0.0;
    for (b, tb) in t.iter().enumerate() {
        let (src, tgt) = dn.meta.positive_indices(tb.len());
        for (s, j) in src.iter().zip(tgt) {
            sum += (dn.layers[2].boxes.get(b as i64).get(*s) - tb.boxes.get(j))
                .abs()
                .sum(Kind::Float)
                .double_value(&[]);
        }
    }
    assert!((l1 - sum / (3.0 * dn.meta.num_groups as f64)).abs() < 1e-5);

    // Without denoising queries (validation) the dn terms are logged as zeros.
    let eval = net.forward(&images, &mask, None, false);
    let l = crit.forward(&eval, &t, 3.0).unwrap();
    assert_eq!(l.terms["loss_ce_dn"].double_value(&[]), 0.0);
    assert_eq!(l.terms.len(), losses.terms.len());
}

#[test]
fn a_training_step_decreases_the_loss() {
    let spec = tiny_spec(&["train.activation_checkpoint=true"]);
    let built = build_model::<DinoDetector>(&spec, Device::Cpu, 5).unwrap();
    let (images, mask) = batch();
    let t = targets();
    let mut opt = nn::Adam::default().build(&built.vs, 1e-3).unwrap();
    let amp = ddetr_trainer::amp::Amp::new(ddetr_trainer::spec::Precision::Fp32, Device::Cpu);
    let mode = ddetr_trainer::step::StepMode {
        activation_checkpoint: true,
        loss_scale: 1.0,
    };
    let mut first = None;
    let mut last = 0.0;
    for step in 0..8 {
        tch::manual_seed(100 + step); // the same denoising draws every step
        opt.zero_grad();
        let l = built
            .model
            .forward_backward(&images, &mask, &t, 3.0, &amp, mode)
            .unwrap();
        opt.step();
        last = l.total.double_value(&[]);
        first.get_or_insert(last);
    }
    let first = first.unwrap();
    assert!(last < 0.9 * first, "loss {first} → {last}");
}

#[test]
fn checkpointed_and_plain_backward_give_the_same_gradients() {
    // Noise-free denoising queries: the staged backward reseeds the generator per encoder layer,
    // so random draws after the encoder differ between the two paths.
    let spec = tiny_spec(&["model.dn_label_noise_ratio=0", "model.dn_box_noise_scale=0"]);
    let (images, mask) = batch();
    let t = targets();
    let amp = ddetr_trainer::amp::Amp::new(ddetr_trainer::spec::Precision::Fp32, Device::Cpu);
    // One model for both (tests share libtorch's generator across threads).
    let built = build_model::<DinoDetector>(&spec, Device::Cpu, 6).unwrap();
    let grads = |checkpoint: bool| {
        for p in &built.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let mode = ddetr_trainer::step::StepMode {
            activation_checkpoint: checkpoint,
            loss_scale: 1.0,
        };
        built
            .model
            .forward_backward(&images, &mask, &t, 3.0, &amp, mode)
            .unwrap();
        built
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.grad().copy()))
            .collect::<Vec<_>>()
    };
    let plain = grads(false);
    let staged = grads(true);
    for ((name, a), (_, b)) in plain.iter().zip(&staged) {
        if !a.defined() {
            assert!(!b.defined(), "{name}");
            continue;
        }
        assert!(a.allclose(b, 1e-4, 1e-5, false), "{name}");
    }
}

#[test]
fn an_official_layout_checkpoint_loads_with_its_aliases() {
    // Save a model as the official DINO does: shared heads under every layer's name and under
    // the decoder's aliases; load it into a fresh model.
    let (vs, net, spec) = tiny_model(&[]);
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    for (k, t) in vs.variables() {
        for head in ["class_embed.0.", "bbox_embed.0."] {
            if let Some(rest) = k.strip_prefix(head) {
                let stem = head.trim_end_matches("0.");
                for i in 0..3 {
                    if i > 0 {
                        tensors.push((format!("{stem}{i}.{rest}"), t.copy()));
                    }
                    tensors.push((format!("transformer.decoder.{stem}{i}.{rest}"), t.copy()));
                }
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("ddetr-dino-ck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("official.safetensors");
    Tensor::write_safetensors(&tensors, &path).unwrap();

    let built = build_model::<DinoDetector>(&spec, Device::Cpu, 99).unwrap();
    let report = DinoDetector::load_checkpoint(&built.vs, &path).unwrap();
    assert_eq!(report.loaded, vs.variables().len());
    // Heads 1, 2 (class: 2 tensors, box: 6) and the decoder's aliases of heads 0..2.
    assert_eq!(report.aliases, 2 * (2 + 6) + 3 * (2 + 6));
    let (images, mask) = batch();
    let a = net.forward(&images, &mask, None, false);
    let b = built.model.net.forward(&images, &mask, None, false);
    assert!(a.last().boxes.allclose(&b.last().boxes, 1e-6, 1e-6, false));

    // A Deformable DETR model is told what the checkpoint is.
    let dd_spec = spec::load_str(
        "",
        &[
            "model.backbone=resnet_18".into(),
            "model.num_feature_levels=3".into(),
            "model.return_interm_indices=[1,2,3]".into(),
            "model.hidden_dim=64".into(),
            "model.nheads=2".into(),
            "dataset.num_classes=4".into(),
        ],
        None,
    )
    .unwrap()
    .spec;
    let dd =
        build_model::<ddetr_trainer::detector::DeformableDetrDetector>(&dd_spec, Device::Cpu, 1)
            .unwrap();
    let err = ddetr_trainer::detector::DeformableDetrDetector::load_checkpoint(&dd.vs, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a dino model"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_encoder_position_count_is_known_before_the_forward() {
    let (_vs, net, _) = tiny_model(&[]);
    for (h, w) in [(96, 128), (97, 131), (33, 40)] {
        let images = Tensor::zeros([1, 3, h, w], (Kind::Float, Device::Cpu));
        let mask = Tensor::zeros([1, h, w], (Kind::Bool, Device::Cpu));
        let features = net.backbone_features(&images, &mask, false);
        let s = net.encoder_inputs(&features, &mask).src.size()[1];
        assert_eq!(net.encoder_positions(h, w), s, "{h}x{w}");
    }
    // 20 queries need 20 positions: 33x40 has 5·5 + 3·3 + 2·2 = 38, 16x16 has 4 + 1 + 1.
    assert!(net.check_input(33, 40).is_ok());
    let e = net.check_input(16, 16).unwrap_err().to_string();
    assert!(
        e.contains("model.num_queries = 20") && e.contains("6 encoder positions"),
        "{e}"
    );
}
