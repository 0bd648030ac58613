//! The `ddetr` package: the thin binaries (`ddetr`, the tch-free front; `ddetr-torch`, the full
//! CLI it execs; `ddetr-launch`), the full command line, the exit-code contract, and
//! `ddetr doctor`. This library is the full CLI's: the front and `ddetr-launch` do not use it (it
//! links libtorch). Everything else lives in the crates: `launcher`, `collective-core`,
//! `collective`, `dataset`, `trainer`, and `bench` (the `ddetr bench` harness).

pub mod cli;
pub mod doctor;
pub mod exit;

/// Logging to stderr, the same for every binary (the launcher's: RUST_LOG wins, no colours in
/// pipes and files).
pub use ddetr_launcher::init_logging;
