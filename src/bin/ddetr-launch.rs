//! `ddetr-launch`: the per-node agent (see the launcher crate). Thin: parse, prepare, print the
//! notices (and the world with `--dry-run`), supervise, map the outcome to the exit codes.
//!
//! It uses nothing of the `ddetr` library, so it does not link libtorch and starts at once
//! (`ldd ddetr-launch | grep torch` prints nothing; tests/launch.rs checks it).

use std::process::ExitCode;

use clap::Parser;
use ddetr_launcher::supervise::Sinks;
use ddetr_launcher::world::{process_env, ThisHost};
use ddetr_launcher::{exit, Args, LaunchError, Outcome};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            });
        }
    };
    ddetr_launcher::init_logging("info");
    let launch = match ddetr_launcher::prepare(args, &process_env(), &mut ThisHost) {
        Ok(launch) => launch,
        Err(err) => return fail(err),
    };
    for notice in launch.notices() {
        eprintln!("notice: {notice}");
    }
    if launch.dry_run {
        print!("{}", launch.render());
        return ExitCode::from(exit::SUCCESS);
    }
    match launch.run(&Sinks::stdio()) {
        Ok(Outcome::Completed) => ExitCode::from(exit::SUCCESS),
        Ok(Outcome::Signalled(sig)) => ExitCode::from(exit::SIGNAL_BASE + sig as u8),
        Err(err) => fail(err),
    }
}

fn fail(err: LaunchError) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(if err.is_usage() {
        exit::USAGE
    } else {
        exit::FAILURE
    })
}
