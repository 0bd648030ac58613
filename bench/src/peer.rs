//! The peers: the PyTorch-world programs each benchmark runs beside ours. They are scripts in a
//! peers folder shared by the project's clones (`DDETR_PEERS_DIR`, else `../shared/peers` beside
//! the repository) whose `venv.sh` creates their Python environment once and prints its python.
//!
//! [`PeerArgs`] are the flags of every bench that has a peer. [`PeerArgs::python`] says whether
//! a peer can run here; where none can (the folder is absent, a script is missing, `venv.sh` is
//! missing or fails), the bench prints one `peer: unavailable (…): ours only` line, measures ours
//! alone and still ends with its `key=value` line, without the peer's fields.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use clap::Args;

/// The peers folder, relative to the repository root, when neither `--peers` nor
/// `DDETR_PEERS_DIR` names one.
const BESIDE_THE_REPOSITORY: &str = "../shared/peers";

/// The flags every bench with a peer takes.
#[derive(Debug, Clone, Default, Args)]
pub struct PeerArgs {
    /// Python that runs the peers (default: what `venv.sh` in the peers folder prints; it creates
    /// that venv the first time).
    #[arg(long, value_name = "PYTHON")]
    pub python: Option<PathBuf>,
    /// Folder of the peer scripts and their `venv.sh` (default: DDETR_PEERS_DIR, else
    /// ../shared/peers beside the repository).
    #[arg(long, value_name = "DIR")]
    pub peers: Option<PathBuf>,
    /// Measure ours only.
    #[arg(long)]
    pub no_peer: bool,
}

impl PeerArgs {
    /// The peers folder: `--peers`, else `DDETR_PEERS_DIR`, else `../shared/peers` beside the
    /// repository.
    pub fn dir(&self) -> PathBuf {
        self.located().0
    }

    /// The script `name` of the peers folder.
    pub fn script(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// The folder, and what to say when it is missing.
    fn located(&self) -> (PathBuf, String) {
        if let Some(d) = &self.peers {
            return (d.clone(), format!("--peers {} not found", d.display()));
        }
        match std::env::var_os("DDETR_PEERS_DIR") {
            Some(d) if !d.is_empty() => {
                let d = PathBuf::from(d);
                let missing = format!("DDETR_PEERS_DIR={} not found", d.display());
                (d, missing)
            }
            _ => (
                repository().join(BESIDE_THE_REPOSITORY),
                format!(
                    "{BESIDE_THE_REPOSITORY} not found beside the repository; set DDETR_PEERS_DIR \
                     or pass --peers"
                ),
            ),
        }
    }

    /// The python that runs `scripts`, or why no peer can run here: the peers folder is absent
    /// (when its `venv.sh` or a script in it is needed), a script is missing, or `venv.sh` is
    /// missing or fails. `--no-peer` is not looked at.
    pub fn find_python(&self, scripts: &[&Path]) -> Result<PathBuf, String> {
        let (dir, missing) = self.located();
        let needs_dir = self.python.is_none() || scripts.iter().any(|s| s.starts_with(&dir));
        if needs_dir && !dir.is_dir() {
            return Err(missing);
        }
        if let Some(s) = scripts.iter().find(|s| !s.is_file()) {
            return Err(format!("{} not found", s.display()));
        }
        match &self.python {
            Some(p) => Ok(p.clone()),
            None => venv_python(&dir.join("venv.sh")),
        }
    }

    /// The python that runs `scripts`; None with `--no-peer`, and None after printing the one
    /// `peer: unavailable (…): ours only` line when no peer can run here.
    pub fn python(&self, scripts: &[&Path]) -> Option<PathBuf> {
        if self.no_peer {
            return None;
        }
        self.find_python(scripts)
            .map_err(|why| unavailable(&why))
            .ok()
    }
}

/// Prints the one line saying that the bench measures ours alone, and why.
pub fn unavailable(why: &str) {
    println!("peer: unavailable ({why}): ours only");
}

/// The repository root: this crate's parent folder.
fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench crate sits in the repository")
}

