//! The QDQ rewrite: which ops of an exported graph are quantized, and the INT8 graph in
//! onnxruntime's QDQ format (what ModelOpt's and onnxruntime's `quantize_static` write):
//! - every quantized op's weight becomes an INT8 initializer with per-output-channel symmetric
//!   scales and a `DequantizeLinear` in front (Conv: axis 0 of `[O, I, kh, kw]`; a linear
//!   layer's `MatMul` weight `[in, out]`: axis 1);
//! - a Conv's bias becomes INT32 at scale `s_x · s_w[c]` (what a runtime's integer Conv adds);
//! - every activation a quantized op reads, and every quantized Conv's output (after the ReLU
//!   when a ReLU is its only reader, so the runtime drops the ReLU into the zero point), gets one
//!   `QuantizeLinear → DequantizeLinear` pair (UINT8, per tensor, the calibrated range) that all
//!   its readers share.
//!
//! onnxruntime fuses `DQ → Conv → Q` into `QLinearConv` and `DQ → MatMul` into
//! `MatMulIntegerToFloat`; everything else (normalisations, attention, the deformable sampling,
//! the heads) runs in float between a `DequantizeLinear` and a `QuantizeLinear`.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::export::gcvit::is_resize_matrix;
use crate::export::graph::{Graph, Init, Node};
use crate::export::proto::{self, Attr};

/// The kind of a quantizable op, also matched by `skip_names`/`layers[].module_name` patterns
/// (TAO matches module class names too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Conv,
    Linear,
}

impl OpKind {
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Conv => "Conv2d",
            Self::Linear => "Linear",
        }
    }
}

/// One quantizable op of the graph.
#[derive(Debug, Clone)]
pub struct QuantOp {
    /// Index into `graph.nodes`.
    pub node: usize,
    pub kind: OpKind,
    /// The module path (`backbone.0.body.layer1.0.conv1`, `transformer.encoder.layers.0.linear1`).
    pub module: String,
    /// Quantize the weight / the activations.
    pub weights: bool,
    pub activations: bool,
}

/// The module path an initializer was written for: its name without the writer's unique `_N`
/// suffix and the `.weight`/`.weight_t` tail.
pub fn module_of(init_name: &str) -> String {
    let base = match init_name.rsplit_once('_') {
        Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => init_name,
    };
    base.strip_suffix(".weight_t")
        .or_else(|| base.strip_suffix(".weight"))
        .unwrap_or(base)
        .to_string()
}

/// The graph's quantizable ops: every `Conv` with an initializer weight, and every `MatMul`
/// whose second input is a 2-D initializer (a linear layer; attention's activation × activation
/// products are not, nor GCViT's bicubic resize by a constant matrix).
pub fn quantizable_ops(graph: &Graph) -> Vec<QuantOp> {
    let inits: HashMap<&str, &Init> = graph.inits.iter().map(|i| (i.name.as_str(), i)).collect();
    graph
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let w = inits.get(n.inputs.get(1)?.as_str())?;
            let kind = match n.op.as_str() {
                "Conv" if w.dims.len() == 4 => OpKind::Conv,
                "MatMul" if w.dims.len() == 2 && !is_resize_matrix(&w.name) => OpKind::Linear,
                _ => return None,
            };
            (w.data_type == proto::FLOAT).then(|| QuantOp {
                node: i,
                kind,
                module: module_of(&w.name),
                weights: true,
                activations: true,
            })
        })
        .collect()
}

/// The activation tensors a plan quantizes: each quantized op's input, and each quantized
/// Conv's output (the ReLU's output when a ReLU is the Conv output's only reader).
pub fn activation_tensors(graph: &Graph, ops: &[QuantOp]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |t: &str, out: &mut Vec<String>| {
        if seen.insert(t.to_string()) {
            out.push(t.to_string());
        }
    };
    for op in ops.iter().filter(|o| o.activations) {
        let node = &graph.nodes[op.node];
        push(&node.inputs[0], &mut out);
        if op.kind == OpKind::Conv {
            let y = &node.outputs[0];
            let readers: Vec<&Node> = graph.consumers(y).collect();
            let t = match readers.as_slice() {
                [r] if r.op == "Relu" && !graph.is_output(y) => r.outputs[0].clone(),
                _ => y.clone(),
            };
            push(&t, &mut out);
        }
    }
    out
}

