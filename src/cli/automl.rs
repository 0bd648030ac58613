//! `ddetr automl -e spec.yaml [--algorithm …] [--trials N] [--max-concurrent K] [--metric …]
//! [--budget-minutes M] [key=value …]`: the search of the spec's `automl` section
//! (`ddetr_automl` decides, this drives). Each trial is an ordinary `ddetr train` under
//! `ddetr-launch` in `<results>/automl/trial_NNN/`, its overrides the trial's parameters, its
//! epochs what the algorithm gives it (a promoted Hyperband trial resumes from its checkpoint);
//! `K` run at once, each pinned to its share of the cores.
//!
//! `state.json` (the controller, written atomically after every event) makes the search
//! resumable: after a kill -9 the same command waits for the trials it had started (they got
//! SIGTERM when it died, and write their checkpoints), runs them again from those checkpoints,
//! and goes on; nothing is run twice. `results.csv`, `best_spec.yaml` and `search.png` are
//! rewritten after every trial.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use ddetr_automl::{Action, Algorithm, Controller, Direction, Event, Settings, TrialState};
use ddetr_trainer::spec::{AutomlAlgorithm, AutomlMetric, ExperimentSpec, Task};
use serde::{Deserialize, Serialize};

use super::SpecArgs;
use crate::exit::UsageError;

#[derive(Debug, Args)]
pub struct AutomlArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// automl.automl_algorithm.
    #[arg(long, value_parser = ["bayesian", "hyperband", "random"])]
    pub algorithm: Option<String>,
    /// automl.automl_max_recommendations: trials in all.
    #[arg(long)]
    pub trials: Option<u32>,
    /// automl.automl_max_concurrent: trials at once.
    #[arg(long)]
    pub max_concurrent: Option<u32>,
    /// automl.metric.
    #[arg(long, value_parser = ["val_mAP50", "val_mAP", "train_loss"])]
    pub metric: Option<String>,
    /// automl.budget_minutes: wall-clock minutes for the whole search (0: none).
    #[arg(long)]
    pub budget_minutes: Option<f64>,
}

/// What `state.json` holds: the search it belongs to and the controller.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    /// The spec file and overrides the search was started with.
    identity: Vec<String>,
    controller: Controller,
    /// Per trial: status.json lines already read, and the pid of its running launcher.
    seen: BTreeMap<usize, usize>,
    pids: BTreeMap<usize, u32>,
    /// Minutes the search has run, over all its invocations.
    minutes: f64,
}

/// A trial's process.
struct Running {
    child: Child,
    started: Instant,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

fn trial_dir(dir: &Path, id: usize) -> PathBuf {
    dir.join(format!("trial_{id:03}"))
}

fn settings(spec: &ExperimentSpec) -> Settings {
    let a = &spec.automl;
    Settings {
        algorithm: match a.automl_algorithm {
            AutomlAlgorithm::Bayesian => Algorithm::Bayesian,
            AutomlAlgorithm::Hyperband => Algorithm::Hyperband,
            AutomlAlgorithm::Random => Algorithm::Random,
        },
        max_trials: a.automl_max_recommendations as usize,
        max_concurrent: a.automl_max_concurrent as usize,
        epochs: if a.automl_r > 0 {
            a.automl_r
        } else {
            spec.train.num_epochs
        },
        nu: a.automl_nu,
        direction: match a.metric {
            AutomlMetric::TrainLoss => Direction::Minimize,
            _ => Direction::Maximize,
        },
        seed: a.seed,
    }
}

/// The task arguments with the flags turned into `automl.*` overrides.
fn spec_args(args: &AutomlArgs) -> SpecArgs {
    let mut overrides = args.spec.overrides.clone();
    let mut set = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            overrides.push(format!("automl.{k}={v}"));
        }
    };
    set("automl_algorithm", args.algorithm.clone());
    set(
        "automl_max_recommendations",
        args.trials.map(|v| v.to_string()),
    );
    set(
        "automl_max_concurrent",
        args.max_concurrent.map(|v| v.to_string()),
    );
    set("metric", args.metric.clone());
    set("budget_minutes", args.budget_minutes.map(|v| v.to_string()));
    SpecArgs {
        spec: args.spec.spec.clone(),
        results_dir: args.spec.results_dir.clone(),
        overrides,
    }
}

