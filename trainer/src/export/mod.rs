//! TAO's `export` task: the Deformable DETR model (and DINO's, [`dino_to_onnx`]) as an ONNX graph (`inputs` `[N, 3, H, W]`, the
//! normalised image batch → `pred_logits` `[N, Q, C]` and `pred_boxes` `[N, Q, 4]` of the last
//! decoder layer, as TAO's export), written from the Rust model itself: [`to_onnx`] walks the
//! very modules [`DeformableDetr::forward`] runs (their weights become initializers) and emits one
//! ONNX node per tensor operation of that forward, in the same order and with the same constants.
//! Multi-scale deformable attention becomes standard ops (`GridSample` bilinear / zeros /
//! `align_corners = 0`, the model's own sampling convention), `GroupNorm` becomes
//! `Reshape → InstanceNormalization → Reshape → Mul → Add`, `FrozenBatchNorm2d` is folded into
//! the convolution before it (weight·scale, bias = shift), and the decoder's `MultiheadAttention` becomes
//! `MatMul → Softmax → MatMul`.
//!
//! The input size is fixed at export (TAO exports without a padding mask), so the sine position
//! embeddings, level spatial shapes, valid ratios and encoder reference points are constants the
//! model's own code computes; only the batch axis may be dynamic. The graph is checked against
//! the model's forward by `trainer/tests/onnx_export.rs` through onnxruntime.

mod dino;
pub mod fan;
pub mod gcvit;
pub mod graph;
pub mod nvdsinfer;
pub mod proto;

pub use dino::{to_graph as dino_to_graph, to_onnx as dino_to_onnx};

use std::path::Path;

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::model::backbone::{Backbone, Block, Body, Conv, FrozenBatchNorm2d, FROZEN_BN_EPS};
use crate::model::deformable_detr::DetrConfig;
use crate::model::deformable_detr::{InputProj, Mlp};
use crate::model::deformable_transformer::{
    DecoderLayer, DeformableTransformer, EncoderLayer, MultiheadAttention,
};
use crate::model::dino::{Dino, DinoConfig};
use crate::model::ms_deform_attn::MSDeformAttn;
use crate::model::position_encoding::PositionEmbeddingSine;
use crate::model::{DeformableDetr, INVERSE_SIGMOID_EPS};
use crate::model_checkpoint;
use crate::spec::{Architecture, ExperimentSpec};
use crate::TrainerError;
use graph::{Graph, Init, Node, ValueInfo};
use proto::{Attr, Dim};

/// The lowest opset the graph needs: `LayerNormalization` is opset 17 (`GridSample` 16).
pub const MIN_OPSET: u32 = 17;
/// The newest opset the writer targets (`GridSample` takes mode `linear` from opset 20).
pub const MAX_OPSET: u32 = 21;
/// tch's default `LayerNorm`/`GroupNorm` epsilon, which the model uses.
const NORM_EPS: f32 = 1e-5;
/// The graph's input and output names (TAO's).
pub const INPUT_NAME: &str = "inputs";
pub const OUTPUT_LOGITS: &str = "pred_logits";
pub const OUTPUT_BOXES: &str = "pred_boxes";

/// Why an export could not be made. One line each: what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export.opset_version {0} is below {MIN_OPSET}, the first opset with LayerNormalization (GridSample needs 16): set export.opset_version to {MIN_OPSET} or higher")]
    OpsetTooLow(u32),
    #[error("export.opset_version {0} is above {MAX_OPSET}, the newest opset ddetr writes: set export.opset_version between {MIN_OPSET} and {MAX_OPSET}")]
    OpsetTooHigh(u32),
    #[error("export.input_channel is {0} but the ResNet backbone takes 3-channel images: set export.input_channel to 3")]
    InputChannels(u32),
    #[error("export.input_height × export.input_width is {0}×{1}: both must be at least 1")]
    InputSize(u32, u32),
    #[error("export.batch_size is {0}: use -1 for a dynamic batch axis or a positive batch size")]
    BatchSize(i32),
    #[error("a {height}x{width} input has {positions} encoder positions but DINO selects model.num_queries = {queries}: export at a larger export.input_height/input_width")]
    TooFewPositions {
        height: u32,
        width: u32,
        positions: i64,
        queries: i64,
    },
    #[error("model.two_stage models cannot be exported to ONNX yet (the proposal top-k is not written): export a single-stage model")]
    TwoStage,
    #[error("cannot write ONNX file {path}: {reason}: set export.onnx_file to a writable path")]
    Write { path: String, reason: String },
    #[error("export.serialize_nvdsinfer: cannot read class names from {path}: {reason}")]
    Labels { path: String, reason: String },
    #[error("export.serialize_nvdsinfer needs the class names: set dataset.val_data_sources (or test_data_sources, train_data_sources) to a COCO json with categories")]
    NoLabels,
}

/// What to export: TAO's `export` keys.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    pub opset_version: u32,
    pub input_channel: u32,
    pub input_height: u32,
    pub input_width: u32,
    /// −1: dynamic batch axis (`batch`); otherwise a fixed batch size.
    pub batch_size: i32,
}

impl ExportOptions {
    /// From the spec's `export` section.
    pub fn from_spec(e: &crate::spec::ExportConfig) -> Self {
        Self {
            opset_version: e.opset_version,
            input_channel: e.input_channel,
            input_height: e.input_height,
            input_width: e.input_width,
            batch_size: e.batch_size,
        }
    }