/// UINT8 scale and zero point of a range containing 0.
pub fn uint8_params(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let span = hi - lo;
    if span <= f32::EPSILON {
        return (1.0, 0);
    }
    let scale = span / 255.0;
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Symmetric per-channel INT8 of `w` along `axis` (0 or 1 of a row-major tensor `dims`), values
/// in `[-qmax, qmax]`. Returns (quantized, one scale per channel).
pub fn int8_per_channel(w: &[f32], dims: &[i64], axis: usize, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let channels = dims[axis] as usize;
    let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
    let channel_of = |i: usize| (i / inner) % channels;
    let mut amax = vec![0f32; channels];
    for (i, &v) in w.iter().enumerate() {
        let c = channel_of(i);
        amax[c] = amax[c].max(v.abs());
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| if a > 0.0 { a / qmax } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / scales[channel_of(i)]).round().clamp(-qmax, qmax) as i8)
        .collect();
    (q, scales)
}

/// The calibrated range of every activation tensor (by name).
pub type Ranges = BTreeMap<String, (f32, f32)>;

/// Rewrites `graph` into the QDQ graph of `ops` (weights quantized to `[-qmax, qmax]`, activations
/// over `ranges`; an activation without a range stays float).
pub fn rewrite(graph: &Graph, ops: &[QuantOp], ranges: &Ranges, qmax: f32) -> Graph {
    let mut g = graph.clone();
    let mut weight_nodes: Vec<Node> = Vec::new();
    let mut act_params: HashMap<String, (f32, u8)> = HashMap::new();
    for t in activation_tensors(graph, ops) {
        if let Some(&(lo, hi)) = ranges.get(&t) {
            act_params.insert(t, uint8_params(lo, hi));
        }
    }
    let mut new_inits: Vec<Init> = Vec::new();
    let mut drop_inits: HashSet<String> = HashSet::new();
    let mut fresh = 0usize;
    let mut name = |hint: &str| {
        fresh += 1;
        format!("{hint}_q{fresh}")
    };
    for op in ops.iter().filter(|o| o.weights) {
        let node = &graph.nodes[op.node];
        let w_name = node.inputs[1].clone();
        let w = graph.init(&w_name).expect("quantizable op weight");
        let values = w.f32s().expect("f32 weight");
        let axis = match op.kind {
            OpKind::Conv => 0,
            OpKind::Linear => 1,
        };
        let (q, scales) = int8_per_channel(&values, &w.dims, axis, qmax);
        let channels = scales.len() as i64;
        let qn = name(&format!("{w_name}_int8"));
        let sn = name(&format!("{w_name}_scale"));
        let zn = name(&format!("{w_name}_zero_point"));
        let dq = name(&format!("{w_name}_dequantized"));
        new_inits.push(Init {
            name: qn.clone(),
            dims: w.dims.clone(),
            data_type: proto::INT8,
            raw: q.iter().map(|&v| v as u8).collect(),
        });
        new_inits.push(Init::f32(&sn, &[channels], &scales));
        new_inits.push(Init {
            name: zn.clone(),
            dims: vec![channels],
            data_type: proto::INT8,
            raw: vec![0; channels as usize],
        });
        weight_nodes.push(Node::new(
            "DequantizeLinear",
            &format!("{dq}_node"),
            &[&qn, &sn, &zn],
            &[&dq],
            &[("axis", Attr::Int(axis as i64))],
        ));
        drop_inits.insert(w_name);
        g.nodes[op.node].inputs[1] = dq;
        // A Conv bias at the integer accumulator's scale, when the input is quantized.
        let x_scale = act_params.get(&node.inputs[0]).map(|p| p.0);
        if let (OpKind::Conv, Some(b_name), Some(sx)) = (op.kind, node.inputs.get(2), x_scale) {
            let b = graph
                .init(b_name)
                .expect("conv bias")
                .f32s()
                .expect("f32 bias");
            let bs: Vec<f32> = scales.iter().map(|s| s * sx).collect();
            let bq: Vec<i32> = b
                .iter()
                .zip(&bs)
                .map(|(v, s)| (v / s).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
                .collect();
            let qn = name(&format!("{b_name}_int32"));
            let sn = name(&format!("{b_name}_scale"));
            let zn = name(&format!("{b_name}_zero_point"));
            let dq = name(&format!("{b_name}_dequantized"));
            new_inits.push(Init {
                name: qn.clone(),
                dims: vec![channels],
                data_type: proto::INT32,
                raw: bq.iter().flat_map(|v| v.to_le_bytes()).collect(),
            });
            new_inits.push(Init::f32(&sn, &[channels], &bs));
            new_inits.push(Init {
                name: zn.clone(),
                dims: vec![channels],
                data_type: proto::INT32,
                raw: vec![0; 4 * channels as usize],
            });
            weight_nodes.push(Node::new(
                "DequantizeLinear",
                &format!("{dq}_node"),
                &[&qn, &sn, &zn],
                &[&dq],
                &[("axis", Attr::Int(0))],
            ));
            drop_inits.insert(b_name.clone());
            g.nodes[op.node].inputs[2] = dq;
        }
    }
    // Activation pairs: after the producer (graph inputs: first), readers rewired to the DQ.
    let mut pairs: HashMap<String, (Vec<Node>, String)> = HashMap::new();
    for (t, &(scale, zp)) in &act_params {
        let sn = name(&format!("{t}_scale"));
        let zn = name(&format!("{t}_zero_point"));
        let qt = name(&format!("{t}_quantized"));
        let dq = name(&format!("{t}_dequantized"));
        new_inits.push(Init::f32(&sn, &[], &[scale]));
        new_inits.push(Init {
            name: zn.clone(),
            dims: vec![],
            data_type: proto::UINT8,
            raw: vec![zp],
        });
        let nodes = vec![
            Node::new(
                "QuantizeLinear",
                &format!("{qt}_node"),
                &[t, &sn, &zn],
                &[&qt],
                &[],
            ),
            Node::new(
                "DequantizeLinear",
                &format!("{dq}_node"),
                &[&qt, &sn, &zn],
                &[&dq],
                &[],
            ),
        ];
        pairs.insert(t.clone(), (nodes, dq));
    }
    let mut nodes = weight_nodes;
    for input in &graph.inputs {
        if let Some((pair, _)) = pairs.get(&input.name) {
            nodes.extend(pair.iter().cloned());
        }
    }
    for node in g.nodes.drain(..) {
        let mut node = node;
        for i in node.inputs.iter_mut() {
            if let Some((_, dq)) = pairs.get(i.as_str()) {
                *i = dq.clone();
            }
        }
        let outs = node.outputs.clone();
        nodes.push(node);
        for o in &outs {
            if let Some((pair, _)) = pairs.get(o) {
                nodes.extend(pair.iter().cloned());
            }
        }
    }
    g.nodes = nodes;
    g.inits.retain(|i| !drop_inits.contains(&i.name));
    g.inits.extend(new_inits);
    g
}

/// A `fnmatch`-style pattern (`*` any run, `?` one character; case-sensitive), as TAO's
/// `skip_names` and `layers[].module_name`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0usize, 0usize);
    let (mut star, mut mark) = (None, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_drop_the_unique_suffix_and_the_weight_tail() {
        assert_eq!(
            module_of("transformer.encoder.layers.0.linear1.weight_t_123"),
            "transformer.encoder.layers.0.linear1"
        );
        assert_eq!(
            module_of("backbone.0.body.layer1.0.conv1.weight_7"),
            "backbone.0.body.layer1.0.conv1"
        );
        assert_eq!(module_of("plain"), "plain");
    }

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob("*class_embed*", "class_embed.0"));
        assert!(glob("backbone.*.conv?", "backbone.0.body.conv1"));
        assert!(!glob("backbone.*.conv?", "backbone.0.body.conv12"));
        assert!(glob("*", ""));
        assert!(!glob("Conv2d", "Linear"));
    }

    #[test]
    fn uint8_params_represent_zero_exactly() {
        let (s, zp) = uint8_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(zp, 64);
        assert_eq!(
            uint8_params(0.0, 2.0).1,
            0,
            "a ReLU output has zero point 0"
        );
        assert_eq!(uint8_params(0.0, 0.0), (1.0, 0));
    }

    #[test]
    fn per_channel_weights_use_each_channels_largest_magnitude() {
        // [2, 3] with axis 1: channels are columns.
        let w = [1.0f32, -2.0, 0.0, 0.5, 4.0, 0.0];
        let (q, s) = int8_per_channel(&w, &[2, 3], 1, 127.0);
        assert_eq!(s, vec![1.0 / 127.0, 4.0 / 127.0, 1.0]);
        assert_eq!(q, vec![127, -64, 0, 64, 127, 0]);
        // Axis 0 of [2, 2, 1, 1]: rows.
        let (q, s) = int8_per_channel(&[0.5, -1.0, 3.0, 1.5], &[2, 2, 1, 1], 0, 127.0);
        assert_eq!(s, vec![1.0 / 127.0, 3.0 / 127.0]);
        assert_eq!(q, vec![64, -127, 127, 64]);
    }
}
