//! DINO distillation (`docs/reference/dino-distill.md`): TAO's criteria on hand-computed cases,
//! the feature maps' layout (TAO's `srcs`), the bindings' `weight²` and coefficient, a teacher
//! equal to the student giving zero, and gradients: a feature binding reaches the backbone and
//! the input projections only, the teacher gets none, and the checkpointed backward agrees.

use std::collections::BTreeMap;

use ddetr_trainer::amp::Amp;
use ddetr_trainer::detector::{build_model, Detector, DinoDetector};
use ddetr_trainer::distill::{criterion, level_maps, Bindings, DinoDistiller, Taps, DISTILL_TERM};
use ddetr_trainer::matcher::Target;
use ddetr_trainer::model::deformable_transformer::EncoderInputs;
use ddetr_trainer::model::Prediction;
use ddetr_trainer::spec::{
    self, DistillBinding, DistillConfig, DistillCriterion, ExperimentSpec, Precision,
};
use ddetr_trainer::step::{Stages, StepMode};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn criteria_are_taos() {
    let zeros = Tensor::zeros([2, 3], CPU);
    let ones = Tensor::ones([2, 3], CPU);
    assert_eq!(scalar(&criterion(DistillCriterion::L2, &zeros, &ones)), 1.0);
    assert_eq!(
        scalar(&criterion(DistillCriterion::L1, &zeros, &(&ones * 2.0))),
        2.0
    );
    // KL(teacher ‖ student), softmax over the last dim, mean over elements: teacher [ln 3, 0]
    // (p = 0.75, 0.25) against a uniform student: (0.75 ln 1.5 + 0.25 ln 0.5) / 2.
    let student = Tensor::from_slice(&[0.0f32, 0.0]).view([1, 2]);
    let teacher = Tensor::from_slice(&[3f32.ln(), 0.0]).view([1, 2]);
    let kl = scalar(&criterion(DistillCriterion::KL, &student, &teacher));
    let want = (0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln()) / 2.0;
    assert!((kl - want).abs() < 1e-7, "{kl} vs {want}");
    assert!((kl - 0.065406).abs() < 1e-6);
    assert_eq!(
        scalar(&criterion(DistillCriterion::KL, &teacher, &teacher)),
        0.0
    );
}

/// Encoder inputs whose `src` is `values` over levels of `shapes` (N = 2, d = 4).
fn inputs(shapes: &[(i64, i64)], src: Tensor) -> EncoderInputs {
    let s: i64 = shapes.iter().map(|(h, w)| h * w).sum();
    EncoderInputs {
        src,
        pos: Tensor::zeros([2, s, 4], CPU),
        mask: Tensor::zeros([2, s], (Kind::Bool, Device::Cpu)),
        spatial_shapes: shapes.to_vec(),
        valid_ratios: Tensor::ones([2, shapes.len() as i64, 2], CPU),
        reference_points: Tensor::zeros([2, s, shapes.len() as i64, 2], CPU),
    }
}

#[test]
fn level_maps_are_the_projected_maps_channels_first() {
    let shapes = [(2, 3), (1, 2)];
    let src = Tensor::arange(2 * 8 * 4, CPU).view([2, 8, 4]);
    let maps = level_maps(&inputs(&shapes, src.shallow_clone()));
    assert_eq!(maps.len(), 2);
    assert_eq!(maps[0].size(), [2, 4, 2, 3]);
    assert_eq!(maps[1].size(), [2, 4, 1, 2]);
    let mut offset = 0;
    for (l, &(h, w)) in shapes.iter().enumerate() {
        for n in 0..2 {
            for c in 0..4 {
                for y in 0..h {
                    for x in 0..w {
                        assert_eq!(
                            maps[l].double_value(&[n, c, y, x]),
                            src.double_value(&[n, offset + y * w + x, c]),
                            "level {l} n {n} c {c} y {y} x {x}"
                        );
                    }
                }
            }
        }
        offset += h * w;
    }
}

fn binding(name: &str, criterion: DistillCriterion, weight: f64) -> DistillBinding {
    DistillBinding {
        student_module_name: name.into(),
        teacher_module_name: name.into(),
        criterion,
        weight,
    }
}

