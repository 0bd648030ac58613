//! End-to-end checks of `ddetr train` / `ddetr evaluate` on a tiny synthetic set (64×64 images,
//! a dozen of them, a few steps per epoch): outputs and mAP, world-2 DDP against world-1 with the
//! doubled batch, SIGTERM → checkpoint → resume, SIGINT → 130, a corrupt latest checkpoint, and
//! the bad-input lines. Every child is stopped by a Drop guard, even when a test fails.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{
    assert_one_error_line, ddetr_bin, launch_bin, one_node_launch as launch_args, serial, signal,
    tiny_task, tiny_workdir as workdir, Proc, TINY_64, TINY_TRAIN,
};
use ddetr_trainer::checkpoint;

/// Upper bound for one training run here.
const PATIENCE: Duration = Duration::from_secs(400);

/// Evaluation on the tiny val set.
const TEST: &[&str] = &[
    "dataset.test_data_sources={image_dir: data/val/images, json_file: data/val/annotations.json}",
];

/// `<task> -e spec -r <results>`, the tiny spec's overrides, then `extra`.
fn args(task: &str, results: &str, extra: &[&str]) -> Vec<String> {
    tiny_task(task, results, &[TINY_64, TINY_TRAIN, TEST, extra])
}

/// Runs `ddetr <args>` to the end; returns (status, stderr).
fn ddetr(dir: &Path, a: &[String], env: &[(&str, &str)]) -> (ExitStatus, String) {
    common::run(dir, &ddetr_bin(), a, env, PATIENCE)
}

fn ok(dir: &Path, a: &[String]) -> String {
    let (st, err) = ddetr(dir, a, &[]);
    assert!(st.success(), "ddetr {a:?} failed ({st}):\n{err}");
    err
}

/// The per-epoch KPI records of a status.json.
fn kpis(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("kpi").cloned())
        .collect()
}

fn model_tensors(path: &Path) -> BTreeMap<String, tch::Tensor> {
    checkpoint::load(path)
        .unwrap()
        .tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("optim."))
        .collect()
}

