//! `ddetr`: the front binary. It links no libtorch (it uses only the launcher crate, whose
//! collective dependency is the tensor-free `ddetr-collective-core`), so it starts in
//! milliseconds:
//!
//! - `ddetr bench barrier [--all-reduce]` (the worker of `ddetr bench launch` and of the
//!   multi-node tests) runs here: join the job, build the CPU collectives, one barrier. A worker
//!   that needs no tensors does not wait ~0.6 s for libtorch to load.
//! - every other command line (including `--help`, `--version` and usage errors) is handed,
//!   argv and environment unchanged, to the full CLI: `ddetr-torch` in this binary's directory,
//!   by exec, so the process, its pid, signals and exit code are the full CLI's.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitCode;

use ddetr_launcher::exit;

/// The full CLI's file name; it must sit next to this binary.
const FULL_CLI: &str = "ddetr-torch";

/// A command line this binary runs itself.
#[derive(Debug, PartialEq, Eq)]
struct Barrier {
    all_reduce: bool,
    /// `--log` when given (else DDETR_LOG, else info), as the full CLI's global flag.
    log: Option<String>,
}

/// `bench barrier [--all-reduce]` with `--log F` / `--log=F` anywhere, each at most once: the
/// exact command lines the full CLI accepts for that command. Anything else (help, a typo, an
/// extra argument) returns None and goes to the full CLI, which parses and reports it.
fn claim(args: &[OsString]) -> Option<Barrier> {
    let mut words = Vec::new();
    let mut log = None;
    let mut all_reduce = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg.to_str()?;
        if arg == "--log" {
            let value = it.next()?.to_str()?;
            if log.replace(value.to_string()).is_some() || value.starts_with('-') {
                return None;
            }
        } else if let Some(value) = arg.strip_prefix("--log=") {
            if log.replace(value.to_string()).is_some() {
                return None;
            }
        } else if arg == "--all-reduce" && words.len() == 2 && !all_reduce {
            all_reduce = true;
        } else if arg.starts_with('-') {
            return None;
        } else {
            words.push(arg);
        }
    }
    (words == ["bench", "barrier"]).then_some(Barrier { all_reduce, log })
}

/// Replaces this process with the full CLI at `full`, same argv (argv[0] included) and env.
/// Returns only when the exec failed.
fn exec_full(full: &Path, argv0: &OsStr, args: &[OsString]) -> std::io::Error {
    std::process::Command::new(full)
        .arg0(argv0)
        .args(args)
        .exec()
}

/// The one-line error for a full CLI that cannot be started.
fn exec_error(full: &Path, err: &std::io::Error) -> String {
    if err.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{} does not exist: `ddetr` runs every command but `bench barrier` through the full CLI \
             `{FULL_CLI}` in its own directory; build both (`cargo build --release --bins`) and \
             install `{FULL_CLI}` next to `ddetr`",
            full.display()
        )
    } else {
        format!("cannot start the full CLI {}: {err}", full.display())
    }
}

fn run_barrier(b: &Barrier) -> ExitCode {
    let filter = b
        .log
        .clone()
        .or_else(|| std::env::var("DDETR_LOG").ok())
        .unwrap_or_else(|| "info".into());
    ddetr_launcher::init_logging(&filter);
    match ddetr_launcher::bootstrap::barrier_check(b.all_reduce) {
        Ok(report) => {
            println!("{report}");
            ExitCode::from(exit::SUCCESS)
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    let argv0 = argv.next().unwrap_or_else(|| "ddetr".into());
    let args: Vec<OsString> = argv.collect();
    if let Some(barrier) = claim(&args) {
        return run_barrier(&barrier);
    }
    let full = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(FULL_CLI),
        Err(e) => {
            eprintln!("error: cannot locate the ddetr binary to find {FULL_CLI} next to it: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let err = exec_full(&full, &argv0, &args);
    eprintln!("error: {}", exec_error(&full, &err));
    ExitCode::from(exit::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim_of(args: &[&str]) -> Option<Barrier> {
        claim(&args.iter().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn claims_exactly_the_barrier_command_lines() {
        let plain = Barrier {
            all_reduce: false,
            log: None,
        };
        assert_eq!(claim_of(&["bench", "barrier"]), Some(plain));
        assert_eq!(
            claim_of(&["--log", "debug", "bench", "barrier", "--all-reduce"]),
            Some(Barrier {
                all_reduce: true,
                log: Some("debug".into())
            })
        );
        assert_eq!(
            claim_of(&["bench", "barrier", "--log=warn"]),
            Some(Barrier {
                all_reduce: false,
                log: Some("warn".into())
            })
        );
    }

    #[test]
    fn leaves_everything_else_to_the_full_cli() {
        for args in [
            &[][..],
            &["--version"],
            &["--help"],
            &["bench", "barrier", "--help"],
            &["bench", "barrier", "-h"],
            &["bench", "barrier", "--all-reduce", "--all-reduce"],
            &["bench", "--all-reduce", "barrier"],
            &["bench", "barrier", "extra"],
            &["bench", "launch"],
            &["bench"],
            &["barrier", "bench"],
            &["bench", "barrier", "--log"],
            &["bench", "barrier", "--log", "a", "--log", "b"],
            &["dataset", "synth", "--out", "x"],
            &["help", "bench", "barrier"],
        ] {
            assert_eq!(claim_of(args), None, "{args:?}");
        }
    }

    #[test]
    fn a_missing_full_cli_is_one_line_naming_where_and_how() {
        let full = Path::new("/nonexistent/dir").join(FULL_CLI);
        let err = exec_full(&full, OsStr::new("ddetr"), &[]);
        let line = exec_error(&full, &err);
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("/nonexistent/dir/ddetr-torch does not exist: "),
            "{line}"
        );
        assert!(line.contains("cargo build --release --bins"), "{line}");
    }
}
