//! `ddetr`: TAO's deformable_detr tasks. Thin: parse, run, report (exit codes in `ddetr::exit`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match ddetr::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                ddetr::exit::USAGE
            } else {
                ddetr::exit::SUCCESS
            });
        }
    };
    ddetr::init_logging(&cli.log);
    ddetr::exit::report(ddetr::cli::run(cli))
}