fn max_diff(a: &BTreeMap<String, tch::Tensor>, b: &BTreeMap<String, tch::Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, t)| {
            (t.to_kind(tch::Kind::Double) - b[k].to_kind(tch::Kind::Double))
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_match_one_rank_with_the_doubled_batch_and_write_every_output() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    // World 1, batch 4.
    ok(d, &args("train", "w1", &["dataset.batch_size=4"]));
    // World 2 under the launcher, batch 2 per rank: the same 4 images per step.
    let mut a = launch_args(2);
    a.extend(args("train", "w2", &[]));
    let mut p = Proc::start(d, &launch_bin(), &a, &[]);
    let st = p.wait(PATIENCE);
    assert!(st.success(), "ddetr-launch failed ({st}):\n{}", p.stderr());

    for w in ["w1", "w2"] {
        let t = d.join(w).join("train");
        for f in [
            "dd_model_latest.safetensors",
            "model_epoch_000.safetensors",
            "model_epoch_001.safetensors",
            "experiment.yaml",
        ] {
            assert!(t.join(f).is_file(), "{w}: {f} missing");
        }
        let k = kpis(&t.join("status.json"));
        assert_eq!(k.len(), 2, "{w}: one KPI record per epoch");
        for (e, r) in k.iter().enumerate() {
            assert_eq!(r["epoch"], e);
            let m = r["val_mAP50"].as_f64().expect("val_mAP50 in every epoch");
            assert!((0.0..=1.0).contains(&m));
            assert!(r["train_loss"].as_f64().unwrap().is_finite());
        }
    }
    let (k1, k2) = (
        kpis(&d.join("w1/train/status.json")),
        kpis(&d.join("w2/train/status.json")),
    );
    for e in 0..2 {
        let (a, b) = (
            k1[e]["train_loss"].as_f64().unwrap(),
            k2[e]["train_loss"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "epoch {e}: world 1 loss {a}, world 2 {b}"
        );
    }
    let diff = max_diff(
        &model_tensors(&d.join("w1/train/dd_model_latest.safetensors")),
        &model_tensors(&d.join("w2/train/dd_model_latest.safetensors")),
    );
    // AdamW normalises each update, so a gradient that is ~0 on one side can move a weight by up to
    // lr (2e-4) per step there: allow a few lr steps.
    assert!(diff < 1e-3, "world-1 and world-2 weights differ by {diff}");

    // The same world under fsdp (ZeRO-2: sharded gradients and optimizer state): the same weights
    // and, gathered into the checkpoint under the same names, the same optimizer state as ddp.
    let mut a = launch_args(2);
    a.extend(args("train", "w2f", &["train.distributed_strategy=fsdp"]));
    let mut p = Proc::start(d, &launch_bin(), &a, &[]);
    let st = p.wait(PATIENCE);
    assert!(st.success(), "fsdp run failed ({st}):\n{}", p.stderr());
    assert!(
        p.stderr()
            .contains("fsdp (ZeRO-2): this rank holds the optimizer state of"),
        "{}",
        p.stderr()
    );
    let all = |w: &str| {
        checkpoint::load(&d.join(w).join("train/dd_model_latest.safetensors"))
            .unwrap()
            .tensors
    };
    let (ddp, fsdp) = (all("w2"), all("w2f"));
    assert!(fsdp.keys().any(|k| k.ends_with(".exp_avg_sq")));
    let diff = max_diff(&ddp, &fsdp);
    assert!(diff < 1e-6, "fsdp and ddp checkpoints differ by {diff}");

    // Evaluate the world-2 checkpoint: 12 COCO lines on stdout, metrics and detections written.
    let (st, err) = ddetr(
        d,
        &args(
            "evaluate",
            "w2",
            &["evaluate.checkpoint=w2/train/dd_model_latest.safetensors"],
        ),
        &[],
    );
    assert!(st.success(), "{err}");
    let out = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".out"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .find(|s| s.contains("Average Precision"))
        .expect("evaluate prints the summary");
    assert_eq!(out.lines().filter(|l| l.contains("Average")).count(), 12);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("w2/evaluate/metrics.json")).unwrap())
            .unwrap();
    assert!(m["AP50"].as_f64().is_some());
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("w2/evaluate/results.json")).unwrap())
            .unwrap();
    assert!(r.as_array().unwrap()[0]["bbox"].as_array().unwrap().len() == 4);
}

