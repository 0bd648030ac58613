//! FLOPs of one forward, counted on the exported graph with the tensor shapes onnxruntime
//! produces for one image (batch 1) at the export size, by fvcore's rules (`FlopCountAnalysis`,
//! the counter of detectron2's and mmdet's analysis tools), op for op:
//! - one multiply-add is one FLOP: convolutions `out · Cin/groups · kh · kw`, linear layers and
//!   attention products `out · K` (aten::_convolution, linear, matmul);
//! - a norm with an affine, 5 per input element (aten::layer_norm, group_norm — written here as
//!   `LayerNormalization`, and as `InstanceNormalization` for a GroupNorm);
//! - the bilinear sampling, 4 per sampled value (aten::grid_sampler — fvcore sees it where the
//!   deformable attention runs in PyTorch, as transformers' does on the CPU; the official CUDA
//!   kernel is invisible to it);
//! - an average pool to one value per channel, 1 per input element (aten::adaptive_avg_pool2d,
//!   GCViT's squeeze-excitation);
//! - nothing else: elementwise ops, softmax, the FrozenBatchNorm (folded, or elementwise in
//!   PyTorch), the bicubic resize of GCViT's global query (aten::upsample_bicubic2d has no rule).
//!
//! `bench/peers/fvcore_flops.py` runs fvcore itself on transformers' Deformable DETR; the
//! counts match op for op (`trainer/tests/flops_fvcore.rs`).

use crate::export::graph::Graph;
use crate::export::INPUT_NAME;
use crate::onnx_runtime::OnnxModel;
use crate::TrainerError;

/// Multiply-adds (and fvcore's norm and sampling counts) of one forward, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlopCount {
    /// Convolutions (the backbone and the input projections).
    pub conv: f64,
    /// Linear layers (`MatMul` by a weight).
    pub linear: f64,
    /// Products of two activations (self-attention's `QKᵀ` and `AV`).
    pub attention: f64,
    /// LayerNorm and GroupNorm, 5 per element.
    pub norm: f64,
    /// The deformable sampling (`GridSample`, bilinear, 4 per value).
    pub sampling: f64,
    /// Average pools to one value per channel (1 per element).
    pub pool: f64,
}

impl FlopCount {
    /// fvcore's total.
    pub fn total(&self) -> f64 {
        self.conv + self.linear + self.attention + self.norm + self.sampling + self.pool
    }
}

/// Counts `graph`'s FLOPs for one `h`×`w` image.
pub fn count(graph: &Graph, (h, w): (u32, u32)) -> Result<FlopCount, TrainerError> {
    // A MatMul whose left operand is a constant is GCViT's bicubic resize (not counted).
    let is_resize = |n: &crate::export::graph::Node| graph.init(&n.inputs[0]).is_some();
    let mut wanted: Vec<String> = Vec::new();
    for n in &graph.nodes {
        match n.op.as_str() {
            "Conv" | "GridSample" => wanted.push(n.outputs[0].clone()),
            "LayerNormalization" | "InstanceNormalization" | "ReduceMean" => {
                wanted.push(n.inputs[0].clone())
            }
            "MatMul" if !is_resize(n) => {
                if graph.init(&n.inputs[1]).is_none() && n.inputs[0] != INPUT_NAME {
                    wanted.push(n.inputs[0].clone());
                }
                wanted.push(n.outputs[0].clone());
            }
            _ => {}
        }
    }
    wanted.retain(|name| name != INPUT_NAME);
    wanted.sort();
    wanted.dedup();
    let mut model = OnnxModel::new(&graph.with_outputs(&wanted).to_bytes(), 0)?;
    let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let image = vec![0f32; (3 * h * w) as usize];
    let outs = model.run(image, [1, 3, i64::from(h), i64::from(w)], &names)?;
    drop(model);
    let shape = |name: &str| -> Vec<i64> {
        if name == INPUT_NAME {
            return vec![1, 3, i64::from(h), i64::from(w)];
        }
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
            "MatMul" if !is_resize(n) => {
                let out = numel(&shape(&n.outputs[0]));
                match graph.init(&n.inputs[1]) {
                    Some(wt) => c.linear += out * wt.dims[0] as f64,
                    None => {
                        let k = *shape(&n.inputs[0]).last().unwrap_or(&0);
                        c.attention += out * k as f64;
                    }
                }
            }
            "LayerNormalization" | "InstanceNormalization" => {
                c.norm += 5.0 * numel(&shape(&n.inputs[0]))
            }
            "ReduceMean" => c.pool += numel(&shape(&n.inputs[0])),
            "GridSample" => c.sampling += 4.0 * numel(&shape(&n.outputs[0])),
            _ => {}
        }
    }
    Ok(c)
}
