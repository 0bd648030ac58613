//! The exit-code contract of `ddetr` and `ddetr-launch` (README "Exit codes").
//!
//! | code    | meaning                                                                      |
//! |---------|------------------------------------------------------------------------------|
//! | 0       | success                                                                      |
//! | 1       | runtime failure (bad data, I/O, a rank failed after its restarts, …)         |
//! | 2       | usage or spec error: bad flags, unreadable/invalid spec, unknown key          |
//! | 128 + N | stopped by signal N after a clean shutdown (130 SIGINT, 143 SIGTERM)         |
//!
//! `ddetr-launch` returns 1 when a trainer failed and `--max-restarts` is spent (the message names
//! the first failure: node, rank, exit code or signal, last lines of its stderr), 128 + N when it
//! was itself stopped by signal N and shut its trainers down, and 2 for usage errors.

use std::process::ExitCode;

use ddetr_dataset::DatasetError;
use ddetr_trainer::spec::SpecError;
use ddetr_trainer::TrainerError;

/// The codes themselves are the launcher's (`ddetr-launch` has no libtorch to link this crate).
pub use ddetr_launcher::exit::{FAILURE, SIGNAL_BASE, SUCCESS, USAGE};

/// An error that is the user's invocation, not the run: exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error: 2 when anything in its chain is a usage or spec error (the
/// crates' errors say so with `is_usage`), else 1.
pub fn code_for(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|e| {
        e.is::<SpecError>()
            || e.is::<UsageError>()
            || e.is::<ddetr_bench::UsageError>()
            || e.is::<clap::Error>()
            || e.downcast_ref::<TrainerError>()
                .is_some_and(TrainerError::is_usage)
            || e.downcast_ref::<DatasetError>()
                .is_some_and(DatasetError::is_usage)
    });
    if usage {
        USAGE
    } else {
        FAILURE
    }
}

/// Prints the error chain once, on one line, and turns it into the process exit code.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(SUCCESS),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(code_for(&err))
        }
    }
}