/// Starts `ddetr train` with `a` and returns once its first step is logged (a 3-epoch run).
fn start_until_first_step(d: &Path, a: &[String]) -> Proc {
    let mut p = Proc::start(d, &ddetr_bin(), a, &[]);
    let t = Instant::now();
    while !p.stderr().contains("epoch 1/3 step 1/6") {
        assert!(t.elapsed() < PATIENCE, "no first step:\n{}", p.stderr());
        assert!(p.running(), "{}", p.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

#[test]
fn sigint_stops_at_a_step_with_a_checkpoint_and_exits_130() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    let a = args(
        "train",
        "int",
        &["train.num_epochs=3", "train.validation_interval=10"],
    );
    let mut p = start_until_first_step(d, &a);
    p.signal("-INT");
    let st = p.wait(PATIENCE);
    // 128 + SIGINT (2): Ctrl-C is told apart from a scheduler's SIGTERM (143).
    assert_eq!(st.code(), Some(130), "{}", p.stderr());
    assert!(p.stderr().contains("stopped by a signal"), "{}", p.stderr());
    let meta = checkpoint::load(&d.join("int/train/dd_model_latest.safetensors"))
        .unwrap()
        .meta;
    assert!(meta.epoch < 3, "checkpoint at {meta:?}");
}

#[test]
fn sigterm_writes_a_mid_epoch_checkpoint_and_the_rerun_ends_where_an_uninterrupted_run_does() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    // Dropout on: its masks must be redrawn identically after the resume. The weights' moving
    // average (train.ema) too: it is in the checkpoints the two runs are compared by.
    let extra = [
        "train.num_epochs=3",
        "train.validation_interval=10",
        "model.dropout_ratio=0.1",
        "train.ema.enable=true",
        "train.ema.decay=0.9",
        "train.ema.warmups=0",
    ];
    ok(d, &args("train", "ref", &extra));

    let a = args("train", "cut", &extra);
    let mut p = start_until_first_step(d, &a);
    p.signal("-TERM");
    let st = p.wait(PATIENCE);
    assert_eq!(st.code(), Some(143), "{}", p.stderr());
    let meta = checkpoint::load(&d.join("cut/train/dd_model_latest.safetensors"))
        .unwrap()
        .meta;
    assert!(
        meta.epoch < 3 && (meta.step > 0 || meta.epoch > 0),
        "checkpoint at {meta:?}"
    );
    let status = std::fs::read_to_string(d.join("cut/train/status.json")).unwrap();
    assert!(status.contains("Stopped by a signal"), "{status}");

    let err = ok(d, &a);
    assert_resumed_like_ref(d, &err);
}

#[test]
fn kill_9_of_a_trainer_under_the_launcher_restarts_and_ends_where_an_uninterrupted_run_does() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    let extra = ["train.num_epochs=3", "train.validation_interval=10"];
    let mut a = launch_args(2);
    a.extend(args("train", "ref", &extra));
    let mut p = Proc::start(d, &launch_bin(), &a, &[]);
    let st = p.wait(PATIENCE);
    assert!(st.success(), "reference run failed ({st}):\n{}", p.stderr());

    let mut a = vec!["--max-restarts".to_string(), "1".into()];
    a.extend(launch_args(2));
    a.extend(args("train", "cut", &extra));
    let mut p = Proc::start(d, &launch_bin(), &a, &[]);
    let t = Instant::now();
    // Mid-epoch 2 (3 steps per epoch): the latest checkpoint is the end of epoch 1.
    while !p.stderr().contains("epoch 2/3 step 1/3") {
        assert!(
            t.elapsed() < PATIENCE,
            "no step of epoch 2:\n{}",
            p.stderr()
        );
        assert!(p.running(), "{}", p.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let children = std::process::Command::new("pgrep")
        .args(["-P", &p.id().to_string()])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&children.stdout).to_string();
    let victim = pids.split_whitespace().next().expect("trainer pids");
    signal("-KILL", victim.parse().unwrap());
    let st = p.wait(PATIENCE);
    let err = p.stderr();
    assert!(st.success(), "run with a restart failed ({st}):\n{err}");
    assert!(err.contains("was killed by signal 9 (SIGKILL)"), "{err}");
    assert!(err.contains("(restart 1 of 1)"), "{err}");
    assert_resumed_like_ref(d, &err);
}

/// The `cut` run (stderr `err`) resumed from a checkpoint and ended with the uninterrupted `ref`
/// run's weights.
fn assert_resumed_like_ref(d: &Path, err: &str) {
    assert!(err.contains("resuming"), "{err}");
    let diff = max_diff(
        &model_tensors(&d.join("ref/train/dd_model_latest.safetensors")),
        &model_tensors(&d.join("cut/train/dd_model_latest.safetensors")),
    );
    assert!(
        diff < 1e-6,
        "resumed run ends {diff} away from the uninterrupted one"
    );
}

#[test]
fn a_flipped_byte_in_the_latest_checkpoint_falls_back_to_the_previous_one() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    ok(d, &args("train", "r", &["train.validation_interval=10"]));
    let latest = d.join("r/train/dd_model_latest.safetensors");
    let mut bytes = std::fs::read(&latest).unwrap();
    let i = bytes.len() - 100;
    bytes[i] ^= 0x01;
    std::fs::write(&latest, bytes).unwrap();
    let err = ok(
        d,
        &args(
            "train",
            "r",
            &["train.num_epochs=3", "train.validation_interval=10"],
        ),
    );
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(
        err.contains("resuming path=r/train/model_epoch_001.safetensors epoch=2 step=0"),
        "{err}"
    );
    assert_eq!(checkpoint::load(&latest).unwrap().meta.epoch, 3);
}