    fn check(&self) -> Result<(), ExportError> {
        if self.opset_version < MIN_OPSET {
            return Err(ExportError::OpsetTooLow(self.opset_version));
        }
        if self.opset_version > MAX_OPSET {
            return Err(ExportError::OpsetTooHigh(self.opset_version));
        }
        if self.input_channel != 3 {
            return Err(ExportError::InputChannels(self.input_channel));
        }
        if self.input_height == 0 || self.input_width == 0 {
            return Err(ExportError::InputSize(self.input_height, self.input_width));
        }
        if self.batch_size == 0 || self.batch_size < -1 {
            return Err(ExportError::BatchSize(self.batch_size));
        }
        Ok(())
    }
}

/// Exports `model` (in eval mode: no dropout) to an ONNX model's bytes.
pub fn to_onnx(model: &DeformableDetr, opts: &ExportOptions) -> Result<Vec<u8>, ExportError> {
    Ok(to_graph(model, opts)?.to_bytes())
}

/// Exports `model` (in eval mode) to an in-memory ONNX graph.
pub fn to_graph(model: &DeformableDetr, opts: &ExportOptions) -> Result<Graph, ExportError> {
    opts.check()?;
    if model.config.transformer.two_stage {
        return Err(ExportError::TwoStage);
    }
    Ok(tch::no_grad(|| {
        Writer::new(opts.opset_version).model(model, opts)
    }))
}

/// The spec's architecture built at its `model` section, `checkpoint` loaded (any published
/// layout: ddetr, official .pth, transformers, TAO; logged), exported to a graph.
pub fn checkpoint_graph(
    spec: &ExperimentSpec,
    checkpoint: &Path,
    opts: &ExportOptions,
) -> Result<Graph, TrainerError> {
    spec_graph(spec, Some(checkpoint), opts)
}

/// The spec's architecture exported to a graph, with `checkpoint`'s weights or freshly
/// initialised ones (`None`: for counting, not for running).
pub fn spec_graph(
    spec: &ExperimentSpec,
    checkpoint: Option<&Path>,
    opts: &ExportOptions,
) -> Result<Graph, TrainerError> {
    let nc = spec.dataset.num_classes;
    let vs = nn::VarStore::new(Device::Cpu);
    Ok(match spec.architecture() {
        Architecture::DeformableDetr => {
            let model = DeformableDetr::new(&vs.root(), DetrConfig::from_spec(&spec.model, nc)?);
            if let Some(c) = checkpoint {
                model_checkpoint::load_for_task(&vs, c)?;
            }
            to_graph(&model, opts)?
        }
        Architecture::Dino => {
            let model = Dino::new(&vs.root(), DinoConfig::from_spec(&spec.model, nc)?);
            if let Some(c) = checkpoint {
                model_checkpoint::load_for_architecture(&vs, c, Architecture::Dino)?;
            }
            dino_to_graph(&model, opts)?
        }
    })
}

/// [`to_onnx`] and write the file.
pub fn export_file(
    model: &DeformableDetr,
    opts: &ExportOptions,
    path: &Path,
) -> Result<usize, ExportError> {
    write_file(&to_onnx(model, opts)?, path)
}

/// Writes an exported model's bytes to `path` (creating its folder); returns the byte count.
pub fn write_file(bytes: &[u8], path: &Path) -> Result<usize, ExportError> {
    let write_err = |e: std::io::Error| ExportError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    std::fs::write(path, bytes).map_err(write_err)?;
    tracing::info!(path = %path.display(), bytes = bytes.len(), "wrote ONNX model");
    Ok(bytes.len())
}

/// A tensor in the graph being written: its value name.
type V = String;

/// Reference points entering a deformable attention: the value and its last dimension (2 or 4).
struct Refs {
    v: V,
    dim: i64,
}

/// What the encoder and decoder read as constants at the fixed input size.
struct LevelConstants {
    /// The flattened position embeddings, level embeddings added.
    pos: V,
    /// The encoder's reference points.
    refs: Refs,
    /// Every level's valid ratio (all ones: the export has no padding).
    valid_ratios: Tensor,
}

/// Graph builder: nodes in execution order, initializers, fresh names.
struct Writer {
    opset: u32,
    nodes: Vec<Node>,
    inits: Vec<Init>,
    counter: usize,
}

