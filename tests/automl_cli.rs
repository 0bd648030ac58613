//! `ddetr automl` end to end on the tiny synthetic set: a search killed with SIGKILL in the middle
//! of a trial and started again with the same command finishes with every trial run once (the
//! interrupted one resumed from the checkpoint its SIGTERM wrote), `results.csv`,
//! `best_spec.yaml` (a spec `ddetr spec validate` accepts) and `search.png`; `automl_policy: on`
//! routes `ddetr train` through the search; a bad search space is one line, exit 2.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    assert_one_error_line, ddetr_bin, ddetr_in, output, text, tiny_spec, tiny_workdir, Proc,
    TINY_64,
};

fn search_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "automl".into(),
        "-e".into(),
        tiny_spec().display().to_string(),
        "-r".into(),
        "results".into(),
        "--algorithm".into(),
        "random".into(),
        "--trials".into(),
        "3".into(),
        "--max-concurrent".into(),
        "1".into(),
    ];
    v.extend(TINY_64.iter().map(|s| s.to_string()));
    v.extend(
        [
            "train.num_epochs=2",
            "automl.automl_hyperparameters=[train.optim.lr]",
            "dataset.train_data_sources=[{image_dir: data/train/images, json_file: data/train/annotations.json}]",
            "dataset.val_data_sources=[{image_dir: data/val/images, json_file: data/val/annotations.json}]",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn wait_for(path: &Path, needle: &str, limit: Duration) {
    let t = Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
        assert!(
            t.elapsed() < limit,
            "{} never held {needle:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[test]
fn a_killed_search_resumes_with_nothing_run_twice() {
    let work = tiny_workdir();
    let args = search_args(&[]);
    let automl = work.path().join("results/automl");
    let mut first = Proc::start(work.path(), &ddetr_bin(), &args, &[]);
    // Kill the controller once trial_001 has validated its first epoch (its second is running).
    wait_for(
        &automl.join("trial_001/train/status.json"),
        "\"epoch\":0",
        Duration::from_secs(240),
    );
    first.signal("-KILL");
    first.wait(Duration::from_secs(10));
    let mut second = Proc::start(work.path(), &ddetr_bin(), &args, &[]);
    let status = second.wait(Duration::from_secs(300));
    let err = second.stderr();
    assert!(status.success(), "{err}");
    assert!(err.contains("automl: resuming the search"), "{err}");
    let csv = std::fs::read_to_string(automl.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows.iter().all(|r| r.contains(",done,")), "{csv}");
    // trial_000 finished before the kill and was not run again; trial_001 resumed.
    assert_eq!(
        count(
            &automl.join("trial_000/train/status.json"),
            "Starting Training Loop"
        ),
        1
    );
    assert!(count(&automl.join("trial_001/log.txt"), "resuming") >= 1);
    assert_eq!(
        count(
            &automl.join("trial_002/train/status.json"),
            "Starting Training Loop"
        ),
        1
    );
    assert!(automl.join("search.png").is_file());
    let best = automl.join("best_spec.yaml");
    let out =
        output(ddetr_in(work.path()).args(["spec", "validate", "-e", best.to_str().unwrap()]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let best_text = std::fs::read_to_string(&best).unwrap();
    assert!(best_text.contains("automl_policy: off"), "{best_text}");
}

#[test]
fn automl_policy_on_makes_train_search_and_bad_spaces_are_one_line() {
    let work = tiny_workdir();
    let mut args = search_args(&[
        "automl_policy=on",
        "train.num_epochs=1",
        "automl.automl_max_recommendations=1",
    ]);
    args[0] = "train".into();
    // `train` takes no --algorithm/--trials flags: drop them (the section's defaults apply).
    let args: Vec<String> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| !(5..=10).contains(i))
        .map(|(_, a)| a.clone())
        .collect();
    let out = output(ddetr_in(work.path()).args(&args));
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("automl_policy is on"), "{err}");
    assert!(work
        .path()
        .join("results/automl/trial_000/train/status.json")
        .is_file());

    for (extra, want) in [
        ("automl.automl_hyperparameters=[train.optim.lrr]", "did you mean train.optim.lr"),
        (
            "automl.automl_range_override=[{parameter: train.optim.lr, valid_min: 0.1, valid_max: 0.01}]",
            "swap them",
        ),
        ("automl.automl_nu=1", "automl.automl_nu"),
        ("automl.nodes_per_trial=2", "automl.launch_prefix is empty"),
    ] {
        let out = output(ddetr_in(work.path()).args(search_args(&[extra])));
        assert_one_error_line(out.status, &text(&out.stderr), 2, want);
    }
}

#[test]
fn trials_run_under_the_launch_prefix_with_the_launcher_flags() {
    let work = tiny_workdir();
    // A stand-in for `srun …`: logs its arguments, drops its own flag and runs the rest.
    let prefix = work.path().join("prefix.sh");
    std::fs::write(
        &prefix,
        "#!/bin/sh\necho \"$@\" >> prefix.log\nshift\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&prefix, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = output(ddetr_in(work.path()).args(search_args(&[
        "train.num_epochs=1",
        "automl.automl_max_recommendations=1",
        &format!(
            "automl.launch_prefix=[{}, --fake-srun-flag]",
            prefix.display()
        ),
        "automl.nproc_per_trial=2",
    ])));
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let log = std::fs::read_to_string(work.path().join("prefix.log")).unwrap();
    assert!(
        log.starts_with("--fake-srun-flag ")
            && log.contains("ddetr-launch --nodes 1 --nproc-per-node 2 -- train -e"),
        "{log}"
    );
    let trial = work.path().join("results/automl/trial_000");
    assert!(
        trial.join("train/status.json").is_file(),
        "{}",
        std::fs::read_to_string(trial.join("log.txt")).unwrap_or_default()
    );
}

#[test]
fn max_concurrent_two_runs_two_trials_at_once() {
    let work = tiny_workdir();
    let mut args = search_args(&["train.num_epochs=1"]);
    // --trials 2 --max-concurrent 2 (the values search_args puts at 8 and 10).
    args[8] = "2".into();
    args[10] = "2".into();
    let out = output(ddetr_in(work.path()).args(&args));
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("2 running"),
        "never two trials at once:\n{err}"
    );
    let csv = std::fs::read_to_string(work.path().join("results/automl/results.csv")).unwrap();
    assert_eq!(csv.matches(",done,").count(), 2, "{csv}");
}