/// Exactly one `error:` line, containing `want`; exit code `code`.
fn fails_with(d: &Path, a: &[String], env: &[(&str, &str)], code: i32, want: &str) {
    let (st, err) = ddetr(d, a, env);
    assert_one_error_line(st, &err, code, want);
}

#[test]
fn each_bad_input_is_one_line_before_the_first_step() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    ok(
        d,
        &args(
            "train",
            "good",
            &["train.num_epochs=1", "train.validation_interval=10"],
        ),
    );
    fails_with(
        d,
        &args("train", "x1", &["dataset.num_classes=2"]),
        &[],
        2,
        "dataset.num_classes is 2 but annotations use category_id 3: set dataset.num_classes to at least 4",
    );
    fails_with(
        d,
        &args("train", "x2", &["dataset.batch_size=13"]),
        &[],
        2,
        "the training set has 12 images but the global batch is 13",
    );
    std::fs::write(d.join("afile"), b"").unwrap();
    fails_with(
        d,
        &args("train", "afile/sub", &[]),
        &[],
        2,
        "results_dir afile/sub/train is not writable",
    );
    fails_with(
        d,
        &args(
            "train",
            "x3",
            &[
                "model.num_queries=30",
                "model.num_select=30",
                "train.resume_training_checkpoint_path=good/train/dd_model_latest.safetensors",
            ],
        ),
        &[],
        2,
        "tensor query_embed.weight has shape [50, 256] but the model expects [30, 256]",
    );
    fails_with(
        d,
        &args("train", "x4", &["train.precision=fp16"]),
        &[],
        2,
        "needs a CUDA GPU",
    );
    if !ddetr_trainer::cuda_runtime::cuda_available() {
        fails_with(
            d,
            &args("train", "x5", &[]),
            &[("DDETR_DEVICE", "cuda")],
            2,
            "DDETR_DEVICE=cuda but no CUDA GPU is visible",
        );
    }
    for x in ["x1", "x2", "x3", "x4", "x5"] {
        assert!(
            !d.join(x).join("train/dd_model_latest.safetensors").exists(),
            "{x} trained"
        );
    }
}

#[test]
fn a_time_budget_fits_the_epochs_to_the_throughput_and_ends_validated_inside_it() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    let budget_s = 24.0;
    let t = Instant::now();
    let err = ok(
        d,
        &args(
            "train",
            "budget",
            &["train.max_minutes=0.4", "train.num_epochs=1"],
        ),
    );
    let wall = t.elapsed().as_secs_f64();
    // The budget runs from the start of training; loading libtorch, the caches and the model
    // come before it.
    assert!(
        wall < budget_s + 15.0,
        "a {budget_s} s budget took {wall:.1} s end to end:\n{err}"
    );
    assert!(
        err.contains("train.max_minutes 0.4: ") && err.contains(" epochs, lr steps "),
        "the fitted schedule is logged:\n{err}"
    );
    let status = d.join("budget/train/status.json");
    let k = kpis(&status);
    assert!(
        k.len() > 1,
        "more than train.num_epochs=1 epoch fits in {budget_s} s of 6 tiny steps each: {k:?}"
    );
    let last = k.last().unwrap();
    assert!(last.get("val_mAP").is_some(), "the last epoch is validated");
    assert_eq!(
        last["epoch"].as_u64().unwrap() + 1,
        last["max_epoch"].as_u64().unwrap(),
        "the run ends at its fitted length"
    );
    assert!(std::fs::read_to_string(&status)
        .unwrap()
        .contains("Train finished successfully."));
    let meta = checkpoint::load(&d.join("budget/train/dd_model_latest.safetensors"))
        .unwrap()
        .meta;
    assert_eq!(u64::from(meta.epoch), last["max_epoch"].as_u64().unwrap());
}