/// An f32 tensor's dims and little-endian bytes (moved to the CPU).
fn f32_raw(t: &Tensor) -> (Vec<i64>, Vec<u8>) {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let dims = t.size();
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.reshape([-1]).copy_data(&mut v, n);
    (dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

impl Writer {
    fn new(opset: u32) -> Self {
        Self {
            opset,
            nodes: Vec::new(),
            inits: Vec::new(),
            counter: 0,
        }
    }

    fn fresh(&mut self, hint: &str) -> V {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// One node with one output.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> V {
        let out = self.fresh(op);
        self.op_into(op, inputs, attrs, &out);
        out
    }

    fn op_into(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], out: &str) {
        let name = format!("{op}_node_{}", self.nodes.len());
        self.nodes.push(Node::new(op, &name, inputs, &[out], attrs));
    }

    /// An f32 initializer (`name` made unique).
    fn tensor(&mut self, name: &str, t: &Tensor) -> V {
        let name = self.fresh(name);
        let (dims, raw) = f32_raw(t);
        self.inits.push(Init {
            name: name.clone(),
            dims,
            data_type: proto::FLOAT,
            raw,
        });
        name
    }

    /// A 0-d f32 constant.
    fn scalar(&mut self, v: f32) -> V {
        let name = self.fresh("scalar");
        self.inits.push(Init::f32(&name, &[], &[v]));
        name
    }

    /// An int64 constant of the given dims.
    fn ints(&mut self, vals: &[i64], dims: &[i64]) -> V {
        let name = self.fresh("ints");
        let raw: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.inits.push(Init {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: proto::INT64,
            raw,
        });
        name
    }

    fn reshape(&mut self, x: &str, shape: &[i64]) -> V {
        let s = self.ints(shape, &[shape.len() as i64]);
        self.op("Reshape", &[x, &s], &[])
    }

    /// `MaxPool2d(kernel 3, stride 2, padding 1)`, updating the spatial size.
    fn max_pool_3x3_s2(&mut self, x: &str, hw: &mut (i64, i64)) -> V {
        *hw = (conv_out(hw.0, 3, 2, 1, 1), conv_out(hw.1, 3, 2, 1, 1));
        self.op(
            "MaxPool",
            &[x],
            &[
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
            ],
        )
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> V {
        self.op("Transpose", &[x], &[("perm", Attr::Ints(perm.to_vec()))])
    }

    fn binary(&mut self, op: &str, a: &str, b: &str) -> V {
        self.op(op, &[a, b], &[])
    }

    /// `x[..., start..end]` along `axis`.
    fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> V {
        let s = self.ints(&[start], &[1]);
        let e = self.ints(&[end], &[1]);
        let a = self.ints(&[axis], &[1]);
        self.op("Slice", &[x, &s, &e, &a], &[])
    }

    /// `x.select(axis, index)`.
    fn select(&mut self, x: &str, axis: i64, index: i64) -> V {
        let i = self.ints(&[index], &[]);
        self.op("Gather", &[x, &i], &[("axis", Attr::Int(axis))])
    }

    /// `x.linear(w, b)`: `MatMul(x, wᵀ) + b`.
    fn linear_wb(&mut self, x: &str, w: &Tensor, b: Option<&Tensor>, name: &str) -> V {
        let wt = self.tensor(&format!("{name}.weight_t"), &w.tr());
        let y = self.binary("MatMul", x, &wt);
        match b {
            Some(b) => {
                let bv = self.tensor(&format!("{name}.bias"), b);
                self.binary("Add", &y, &bv)
            }
            None => y,
        }
    }

    fn linear(&mut self, x: &str, l: &nn::Linear, name: &str) -> V {
        self.linear_wb(x, &l.ws, l.bs.as_ref(), name)
    }

    fn layer_norm(&mut self, x: &str, ln: &nn::LayerNorm, name: &str) -> V {
        let w = self.tensor(
            &format!("{name}.weight"),
            ln.ws.as_ref().expect("affine LayerNorm"),
        );
        let b = self.tensor(
            &format!("{name}.bias"),
            ln.bs.as_ref().expect("affine LayerNorm"),
        );
        self.op(
            "LayerNormalization",
            &[x, &w, &b],
            &[("axis", Attr::Int(-1)), ("epsilon", Attr::Float(NORM_EPS))],
        )
    }

    fn mlp(&mut self, x: &str, mlp: &Mlp, name: &str) -> V {
        let n = mlp.layers.len();
        let mut x = x.to_string();
        for (i, l) in mlp.layers.iter().enumerate() {
            x = self.linear(&x, l, &format!("{name}.layers.{i}"));
            if i + 1 < n {
                x = self.op("Relu", &[&x], &[]);
            }
        }
        x
    }

    /// `inverse_sigmoid`: log(max(clip(x, 0, 1), ε) / max(1 − x, ε)).
    fn inverse_sigmoid(&mut self, x: &str) -> V {
        self.inverse_sigmoid_eps(x, INVERSE_SIGMOID_EPS)
    }

    fn inverse_sigmoid_eps(&mut self, x: &str, eps: f64) -> V {
        let zero = self.scalar(0.0);
        let one = self.scalar(1.0);
        let eps = self.scalar(eps as f32);
        let x = self.op("Clip", &[x, &zero, &one], &[]);
        let x1 = self.binary("Max", &x, &eps);
        let one_minus = self.binary("Sub", &one, &x);
        let x2 = self.binary("Max", &one_minus, &eps);
        let r = self.binary("Div", &x1, &x2);
        self.op("Log", &[&r], &[])
    }

    /// A backbone convolution (no bias) and the `FrozenBatchNorm2d` after it, folded into one
    /// `Conv`: weight·scale per output channel, bias = shift, with the model's scale and shift
    /// (`x·scale + shift`). Tracks the spatial size. One node keeps the pair a single quantizable
    /// op for `ddetr quantize`; runtimes fold it the same way.
    fn conv_bn(
        &mut self,
        x: &str,
        c: &Conv,
        bn: &FrozenBatchNorm2d,
        name: &str,
        bn_name: &str,
        hw: &mut (i64, i64),
    ) -> V {
        let k = c.weight.size()[2];
        let scale = &bn.weight * (&bn.running_var + FROZEN_BN_EPS).rsqrt();
        let shift = &bn.bias - &bn.running_mean * &scale;
        let w = self.tensor(
            &format!("{name}.weight"),
            &(&c.weight * scale.view([-1, 1, 1, 1])),
        );
        let b = self.tensor(&format!("{bn_name}.shift"), &shift);
        *hw = (
            conv_out(hw.0, k, c.stride, c.padding, c.dilation),
            conv_out(hw.1, k, c.stride, c.padding, c.dilation),
        );
        self.op(
            "Conv",
            &[x, &w, &b],
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![c.stride, c.stride])),
                ("pads", Attr::Ints(vec![c.padding; 4])),
                ("dilations", Attr::Ints(vec![c.dilation, c.dilation])),
            ],
        )
    }

    fn block(&mut self, x: &str, block: &Block, name: &str, hw: &mut (i64, i64)) -> V {
        let n = block.convs.len();
        let mut out = x.to_string();
        let mut out_hw = *hw;
        for (i, (conv, bn)) in block.convs.iter().zip(&block.bns).enumerate() {
            out = self.conv_bn(
                &out,
                conv,
                bn,
                &format!("{name}.conv{}", i + 1),
                &format!("{name}.bn{}", i + 1),
                &mut out_hw,
            );
            if i + 1 < n {
                out = self.op("Relu", &[&out], &[]);
            }
        }
        let identity = match &block.downsample {
            Some(d) => {
                let mut ds_hw = *hw;
                self.conv_bn(
                    x,
                    &d.conv,
                    &d.bn,
                    &format!("{name}.downsample.0"),
                    &format!("{name}.downsample.1"),
                    &mut ds_hw,
                )
            }
            None => x.to_string(),
        };
        *hw = out_hw;
        let sum = self.binary("Add", &out, &identity);
        self.op("Relu", &[&sum], &[])
    }

    /// `input_proj[l]`: Conv2d + GroupNorm(32, d).
    fn input_proj(&mut self, x: &str, ip: &InputProj, l: usize, hw: &mut (i64, i64)) -> V {
        let name = format!("input_proj.{l}");
        let k = ip.conv.ws.size()[2];
        // The model builds 1×1 stride-1 projections for backbone levels and 3×3 stride-2 pad-1
        // convs for the extra levels (`InputProj::new`).
        let (stride, pad) = if k == 1 { (1, 0) } else { (2, 1) };
        let w = self.tensor(&format!("{name}.0.weight"), &ip.conv.ws);
        let b = self.tensor(
            &format!("{name}.0.bias"),
            ip.conv.bs.as_ref().expect("input_proj conv has a bias"),
        );
        *hw = (
            conv_out(hw.0, k, stride, pad, 1),
            conv_out(hw.1, k, stride, pad, 1),
        );
        let y = self.op(
            "Conv",
            &[x, &w, &b],
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![stride, stride])),
                ("pads", Attr::Ints(vec![pad; 4])),
            ],
        );
        // GroupNorm(G, C) = InstanceNormalization over [N, G, C/G·H·W], then the affine.
        let g = ip.norm.num_groups;
        let c = ip.norm.num_channels;
        let grouped = self.reshape(&y, &[0, g, -1]);
        let ones = self.tensor(
            &format!("{name}.1.unit_scale"),
            &Tensor::ones([g], (Kind::Float, Device::Cpu)),
        );
        let zeros = self.tensor(
            &format!("{name}.1.zero_bias"),
            &Tensor::zeros([g], (Kind::Float, Device::Cpu)),
        );
        let normed = self.op(
            "InstanceNormalization",
            &[&grouped, &ones, &zeros],
            &[("epsilon", Attr::Float(NORM_EPS))],
        );
        let normed = self.reshape(&normed, &[0, c, hw.0, hw.1]);
        let gamma = self.tensor(
            &format!("{name}.1.weight"),
            &ip.norm
                .ws
                .as_ref()
                .expect("affine GroupNorm")
                .view([1, -1, 1, 1]),
        );
        let beta = self.tensor(
            &format!("{name}.1.bias"),
            &ip.norm
                .bs
                .as_ref()
                .expect("affine GroupNorm")
                .view([1, -1, 1, 1]),
        );
        let y = self.binary("Mul", &normed, &gamma);
        self.binary("Add", &y, &beta)
    }

    /// `MSDeformAttn.forward` (no padding mask: the export has none).
    #[allow(clippy::too_many_arguments)]
    fn ms_deform_attn(
        &mut self,
        a: &MSDeformAttn,
        name: &str,
        query: &str,
        refs: &Refs,
        input_flatten: &str,
        shapes: &[(i64, i64)],
        len_q: i64,
    ) -> V {
        let (m, l, p) = (a.n_heads, a.n_levels, a.n_points);
        let dh = a.d_model / m;
        let len_in: i64 = shapes.iter().map(|&(h, w)| h * w).sum();
        let value = self.linear(input_flatten, &a.value_proj, &format!("{name}.value_proj"));
        let value = self.reshape(&value, &[0, len_in, m, dh]);
        // The grid GridSample reads, `2·location − 1`, with the constant factors of the offsets
        // folded into the sampling_offsets layer (one scale per output column, weight and
        // bias): `2/(W_l, H_l)` for a point reference, `1/n_points` for a box (whose
        // `offset/P · wh · 0.5` doubles to `offset/P · wh`). The references are tiled over heads
        // and points so every elementwise op meets operands of one shape (onnxruntime's
        // broadcast over size-2 inner spans is ~6x slower than the tile and the add together).
        let col_scale: Vec<f32> = (0..m * l * p * 2)
            .map(|c| {
                let (li, xy) = ((c / 2 / p) % l, c % 2);
                match refs.dim {
                    2 => {
                        let (h, w) = shapes[li as usize];
                        2.0 / (if xy == 0 { w } else { h }) as f32
                    }
                    _ => 1.0 / p as f32,
                }
            })
            .collect();
        let col_scale = Tensor::from_slice(&col_scale);
        let (ws, bs) = tch::no_grad(|| {
            let so = &a.sampling_offsets;
            (
                &so.ws * col_scale.view([-1, 1]).to_device(so.ws.device()),
                so.bs.as_ref().map(|b| b * col_scale.to_device(b.device())),
            )
        });
        let offsets = self.linear_wb(query, &ws, bs.as_ref(), &format!("{name}.sampling_offsets"));
        let offsets = self.reshape(&offsets, &[0, len_q, m, l, p, 2]);
        let weights = self.linear(
            query,
            &a.attention_weights,
            &format!("{name}.attention_weights"),
        );
        let weights = self.reshape(&weights, &[0, len_q, m, l * p]);
        let weights = self.op("Softmax", &[&weights], &[("axis", Attr::Int(-1))]);
        let weights = self.reshape(&weights, &[0, len_q, m, l, p]);
        let two = self.scalar(2.0);
        let one = self.scalar(1.0);
        let reps = self.ints(&[1, 1, m, 1, p, 1], &[6]);
        let spread = |wr: &mut Self, x: &str| {
            let x = wr.reshape(x, &[0, len_q, 1, l, 1, 2]);
            wr.op("Tile", &[&x, &reps], &[])
        };
        let xy = match refs.dim {
            2 => refs.v.clone(),
            _ => self.slice(&refs.v, -1, 0, 2),
        };
        let xy = self.binary("Mul", &xy, &two);
        let xy = self.binary("Sub", &xy, &one);
        let xy = spread(self, &xy);
        let grids = match refs.dim {
            2 => self.binary("Add", &xy, &offsets),
            _ => {
                let wh = self.slice(&refs.v, -1, 2, 4);
                let wh = spread(self, &wh);
                let t = self.binary("Mul", &offsets, &wh);
                self.binary("Add", &xy, &t)
            }
        };
        // ms_deform_attn_core.
        let weights = self.transpose(&weights, &[0, 2, 1, 3, 4]);
        let weights = self.reshape(&weights, &[-1, 1, len_q, l, p]);
        let mode = if self.opset >= 20 {
            "linear"
        } else {
            "bilinear"
        };
        let mut acc: Option<V> = None;
        let mut start = 0;
        for (lid, &(h, w)) in shapes.iter().enumerate() {
            let value_l = self.slice(&value, 1, start, start + h * w);
            start += h * w;
            let value_l = self.transpose(&value_l, &[0, 2, 3, 1]);
            let value_l = self.reshape(&value_l, &[-1, dh, h, w]);
            let grid_l = self.select(&grids, 3, lid as i64);
            let grid_l = self.transpose(&grid_l, &[0, 2, 1, 3, 4]);
            let grid_l = self.reshape(&grid_l, &[-1, len_q, p, 2]);
            let sampled = self.op(
                "GridSample",
                &[&value_l, &grid_l],
                &[
                    ("mode", Attr::Str(mode.into())),
                    ("padding_mode", Attr::Str("zeros".into())),
                    ("align_corners", Attr::Int(0)),
                ],
            );
            let w_l = self.select(&weights, 3, lid as i64);
            let prod = self.binary("Mul", &sampled, &w_l);
            let axes = self.ints(&[-1], &[1]);
            let contrib = self.op("ReduceSum", &[&prod, &axes], &[("keepdims", Attr::Int(0))]);
            acc = Some(match acc {
                Some(a) => self.binary("Add", &a, &contrib),
                None => contrib,
            });
        }
        let out = acc.expect("at least one level");
        let out = self.reshape(&out, &[-1, m * dh, len_q]);
        let out = self.transpose(&out, &[0, 2, 1]);
        self.linear(&out, &a.output_proj, &format!("{name}.output_proj"))
    }

    fn encoder_layer(
        &mut self,
        layer: &EncoderLayer,
        name: &str,
        src: &str,
        pos: &str,
        refs: &Refs,
        shapes: &[(i64, i64)],
    ) -> V {
        let len: i64 = shapes.iter().map(|&(h, w)| h * w).sum();
        let q = self.binary("Add", src, pos);
        let src2 = self.ms_deform_attn(
            &layer.self_attn,
            &format!("{name}.self_attn"),
            &q,
            refs,
            src,
            shapes,
            len,
        );
        let s = self.binary("Add", src, &src2);
        let s = self.layer_norm(&s, &layer.norm1, &format!("{name}.norm1"));
        let f = self.linear(&s, &layer.ffn.linear1, &format!("{name}.linear1"));
        let f = self.op("Relu", &[&f], &[]);
        let f = self.linear(&f, &layer.ffn.linear2, &format!("{name}.linear2"));
        let s2 = self.binary("Add", &s, &f);
        self.layer_norm(&s2, &layer.norm2, &format!("{name}.norm2"))
    }

    /// `nn.MultiheadAttention(q, q, v)` batch-first, `[N, Lq, d]`.
    fn mha(&mut self, a: &MultiheadAttention, name: &str, q: &str, v: &str, len_q: i64) -> V {
        let d = a.in_proj_weight.size()[1];
        let nh = a.nhead;
        let hd = d / nh;
        let proj = |wr: &mut Self, x: &str, i: i64, tag: &str| {
            let y = wr.linear_wb(
                x,
                &a.in_proj_weight.narrow(0, i * d, d),
                Some(&a.in_proj_bias.narrow(0, i * d, d)),
                &format!("{name}.in_proj_{tag}"),
            );
            wr.reshape(&y, &[0, len_q, nh, hd])
        };
        let qh = proj(self, q, 0, "q");
        let kh = proj(self, q, 1, "k");
        let vh = proj(self, v, 2, "v");
        let qh = self.transpose(&qh, &[0, 2, 1, 3]);
        let kt = self.transpose(&kh, &[0, 2, 3, 1]);
        let vh = self.transpose(&vh, &[0, 2, 1, 3]);
        let scores = self.binary("MatMul", &qh, &kt);
        let scale = self.scalar((1.0 / (hd as f64).sqrt()) as f32);
        let scores = self.binary("Mul", &scores, &scale);
        let attn = self.op("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
        let out = self.binary("MatMul", &attn, &vh);
        let out = self.transpose(&out, &[0, 2, 1, 3]);
        let out = self.reshape(&out, &[0, len_q, d]);
        self.linear(&out, &a.out_proj, &format!("{name}.out_proj"))
    }

    #[allow(clippy::too_many_arguments)]
    fn decoder_layer(
        &mut self,
        layer: &DecoderLayer,
        name: &str,
        tgt: &str,
        query_pos: &str,
        refs: &Refs,
        memory: &str,
        shapes: &[(i64, i64)],
        len_q: i64,
    ) -> V {
        let q = self.binary("Add", tgt, query_pos);
        let t2 = self.mha(
            &layer.self_attn,
            &format!("{name}.self_attn"),
            &q,
            tgt,
            len_q,
        );
        let t = self.binary("Add", tgt, &t2);
        let t = self.layer_norm(&t, &layer.norm2, &format!("{name}.norm2"));
        let q = self.binary("Add", &t, query_pos);
        let t2 = self.ms_deform_attn(
            &layer.cross_attn,
            &format!("{name}.cross_attn"),
            &q,
            refs,
            memory,
            shapes,
            len_q,
        );
        let t = self.binary("Add", &t, &t2);
        let t = self.layer_norm(&t, &layer.norm1, &format!("{name}.norm1"));
        let f = self.linear(&t, &layer.ffn.linear1, &format!("{name}.linear1"));
        let f = self.op("Relu", &[&f], &[]);
        let f = self.linear(&f, &layer.ffn.linear2, &format!("{name}.linear2"));
        let t = self.binary("Add", &t, &f);
        self.layer_norm(&t, &layer.norm3, &format!("{name}.norm3"))
    }

    /// The whole model → its graph.
    fn model(mut self, model: &DeformableDetr, opts: &ExportOptions) -> Graph {
        let (h, w) = (opts.input_height as i64, opts.input_width as i64);
        let features = self.backbone(&model.backbone, (h, w));
        let srcs = self.input_levels(&model.input_proj, &features);
        let shapes: Vec<(i64, i64)> = srcs.iter().map(|(_, s)| *s).collect();
        let constants = self.level_constants(
            &model.position_embedding,
            &model.transformer.level_embed,
            &shapes,
        );
        let memory = self.flatten_levels(&srcs, model.config.transformer.d_model);
        let memory = self.encoder(&model.transformer.encoder, memory, &constants, &shapes);
        let (query_pos, tgt) = self.decoder_queries(model);
        let reference = self.initial_reference(model, &query_pos);
        let (tgt, head_reference) = self.decoder(
            model,
            tgt,
            &query_pos,
            reference,
            &memory,
            &shapes,
            &constants.valid_ratios,
        );
        self.heads(model, &tgt, head_reference);
        let (nq, nc) = (model.num_queries(), model.config.num_classes);
        self.finish(nq, nc, "deformable_detr", opts)
    }

    /// The backbone's body from the input: the stem, then every stage. Returns the stages the
    /// model returns (`return_stages`) with their spatial sizes.
    fn backbone(&mut self, backbone: &Backbone, input_hw: (i64, i64)) -> Vec<(V, (i64, i64))> {
        let body = match &backbone.body {
            Body::ResNet(r) => r,
            Body::GcVit(g) => return self.gcvit(g, &backbone.return_stages, input_hw),
            Body::Fan(f) => return self.fan(f, &backbone.return_stages, input_hw),
        };
        let mut hw = input_hw;
        let x = self.conv_bn(
            INPUT_NAME,
            &body.conv1,
            &body.bn1,
            "backbone.0.body.conv1",
            "backbone.0.body.bn1",
            &mut hw,
        );
        let x = self.op("Relu", &[&x], &[]);
        let mut x = self.max_pool_3x3_s2(&x, &mut hw);
        let mut stage_outs = Vec::new();
        for (s, stage) in body.layers.iter().enumerate() {
            for (bi, block) in stage.iter().enumerate() {
                x = self.block(
                    &x,
                    block,
                    &format!("backbone.0.body.layer{}.{bi}", s + 1),
                    &mut hw,
                );
            }
            stage_outs.push((x.clone(), hw));
        }
        backbone
            .return_stages
            .iter()
            .map(|&s| stage_outs[s].clone())
            .collect()
    }

    /// `input_proj` of every backbone feature, then the extra levels (the first from the last
    /// backbone feature, each next one from the level before), with their spatial sizes.
    fn input_levels(
        &mut self,
        input_proj: &[InputProj],
        features: &[(V, (i64, i64))],
    ) -> Vec<(V, (i64, i64))> {
        let mut srcs: Vec<(V, (i64, i64))> = Vec::new();
        for (l, (feat, fhw)) in features.iter().enumerate() {
            let mut lhw = *fhw;
            let v = self.input_proj(feat, &input_proj[l], l, &mut lhw);
            srcs.push((v, lhw));
        }
        let n_backbone = features.len();
        for l in n_backbone..input_proj.len() {
            let (input, mut lhw) = if l == n_backbone {
                features[n_backbone - 1].clone()
            } else {
                srcs.last().expect("a previous level").clone()
            };
            let v = self.input_proj(&input, &input_proj[l], l, &mut lhw);
            srcs.push((v, lhw));
        }
        srcs
    }

    /// Constants from the model's own code at this input size, with no padding: the flattened
    /// position embeddings (level embeddings added), the valid ratios and the encoder's reference
    /// points.
    fn level_constants(
        &mut self,
        position_embedding: &PositionEmbeddingSine,
        level_embed: &Tensor,
        shapes: &[(i64, i64)],
    ) -> LevelConstants {
        let masks: Vec<Tensor> = shapes
            .iter()
            .map(|&(a, b)| Tensor::zeros([1, a, b], (Kind::Bool, Device::Cpu)))
            .collect();
        let level_embed = level_embed.to_device(Device::Cpu);
        let pos: Vec<Tensor> = masks
            .iter()
            .enumerate()
            .map(|(lvl, m)| {
                position_embedding.forward(m).flatten(2, 3).transpose(1, 2)
                    + level_embed.get(lvl as i64).view([1, 1, -1])
            })
            .collect();
        let pos_flatten = self.tensor("pos_embed_flatten", &Tensor::cat(&pos, 1));
        let valid_ratios = Tensor::stack(
            &masks
                .iter()
                .map(DeformableTransformer::valid_ratio)
                .collect::<Vec<_>>(),
            1,
        );
        let enc_refs = DeformableTransformer::encoder_reference_points(shapes, &valid_ratios);
        let enc_refs = Refs {
            v: self.tensor("encoder_reference_points", &enc_refs),
            dim: 2,
        };
        LevelConstants {
            pos: pos_flatten,
            refs: enc_refs,
            valid_ratios,
        }
    }

    /// The levels flattened to `[N, H·W, d]` and concatenated along the sequence: the encoder's
    /// input.
    fn flatten_levels(&mut self, srcs: &[(V, (i64, i64))], d: i64) -> V {
        let len_in: i64 = srcs.iter().map(|(_, (a, b))| a * b).sum();
        let flat: Vec<V> = srcs
            .iter()
            .map(|(v, (a, b))| {
                let r = self.reshape(v, &[0, d, a * b]);
                self.transpose(&r, &[0, 2, 1])
            })
            .collect();
        let flat_refs: Vec<&str> = flat.iter().map(String::as_str).collect();
        let memory = if flat.len() == 1 {
            flat[0].clone()
        } else {
            self.op("Concat", &flat_refs, &[("axis", Attr::Int(1))])
        };
        debug_assert!(len_in > 0);
        memory
    }

    /// Every encoder layer over the flattened levels: the memory the decoder attends to.
    fn encoder(
        &mut self,
        layers: &[EncoderLayer],
        mut memory: V,
        constants: &LevelConstants,
        shapes: &[(i64, i64)],
    ) -> V {
        for (i, layer) in layers.iter().enumerate() {
            memory = self.encoder_layer(
                layer,
                &format!("transformer.encoder.layers.{i}"),
                &memory,
                &constants.pos,
                &constants.refs,
                shapes,
            );
        }
        memory
    }

    /// Decoder inputs: `query_embed` split into (query_pos, tgt), each expanded to the batch.
    fn decoder_queries(&mut self, model: &DeformableDetr) -> (V, V) {
        let tc = model.config.transformer;
        let (d, nq) = (tc.d_model, tc.num_queries);
        let qe = model
            .query_embed
            .as_ref()
            .expect("single-stage models have query_embed");
        let parts = qe.split(d, 1);
        let batch = self.op(
            "Shape",
            &[INPUT_NAME],
            &[("start", Attr::Int(0)), ("end", Attr::Int(1))],
        );
        let qd = self.ints(&[nq, d], &[2]);
        let target_shape = self.op("Concat", &[&batch, &qd], &[("axis", Attr::Int(0))]);
        let qp_c = self.tensor("query_embed.query_pos", &parts[0].unsqueeze(0));
        let tgt_c = self.tensor("query_embed.tgt", &parts[1].unsqueeze(0));
        let query_pos = self.op("Expand", &[&qp_c, &target_shape], &[]);
        let tgt = self.op("Expand", &[&tgt_c, &target_shape], &[]);
        (query_pos, tgt)
    }

    /// The first decoder layer's reference points: `sigmoid(reference_points(query_pos))`.
    fn initial_reference(&mut self, model: &DeformableDetr, query_pos: &str) -> Refs {
        let rp = model
            .transformer
            .reference_points
            .as_ref()
            .expect("reference_points exists without two-stage");
        let r = self.linear(query_pos, rp, "transformer.reference_points");
        Refs {
            v: self.op("Sigmoid", &[&r], &[]),
            dim: 2,
        }
    }

    /// Every decoder layer, each reading its reference points scaled by the valid ratios, and with
    /// box refinement refining them after every layer but the last. Returns the last layer's
    /// output and the reference points it read (the heads add to them).
    #[allow(clippy::too_many_arguments)]
    fn decoder(
        &mut self,
        model: &DeformableDetr,
        mut tgt: V,
        query_pos: &str,
        mut reference: Refs,
        memory: &str,
        shapes: &[(i64, i64)],
        valid_ratios: &Tensor,
    ) -> (V, Option<Refs>) {
        let nq = model.config.transformer.num_queries;
        let vr2 = self.tensor("valid_ratios", &valid_ratios.unsqueeze(1));
        let vr4 = self.tensor(
            "valid_ratios_box",
            &Tensor::cat(&[valid_ratios, valid_ratios], -1).unsqueeze(1),
        );
        let axes2 = self.ints(&[2], &[1]);
        let n_dec = model.transformer.decoder.len();
        let mut head_reference = None;
        for (lid, layer) in model.transformer.decoder.iter().enumerate() {
            if lid + 1 == n_dec {
                head_reference = Some(Refs {
                    v: reference.v.clone(),
                    dim: reference.dim,
                });
            }
            let un = self.op("Unsqueeze", &[&reference.v, &axes2], &[]);
            let vr = if reference.dim == 4 { &vr4 } else { &vr2 };
            let ref_input = Refs {
                v: self.binary("Mul", &un, vr),
                dim: reference.dim,
            };
            tgt = self.decoder_layer(
                layer,
                &format!("transformer.decoder.layers.{lid}"),
                &tgt,
                query_pos,
                &ref_input,
                memory,
                shapes,
                nq,
            );
            if model.heads.refine && lid + 1 < n_dec {
                // The last layer's refined reference feeds nothing the export returns.
                reference = self.refine_reference(model, lid, &tgt, &reference);
            }
        }
        (tgt, head_reference)
    }

    /// Box refinement after decoder layer `lid`:
    /// `sigmoid(bbox_embed[lid](tgt) + inverse_sigmoid(reference))`, a box from then on.
    fn refine_reference(
        &mut self,
        model: &DeformableDetr,
        lid: usize,
        tgt: &str,
        reference: &Refs,
    ) -> Refs {
        let delta = self.mlp(tgt, model.heads.bbox(lid), &format!("bbox_embed.{lid}"));
        let inv = self.inverse_sigmoid(&reference.v);
        let unact = self.offset_reference(&delta, &inv, reference.dim);
        Refs {
            v: self.op("Sigmoid", &[&unact], &[]),
            dim: 4,
        }
    }

    /// `delta + inverse_sigmoid(reference)` as the model adds them: every coordinate for a box
    /// reference (`dim` 4), only the centre for a point.
    fn offset_reference(&mut self, delta: &str, inv: &str, dim: i64) -> V {
        if dim == 4 {
            self.binary("Add", delta, inv)
        } else {
            let xy = self.slice(delta, -1, 0, 2);
            let xy = self.binary("Add", &xy, inv);
            let rest = self.slice(delta, -1, 2, 4);
            self.op("Concat", &[&xy, &rest], &[("axis", Attr::Int(-1))])
        }
    }

    /// The class and box heads of the last decoder layer on its output `tgt` (boxes relative to
    /// the reference points it read), written to the graph's outputs.
    fn heads(&mut self, model: &DeformableDetr, tgt: &str, head_reference: Option<Refs>) {
        let last = model.transformer.decoder.len() - 1;
        let head_ref = head_reference.expect("at least one decoder layer");
        let inv = self.inverse_sigmoid(&head_ref.v);
        let cls_idx = if model.heads.refine { last } else { 0 };
        let logits = self.linear(
            tgt,
            model.heads.class(last),
            &format!("class_embed.{cls_idx}"),
        );
        let delta = self.mlp(
            tgt,
            model.heads.bbox(last),
            &format!("bbox_embed.{cls_idx}"),
        );
        let coord = self.offset_reference(&delta, &inv, head_ref.dim);
        self.op_into("Identity", &[&logits], &[], OUTPUT_LOGITS);
        self.op_into("Sigmoid", &[&coord], &[], OUTPUT_BOXES);
    }

    /// The graph's input and outputs declared (the batch axis dynamic when
    /// `opts.batch_size < 0`) → the graph.
    fn finish(self, nq: i64, nc: i64, graph_name: &str, opts: &ExportOptions) -> Graph {
        let (h, w) = (opts.input_height as i64, opts.input_width as i64);
        let batch_dim = if opts.batch_size < 0 {
            Dim::Param("batch".into())
        } else {
            Dim::Fixed(opts.batch_size as i64)
        };
        let value = |name: &str, shape: Vec<Dim>| ValueInfo {
            name: name.into(),
            elem_type: proto::FLOAT,
            shape: Some(shape),
        };
        Graph {
            name: graph_name.into(),
            opset: self.opset,
            nodes: self.nodes,
            inits: self.inits,
            inputs: vec![value(
                INPUT_NAME,
                vec![
                    batch_dim.clone(),
                    Dim::Fixed(3),
                    Dim::Fixed(h),
                    Dim::Fixed(w),
                ],
            )],
            outputs: vec![
                value(
                    OUTPUT_LOGITS,
                    vec![batch_dim.clone(), Dim::Fixed(nq), Dim::Fixed(nc)],
                ),
                value(OUTPUT_BOXES, vec![batch_dim, Dim::Fixed(nq), Dim::Fixed(4)]),
            ],
        }
    }
}

/// Output size of a convolution/pooling along one axis.
fn conv_out(size: i64, k: i64, stride: i64, pad: i64, dilation: i64) -> i64 {
    (size + 2 * pad - dilation * (k - 1) - 1) / stride + 1
}