#[test]
fn bindings_sum_levels_square_the_weight_and_scale_the_total() {
    let shapes = [(2, 2), (1, 2), (1, 1)];
    let teacher = Taps {
        srcs: level_maps(&inputs(&shapes, Tensor::zeros([2, 7, 4], CPU))),
        last: Some(Prediction {
            logits: Tensor::zeros([2, 5, 3], CPU),
            boxes: Tensor::full([2, 5, 4], 0.5, CPU),
        }),
    };
    let student = inputs(&shapes, Tensor::ones([2, 7, 4], CPU));
    let features = |weight: f64, coef: f64| Bindings {
        bindings: vec![binding(
            "model.backbone.0.body",
            DistillCriterion::L2,
            weight,
        )],
        coef,
    };
    // Three levels, each off by exactly 1: Σ_levels MSE = 3.
    let l = features(1.0, 1.0).features_loss(&student, &teacher);
    assert_eq!(scalar(&l.terms[DISTILL_TERM]), 3.0);
    // weight 2 counts as 4 (TAO applies it twice); the coefficient scales the total only.
    let l = features(2.0, 0.5).features_loss(&student, &teacher);
    assert_eq!(scalar(&l.terms[DISTILL_TERM]), 12.0);
    assert_eq!(scalar(&l.total), 6.0);
    // The prediction bindings: query by query, each its own criterion and weight.
    let pred = Prediction {
        logits: Tensor::full([2, 5, 3], 2.0, CPU),
        boxes: Tensor::full([2, 5, 4], 0.25, CPU),
    };
    let both = Bindings {
        bindings: vec![
            binding("model.backbone.0.body", DistillCriterion::L2, 1.0),
            binding("pred_logits", DistillCriterion::L1, 1.0),
            binding("pred_boxes", DistillCriterion::L2, 3.0),
        ],
        coef: 1.0,
    };
    let l = both.predictions_loss(&pred, &teacher);
    assert!((scalar(&l.terms[DISTILL_TERM]) - (2.0 + 9.0 * 0.0625)).abs() < 1e-6);
    // Without a binding the term is still there, and zero.
    let none = Bindings {
        bindings: vec![],
        coef: 1.0,
    };
    assert!(!none.on_features());
    assert_eq!(
        scalar(&none.predictions_loss(&pred, &teacher).terms[DISTILL_TERM]),
        0.0
    );
}

/// A tiny DINO spec: ResNet-18 from scratch, d 64, 2 heads, 1+2 layers, 3 levels, 20 queries.
fn tiny_spec(extra: &[&str]) -> ExperimentSpec {
    let mut overrides: Vec<String> = [
        "model_name=dino",
        "model.backbone=resnet_18",
        "model.backbone_from_scratch=true",
        "model.num_feature_levels=3",
        "model.return_interm_indices=[1,2,3]",
        "model.hidden_dim=64",
        "model.nheads=2",
        "model.enc_layers=1",
        "model.dec_layers=2",
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

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(4);
    let images = Tensor::randn([2, 3, 64, 96], CPU);
    let mask = Tensor::zeros([2, 64, 96], (Kind::Bool, Device::Cpu));
    let _ = mask.get(1).narrow(1, 80, 16).fill_(1);
    (images, mask)
}

fn targets() -> Vec<Target> {
    let t = |labels: &[i64], boxes: &[f32]| Target {
        labels: Tensor::from_slice(labels),
        boxes: Tensor::from_slice(boxes).view([-1, 4]),
    };
    vec![
        t(&[1, 3], &[0.3, 0.4, 0.2, 0.3, 0.7, 0.6, 0.25, 0.2]),
        t(&[2], &[0.5, 0.5, 0.4, 0.4]),
    ]
}

/// `spec` with a distill section: the teacher is `spec`'s own model, loaded from `path`.
fn with_teacher(
    mut spec: ExperimentSpec,
    path: &std::path::Path,
    b: Vec<DistillBinding>,
) -> ExperimentSpec {
    spec.distill = Some(DistillConfig {
        teacher_model_name: None,
        teacher: spec.model.clone(),
        pretrained_teacher_model_path: Some(path.display().to_string()),
        bindings: b,
        results_dir: None,
    });
    spec
}

#[test]
fn a_teacher_equal_to_the_student_gives_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("teacher.safetensors");
    let spec = tiny_spec(&[]);
    build_model::<DinoDetector>(&spec, Device::Cpu, 7)
        .unwrap()
        .vs
        .save(&path)
        .unwrap();
    let spec = with_teacher(
        spec,
        &path,
        vec![
            binding("model.backbone.0.body", DistillCriterion::L2, 1.0),
            binding("pred_logits", DistillCriterion::KL, 1.0),
            binding("pred_boxes", DistillCriterion::L1, 1.0),
        ],
    );
    let built = build_model::<DinoDistiller>(&spec, Device::Cpu, 7).unwrap();
    // The student takes the teacher's weights (tests share libtorch's generator, so a seed
    // does not make two builds equal).
    DinoDistiller::load_checkpoint(&built.vs, &path).unwrap();
    let d = &built.model;
    let (images, mask) = batch();
    let teacher = d.teacher.taps(&images, &mask, true);
    let (inputs, out) = tch::no_grad(|| {
        d.student
            .net
            .forward_with_inputs(&images, &mask, None, false)
    });
    assert_eq!(
        scalar(&d.bindings.features_loss(&inputs, &teacher).total),
        0.0
    );
    assert_eq!(
        scalar(&d.bindings.predictions_loss(out.last(), &teacher).total),
        0.0
    );
    // And its own taps are the student's.
    let student = tch::no_grad(|| Taps::of(&d.student.net, &images, &mask, true));
    let logits = |t: &Taps| t.last.as_ref().unwrap().logits.shallow_clone();
    assert!(logits(&student).equal(&logits(&teacher)));
    // Feature bindings alone stop the teacher at the feature maps: the same maps.
    let features = d.teacher.taps(&images, &mask, false);
    assert!(features.last.is_none());
    for (a, b) in features.srcs.iter().zip(&teacher.srcs) {
        assert!(a.equal(b));
    }
    // The teacher is in no optimizer group: the student's parameters are train's.
    let alone = build_model::<DinoDetector>(&spec, Device::Cpu, 7).unwrap();
    let names =
        |p: &[ddetr_trainer::optim::Param]| p.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&built.params), names(&alone.params));
    assert_eq!(built.vs.variables().len(), alone.vs.variables().len());
}