/// What the peers' `venv.sh` prints (it creates the venv the first time).
fn venv_python(venv_sh: &Path) -> Result<PathBuf, String> {
    let out = Command::new(venv_sh)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", venv_sh.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{} failed: {}",
            venv_sh.display(),
            err.lines().last().unwrap_or("").trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Runs a peer to its end and returns its stdout; a failure names the script, its exit status
/// and the last line it wrote to stderr.
pub fn output(cmd: &mut Command, script: &Path) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "peer {} exited with {}: {}",
            script.display(),
            out.status,
            err.lines().last().unwrap_or("").trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last line of a peer's `stdout` that holds `key=`.
pub fn line_with<'a>(stdout: &'a str, key: &str) -> anyhow::Result<&'a str> {
    let word = format!("{key}=");
    stdout
        .lines()
        .rev()
        .find(|l| l.split_whitespace().any(|w| w.starts_with(&word)))
        .with_context(|| format!("the peer printed no {word}"))
}

/// The number of `key=` in a line of `key=value` words (a trailing `s` of seconds dropped).
pub fn figure(line: &str, key: &str) -> anyhow::Result<f64> {
    let word = format!("{key}=");
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&word))
        .with_context(|| format!("the peer printed no {word} in {line:?}"))?;
    value
        .trim_end_matches('s')
        .parse()
        .with_context(|| format!("the peer's {key} '{value}' is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(peers: &Path, python: Option<&str>) -> PeerArgs {
        PeerArgs {
            python: python.map(PathBuf::from),
            peers: Some(peers.to_path_buf()),
            no_peer: false,
        }
    }

    #[test]
    fn a_missing_folder_or_script_is_a_reason_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let absent = tmp.path().join("absent");
        let why = args(&absent, None).find_python(&[]).unwrap_err();
        assert_eq!(why, format!("--peers {} not found", absent.display()));
        // A script of the folder needs the folder even with --python.
        let script = absent.join("hf_ddetr_step.py");
        let why = args(&absent, Some("/bin/sh"))
            .find_python(&[&script])
            .unwrap_err();
        assert!(why.starts_with("--peers "), "{why}");
        // A script elsewhere with --python needs no folder, only the script.
        let elsewhere = tmp.path().join("peer.sh");
        let why = args(&absent, Some("/bin/sh"))
            .find_python(&[&elsewhere])
            .unwrap_err();
        assert_eq!(why, format!("{} not found", elsewhere.display()));
        std::fs::write(&elsewhere, "").unwrap();
        assert_eq!(
            args(&absent, Some("/bin/sh")).find_python(&[&elsewhere]),
            Ok(PathBuf::from("/bin/sh"))
        );
        // --no-peer asks nothing and prints nothing.
        let quiet = PeerArgs {
            no_peer: true,
            ..args(&absent, None)
        };
        assert_eq!(quiet.python(&[]), None);
    }

    #[test]
    fn venv_sh_gives_the_python_or_its_last_error_line() {
        let tmp = tempfile::tempdir().unwrap();
        let why = args(tmp.path(), None).find_python(&[]).unwrap_err();
        assert!(
            why.starts_with("cannot run ") && why.contains("venv.sh"),
            "{why}"
        );
        let venv = tmp.path().join("venv.sh");
        std::fs::write(
            &venv,
            "#!/bin/sh\necho working >&2\necho 'no pip here' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&venv, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let why = args(tmp.path(), None).find_python(&[]).unwrap_err();
        assert!(why.ends_with("venv.sh failed: no pip here"), "{why}");
        std::fs::write(&venv, "#!/bin/sh\necho venv/bin/python\n").unwrap();
        assert_eq!(
            args(tmp.path(), None).find_python(&[]),
            Ok(PathBuf::from("venv/bin/python"))
        );
    }

    #[test]
    fn figures_come_from_the_last_line_that_has_them() {
        let out = "loading\nhf-ddetr median_step=9s\nhf-ddetr device=cpu median_step=1.5s peak_gib=2.25\nbye\n";
        let line = line_with(out, "median_step").unwrap();
        assert_eq!(figure(line, "median_step").unwrap(), 1.5);
        assert_eq!(figure(line, "peak_gib").unwrap(), 2.25);
        assert!(figure(line, "step").is_err());
        assert!(line_with(out, "ratio").is_err());
        assert!(figure("median_step=fast", "median_step").is_err());
    }
}
