//! The `ddetr` package: the two thin binaries (`ddetr`, `ddetr-launch`), their command lines, the
//! exit-code contract they share, and `ddetr doctor`. Everything else lives in the crates:
//! `launcher`, `collective`, `dataset`, `trainer`.

pub mod cli;
pub mod doctor;
pub mod exit;

/// Sets up `tracing` to stderr with the given filter (RUST_LOG wins when set).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in files and pipes (Slurm output, ddetr-launch's log capture).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
