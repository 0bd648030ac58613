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
//!   GCViT's squeeze-excitation, FAN's channel-attention keys);
//! - a BatchNorm on its running statistics (FAN's, written as a scale `Mul` and a shift `Add`),
//!   2 per element (aten::batch_norm in eval mode, with an affine);
//! - nothing else: elementwise ops, softmax, the FrozenBatchNorm (folded, or elementwise in
//!   PyTorch), the bicubic resize of GCViT's global query (aten::upsample_bicubic2d has no rule).
//!
//! Each counted op belongs to the module of its weight (`backbone.0.body.layer1.0.conv1` →
//! `backbone`; see [`group`]), an op without one (attention products, the sampling, a pool) to
//! the module of the weighted op before it, as fvcore's `by_module` places ops in their module.
//!
//! `bench/peers/fvcore_flops.py` runs fvcore itself on transformers' Deformable DETR; the
//! counts match kind by kind and module by module (`bench/tests/flops_fvcore.rs`).

use std::collections::BTreeMap;

use crate::export::fan::is_batch_norm_scale;
use crate::export::gcvit::is_resize_matrix;
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
    /// LayerNorm and GroupNorm, 5 per element; BatchNorm (eval), 2.
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

    /// The counts added up.
    pub fn sum<'a>(counts: impl IntoIterator<Item = &'a FlopCount>) -> FlopCount {
        let mut total = FlopCount::default();
        for c in counts {
            total.add(c);
        }
        total
    }

    fn add(&mut self, o: &FlopCount) {
        self.conv += o.conv;
        self.linear += o.linear;
        self.attention += o.attention;
        self.norm += o.norm;
        self.sampling += o.sampling;
        self.pool += o.pool;
    }
}

/// The module group a weight's initializer belongs to: `backbone`, `input_proj`,
/// `transformer.<part>` (`encoder`, `decoder`, `reference_points`, DINO's `enc_output`, …),
/// `heads` (the class and box heads, the decoder's box refinement included), else the name's
/// first component.
pub fn group(init_name: &str) -> String {
    let parts: Vec<&str> = init_name.split('.').collect();
    match parts[0] {
        "class_embed" | "bbox_embed" => "heads".into(),
        "transformer" if parts.len() > 1 => format!("transformer.{}", parts[1]),
        first => first.into(),
    }
}

/// Counts `graph`'s FLOPs for one `h`×`w` image, per module group ([`group`]);
/// [`FlopCount::sum`] of the values is the whole.
pub fn count_by_module(
    graph: &Graph,
    (h, w): (u32, u32),
) -> Result<BTreeMap<String, FlopCount>, TrainerError> {
    // GCViT's bicubic resize: a MatMul by a constant interpolation matrix (not counted).
    let is_resize = |n: &crate::export::graph::Node| {
        n.inputs
            .iter()
            .any(|i| graph.init(i).is_some_and(|t| is_resize_matrix(&t.name)))
    };
    let is_batch_norm = |n: &crate::export::graph::Node| {
        n.op == "Mul"
            && n.inputs
                .iter()
                .any(|i| graph.init(i).is_some_and(|t| is_batch_norm_scale(&t.name)))
    };
    let mut wanted: Vec<String> = Vec::new();
    for n in &graph.nodes {
        if is_batch_norm(n) {
            wanted.push(n.inputs[0].clone());
        }
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
    let mut by_module: BTreeMap<String, FlopCount> = BTreeMap::new();
    let mut module = String::from("other");
    for n in &graph.nodes {
        let weight = match n.op.as_str() {
            "MatMul" if is_resize(n) => None,
            "Conv" | "MatMul" | "LayerNormalization" | "InstanceNormalization" => {
                n.inputs.get(1).and_then(|i| graph.init(i))
            }
            _ => None,
        };
        if let Some(wt) = weight {
            module = group(&crate::quantize::qdq::module_of(&wt.name));
        }
        let mut c = FlopCount::default();
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
            "Mul" if is_batch_norm(n) => c.norm += 2.0 * numel(&shape(&n.inputs[0])),
            "GridSample" => c.sampling += 4.0 * numel(&shape(&n.outputs[0])),
            _ => continue,
        }
        by_module.entry(module.clone()).or_default().add(&c);
    }
    Ok(by_module)
}
