//! `ddetr <task> …` under `ddetr-launch` on this node with N CPU ranks, its stderr in a log, and
//! the benchmark's output folder: how the training benchmarks run ours.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// Runs `ddetr-launch --nodes 1 --nproc-per-node nproc --device cpu -- args…` (the launcher
/// beside this binary); fails naming `log` when the run fails.
pub fn launch_cpu(nproc: u32, args: &[String], log: &Path) -> anyhow::Result<()> {
    let launch = std::env::current_exe()?.with_file_name("ddetr-launch");
    let st = Command::new(&launch)
        .args(["--nodes", "1", "--nproc-per-node", &nproc.to_string()])
        .args(["--device", "cpu", "--"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .status()
        .with_context(|| format!("running {}", launch.display()))?;
    if !st.success() {
        bail!("{} failed ({st}): see {}", args.join(" "), log.display());
    }
    Ok(())
}

/// Creates the benchmark's output folder and returns its absolute path.
pub fn output_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(std::fs::canonicalize(dir)?)
}
