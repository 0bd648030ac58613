//! The `ddetr` command line (clap derive). Each subcommand parses its flags here and calls into a
//! library crate; nothing below prints except through the functions in this module.

mod convert;
mod dataset;
mod export;
mod inference;
mod spec;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ddetr: Deformable DETR training, evaluation, inference and export — TAO's deformable_detr
/// tasks in one native binary. Exit codes: 0 ok, 1 runtime failure, 2 usage/spec error.
#[derive(Debug, Parser)]
#[command(name = "ddetr", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG works too.
    #[arg(long, global = true, default_value = "info", env = "DDETR_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve, print or check an experiment spec.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Synthetic data, the dataset cache, and its summary.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Convert a KITTI dataset to sharded COCO JSON (the spec's `convert` section).
    Convert(SpecArgs),
    /// Benchmarks: ddetr against its peers, one key=value line last.
    #[command(subcommand)]
    Bench(ddetr_bench::BenchCommand),
    /// Train a model: `ddetr train -e spec.yaml [-r dir] [key=value …]` (any world under ddetr-launch).
    Train(SpecArgs),
    /// COCO bbox evaluation of `evaluate.checkpoint` on `dataset.test_data_sources`.
    Evaluate(SpecArgs),
    /// Annotated images and KITTI labels for `dataset.infer_data_sources` with `inference.checkpoint`.
    Inference(SpecArgs),
    /// Export a checkpoint to ONNX (TAO's export task: export.checkpoint, export.onnx_file, …).
    Export(SpecArgs),
    /// Print the ddetr and libtorch versions, CPU threads, CUDA devices, NCCL and the venv in use.
    Doctor,
}

#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// Print the resolved spec (defaults + file + overrides) as YAML.
    Show(SpecArgs),
    /// Check the spec and its overrides; print nothing but notices when it is valid.
    Validate(SpecArgs),
}

/// The TAO task arguments: `-e spec.yaml [-r results_dir] [key.path=value …]`.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// The experiment spec (TAO's YAML format).
    #[arg(short = 'e', long = "experiment-spec", value_name = "SPEC")]
    pub spec: PathBuf,
    /// Results directory (overrides the spec's results_dir).
    #[arg(short = 'r', long = "results-dir", value_name = "DIR")]
    pub results_dir: Option<String>,
    /// Overrides: key.path=value (e.g. train.num_epochs=3 dataset.augmentation.scales=[480,512]).
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Spec(SpecCommand::Show(args)) => spec::show(&args),
        Command::Spec(SpecCommand::Validate(args)) => spec::validate(&args),
        Command::Dataset(cmd) => dataset::run(&cmd),
        Command::Bench(cmd) => ddetr_bench::run(&cmd),
        Command::Train(args) => train::train(&args),
        Command::Evaluate(args) => train::evaluate(&args),
        Command::Inference(args) => inference::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Doctor => {
            print!("{}", crate::doctor::render(&crate::doctor::checks()));
            Ok(())
        }
    }
}
