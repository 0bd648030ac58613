//! `ddetr quantize -e spec.yaml [quantize.model_path=…]`: TAO's quantize task (see
//! `ddetr_trainer::quantize`), with a report of both models on the last lines.

use ddetr_trainer::quantize::{quantize, QuantizeOutcome};

use super::SpecArgs;

/// The report: files, sizes, scores and latency of FP32 and INT8 side by side.
pub fn report(o: &QuantizeOutcome) -> String {
    let mb = |b: usize| b as f64 / 1e6;
    let mut s = format!(
        "wrote {} ({:.2} MB) and {} ({:.2} MB, {:.2}x): {} of {} Conv/Linear ops in INT8, {} calibration images\n",
        o.fp32_file.display(),
        mb(o.fp32_bytes),
        o.int8_file.display(),
        mb(o.int8_bytes),
        o.int8_bytes as f64 / o.fp32_bytes as f64,
        o.quantized_ops,
        o.quantizable_ops,
        o.calibration_images,
    );
    if let Some((f, q)) = &o.scores {
        s += &format!(
            "val mAP50 fp32 {:.4} int8 {:.4} (Δ {:+.4}); mAP fp32 {:.4} int8 {:.4} (Δ {:+.4})\n",
            f.map50(),
            q.map50(),
            q.map50() - f.map50(),
            f.map(),
            q.map(),
            q.map() - f.map()
        );
    }
    if let Some((f, q)) = o.latency_ms {
        s += &format!(
            "onnxruntime CPU latency (1 image, median) fp32 {f:.2} ms int8 {q:.2} ms ({:.2}x)\n",
            q / f
        );
    }
    s
}

pub(super) fn run(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = super::spec::resolve(args)?.spec;
    let outcome = quantize(&spec)?;
    eprint!("{}", report(&outcome));
    Ok(())
}