#[test]
fn with_ema_validation_and_evaluate_score_the_average() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    // A fast average (decay 0.5, no warm-up) sits far from the last weights after a few steps.
    let ema = [
        "train.ema.enable=true",
        "train.ema.decay=0.5",
        "train.ema.warmups=0",
    ];
    ok(d, &args("train", "ema", &ema));
    let ck = checkpoint::load(&d.join("ema/train/dd_model_latest.safetensors")).unwrap();
    assert_eq!(
        ck.tensors["ema_updates"].int64_value(&[0]) as u64,
        ck.meta.global_step
    );
    let (w, a) = (
        &ck.tensors["class_embed.0.weight"],
        &ck.tensors["ema.class_embed.0.weight"],
    );
    assert!(!w.equal(a), "the average equals the weights");
    let last_val = kpis(&d.join("ema/train/status.json"))
        .iter()
        .rev()
        .find_map(|k| k["val_mAP"].as_f64())
        .unwrap();
    let err = ok(
        d,
        &args(
            "evaluate",
            "ema",
            &["evaluate.checkpoint=ema/train/dd_model_latest.safetensors"],
        ),
    );
    assert!(
        err.contains("moving average of the weights (train.ema) is loaded"),
        "{err}"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("ema/evaluate/metrics.json")).unwrap())
            .unwrap();
    // Validation ran on the average, and evaluate loaded it: the same mAP.
    assert!(
        (m["AP"].as_f64().unwrap() - last_val).abs() < 1e-9,
        "evaluate {m} vs last validation {last_val}"
    );
    let bad = args("train", "bad", &["train.ema.decay=1.0"]);
    fails_with(d, &bad, &[], 2, "train.ema.decay is 1");
}

#[test]
fn step_checkpoints_resume_like_the_uninterrupted_run_and_early_stopping_ends_it() {
    let _serial = serial();
    let dir = workdir();
    let d = dir.path();
    // 12 images at batch 2: 6 steps an epoch; a checkpoint every 4 optimizer steps.
    let by_step = [
        "train.checkpoint_interval_unit=step",
        "train.checkpoint_interval=4",
        "train.validation_interval=10",
    ];
    ok(d, &args("train", "ref", &by_step));
    let ref_dir = d.join("ref/train");
    for n in [4, 8, 12] {
        assert!(
            ref_dir
                .join(format!("model_step_{n:06}.safetensors"))
                .is_file(),
            "no step {n} checkpoint"
        );
    }
    assert!(!ref_dir.join("model_epoch_000.safetensors").exists());
    let meta = checkpoint::load(&ref_dir.join("model_step_000004.safetensors"))
        .unwrap()
        .meta;
    assert_eq!((meta.epoch, meta.step, meta.global_step), (0, 4, 4));
    // Resumed from the mid-epoch step checkpoint, the run ends where the uninterrupted one did.
    let resume = format!(
        "train.resume_training_checkpoint_path={}",
        ref_dir.join("model_step_000004.safetensors").display()
    );
    let err = ok(
        d,
        &args("train", "cut", &[&by_step[..], &[resume.as_str()]].concat()),
    );
    assert_resumed_like_ref(d, &err);

    // Early stopping: no gain can beat min_delta 10, so the second observation stops the run.
    for monitor in ["train_loss", "val_mAP50"] {
        let results = format!("stop_{monitor}");
        let m = format!("train.early_stopping.monitor={monitor}");
        ok(
            d,
            &args(
                "train",
                &results,
                &[
                    "train.num_epochs=5",
                    "train.early_stopping.enable=true",
                    "train.early_stopping.patience=1",
                    "train.early_stopping.min_delta=10",
                    &m,
                ],
            ),
        );
        let status = d.join(&results).join("train/status.json");
        let epochs: Vec<u64> = kpis(&status)
            .iter()
            .filter_map(|k| k["epoch"].as_u64())
            .collect();
        assert_eq!(epochs.last(), Some(&1), "{monitor}: epochs {epochs:?}");
        let text = std::fs::read_to_string(&status).unwrap();
        assert!(
            text.contains(&format!(
                "Early stopping after epoch 2: {monitor} did not improve"
            )),
            "{text}"
        );
    }
    let bad = args(
        "train",
        "bad",
        &[
            "train.early_stopping.enable=true",
            "train.early_stopping.patience=0",
        ],
    );
    fails_with(d, &bad, &[], 2, "train.early_stopping.patience is 0");
}