pub(super) fn run(args: &AutomlArgs) -> anyhow::Result<()> {
    search(&spec_args(args))
}

/// The search of `args`'s spec (also `ddetr train` with `automl_policy: on`).
pub(super) fn search(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = super::spec::resolve(args)?.spec;
    let space = ddetr_trainer::automl_space::space(&spec).map_err(UsageError)?;
    let dir = spec.task_results_dir(Task::Automl);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut identity = vec![args.spec.display().to_string()];
    identity.extend(args.overrides.iter().cloned());
    identity.extend(args.results_dir.iter().map(|r| format!("-r {r}")));
    let state_file = dir.join("state.json");
    let mut state = if state_file.is_file() {
        let s: State = serde_json::from_slice(&std::fs::read(&state_file)?)
            .with_context(|| format!("reading {}", state_file.display()))?;
        if s.controller.settings != settings(&spec) || s.controller.space != space {
            return Err(UsageError(format!(
                "{} belongs to another search (other automl settings or search space): remove it to start afresh, or set automl.results_dir",
                state_file.display()
            ))
            .into());
        }
        eprintln!(
            "automl: resuming the search in {} ({} trials so far)",
            dir.display(),
            s.controller.trials.len()
        );
        s
    } else {
        State {
            identity,
            controller: Controller::new(settings(&spec), space),
            seen: BTreeMap::new(),
            pids: BTreeMap::new(),
            minutes: 0.0,
        }
    };
    let save = |state: &State| -> anyhow::Result<()> {
        write_atomic(&state_file, &serde_json::to_vec_pretty(state)?)
    };
    let launch = std::env::current_exe()?.with_file_name("ddetr-launch");
    let allowed = allowed_cpus();
    let slots = spec.automl.automl_max_concurrent as usize;
    let per_trial = (allowed.len() / slots).max(1);
    let cpus = |slot: usize| slot_cpus(&allowed, slot, per_trial);
    let mut running: BTreeMap<usize, (Running, usize)> = BTreeMap::new();
    let budget = spec.automl.budget_minutes;
    let spent_before = budget > 0.0 && state.minutes >= budget;
    // Trials a killed search had started: wait for their old launchers, then run them again
    // (or, with the budget spent, record them as stopped: their checkpoints are there).
    let interrupted = state.controller.interrupted();
    for (slot, a) in interrupted.into_iter().enumerate() {
        let Action::Run { trial, .. } = a;
        if let Some(pid) = state.pids.remove(&trial) {
            wait_gone(pid);
        }
        if spent_before {
            state.controller.handle(Event::Stopped {
                trial,
                minutes: 0.0,
            });
            continue;
        }
        let point = state.controller.trials[trial].params.clone();
        let r = start(&launch, args, &spec, &dir, &a, &point, cpus(slot % slots))?;
        state.pids.insert(trial, r.child.id());
        running.insert(trial, (r, slot % slots));
    }
    save(&state)?;
    let t0 = Instant::now();
    let minutes_before = state.minutes;
    let mut last_line = String::new();
    loop {
        let spent = minutes_before + t0.elapsed().as_secs_f64() / 60.0;
        let out_of_budget = budget > 0.0 && spent >= budget;
        // Start what the controller asks for, on free slots.
        let actions = if out_of_budget {
            Vec::new()
        } else {
            state.controller.schedule()
        };
        for a in actions {
            let Action::Run { trial, .. } = a;
            let used: Vec<usize> = running.values().map(|(_, s)| *s).collect();
            let slot = (0..slots).find(|s| !used.contains(s)).unwrap_or(0);
            let point = state.controller.trials[trial].params.clone();
            let r = start(&launch, args, &spec, &dir, &a, &point, cpus(slot))?;
            state.pids.insert(trial, r.child.id());
            running.insert(trial, (r, slot));
            save(&state)?;
        }
        // Metrics and exits.
        let ids: Vec<usize> = running.keys().copied().collect();
        for id in ids {
            read_metrics(&mut state, &dir, id, spec.automl.metric);
            let (r, _) = running.get_mut(&id).expect("running");
            if let Some(status) = r.child.try_wait()? {
                read_metrics(&mut state, &dir, id, spec.automl.metric);
                let minutes = r.started.elapsed().as_secs_f64() / 60.0;
                let error = (!status.success()).then(|| last_error(&trial_dir(&dir, id)));
                state.controller.handle(Event::Exited {
                    trial: id,
                    error,
                    minutes,
                });
                state.pids.remove(&id);
                running.remove(&id);
                state.minutes = minutes_before + t0.elapsed().as_secs_f64() / 60.0;
                save(&state)?;
                write_reports(&state, &spec, args, &dir)?;
            }
        }
        let line = progress(&state.controller, spec.automl.metric);
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if out_of_budget {
            eprintln!("automl: budget of {budget} minutes spent: stopping the running trials (their checkpoints are written)");
            for (id, (mut r, _)) in std::mem::take(&mut running) {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
                let _ = r.child.wait();
                read_metrics(&mut state, &dir, id, spec.automl.metric);
                state.controller.handle(Event::Stopped {
                    trial: id,
                    minutes: r.started.elapsed().as_secs_f64() / 60.0,
                });
                state.pids.remove(&id);
            }
            state.minutes = spent;
            save(&state)?;
            break;
        }
        if running.is_empty() && state.controller.finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    write_reports(&state, &spec, args, &dir)?;
    if spec.automl.automl_delete_intermediate_ckpt && state.controller.finished() {
        delete_other_checkpoints(&state.controller, &dir)?;
    }
    let c = &state.controller;
    match c.best() {
        Some(b) => eprintln!(
            "automl: done — best {} {:.4} (trial_{:03}, {}); results.csv and best_spec.yaml in {}",
            spec.automl.metric.key(),
            b.metric().unwrap_or(f64::NAN),
            b.id,
            params_text(&b.params),
            dir.display()
        ),
        None => eprintln!(
            "automl: done — no trial reported {}",
            spec.automl.metric.key()
        ),
    }
    Ok(())
}

/// `automl_delete_intermediate_ckpt`: the checkpoints of every trial but the best are removed
/// once the search is over (their status.json, logs and plots stay).
fn delete_other_checkpoints(c: &Controller, dir: &Path) -> anyhow::Result<()> {
    let best = c.best().map(|b| b.id);
    let mut freed = 0u64;
    for t in c.trials.iter().filter(|t| Some(t.id) != best) {
        let train = trial_dir(dir, t.id).join("train");
        let Ok(entries) = std::fs::read_dir(&train) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                freed += e.metadata().map_or(0, |m| m.len());
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    eprintln!(
        "automl: automl_delete_intermediate_ckpt: removed the other trials' checkpoints ({:.1} MB)",
        freed as f64 / 1e6
    );
    Ok(())
}

/// Waits (up to two minutes, then SIGKILL) for a launcher a killed search left behind.
fn wait_gone(pid: u32) {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let is_launcher = || {
        std::fs::read(proc_dir.join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("ddetr-launch"))
            .unwrap_or(false)
    };
    let t = Instant::now();
    while is_launcher() {
        if t.elapsed() > Duration::from_secs(120) {
            // SAFETY: kill(2) on a pid whose cmdline is our launcher.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts (or resumes) a trial: `ddetr-launch -- train -e SPEC <overrides> <trial overrides>
/// train.num_epochs=E results_dir=<trial dir>`, pinned to its slot's cores, sent SIGTERM if
/// this process dies.
#[allow(clippy::too_many_arguments)]
fn start(
    launch: &Path,
    args: &SpecArgs,
    spec: &ExperimentSpec,
    dir: &Path,
    action: &Action,
    point: &ddetr_automl::Point,
    cpus: Vec<usize>,
) -> anyhow::Result<Running> {
    let Action::Run { trial, epochs } = *action;
    let tdir = trial_dir(dir, trial);
    let params = &trial_overrides(dir, trial, spec, point)?;
    let epochs = epochs * spec.automl.epoch_multiplier;
    let a = &spec.automl;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tdir.join("log.txt"))?;
    // `<launch_prefix…> ddetr-launch --nodes N --nproc-per-node P [--master-port …] -- train …`
    let mut cmd = match a.launch_prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(launch);
            c
        }
        None => Command::new(launch),
    };
    cmd.args(["--nodes", &a.nodes_per_trial.to_string()])
        .args(["--nproc-per-node", &a.nproc_per_trial.to_string()]);
    if a.nodes_per_trial > 1 {
        let port = u32::from(a.master_port) + trial as u32;
        cmd.args(["--master-port", &port.to_string()]);
        // Every agent of the trial must hold the same job token (the prefix passes the
        // environment on); a fresh one per trial unless the user set one.
        if std::env::var_os("DDETR_JOB_TOKEN").is_none() {
            cmd.env("DDETR_JOB_TOKEN", job_token()?);
        }
    }
    cmd.arg("--")
        .arg("train")
        .arg("-e")
        .arg(&args.spec)
        .args(&args.overrides)
        .args(params)
        .arg(format!("train.num_epochs={epochs}"))
        .arg(format!("results_dir={}", tdir.display()))
        .arg("automl_policy=off")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Pinned to the slot's cores when the launcher runs here; a prefix places the agents itself.
    let pin = a.launch_prefix.is_empty();
    // SAFETY: between fork and exec only async-signal-safe calls (prctl, sched_setaffinity).
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if pin {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &c in &cpus {
                    libc::CPU_SET(c, &mut set);
                }
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", launch.display()))?;
    eprintln!(
        "automl: trial_{trial:03} → {epochs} epochs ({})",
        params.join(" ")
    );
    Ok(Running {
        child,
        started: Instant::now(),
    })
}

/// 16 random bytes as hex, from the kernel.
fn job_token() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The CPUs this process may run on (its affinity mask; all online CPUs if that cannot be read).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    let cpus: Vec<usize> = if ok {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    cpus
}

/// Slot `slot`'s share of the allowed CPUs: `per_trial` of them, wrapping around when more
/// trials run at once than there are CPUs (two trials then share a core).
fn slot_cpus(allowed: &[usize], slot: usize, per_trial: usize) -> Vec<usize> {
    (slot * per_trial..(slot + 1) * per_trial)
        .map(|i| allowed[i % allowed.len()])
        .collect()
}

/// The trial's overrides, written to `trial.json` the first time (so a resumed search runs the
/// very same command).
fn trial_overrides(
    dir: &Path,
    trial: usize,
    spec: &ExperimentSpec,
    point: &ddetr_automl::Point,
) -> anyhow::Result<Vec<String>> {
    let f = trial_dir(dir, trial).join("trial.json");
    if let Ok(bytes) = std::fs::read(&f) {
        return Ok(serde_json::from_slice(&bytes)?);
    }
    std::fs::create_dir_all(trial_dir(dir, trial))?;
    let o = ddetr_trainer::automl_space::overrides(spec, point);
    write_atomic(&f, &serde_json::to_vec(&o)?)?;
    Ok(o)
}

/// New `status.json` lines of a trial → metric events.
fn read_metrics(state: &mut State, dir: &Path, trial: usize, metric: AutomlMetric) {
    let path = trial_dir(dir, trial).join("train").join("status.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let seen = state.seen.entry(trial).or_insert(0);
    let lines: Vec<&str> = text.lines().collect();
    // A line still being written has no newline yet: leave it for the next read.
    let complete = if text.ends_with('\n') {
        lines.len()
    } else {
        lines.len().saturating_sub(1)
    };
    for line in lines.iter().take(complete).skip(*seen) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let kpi = &v["kpi"];
        if let (Some(epoch), Some(value)) = (kpi["epoch"].as_u64(), kpi[metric.key()].as_f64()) {
            state.controller.handle(Event::Metric {
                trial,
                epoch: epoch as u32 + 1,
                value,
            });
        }
    }
    *seen = complete.max(*seen);
}

/// The error line of a failed trial: the last `error:` line of its log, else its last line.
fn last_error(tdir: &Path) -> String {
    let text = std::fs::read_to_string(tdir.join("log.txt")).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("error"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("the trial exited with an error")
        .trim()
        .to_string()
}

fn params_text(p: &ddetr_automl::Point) -> String {
    p.iter()
        .map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn progress(c: &Controller, metric: AutomlMetric) -> String {
    let count = |f: &dyn Fn(&TrialState) -> bool| c.trials.iter().filter(|t| f(&t.state)).count();
    let done = count(&|s| {
        matches!(
            s,
            TrialState::Done | TrialState::Paused | TrialState::Stopped
        )
    });
    let running = count(&|s| matches!(s, TrialState::Running { .. }));
    let failed = count(&|s| matches!(s, TrialState::Failed { .. }));
    let best = c.best().map_or("none yet".to_string(), |b| {
        format!("{:.4} (trial_{:03})", b.metric().unwrap_or(f64::NAN), b.id)
    });
    format!(
        "automl: {done}/{} trials done, {running} running, {failed} failed; best {} {best}",
        c.settings.max_trials,
        metric.key()
    )
}

/// `results.csv`, `best_spec.yaml` and `search.png`.
fn write_reports(
    state: &State,
    spec: &ExperimentSpec,
    args: &SpecArgs,
    dir: &Path,
) -> anyhow::Result<()> {
    let c = &state.controller;
    let names: Vec<&str> = c.space.params.iter().map(|p| p.name.as_str()).collect();
    let mut csv = format!(
        "trial,state,{},epochs,minutes,{}\n",
        spec.automl.metric.key(),
        names.join(",")
    );
    for t in &c.trials {
        let st = match &t.state {
            TrialState::Running { .. } => "running".to_string(),
            TrialState::Paused => "paused".into(),
            TrialState::Done => "done".into(),
            TrialState::Stopped => "stopped".into(),
            TrialState::Failed { error } => format!("failed: {}", error.replace([',', '\n'], ";")),
        };
        let vals: Vec<String> = names
            .iter()
            .map(|n| t.params.get(*n).map_or(String::new(), |v| v.to_string()))
            .collect();
        csv += &format!(
            "{},{st},{},{},{:.2},{}\n",
            t.id,
            t.metric().map_or(String::new(), |m| format!("{m:.6}")),
            t.epochs_done,
            t.minutes,
            vals.join(",")
        );
    }
    write_atomic(&dir.join("results.csv"), csv.as_bytes())?;
    if let Some(best) = c.best() {
        let mut overrides = args.overrides.clone();
        overrides.extend(ddetr_trainer::automl_space::overrides(spec, &best.params));
        overrides.push("automl_policy=off".into());
        let best_spec =
            ddetr_trainer::spec::load(&args.spec, &overrides, args.results_dir.as_deref())?.spec;
        let header = format!(
            "# ddetr automl: best trial_{:03}, {} {:.4} after {} epochs; train it with `ddetr train -e best_spec.yaml`\n",
            best.id,
            spec.automl.metric.key(),
            best.metric().unwrap_or(f64::NAN),
            best.epochs_done
        );
        write_atomic(
            &dir.join("best_spec.yaml"),
            (header + &best_spec.to_yaml()).as_bytes(),
        )?;
    }
    let points: Vec<(f64, f64)> = c
        .trials
        .iter()
        .filter_map(|t| t.metric().map(|m| (t.id as f64, m)))
        .collect();
    if !points.is_empty() {
        let better = |a: f64, b: f64| match c.settings.direction {
            Direction::Maximize => a.max(b),
            Direction::Minimize => a.min(b),
        };
        let mut best = Vec::new();
        let mut acc: Option<f64> = None;
        for &(x, y) in &points {
            let v = acc.map_or(y, |a| better(a, y));
            acc = Some(v);
            best.push((x, v));
        }
        let key = spec.automl.metric.key();
        ddetr_trainer::plot::chart(
            &dir.join("search.png"),
            &format!("automl ({:?}): {key} per trial", c.settings.algorithm),
            "trial",
            key,
            &[
                ("trial", [31, 119, 180], points),
                ("best so far", [214, 39, 40], best),
            ],
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::slot_cpus;

    #[test]
    fn slots_divide_the_allowed_cpus_and_wrap() {
        let allowed = [2, 3, 5, 7];
        assert_eq!(slot_cpus(&allowed, 0, 2), vec![2, 3]);
        assert_eq!(slot_cpus(&allowed, 1, 2), vec![5, 7]);
        // Five trials on four CPUs: the fifth shares the first CPU.
        assert_eq!(slot_cpus(&allowed, 3, 1), vec![7]);
        assert_eq!(slot_cpus(&allowed, 4, 1), vec![2]);
    }
}
