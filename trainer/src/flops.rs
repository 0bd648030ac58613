//! FLOPs of one forward, counted on the exported graph with the tensor shapes onnxruntime
//! produces for one image (batch 1) at the export size. The convention is fvcore's (detectron2's
//! and mmdet's analysis tools): one multiply-add is one FLOP, and only the ops that carry the
//! compute are counted — convolutions (`out · Cin/groups · kh · kw`), linear layers and attention
//! products (`out · K`) — plus the deformable sampling, which fvcore leaves out and which is
//! reported apart: `GridSample` as 4 multiply-adds per sampled value (bilinear).

use crate::export::graph::Graph;
use crate::export::INPUT_NAME;
use crate::onnx_runtime::OnnxModel;
use crate::TrainerError;

/// Multiply-adds of one forward, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlopCount {
    /// Convolutions (the backbone and the input projections).
    pub conv: f64,
    /// Linear layers (`MatMul` by a weight).
    pub linear: f64,
    /// Products of two activations (self-attention's `QKᵀ` and `AV`).
    pub attention: f64,
    /// The deformable sampling (`GridSample`, bilinear).
    pub sampling: f64,
}

impl FlopCount {
    /// fvcore's total: everything but the sampling.
    pub fn fvcore(&self) -> f64 {
        self.conv + self.linear + self.attention
    }

    pub fn total(&self) -> f64 {
        self.fvcore() + self.sampling
    }
}

/// Counts `graph`'s FLOPs for one `h`×`w` image.
pub fn count(graph: &Graph, (h, w): (u32, u32)) -> Result<FlopCount, TrainerError> {
    let mut wanted: Vec<String> = Vec::new();
    for n in &graph.nodes {
        match n.op.as_str() {
            "Conv" | "GridSample" => wanted.push(n.outputs[0].clone()),
            "MatMul" => {
                if graph.init(&n.inputs[0]).is_none() && n.inputs[0] != INPUT_NAME {
                    wanted.push(n.inputs[0].clone());
                }
                wanted.push(n.outputs[0].clone());
            }
            _ => {}
        }
    }
    wanted.sort();
    wanted.dedup();
    let mut model = OnnxModel::new(&graph.with_outputs(&wanted).to_bytes(), 0)?;
    let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let image = vec![0f32; (3 * h * w) as usize];
    let outs = model.run(image, [1, 3, i64::from(h), i64::from(w)], &names)?;
    drop(model);
    let shape = |name: &str| -> Vec<i64> {
        wanted
            .iter()
            .position(|w| w == name)
            .map(|i| outs[i].0.clone())
            .unwrap_or_default()
    };
    let numel = |s: &[i64]| s.iter().product::<i64>() as f64;
    let mut c = FlopCount::default();
    for n in &graph.nodes {
        match n.op.as_str() {
            "Conv" => {
                let wd = &graph.init(&n.inputs[1]).expect("conv weight").dims;
                let per_out: i64 = wd[1..].iter().product();
                c.conv += numel(&shape(&n.outputs[0])) * per_out as f64;
            }
            "MatMul" => {
                let out = numel(&shape(&n.outputs[0]));
                match graph.init(&n.inputs[1]) {
                    Some(wt) => c.linear += out * wt.dims[0] as f64,
                    None => {
                        let k = *shape(&n.inputs[0]).last().unwrap_or(&0);
                        c.attention += out * k as f64;
                    }
                }
            }
            "GridSample" => c.sampling += 4.0 * numel(&shape(&n.outputs[0])),
            _ => {}
        }
    }
    Ok(c)
}
