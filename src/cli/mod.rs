//! The `ddetr` command line (clap derive). Each subcommand parses its flags here and calls into a
//! library crate; nothing below prints except through the functions in this module.

mod automl;
mod convert;
mod dataset;
mod export;
mod inference;
mod model;
mod quantize;
mod spec;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ddetr: Deformable DETR and DINO training, evaluation, inference and export — TAO's
/// deformable_detr and dino tasks in one native binary. Exit codes: 0 ok, 1 runtime failure, 2 usage/spec error.
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
    /// Distill a DINO student from a frozen teacher (the spec's `distill` section); as `train`,
    /// in `<results_dir>/distill`.
    Distill(SpecArgs),
    /// COCO bbox evaluation of `evaluate.checkpoint` on `dataset.test_data_sources`.
    Evaluate(SpecArgs),
    /// Annotated images and KITTI labels for `dataset.infer_data_sources` with `inference.checkpoint`.
    Inference(SpecArgs),
    /// Export a checkpoint to ONNX (TAO's export task: export.checkpoint, export.onnx_file, …).
    Export(SpecArgs),
    /// Hyper-parameter search over the spec (its `automl` section): trials are `ddetr train` runs
    /// under ddetr-launch in `<results_dir>/automl/trial_NNN`; resumable after a kill.
    Automl(automl::AutomlArgs),
    /// INT8 post-training quantization (TAO's quantize task): the checkpoint exported and
    /// calibrated into a QDQ ONNX model, both models scored and timed in onnxruntime.
    Quantize(SpecArgs),
    /// DINO's tasks, as TAO's `dino` entry point: `ddetr dino train -e spec.yaml` is
    /// `ddetr train -e spec.yaml model_name=dino` (a spec naming another model is refused).
    #[command(subcommand)]
    Dino(DinoCommand),
    /// The spec's network: parameters per module, trainable and frozen.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Print the ddetr and libtorch versions, CPU threads, CUDA devices, NCCL and the venv in use.
    Doctor,
}

/// The tasks of `ddetr dino`.
#[derive(Debug, Subcommand)]
pub enum DinoCommand {
    /// Train DINO (any world under ddetr-launch).
    Train(SpecArgs),
    /// Train a DINO student with a frozen teacher (`distill.teacher`,
    /// `distill.pretrained_teacher_model_path`, `distill.bindings`).
    Distill(SpecArgs),
    /// COCO bbox evaluation of a DINO `evaluate.checkpoint`.
    Evaluate(SpecArgs),
    /// Annotated images and KITTI labels with a DINO `inference.checkpoint`.
    Inference(SpecArgs),
    /// Export a DINO checkpoint to ONNX.
    Export(SpecArgs),
    /// INT8 QDQ ONNX of a DINO checkpoint.
    Quantize(SpecArgs),
    /// Resolve, print or check a DINO spec.
    #[command(subcommand)]
    Spec(SpecCommand),
}

impl DinoCommand {
    /// The task as the generic command it stands for: the same arguments with `model_name=dino`
    /// first among the overrides.
    fn into_generic(self) -> Command {
        let dino = |mut args: SpecArgs| {
            args.overrides.insert(0, "model_name=dino".into());
            args
        };
        match self {
            DinoCommand::Train(a) => Command::Train(dino(a)),
            DinoCommand::Distill(a) => Command::Distill(dino(a)),
            DinoCommand::Evaluate(a) => Command::Evaluate(dino(a)),
            DinoCommand::Inference(a) => Command::Inference(dino(a)),
            DinoCommand::Export(a) => Command::Export(dino(a)),
            DinoCommand::Quantize(a) => Command::Quantize(dino(a)),
            DinoCommand::Spec(SpecCommand::Show(a)) => Command::Spec(SpecCommand::Show(dino(a))),
            DinoCommand::Spec(SpecCommand::Validate(a)) => {
                Command::Spec(SpecCommand::Validate(dino(a)))
            }
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Build the spec's model and count its parameters per module (no checkpoint needed).
    Info(SpecArgs),
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
        Command::Train(args) => train::train(&args, train::Run::Train),
        Command::Distill(args) => train::train(&args, train::Run::Distill),
        Command::Evaluate(args) => train::evaluate(&args),
        Command::Inference(args) => inference::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Quantize(args) => quantize::run(&args),
        Command::Automl(args) => automl::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Model(ModelCommand::Info(args)) => model::info(&args),
        Command::Dino(cmd) => run(Cli {
            log: cli.log,
            command: cmd.into_generic(),
        }),
        Command::Doctor => {
            print!("{}", crate::doctor::render(&crate::doctor::checks()));
            Ok(())
        }
    }
}
