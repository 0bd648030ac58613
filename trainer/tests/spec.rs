//! The experiment spec: TAO defaults, round trip, overrides, unknown keys, validation messages.

use ddetr_trainer::spec::{self, Backbone, ExperimentSpec, Precision, SpecError, Task};

fn load(yaml: &str, overrides: &[&str]) -> Result<spec::Resolved, SpecError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    spec::load_str(yaml, &overrides, None)
}

fn err(yaml: &str, overrides: &[&str]) -> String {
    match load(yaml, overrides) {
        Ok(r) => panic!("expected an error, got a valid spec: {:?}", r.notices),
        Err(e) => e.to_string(),
    }
}

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// TAO's documented defaults (../shared/reference/deformable-detr-anchors.md §3.6 and the
/// tao-core schema), checked key by key on an empty spec.
#[test]
fn defaults_equal_taos_table() {
    let s = load("", &[]).unwrap().spec;
    let m = &s.model;
    assert_eq!(m.backbone, Backbone::Resnet50);
    assert_eq!(m.num_queries, 300);
    assert_eq!(m.num_select, 100);
    assert_eq!(m.num_feature_levels, 4);
    assert_eq!(m.return_interm_indices, vec![1, 2, 3, 4]);
    assert_eq!(
        (m.cls_loss_coef, m.bbox_loss_coef, m.giou_loss_coef),
        (2.0, 5.0, 2.0)
    );
    assert_eq!(m.focal_alpha, 0.25);
    assert!(m.with_box_refine && !m.two_stage && m.aux_loss && m.train_backbone && !m.dilation);
    assert_eq!(
        (m.nheads, m.hidden_dim, m.enc_layers, m.dec_layers),
        (8, 256, 6, 6)
    );
    assert_eq!(m.dropout_ratio, 0.3);
    assert_eq!(m.dim_feedforward, 1024);
    assert_eq!((m.enc_n_points, m.dec_n_points), (4, 4));
    assert_eq!(m.backbone_names, vec!["backbone.0"]);
    assert_eq!(
        m.linear_proj_names,
        vec!["reference_points", "sampling_offsets"]
    );
    assert_eq!(m.loss_types, vec!["labels", "boxes"]);

    let t = &s.train;
    let o = &t.optim;
    assert_eq!(
        (o.lr, o.lr_backbone, o.lr_linear_proj_mult),
        (2e-4, 2e-5, 0.1)
    );
    assert_eq!((o.weight_decay, o.momentum, o.lr_decay), (1e-4, 0.9, 0.1));
    assert_eq!(o.lr_steps, vec![40]);
    assert_eq!(o.lr_step_size, 40);
    assert_eq!(t.clip_grad_norm, 0.1);
    assert_eq!(
        (t.num_gpus, t.gpu_ids.clone(), t.num_nodes),
        (1, vec![0], 1)
    );
    assert_eq!(
        (t.num_epochs, t.checkpoint_interval, t.validation_interval),
        (10, 1, 1)
    );
    assert_eq!(t.seed, 1234);
    assert_eq!(t.precision, Precision::Fp32);
    assert!(t.activation_checkpoint);

    let d = &s.dataset;
    assert_eq!((d.batch_size, d.workers, d.num_classes), (4, 8, 91));
    let a = &d.augmentation;
    assert_eq!(
        a.scales,
        vec![480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    );
    assert_eq!(a.train_random_resize, vec![400, 500, 600]);
    assert_eq!(
        (a.train_random_crop_min, a.train_random_crop_max),
        (384, 600)
    );
    assert_eq!(
        (a.random_resize_max_size, a.test_random_resize),
        (1333, 800)
    );
    assert_eq!(a.horizontal_flip_prob, 0.5);
    assert_eq!(a.input_mean, vec![0.485, 0.456, 0.406]);
    assert_eq!(a.input_std, vec![0.229, 0.224, 0.225]);
    assert!(a.fixed_padding);

    assert_eq!(s.evaluate.conf_threshold, 0.0);
    assert_eq!(s.inference.conf_threshold, 0.5);
    assert_eq!(s.inference.outline_width, 3);
    let e = &s.export;
    assert_eq!(
        (
            e.opset_version,
            e.input_channel,
            e.input_width,
            e.input_height,
            e.batch_size
        ),
        (17, 3, 960, 544, -1)
    );
    assert!(!e.on_cpu);
    assert_eq!(
        (
            s.convert.num_shards,
            s.convert.num_partitions,
            s.convert.image_extension.as_str()
        ),
        (20, 1, ".jpg")
    );
}

#[test]
fn shipped_specs_round_trip_through_show() {
    for rel in ["configs/coco_r50.yaml", "configs/shapes_tiny.yaml"] {
        let first = spec::load(&repo_file(rel), &[], None)
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .spec;
        let shown = first.to_yaml();
        let second = load(&shown, &[]).unwrap().spec;
        assert_eq!(first, second, "{rel}: show → load changed the spec");
        assert_eq!(first.hash(), second.hash());
    }
    let default = ExperimentSpec::default();
    assert_eq!(load(&default.to_yaml(), &[]).unwrap().spec, default);
}

#[test]
fn tao_example_spec_keeps_its_values() {
    let s = spec::load(&repo_file("configs/coco_r50.yaml"), &[], None)
        .unwrap()
        .spec;
    assert_eq!(s.model.num_feature_levels, 2);
    assert_eq!(s.model.return_interm_indices, vec![1, 2]);
    assert_eq!(s.train.optim.lr_steps, vec![10, 20, 30, 40]);
    assert!(!s.dataset.augmentation.fixed_padding);
    assert_eq!(
        s.dataset.train_data_sources[0].json_file,
        "/data/raw-data/annotations/instances_train2017.json"
    );
}

#[test]
fn overrides_of_every_type() {
    let s = load(
        "",
        &[
            "train.num_epochs=3",
            "train.optim.lr=1e-4",
            "train.optim.lr_backbone=0",
            "model.with_box_refine=false",
            "train.gpu_ids=[0,1]",
            "train.num_gpus=2",
            "dataset.augmentation.scales=[480, 512]",
            "model.backbone=resnet_18",
            "results_dir=/tmp/x",
            "train.precision=fp16",
            "train.seed=-1",
        ],
    )
    .unwrap();
    let s = s.spec;
    assert_eq!(s.train.num_epochs, 3);
    assert_eq!(s.train.optim.lr, 1e-4);
    assert_eq!(s.train.optim.lr_backbone, 0.0);
    assert!(!s.model.with_box_refine);
    assert_eq!(s.train.gpu_ids, vec![0, 1]);
    assert_eq!(s.train.num_gpus, 2);
    assert_eq!(s.dataset.augmentation.scales, vec![480, 512]);
    assert_eq!(s.model.backbone, Backbone::Resnet18);
    assert_eq!(s.results_dir, "/tmp/x");
    assert_eq!(s.train.precision, Precision::Fp16);
    assert_eq!(s.train.seed, -1);
}

#[test]
fn later_overrides_win_and_results_dir_flag_wins_last() {
    let ov = vec![
        "train.num_epochs=3".to_string(),
        "train.num_epochs=5".to_string(),
        "results_dir=a".to_string(),
    ];
    let s = spec::load_str("train: {num_epochs: 1}", &ov, Some("from-flag"))
        .unwrap()
        .spec;
    assert_eq!(s.train.num_epochs, 5);
    assert_eq!(s.results_dir, "from-flag");
    assert_eq!(
        s.task_results_dir(Task::Train),
        std::path::PathBuf::from("from-flag/train")
    );
}

#[test]
fn numeric_override_of_a_string_key_is_taken_as_text() {
    let s = load("", &["export.onnx_file=123", "inference.checkpoint=7"])
        .unwrap()
        .spec;
    assert_eq!(s.export.onnx_file.as_deref(), Some("123"));
    assert_eq!(s.inference.checkpoint.as_deref(), Some("7"));
}

#[test]
fn override_with_the_wrong_type_names_the_key() {
    let e = err("", &["train.num_epochs=many"]);
    assert!(
        e.starts_with("train.num_epochs: invalid type: string \"many\""),
        "{e}"
    );
    let e = err("", &["model.with_box_refine=[1]"]);
    assert!(
        e.starts_with("model.with_box_refine: invalid type: sequence"),
        "{e}"
    );
}

#[test]
fn malformed_override_is_rejected() {
    assert!(err("", &["train.num_epochs"]).contains("expected key.path=value"));
    assert!(err("", &["train..num_epochs=3"]).contains("empty component"));
    assert!(err("", &["model.backbone.depth=3"]).contains("model.backbone is not a section"));
}

#[test]
fn unknown_key_names_the_nearest_valid_one() {
    assert_eq!(
        err("train:\n  num_epoch: 3\n", &[]),
        "unknown key 'train.num_epoch' in train: did you mean 'train.num_epochs'?"
    );
    assert_eq!(
        err("dataset:\n  augmentation:\n    horizontal_flip_probability: 0.5\n", &[]),
        "unknown key 'dataset.augmentation.horizontal_flip_probability' in dataset.augmentation: did you mean 'dataset.augmentation.horizontal_flip_prob'?"
    );
    assert_eq!(
        err("modle:\n  nheads: 8\n", &[]),
        "unknown key 'modle' at the top level: did you mean 'model'?"
    );
    assert_eq!(
        err("", &["train.optim.learning_rate=1"]),
        "unknown key 'train.optim.learning_rate' in train.optim: valid keys are optimizer, monitor_name, lr, lr_backbone, lr_linear_proj_mult, momentum, weight_decay, lr_scheduler, lr_steps, lr_step_size, lr_decay"
    );
    let e = err(
        "dataset:\n  train_data_sources:\n    - image_dri: a\n      json_file: b\n",
        &[],
    );
    assert!(
        e.contains("unknown key")
            && e.contains("image_dri")
            && e.contains("did you mean")
            && e.contains("image_dir"),
        "{e}"
    );
}

#[test]
fn unknown_values_name_the_valid_ones() {
    assert_eq!(
        err("", &["model.backbone=resnet_5"]),
        "model.backbone: unknown value 'resnet_5' (did you mean 'resnet_50'?); valid values are resnet_18, resnet_34, resnet_50, gc_vit_xxtiny, gc_vit_xtiny, gc_vit_tiny, gc_vit_small, gc_vit_base, gc_vit_large, gc_vit_large_384, fan_tiny, fan_small, fan_base, fan_large"
    );
    assert_eq!(
        err("", &["model.backbone=gc_vit_tny"]),
        "model.backbone: unknown value 'gc_vit_tny' (did you mean 'gc_vit_tiny'?); valid values are resnet_18, resnet_34, resnet_50, gc_vit_xxtiny, gc_vit_xtiny, gc_vit_tiny, gc_vit_small, gc_vit_base, gc_vit_large, gc_vit_large_384, fan_tiny, fan_small, fan_base, fan_large"
    );
    assert_eq!(
        err("", &["train.optim.optimizer=Adam"]),
        "train.optim.optimizer: unknown value 'Adam' (did you mean 'AdamW'?); valid values are AdamW, SGD"
    );
    assert!(err("", &["train.optim.lr_scheduler=Cosine"])
        .starts_with("train.optim.lr_scheduler: unknown value 'Cosine'"));
    assert!(err("", &["train.precision=fp8"]).contains("valid values are fp32, fp16, bf16"));
    assert!(
        err("", &["train.distributed_strategy=deepspeed"]).contains("valid values are ddp, fsdp")
    );
}

#[test]
fn return_interm_indices_must_match_levels_and_be_allowed() {
    let e = err("", &["model.num_feature_levels=2"]);
    assert_eq!(
        e,
        "model.return_interm_indices has 4 entries [1, 2, 3, 4] but model.num_feature_levels is 2: give one index per level, e.g. return_interm_indices: [1, 2]"
    );
    for bad in ["[1,1,2,3]", "[1,2,3,5]", "[3,2,1,0]"] {
        let e = err("", &[&format!("model.return_interm_indices={bad}")]);
        assert!(
            e.contains("use strictly increasing indices from 0..=4"),
            "{bad}: {e}"
        );
    }
    load(
        "",
        &[
            "model.num_feature_levels=1",
            "model.return_interm_indices=[3]",
        ],
    )
    .unwrap();
    load(
        "",
        &[
            "model.num_feature_levels=5",
            "model.return_interm_indices=[0,1,2,3,4]",
        ],
    )
    .unwrap();
}

#[test]
fn num_select_must_stay_below_queries_times_classes() {
    let e = err(
        "",
        &[
            "model.num_queries=50",
            "dataset.num_classes=2",
            "model.num_select=100",
        ],
    );
    assert_eq!(
        e,
        "model.num_select is 100 but num_queries × dataset.num_classes is 50 × 2 = 100: set model.num_select below 100"
    );
    load(
        "",
        &[
            "model.num_queries=50",
            "dataset.num_classes=2",
            "model.num_select=99",
        ],
    )
    .unwrap();
}

#[test]
fn dropout_outside_unit_interval_is_rejected() {
    assert_eq!(
        err("", &["model.dropout_ratio=1.5"]),
        "model.dropout_ratio is 1.5; a dropout probability must be within [0, 1]"
    );
    assert!(err("", &["model.dropout_ratio=-0.1"]).contains("within [0, 1]"));
    load("", &["model.dropout_ratio=0"]).unwrap();
}

#[test]
fn lr_steps_must_increase() {
    assert_eq!(
        err("", &["train.optim.lr_steps=[10,30,20]"]),
        "train.optim.lr_steps is [10, 30, 20]: 30 is followed by 20; list the decay epochs in increasing order"
    );
    // StepLR ignores lr_steps.
    load(
        "",
        &[
            "train.optim.lr_steps=[10,5]",
            "train.optim.lr_scheduler=StepLR",
        ],
    )
    .unwrap();
}

#[test]
fn encryption_key_is_refused() {
    assert!(err("encryption_key: tlt_encode\n", &[])
        .starts_with("encryption_key is set, but ddetr does not encrypt checkpoints"));
    load("encryption_key: ''\n", &[]).unwrap();
    load("encryption_key: null\n", &[]).unwrap();
}

#[test]
fn num_gpus_and_gpu_ids_follow_the_larger_with_a_notice() {
    let r = load("", &["train.num_gpus=4"]).unwrap();
    assert_eq!(r.spec.train.gpu_ids, vec![0, 1, 2, 3]);
    assert_eq!(
        r.notices[0].to_string(),
        "train.num_gpus = 4 and train.gpu_ids = [0] disagree: using the larger, gpu_ids = [0, 1, 2, 3]"
    );
    let r = load("", &["evaluate.gpu_ids=[2,3]"]).unwrap();
    assert_eq!(r.spec.evaluate.num_gpus, 2);
    assert!(r.notices[0]
        .to_string()
        .contains("using the larger, num_gpus = 2"));
    assert!(err("", &["train.gpu_ids=[1,1]", "train.num_gpus=2"]).contains("lists a GPU twice"));
    assert!(load("", &[]).unwrap().notices.is_empty());
}

#[test]
fn malformed_yaml_reports_line_and_column() {
    let e = err("train:\n  num_epochs: 3\n   bad: [\n", &[]);
    assert!(e.starts_with("spec <spec> is not valid YAML: line "), "{e}");
    assert!(e.contains("column"), "{e}");
    assert!(err("- a\n- b\n", &[]).contains("top level must be a mapping"));
}

#[test]
fn other_sanity_rules() {
    assert!(err("", &["dataset.num_classes=1"]).contains("at least 2"));
    assert!(err("", &["model.hidden_dim=100"]).contains("model.hidden_dim"));
    assert!(
        err("", &["model.two_stage=true", "model.with_box_refine=false"])
            .contains("needs model.with_box_refine")
    );
    assert!(err("", &["dataset.augmentation.train_random_crop_max=300"])
        .contains("must exceed train_random_crop_min"));
    assert!(err("", &["dataset.augmentation.horizontal_flip_prob=2"]).contains("within [0, 1]"));
    assert!(err("", &["train.num_epochs=0"]).contains("at least 1 epoch"));
    assert!(err("", &["train.max_minutes=-5"]).contains("train.max_minutes must be a number"));
    assert!(err(
        "",
        &[
            "model.backbone_from_scratch=true",
            "model.pretrained_backbone_path=r18.pth"
        ]
    )
    .contains("model.backbone_from_scratch is true but model.pretrained_backbone_path is set"));
}

#[test]
fn tao_only_sections_are_accepted_with_a_notice() {
    let r = load(
        "wandb:\n  enable: false\ngen_trt_engine:\n  tensorrt:\n    data_type: fp16\n",
        &[],
    )
    .unwrap();
    assert_eq!(r.notices.len(), 2);
    assert!(r.notices.iter().any(|n| n.0.contains("wandb")));
}

/// TAO's tutorial `deformable_detr/specs/export.yaml` (tao_tutorials @ a15a2cf), data paths
/// shortened: its `dataset.batch_size: -1` is a value TAO's export never reads.
const TAO_EXPORT: &str = r#"
export:
  gpu_id: 0
  input_width: 960
  input_height: 544
  opset_version: 12
  on_cpu: False
dataset:
  train_data_sources:
    - image_dir: /data/train2017/
      json_file: /data/instances_train2017.json
  val_data_sources:
    - image_dir: /data/val2017/
      json_file: /data/instances_val2017.json
  num_classes: 91
  batch_size: -1
  workers: 8
  augmentation:
    fixed_padding: False
model:
  backbone: resnet_50
  num_feature_levels: 2
  return_interm_indices: [1, 2]
  num_queries: 300
  with_box_refine: True
  aux_loss: False
"#;

#[test]
fn taos_placeholder_encryption_key_is_ignored_and_a_real_key_refused() {
    // tao_pytorch_backend's own export specs write `encryption_key: "???"` (OmegaConf's
    // mandatory placeholder).
    let r = load("encryption_key: \"???\"\n", &[]).unwrap();
    assert_eq!(r.spec.encryption_key, None);
    assert!(
        r.notices
            .iter()
            .any(|n| n.0.contains("encryption_key '???'")),
        "{:?}",
        r.notices
    );
    assert!(err("encryption_key: nvidia_tlt\n", &[]).contains("ddetr does not encrypt"));
}

#[test]
fn taos_export_spec_with_batch_size_minus_one_loads() {
    let r = load(TAO_EXPORT, &[]).unwrap();
    assert_eq!(r.spec.dataset.batch_size, 4);
    assert_eq!(r.spec.export.batch_size, -1);
    assert_eq!(r.notices.len(), 1, "{:?}", r.notices);
    assert!(
        r.notices[0].0.contains("dataset.batch_size -1"),
        "{:?}",
        r.notices
    );
    // An override of -1 means the same; other negatives are refused with the key named.
    let r = load("", &["dataset.batch_size=-1"]).unwrap();
    assert_eq!(r.spec.dataset.batch_size, 4);
    assert!(err("dataset:\n  batch_size: -2\n", &[]).contains("dataset.batch_size"));
}

#[test]
fn test_and_infer_sources_in_taos_shapes() {
    let s = load(
        "dataset:\n  test_data_sources:\n    image_dir: /d/val\n    json_file: /d/val.json\n  infer_data_sources:\n    image_dir:\n      - /d/a\n      - /d/b\n    classmap: /d/classmap.txt\n",
        &[],
    )
    .unwrap()
    .spec;
    assert_eq!(s.dataset.test_data_sources.len(), 1);
    assert_eq!(
        s.dataset.infer_data_sources.unwrap().image_dir,
        vec!["/d/a", "/d/b"]
    );
}

#[test]
fn empty_sections_keep_their_defaults() {
    let s = load("train:\nmodel:\n", &[]).unwrap().spec;
    assert_eq!(s, ExperimentSpec::default());
}

#[test]
fn model_name_dino_takes_taos_dino_defaults() {
    let s = load("model_name: dino\n", &[]).unwrap().spec;
    assert_eq!(s.architecture(), spec::Architecture::Dino);
    // TAO's DINOModelConfig where it differs from Deformable DETR's.
    assert_eq!(s.model.num_select, 300);
    assert_eq!(s.model.dim_feedforward, 2048);
    assert_eq!(s.model.dropout_ratio, 0.0);
    assert_eq!(s.model.num_queries, 300);
    assert_eq!(s.model.dn_number, 100);
    assert_eq!(s.model.dn_box_noise_scale, 1.0);
    assert_eq!(s.model.dn_label_noise_ratio, 0.5);
    assert_eq!(s.model.pe_temperature_h, 20.0);
    assert_eq!(s.model.cls_loss_coef, 2.0);
    assert_eq!(s.train.optim.lr_steps, vec![11]);
    // The same keys through an override (`ddetr dino …` prepends it).
    let o = load("", &["model_name=dino"]).unwrap().spec;
    assert_eq!(o, s);
    // A Deformable DETR spec keeps its own.
    let d = load("", &[]).unwrap().spec;
    assert_eq!(d.architecture(), spec::Architecture::DeformableDetr);
    assert_eq!((d.model.num_select, d.model.dim_feedforward), (100, 1024));
}

#[test]
fn each_architecture_refuses_the_others_model_keys() {
    let e = err("model:\n  dn_number: 50\n", &[]);
    assert!(
        e.contains("model.dn_number") && e.contains("dino key") && e.contains("model_name: dino"),
        "{e}"
    );
    let e = err("model_name: dino\nmodel:\n  with_box_refine: true\n", &[]);
    assert!(
        e.contains("model.with_box_refine") && e.contains("deformable_detr key"),
        "{e}"
    );
    // Typos in DINO keys get the nearest DINO key.
    let e = err("model_name: dino\nmodel:\n  dn_numbr: 50\n", &[]);
    assert!(e.contains("did you mean 'model.dn_number'"), "{e}");
    // spec show prints an architecture's keys only.
    let dd = load("", &[]).unwrap().spec.to_yaml();
    assert!(!dd.contains("dn_number") && dd.contains("with_box_refine"));
    let dino = load("model_name: dino\n", &[]).unwrap().spec.to_yaml();
    assert!(dino.contains("dn_number: 100") && !dino.contains("with_box_refine"));
    assert!(dino.contains("pe_temperatureH"));
    // …and what it prints loads back to the same spec.
    assert_eq!(
        load(&dino, &[]).unwrap().spec,
        load("model_name: dino\n", &[]).unwrap().spec
    );
}

#[test]
fn model_name_is_checked() {
    let e = err("model_name: dinoo\n", &[]);
    assert!(e.contains("did you mean 'dino'"), "{e}");
    // `ddetr dino train` on a spec that names another model.
    let e = err("model_name: deformable_detr\n", &["model_name=dino"]);
    assert!(
        e.starts_with("model_name is 'deformable_detr' in the spec but 'dino'"),
        "{e}"
    );
    let e = err("model_name: dino\nmodel:\n  two_stage_type: no\n", &[]);
    assert!(
        e.contains("model.two_stage_type") && e.contains("standard"),
        "{e}"
    );
    let e = err("model_name: dino\nmodel:\n  dn_label_noise_ratio: 2\n", &[]);
    assert!(e.contains("model.dn_label_noise_ratio"), "{e}");
}

#[test]
fn the_dino_configs_load() {
    for name in ["configs/dino_r50.yaml", "configs/shapes_dino_tiny.yaml"] {
        let s = spec::load(&repo_file(name), &[], None)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .spec;
        assert_eq!(s.architecture(), spec::Architecture::Dino, "{name}");
    }
}

/// TAO's tutorial `dino/specs/distill.yaml` (tao_tutorials @ a15a2cf), data paths shortened.
const TAO_DISTILL: &str = r#"
model_name: dino
train:
  num_gpus: 1
  num_nodes: 1
  validation_interval: 1
  optim:
    lr_backbone: 2e-05
    lr: 2e-4
    lr_steps: [11]
    momentum: 0.9
  num_epochs: 12
  precision: fp16
dataset:
  train_data_sources:
    - image_dir: /data/train2017/
      json_file: /data/instances_train2017.json
  val_data_sources:
    - image_dir: /data/val2017/
      json_file: /data/instances_val2017.json
  num_classes: 91
  batch_size: 2
  workers: 8
  augmentation:
    random_resize_max_size: 1344
    fixed_padding: True
model:
  backbone: resnet_50
  train_backbone: True
  num_feature_levels: 4
  dec_layers: 6
  enc_layers: 6
  num_queries: 900
  num_select: 100
  dropout_ratio: 0.0
  dim_feedforward: 2048
distill:
  teacher:
    backbone: fan_small
    train_backbone: False
    num_feature_levels: 4
    dec_layers: 6
    enc_layers: 6
    num_queries: 900
    dropout_ratio: 0.0
    dim_feedforward: 2048
  pretrained_teacher_model_path: /workspace/dino_fan_small_ep12.pth
  bindings:
  - teacher_module_name: 'model.backbone.0.body'
    student_module_name: 'model.backbone.0.body'
    criterion: L2
    weight: 1.0
"#;

#[test]
fn taos_distill_spec_loads_with_its_fan_teacher() {
    let s = load(TAO_DISTILL, &[]).unwrap().spec;
    let d = s.distill.as_ref().unwrap();
    assert_eq!(d.teacher.backbone, Backbone::FanSmall);
    // TAO's stochastic depth for a FAN (unset: the family's rate).
    assert_eq!(d.teacher.backbone_drop_path_rate, None);
    assert_eq!(Backbone::FanSmall.default_drop_path_rate(), 0.3);
    assert_eq!(s.model.backbone.default_drop_path_rate(), 0.0);
    assert_eq!(d.teacher_architecture(), spec::Architecture::Dino);
    assert_eq!(d.teacher.num_queries, 900);
    assert!(!d.teacher.train_backbone);
    // Keys the spec leaves out take TAO's DINO model defaults.
    assert_eq!(d.teacher.dn_number, 100);
    assert_eq!(d.teacher.hidden_dim, 256);
    assert_eq!(d.bindings.len(), 1);
    assert_eq!(d.bindings[0].criterion, spec::DistillCriterion::L2);
    assert_eq!(
        s.task_results_dir(spec::Task::Distill),
        std::path::Path::new("results/distill")
    );
    // What spec show prints loads back to the same spec.
    assert_eq!(load(&s.to_yaml(), &[]).unwrap().spec, s);
    // A spec without a distill section prints none and hashes as before.
    assert!(!load("model_name: dino\n", &[])
        .unwrap()
        .spec
        .to_yaml()
        .contains("\ndistill:"));
}

#[test]
fn distill_mistakes_get_one_line_each() {
    let tao = |o: &[&str]| {
        let mut v = vec!["distill.teacher.backbone=resnet_50"];
        v.extend_from_slice(o);
        err(TAO_DISTILL, &v)
    };
    let e = tao(&["distill.bindings=[{student_module_name: model.backbone.0.body, teacher_module_name: model.backbone.0.body, criterion: IOU}]"]);
    assert!(
        e.contains("unknown value 'IOU'") && e.contains("L1, L2, KL"),
        "{e}"
    );
    let e = tao(&["distill.bindings=[{student_module_name: model.transformer.encoder, teacher_module_name: model.transformer.encoder, criterion: L2}]"]);
    assert!(
        e.starts_with("distill.bindings[0].student_module_name is 'model.transformer.encoder'")
            && e.contains("model.backbone.0.body, pred_logits, pred_boxes"),
        "{e}"
    );
    // TAO's backend example: a 300-query student against a 900-query teacher.
    let e = tao(&[
        "model.num_queries=300",
        "distill.bindings=[{student_module_name: pred_logits, teacher_module_name: pred_logits, criterion: KL}]",
    ]);
    assert!(
        e.contains("num_queries is 300") && e.contains("is 900"),
        "{e}"
    );
    let e = tao(&["distill.teacher.hidden_dim=128"]);
    assert!(
        e.contains("hidden_dim is 256") && e.contains("is 128"),
        "{e}"
    );
    // The backend's spec puts the teacher's path under teacher.
    let e = tao(&["distill.teacher.pretrained_teacher_model_path=/t.pth"]);
    assert!(
        e.contains("distill.pretrained_teacher_model_path")
            && e.starts_with("distill.teacher.pretrained_teacher_model_path is a key of distill"),
        "{e}"
    );
    // The teacher's keys are checked as a model section's, named by their place.
    let e = tao(&["distill.teacher.nheads=3"]);
    assert!(e.starts_with("distill.teacher.hidden_dim"), "{e}");
    let e = tao(&["distill.teacher.dn_numbr=3"]);
    assert!(
        e.contains("did you mean 'distill.teacher.dn_number'"),
        "{e}"
    );
    // A Deformable DETR teacher has its own keys and defaults.
    let e = tao(&[
        "distill.teacher_model_name=deformable_detr",
        "distill.teacher.dn_number=50",
    ]);
    assert!(
        e.starts_with(
            "distill.teacher.dn_number is a dino key, but this teacher is deformable_detr"
        ) && e.contains("distill.teacher_model_name: dino"),
        "{e}"
    );
    let s = load(
        "model_name: dino\ndistill:\n  teacher_model_name: deformable_detr\n  pretrained_teacher_model_path: t.pth\n",
        &[],
    )
    .unwrap()
    .spec;
    let d = s.distill.unwrap();
    assert_eq!(d.teacher_architecture(), spec::Architecture::DeformableDetr);
    assert_eq!(
        (d.teacher.dim_feedforward, d.teacher.num_queries),
        (1024, 300)
    );
    let e = err(
        "model_name: dino\ndistill:\n  teacher_model_name: dinoo\n",
        &[],
    );
    assert!(e.contains("did you mean 'dino'"), "{e}");
    // Distillation trains a DINO student.
    let e = err("distill:\n  pretrained_teacher_model_path: t.pth\n", &[]);
    assert!(e.starts_with("distill is DINO's distill task"), "{e}");
}

#[test]
fn the_distill_config_loads() {
    let s = spec::load(&repo_file("configs/shapes_dino_distill.yaml"), &[], None)
        .unwrap()
        .spec;
    let d = s.distill.as_ref().unwrap();
    assert_eq!((s.model.enc_layers, s.model.dec_layers), (1, 1));
    assert_eq!((d.teacher.enc_layers, d.teacher.dec_layers), (2, 2));
    // The teacher is shapes_dino_tiny.yaml's model.
    let tiny = spec::load(&repo_file("configs/shapes_dino_tiny.yaml"), &[], None)
        .unwrap()
        .spec;
    assert_eq!(d.teacher, tiny.model);
}

#[test]
fn grad_accum_steps_is_checked() {
    assert_eq!(load("", &[]).unwrap().spec.train.grad_accum_steps, 1);
    assert_eq!(
        load("train:\n  grad_accum_steps: 4\n", &[])
            .unwrap()
            .spec
            .train
            .grad_accum_steps,
        4
    );
    let e = err("", &["train.grad_accum_steps=0"]);
    assert!(e.starts_with("train.grad_accum_steps is 0"), "{e}");
}
