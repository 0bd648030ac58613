//! An ONNX graph held in memory before it is encoded: nodes in execution order, initializers,
//! the graph's inputs and outputs. The exporter builds one; `ddetr quantize` rewrites one (adds
//! calibration outputs, inserts QuantizeLinear/DequantizeLinear pairs) before [`Graph::to_bytes`]
//! encodes it with [`super::proto`].

use super::proto::{self, Attr, Dim};

/// `NodeProto`.
#[derive(Debug, Clone)]
pub struct Node {
    pub op: String,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(String, Attr)>,
}

impl Node {
    pub fn new(
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: &[(&str, Attr)],
    ) -> Self {
        Self {
            op: op.into(),
            name: name.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: attrs
                .iter()
                .map(|(n, a)| (n.to_string(), a.clone()))
                .collect(),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }
}

/// `TensorProto` with raw little-endian data.
#[derive(Debug, Clone)]
pub struct Init {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: i32,
    pub raw: Vec<u8>,
}

impl Init {
    pub fn f32(name: &str, dims: &[i64], values: &[f32]) -> Self {
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: proto::FLOAT,
            raw: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// The values of an f32 initializer (`None` for other types).
    pub fn f32s(&self) -> Option<Vec<f32>> {
        (self.data_type == proto::FLOAT).then(|| {
            self.raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }

    pub fn numel(&self) -> i64 {
        self.dims.iter().product()
    }
}

/// `ValueInfoProto` of a tensor; `shape: None` leaves the shape unknown.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    pub shape: Option<Vec<Dim>>,
}

/// A whole model: one graph and its opset.
#[derive(Debug, Clone)]
pub struct Graph {
    pub name: String,
    pub opset: u32,
    pub nodes: Vec<Node>,
    pub inits: Vec<Init>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

impl Graph {
    pub fn init(&self, name: &str) -> Option<&Init> {
        self.inits.iter().find(|i| i.name == name)
    }

    /// `ModelProto` bytes (IR version from the opset, as onnx's `VERSION_TABLE`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let ir_version = match self.opset {
            ..=18 => 8,
            19 | 20 => 9,
            _ => 10,
        };
        let nodes: Vec<proto::Msg> = self
            .nodes
            .iter()
            .map(|n| {
                let inputs: Vec<&str> = n.inputs.iter().map(String::as_str).collect();
                let outputs: Vec<&str> = n.outputs.iter().map(String::as_str).collect();
                let attrs: Vec<(&str, Attr)> = n
                    .attrs
                    .iter()
                    .map(|(k, a)| (k.as_str(), a.clone()))
                    .collect();
                proto::node(&n.op, &n.name, &inputs, &outputs, &attrs)
            })
            .collect();
        let inits: Vec<proto::Msg> = self
            .inits
            .iter()
            .map(|t| proto::tensor(&t.name, &t.dims, t.data_type, &t.raw))
            .collect();
        let vi = |v: &ValueInfo| proto::value_info(&v.name, v.elem_type, v.shape.as_deref());
        let inputs: Vec<proto::Msg> = self.inputs.iter().map(vi).collect();
        let outputs: Vec<proto::Msg> = self.outputs.iter().map(vi).collect();
        proto::model(
            ir_version,
            i64::from(self.opset),
            env!("CARGO_PKG_VERSION"),
            &self.name,
            &nodes,
            &inits,
            &inputs,
            &outputs,
        )
    }

    /// The same model with `extra` float tensors added to its outputs (shapes unknown), so a
    /// runtime returns them too: how calibration reads intermediate activations.
    pub fn with_outputs(&self, extra: &[String]) -> Graph {
        let mut g = self.clone();
        for name in extra {
            if !g.outputs.iter().any(|o| &o.name == name) {
                g.outputs.push(ValueInfo {
                    name: name.clone(),
                    elem_type: proto::FLOAT,
                    shape: None,
                });
            }
        }
        g
    }

    /// The nodes that read `value`.
    pub fn consumers<'a>(&'a self, value: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes
            .iter()
            .filter(move |n| n.inputs.iter().any(|i| i == value))
    }

    /// Whether `value` is a graph output.
    pub fn is_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o.name == value)
    }
}
