//! `ddetr dino <task>` end to end on the tiny synthetic sets: training under `ddetr-launch`
//! (2 CPU ranks, fsdp) with its outputs, a SIGTERM checkpoint and the resumed run, evaluation,
//! inference and export of the checkpoint, and the one-line refusal of a Deformable DETR spec;
//! `ddetr dino distill` from a trained teacher, its checkpoint evaluated as a DINO one.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    assert_one_error_line, launch_bin, one_node_launch, root, serial, text, tiny_workdir, Proc,
    TINY_64, TINY_TRAIN,
};

const PATIENCE: Duration = Duration::from_secs(400);

/// The DINO demo spec at 64×64: 30 queries (a 48×48 crop has 49 encoder positions).
const DINO_64: &[&str] = &["model.num_queries=30", "model.num_select=30"];

const TEST: &[&str] = &[
    "dataset.test_data_sources={image_dir: data/val/images, json_file: data/val/annotations.json}",
];

fn dino_args(task: &str, results: &str, extra: &[&str]) -> Vec<String> {
    spec_args("configs/shapes_dino_tiny.yaml", task, results, extra)
}

/// `dino <task> -e <spec> -r <results>` with the tiny overrides, then `extra`.
fn spec_args(spec: &str, task: &str, results: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "dino".to_string(),
        task.to_string(),
        "-e".into(),
        root().join(spec).display().to_string(),
        "-r".into(),
        results.into(),
    ];
    for o in [TINY_64, TINY_TRAIN, DINO_64, TEST, extra] {
        v.extend(o.iter().map(|s| s.to_string()));
    }
    v
}

fn ddetr(dir: &Path, a: &[String]) -> (std::process::ExitStatus, String) {
    common::run(dir, &common::ddetr_bin(), a, &[], PATIENCE)
}

