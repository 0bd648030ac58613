//! A FAN backbone (TAO's DINO backbone) through every task on the tiny synthetic sets: DINO
//! trained under `ddetr-launch` (2 CPU ranks, ddp, activation checkpointing: the recomputed
//! backbone repeats the first pass's stochastic depth and batch statistics), evaluated, run
//! for inference, exported and used as a distillation teacher; a checkpoint of another FAN size
//! is one line naming it.

mod common;

use std::time::Duration;

use common::{serial, tiny_workdir, TINY_64, TINY_TRAIN};

const PATIENCE: Duration = Duration::from_secs(400);
const FAN: &[&str] = &[
    "model.backbone=fan_tiny",
    "model.num_queries=30",
    "model.num_select=30",
];

/// `ddetr dino <task> -e configs/shapes_dino_tiny.yaml -r results <overrides…>`.
fn dino_task(task: &str, overrides: &[&[&str]]) -> Vec<String> {
    let mut v = vec!["dino".to_string(), task.into(), "-e".into()];
    v.push(
        common::root()
            .join("configs/shapes_dino_tiny.yaml")
            .display()
            .to_string(),
    );
    v.extend(["-r".into(), "results".into()]);
    for o in overrides {
        v.extend(o.iter().map(|s| s.to_string()));
    }
    v
}

#[test]
fn fan_dino_trains_under_the_launcher_evaluates_infers_and_exports() {
    let _one = serial();
    let work = tiny_workdir();
    let d = work.path();
    let ddetr = |a: &[String]| common::run(d, &common::ddetr_bin(), a, &[], PATIENCE);

    common::train_on_two_ranks(
        d,
        dino_task(
            "train",
            &[
                TINY_64,
                TINY_TRAIN,
                FAN,
                &["train.activation_checkpoint=true"],
            ],
        ),
        "fan_tiny",
        PATIENCE,
    );
    // The checkpoint holds the BatchNorms' running statistics, moved off their initial values
    // by the training batches.
    let ck = "results/train/dd_model_latest.safetensors";
    let saved = tch::Tensor::read_safetensors(d.join(ck)).unwrap();
    let var = saved
        .iter()
        .find(|(k, _)| k == "backbone.0.body.blocks.0.mlp.mlp_v.dwconv.bn.running_var")
        .map(|(_, t)| t.shallow_clone())
        .expect("running statistics saved");
    assert!(!var.equal(&var.ones_like()), "running_var never updated");

    let test = "dataset.test_data_sources={image_dir: data/val/images, json_file: data/val/annotations.json}";
    let (st, err) = ddetr(&dino_task(
        "evaluate",
        &[TINY_64, FAN, &[&format!("evaluate.checkpoint={ck}"), test]],
    ));
    assert!(st.success(), "{err}");
    assert!(d.join("results/evaluate/metrics.json").is_file());
    let (st, err) = ddetr(&dino_task(
        "inference",
        &[TINY_64, FAN, &[&format!("inference.checkpoint={ck}"), "dataset.infer_data_sources={image_dir: [data/val/images], classmap: data/val/label_map.txt}"]],
    ));
    assert!(st.success(), "{err}");
    let labels = std::fs::read_dir(d.join("results/inference/labels"))
        .unwrap()
        .count();
    assert_eq!(labels, common::TINY_VAL_IMAGES);
    // ONNX written (checked against the model by trainer/tests/onnx_export.rs).
    let (st, err) = ddetr(&dino_task(
        "export",
        &[
            FAN,
            &[
                &format!("export.checkpoint={ck}"),
                "export.input_height=64",
                "export.input_width=80",
            ],
        ],
    ));
    assert!(st.success(), "{err}");
    assert!(d.join("results/export/model.onnx").is_file(), "{err}");
    // The checkpoint as TAO's distill tutorial uses a FAN: the frozen teacher of a ResNet-18
    // student (their feature maps round odd sizes differently: the teacher's are resized).
    let mut distill = vec!["dino".to_string(), "distill".into(), "-e".into()];
    distill.push(
        common::root()
            .join("configs/shapes_dino_distill.yaml")
            .display()
            .to_string(),
    );
    distill.extend(["-r".into(), "results_distill".into()]);
    for o in [
        TINY_64,
        TINY_TRAIN,
        &[
            "train.num_epochs=1",
            "model.num_queries=30",
            "model.num_select=30",
            "distill.teacher.backbone=fan_tiny",
            "distill.teacher.num_queries=30",
            "distill.teacher.num_select=30",
            "dataset.augmentation.train_random_resize=[58, 64]",
        ],
        &[&format!("distill.pretrained_teacher_model_path={ck}")],
    ] {
        distill.extend(o.iter().map(|s| s.to_string()));
    }
    let (st, err) = ddetr(&distill);
    assert!(st.success(), "{err}");
    assert!(d
        .join("results_distill/distill/dd_model_latest.safetensors")
        .is_file());
    // A checkpoint of another size is one line naming the right one.
    let (st, err) = ddetr(&dino_task(
        "evaluate",
        &[
            TINY_64,
            FAN,
            &[
                "model.backbone=fan_small",
                &format!("evaluate.checkpoint={ck}"),
                test,
            ],
        ],
    ));
    assert!(!st.success());
    assert!(err.contains("set model.backbone to fan_tiny"), "{err}");
}
