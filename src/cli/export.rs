//! `ddetr export -e spec.yaml export.checkpoint=… export.onnx_file=…`: TAO's export task, the
//! checkpoint's model written as ONNX (see `ddetr_trainer::export`).

use std::path::PathBuf;

use anyhow::Context as _;
use ddetr_trainer::export::{self, nvdsinfer, ExportError, ExportOptions};
use ddetr_trainer::spec::Task;
use ddetr_trainer::TrainerError;

use super::SpecArgs;
use crate::exit::UsageError;

/// File name of the export when `export.onnx_file` is not set.
const DEFAULT_ONNX_NAME: &str = "model.onnx";

pub(super) fn run(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = super::spec::resolve(args)?.spec;
    let e = &spec.export;
    let opts = ExportOptions::from_spec(e);
    let checkpoint = e
        .checkpoint
        .as_deref()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            UsageError(
                "export.checkpoint is not set: pass export.checkpoint=/path/to/model.pth".into(),
            )
        })?;
    let checkpoint = PathBuf::from(checkpoint);
    if !checkpoint.is_file() {
        return Err(UsageError(format!(
            "export.checkpoint {} does not exist: pass the path of a trained checkpoint",
            checkpoint.display()
        ))
        .into());
    }
    let onnx_file = match e.onnx_file.as_deref().filter(|f| !f.is_empty()) {
        Some(f) => PathBuf::from(f),
        None => spec.task_results_dir(Task::Export).join(DEFAULT_ONNX_NAME),
    };
    if !e.on_cpu {
        tracing::info!(
            "the ONNX writer runs on the CPU whatever export.on_cpu says; the graph is the same"
        );
    }
    let nc = spec.dataset.num_classes;
    // export.serialize_nvdsinfer's class names, read before anything is written.
    let labels = if e.serialize_nvdsinfer {
        let d = &spec.dataset;
        let json = d
            .val_data_sources
            .iter()
            .chain(&d.test_data_sources)
            .chain(&d.train_data_sources)
            .map(|s| PathBuf::from(&s.json_file))
            .next()
            .ok_or(ExportError::NoLabels)
            .map_err(|e| UsageError(e.to_string()))?;
        Some(nvdsinfer::class_names(&json, nc).map_err(|e| UsageError(e.to_string()))?)
    } else {
        None
    };
    // Any published layout of the architecture (ddetr, official .pth, transformers, TAO); logs
    // what it loaded.
    let graph = match export::checkpoint_graph(&spec, &checkpoint, &opts) {
        Ok(g) => g,
        Err(TrainerError::Export(err)) => return Err(UsageError(err.to_string()).into()),
        Err(other) => return Err(other.into()),
    };
    let bytes = export::write_file(&graph.to_bytes(), &onnx_file)
        .with_context(|| format!("export of {}", checkpoint.display()))?;
    let batch = if opts.batch_size < 0 {
        "batch".to_string()
    } else {
        opts.batch_size.to_string()
    };
    eprintln!(
        "wrote {} ({bytes} bytes, opset {}, inputs [{batch}, 3, {}, {}] → pred_logits, pred_boxes)",
        onnx_file.display(),
        opts.opset_version,
        opts.input_height,
        opts.input_width
    );
    if let Some(names) = &labels {
        let chw = [
            i64::from(opts.input_channel),
            i64::from(opts.input_height),
            i64::from(opts.input_width),
        ];
        let (labels, config) = nvdsinfer::write(&onnx_file, names, chw)?;
        eprintln!(
            "wrote {} and {} (DeepStream nvinfer, parser NvDsInferParseCustomDDETRTAO)",
            labels.display(),
            config.display()
        );
    }
    Ok(())
}