#[test]
fn feature_distillation_reaches_the_feature_path_only_and_checkpointing_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("teacher.safetensors");
    // Only the distillation term counts, and no noise (the staged backward reseeds per layer).
    let spec = tiny_spec(&[
        "model.cls_loss_coef=0",
        "model.bbox_loss_coef=0",
        "model.giou_loss_coef=0",
        "model.interm_loss_coef=0",
        "model.distillation_loss_coef=0.5",
        "model.dn_label_noise_ratio=0",
        "model.dn_box_noise_scale=0",
    ]);
    build_model::<DinoDetector>(&spec, Device::Cpu, 8)
        .unwrap()
        .vs
        .save(&path)
        .unwrap();
    let spec = with_teacher(
        spec,
        &path,
        vec![binding("model.backbone.0.body", DistillCriterion::L2, 1.0)],
    );
    let built = build_model::<DinoDistiller>(&spec, Device::Cpu, 9).unwrap();
    let teacher_before: BTreeMap<String, Tensor> = built
        .model
        .teacher
        .vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect();
    let (images, mask) = batch();
    let t = targets();
    let amp = Amp::new(Precision::Fp32, Device::Cpu);
    let grads = |activation_checkpoint: bool| {
        for p in &built.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::manual_seed(3);
        let mode = StepMode {
            activation_checkpoint,
            loss_scale: 1.0,
        };
        let l = built
            .model
            .forward_backward(&images, &mask, &t, 3.0, &amp, mode)
            .unwrap();
        let raw = scalar(&l.terms[DISTILL_TERM]);
        assert!(raw > 0.0);
        assert!((scalar(&l.total) - 0.5 * raw).abs() < 1e-5 * raw, "{l:?}");
        built
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.grad().copy()))
            .collect::<Vec<_>>()
    };
    let plain = grads(false);
    let magnitude = |g: &Tensor| {
        if g.defined() {
            g.abs().max().double_value(&[])
        } else {
            0.0
        }
    };
    for (name, g) in &plain {
        let m = magnitude(g);
        if name.starts_with("input_proj.") {
            assert!(m > 0.0, "{name} gets no gradient");
        } else if !name.starts_with("backbone.") {
            assert_eq!(m, 0.0, "{name} is past the feature maps but has a gradient");
        }
    }
    assert!(plain
        .iter()
        .any(|(n, g)| n.starts_with("backbone.") && magnitude(g) > 0.0));
    let staged = grads(true);
    for ((name, a), (_, b)) in plain.iter().zip(&staged) {
        if !a.defined() || !b.defined() {
            assert_eq!(magnitude(a), magnitude(b), "{name}");
            continue;
        }
        assert!(a.allclose(b, 1e-4, 1e-6, false), "{name}");
    }
    // The teacher: frozen, no gradient, unchanged.
    for ((name, before), (_, now)) in teacher_before.iter().zip(
        built
            .model
            .teacher
            .vs
            .variables()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    ) {
        assert!(!now.requires_grad(), "{name}");
        assert!(!now.grad().defined(), "{name}");
        assert!(before.equal(&now), "{name}");
    }
}
