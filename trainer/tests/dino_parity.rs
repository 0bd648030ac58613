//! DINO against the official IDEA-Research/DINO code (`golden/make_dino_fixtures.py`): the same
//! weights (`fill` of each official key) on the same padded batch give the same predictions in
//! inference (every decoder layer and the selected encoder proposals), the same matching and
//! denoising predictions in training, and the same loss terms from the official criterion.

mod common;

use std::collections::BTreeMap;

use common::{fill_model, read_fixture};
use ddetr_trainer::detector::{build_model, DinoDetector};
use ddetr_trainer::matcher::Target;
use ddetr_trainer::model::deformable_detr::Prediction;
use ddetr_trainer::spec;
use tch::{Device, Kind, Tensor};

/// `make_dino_fixtures.py`'s configuration as a ddetr spec.
fn spec() -> spec::ExperimentSpec {
    let o: Vec<String> = [
        "model_name=dino",
        "model.backbone=resnet_50",
        "model.num_feature_levels=4",
        "model.return_interm_indices=[1,2,3,4]",
        "model.hidden_dim=256",
        "model.nheads=8",
        "model.enc_layers=1",
        "model.dec_layers=2",
        "model.dim_feedforward=64",
        "model.num_queries=30",
        "model.num_select=30",
        "model.dn_number=3",
        "model.dn_label_noise_ratio=0",
        "model.dn_box_noise_scale=0",
        "dataset.num_classes=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    spec::load_str("", &o, None).unwrap().spec
}

fn close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    eprintln!("{name}: max |diff| {diff:.2e}");
    assert!(diff <= tol, "{name}: max |diff| {diff:e} > {tol:e}");
}

fn same(prefix: &str, p: &Prediction, fx: &BTreeMap<String, Tensor>, tol: f64) {
    close(
        &format!("{prefix}.logits"),
        &p.logits,
        &fx[&format!("{prefix}.logits")],
        tol,
    );
    close(
        &format!("{prefix}.boxes"),
        &p.boxes,
        &fx[&format!("{prefix}.boxes")],
        tol,
    );
}

#[test]
fn dino_matches_the_official_model_and_criterion() {
    let fx = read_fixture("dino_r50.safetensors");
    let spec = spec();
    let built = build_model::<DinoDetector>(&spec, Device::Cpu, 0).unwrap();
    fill_model(&built.vs);
    let net = &built.model.net;
    let images = &fx["images"];
    let mask = &fx["mask"];
    let tol = 2e-4;

    let eval = tch::no_grad(|| net.forward(images, mask, None, false));
    same("eval", eval.last(), &fx, tol);
    same("eval.aux0", &eval.layers[0], &fx, tol);
    same("eval.interm", &eval.interm, &fx, tol);

    let targets: Vec<Target> = (0..2)
        .map(|i| Target {
            labels: fx[&format!("target{i}.labels")].shallow_clone(),
            boxes: fx[&format!("target{i}.boxes")].shallow_clone(),
        })
        .collect();
    let train = tch::no_grad(|| net.forward(images, mask, Some(&targets), true));
    same("train", train.last(), &fx, tol);
    same("train.aux0", &train.layers[0], &fx, tol);
    same("train.interm", &train.interm, &fx, tol);
    let dn = train.dn.as_ref().expect("denoising queries");
    assert_eq!(dn.meta.pad_size, fx["train.dn.pad_size"].int64_value(&[0]));
    assert_eq!(
        dn.meta.num_groups,
        fx["train.dn.num_groups"].int64_value(&[0])
    );
    same("train.dn", &dn.layers[1], &fx, tol);
    same("train.dn.aux0", &dn.layers[0], &fx, tol);

    // Every loss term of ours against the official criterion's (num_boxes = 4 boxes).
    let losses = tch::no_grad(|| built.model.criterion.forward(&train, &targets, 4.0)).unwrap();
    let mut compared = 0;
    for (k, want) in fx
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("loss.")?, v)))
    {
        let Some(got) = losses.terms.get(k) else {
            continue;
        };
        let (g, w) = (got.double_value(&[]), want.double_value(&[0]));
        eprintln!("{k}: ours {g:.6}, official {w:.6}");
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "{k}: ours {g}, official {w}"
        );
        compared += 1;
    }
    // 3 kinds × (final, aux, dn, dn aux, interm) + class_error.
    assert_eq!(compared, 16, "terms compared");
}
