//! The `ddetr` package: the thin binaries (`ddetr`, the tch-free front; `ddetr-torch`, the full
//! CLI it execs; `ddetr-launch`), the full command line, the exit-code contract, and
//! `ddetr doctor`. This library is the full CLI's: the front and `ddetr-launch` do not use it (it
//! links libtorch). Everything else lives in the crates: `launcher`, `collective-core`,
//! `collective`, `dataset`, `trainer`, and `bench` (the `ddetr bench` harness).

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
