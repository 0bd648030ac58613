//! A GCViT backbone through every task on the tiny synthetic sets: Deformable DETR trained under
//! `ddetr-launch` (2 CPU ranks, ddp, activation checkpointing, stochastic depth), evaluated,
//! run for inference and exported; DINO trained with it for an epoch.

mod common;

use std::time::Duration;

use common::{serial, tiny_task, tiny_workdir, TINY_64, TINY_TRAIN};

const PATIENCE: Duration = Duration::from_secs(400);
const GCVIT: &[&str] = &["model.backbone=gc_vit_xxtiny"];

#[test]
fn gcvit_deformable_detr_trains_evaluates_infers_and_exports_and_dino_trains() {
    let _one = serial();
    let work = tiny_workdir();
    let d = work.path();
    let ddetr = |a: &[String]| common::run(d, &common::ddetr_bin(), a, &[], PATIENCE);

    common::train_on_two_ranks(
        d,
        tiny_task(
            "train",
            "results",
            &[
                TINY_64,
                TINY_TRAIN,
                GCVIT,
                &["train.activation_checkpoint=true"],
            ],
        ),
        "gc_vit_xxtiny",
        PATIENCE,
    );

    let ck = "results/train/dd_model_latest.safetensors";
    let (st, err) = ddetr(&tiny_task(
        "evaluate",
        "results",
        &[TINY_64, GCVIT, &[&format!("evaluate.checkpoint={ck}"), "dataset.test_data_sources={image_dir: data/val/images, json_file: data/val/annotations.json}"]],
    ));
    assert!(st.success(), "{err}");
    assert!(d.join("results/evaluate/metrics.json").is_file());
    let (st, err) = ddetr(&tiny_task(
        "inference",
        "results",
        &[TINY_64, GCVIT, &[&format!("inference.checkpoint={ck}"), "dataset.infer_data_sources={image_dir: [data/val/images], classmap: data/val/label_map.txt}"]],
    ));
    assert!(st.success(), "{err}");
    let labels = std::fs::read_dir(d.join("results/inference/labels"))
        .unwrap()
        .count();
    assert_eq!(labels, common::TINY_VAL_IMAGES);
    // ONNX written (checked against the model by trainer/tests/onnx_export.rs).
    let (st, err) = ddetr(&tiny_task(
        "export",
        "results",
        &[
            GCVIT,
            &[
                &format!("export.checkpoint={ck}"),
                "export.input_height=64",
                "export.input_width=80",
            ],
        ],
    ));
    assert!(st.success(), "{err}");
    assert!(d.join("results/export/model.onnx").is_file(), "{err}");
    // A checkpoint of another backbone is one line naming the right one.
    let (st, err) = ddetr(&tiny_task(
        "evaluate",
        "results",
        &[TINY_64, &["model.backbone=gc_vit_xtiny", &format!("evaluate.checkpoint={ck}"), "dataset.test_data_sources={image_dir: data/val/images, json_file: data/val/annotations.json}"]],
    ));
    assert!(!st.success());
    assert!(err.contains("set model.backbone to gc_vit_xxtiny"), "{err}");

    // DINO takes the same backbone.
    let mut dino = vec!["dino".to_string(), "train".into(), "-e".into()];
    dino.push(
        common::root()
            .join("configs/shapes_dino_tiny.yaml")
            .display()
            .to_string(),
    );
    dino.extend(["-r".into(), "results_dino".into()]);
    for o in [
        TINY_64,
        TINY_TRAIN,
        GCVIT,
        &[
            "model.num_queries=30",
            "model.num_select=30",
            "train.num_epochs=1",
        ],
    ] {
        dino.extend(o.iter().map(|s| s.to_string()));
    }
    let (st, err) = ddetr(&dino);
    assert!(st.success(), "{err}");
    assert!(d
        .join("results_dino/train/dd_model_latest.safetensors")
        .is_file());
}
