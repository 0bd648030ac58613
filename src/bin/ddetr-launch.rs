//! `ddetr-launch`: the per-node agent (see the launcher crate).

use std::process::ExitCode;

fn main() -> ExitCode {
    ddetr::exit::report(ddetr_launcher::run_from_env())
}