#[test]
fn dino_trains_under_the_launcher_resumes_evaluates_and_infers() {
    let _one = serial();
    let work = tiny_workdir();
    let d = work.path();

    // Two ranks, fsdp, two epochs; a SIGTERM in epoch 1 stops it at a step with a checkpoint.
    let mut launch = one_node_launch(2);
    launch.extend(dino_args(
        "train",
        "results",
        &["train.distributed_strategy=fsdp", "train.num_epochs=3"],
    ));
    let mut p = Proc::start(d, &launch_bin(), &launch, &[]);
    let t0 = std::time::Instant::now();
    while !p.stderr().contains("epoch 1/3 step 1/3") {
        assert!(p.running(), "training ended early:\n{}", p.stderr());
        assert!(t0.elapsed() < PATIENCE, "no first step:\n{}", p.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    p.signal("-TERM");
    let st = p.wait(PATIENCE);
    assert_eq!(st.code(), Some(143), "{}", p.stderr());
    assert!(d
        .join("results/train/dd_model_latest.safetensors")
        .is_file());

    // The same command resumes and finishes.
    let out = common::run(d, &launch_bin(), &launch, &[], PATIENCE);
    assert!(out.0.success(), "{}", out.1);
    assert!(out.1.contains("resum"), "no resume in:\n{}", out.1);
    let train = d.join("results/train");
    for f in [
        "model_epoch_002.safetensors",
        "experiment.yaml",
        "status.json",
        "loss.png",
    ] {
        assert!(train.join(f).is_file(), "{f} missing");
    }
    let experiment = std::fs::read_to_string(train.join("experiment.yaml")).unwrap();
    assert!(experiment.contains("model_name: dino") && experiment.contains("dn_number"));
    let log = std::fs::read_to_string(train.join("status.json")).unwrap();
    for term in ["loss_ce_dn", "loss_bbox_interm"] {
        assert!(log.contains(term), "{term} not logged in status.json");
    }

    // Evaluation and inference of the last checkpoint (the spec says dino: plain commands work).
    let ck = "evaluate.checkpoint=results/train/dd_model_latest.safetensors";
    let (st, err) = ddetr(d, &dino_args("evaluate", "results", &[ck]));
    assert!(st.success(), "{err}");
    assert!(d.join("results/evaluate/metrics.json").is_file());
    let (st, err) = ddetr(
        d,
        &dino_args(
            "inference",
            "results",
            &[
                "inference.checkpoint=results/train/dd_model_latest.safetensors",
                "dataset.infer_data_sources={image_dir: [data/val/images], classmap: data/val/label_map.txt}",
            ],
        ),
    );
    assert!(st.success(), "{err}");
    let labels = std::fs::read_dir(d.join("results/inference/labels"))
        .unwrap()
        .count();
    assert_eq!(labels, common::TINY_VAL_IMAGES);

    // A Deformable DETR spec with the DINO command group, and DINO's export: one line each.
    let dd = vec![
        "dino".to_string(),
        "train".into(),
        "-e".into(),
        root()
            .join("configs/shapes_tiny.yaml")
            .display()
            .to_string(),
    ];
    let (st, err) = ddetr(d, &dd);
    let _ = text(&[]);
    assert_one_error_line(
        st,
        &err,
        2,
        "model.with_box_refine is a deformable_detr key, but this spec trains dino",
    );
    // Export: ONNX written (checked against the model by trainer/tests/onnx_export.rs).
    let (st, err) = ddetr(
        d,
        &dino_args(
            "export",
            "results",
            &[
                "export.checkpoint=results/train/dd_model_latest.safetensors",
                "export.input_height=64",
                "export.input_width=64",
            ],
        ),
    );
    assert!(st.success(), "{err}");
    assert!(d.join("results/export/model.onnx").is_file(), "{err}");
}

/// The distill spec at 64×64: its teacher is shapes_dino_tiny.yaml's model with [`DINO_64`]'s
/// queries, and the feature binding plus a KL one on the final class logits.
const DISTILL_64: &[&str] = &[
    "distill.teacher.num_queries=30",
    "distill.teacher.num_select=30",
    "distill.pretrained_teacher_model_path=results/teacher/train/dd_model_latest.safetensors",
    "distill.bindings=[{student_module_name: model.backbone.0.body, teacher_module_name: model.backbone.0.body, criterion: L2}, {student_module_name: pred_logits, teacher_module_name: pred_logits, criterion: KL, weight: 0.5}]",
    "train.num_epochs=1",
];

#[test]
fn dino_distills_from_a_trained_teacher_under_the_launcher() {
    let _one = serial();
    let work = tiny_workdir();
    let d = work.path();
    let (st, err) = ddetr(
        d,
        &dino_args("train", "results/teacher", &["train.num_epochs=1"]),
    );
    assert!(st.success(), "{err}");

    // Two ranks, the staged backward: the feature term joins it at the input projections.
    let mut launch = one_node_launch(2);
    launch.extend(spec_args(
        "configs/shapes_dino_distill.yaml",
        "distill",
        "results/student",
        &[DISTILL_64, &["train.activation_checkpoint=true"]].concat(),
    ));
    let (st, err) = common::run(d, &launch_bin(), &launch, &[], PATIENCE);
    assert!(st.success(), "{err}");
    assert!(err.contains("distill: teacher loaded and frozen"), "{err}");
    let out = d.join("results/student/distill");
    for f in [
        "dd_model_latest.safetensors",
        "status.json",
        "experiment.yaml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    let log = std::fs::read_to_string(out.join("status.json")).unwrap();
    assert!(log.contains("\"train_loss_distillation\""), "{log}");
    let experiment = std::fs::read_to_string(out.join("experiment.yaml")).unwrap();
    assert!(experiment.contains("\ndistill:") && experiment.contains("pred_logits"));

    // The student's checkpoint is a DINO one: evaluate loads it strictly (no teacher tensors).
    let (st, err) = ddetr(
        d,
        &spec_args(
            "configs/shapes_dino_distill.yaml",
            "evaluate",
            "results/student",
            &[
                DISTILL_64,
                &["evaluate.checkpoint=results/student/distill/dd_model_latest.safetensors"],
            ]
            .concat(),
        ),
    );
    assert!(st.success(), "{err}");
    assert!(err.contains("0 missing, 0 unexpected"), "{err}");
    // dataset.eval_class_ids restricts the metrics to those categories; an id the set lacks is
    // one line.
    let eval_ids = |ids: &str| {
        ddetr(
            d,
            &spec_args(
                "configs/shapes_dino_distill.yaml",
                "evaluate",
                "results/student",
                &[
                    DISTILL_64,
                    &[
                        "evaluate.checkpoint=results/student/distill/dd_model_latest.safetensors",
                        ids,
                    ],
                ]
                .concat(),
            ),
        )
    };
    let (st, err) = eval_ids("dataset.eval_class_ids=[1, 2]");
    assert!(st.success(), "{err}");
    let (st, err) = eval_ids("dataset.eval_class_ids=[9]");
    assert_one_error_line(st, &err, 2, "dataset.eval_class_ids has 9");

    // A Deformable DETR teacher (shapes_tiny.yaml trained), the feature binding only.
    // (Trained with two micro batches per optimizer step.)
    let dd = common::tiny_task(
        "train",
        "results/dd_teacher",
        &[
            TINY_64,
            TINY_TRAIN,
            &["train.num_epochs=1", "train.grad_accum_steps=2"],
        ],
    );
    let (st, err) = ddetr(d, &dd);
    assert!(st.success(), "{err}");
    let dd_teacher: &[&str] = &[
        "distill.teacher_model_name=deformable_detr",
        "distill.teacher={backbone: resnet_18, backbone_from_scratch: true, num_feature_levels: 3, return_interm_indices: [1, 2, 3], hidden_dim: 128, nheads: 4, enc_layers: 2, dec_layers: 2, dim_feedforward: 256, num_queries: 50, num_select: 50, dropout_ratio: 0.0}",
        "distill.bindings=[{student_module_name: model.backbone.0.body, teacher_module_name: model.backbone.0.body, criterion: L1}]",
    ];
    let (st, err) = ddetr(
        d,
        &spec_args(
            "configs/shapes_dino_distill.yaml",
            "distill",
            "results/from_dd",
            &[
                DISTILL_64,
                dd_teacher,
                &["distill.pretrained_teacher_model_path=results/dd_teacher/train/dd_model_latest.safetensors"],
            ]
            .concat(),
        ),
    );
    assert!(st.success(), "{err}");
    assert!(err.contains("architecture=\"deformable_detr\""), "{err}");
    assert!(d
        .join("results/from_dd/distill/dd_model_latest.safetensors")
        .is_file());

    // A teacher checkpoint of another architecture, a foreign teacher key, a missing path: one
    // line each.
    let (st, err) = ddetr(
        d,
        &spec_args(
            "configs/shapes_dino_distill.yaml",
            "distill",
            "results/bad",
            &[DISTILL_64, dd_teacher].concat(),
        ),
    );
    assert_one_error_line(st, &err, 2, "distill teacher (deformable_detr");
    let (st, err) = ddetr(
        d,
        &spec_args(
            "configs/shapes_dino_distill.yaml",
            "distill",
            "results/bad",
            &[DISTILL_64, &["distill.teacher_model_name=deformable_detr"]].concat(),
        ),
    );
    assert_one_error_line(st, &err, 2, "distill.teacher.dn_number is a dino key");
    let (st, err) = ddetr(
        d,
        &spec_args(
            "configs/shapes_dino_distill.yaml",
            "distill",
            "results/bad",
            &[DISTILL_64, &["distill.pretrained_teacher_model_path="]].concat(),
        ),
    );
    assert_one_error_line(
        st,
        &err,
        2,
        "distill.pretrained_teacher_model_path is not set",
    );
}
