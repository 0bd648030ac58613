//! The few ONNX protobuf messages the exporter writes, encoded by hand (field numbers from
//! `onnx/onnx.proto`): `ModelProto`, `GraphProto`, `NodeProto`, `AttributeProto`, `TensorProto`,
//! `ValueInfoProto` (with `TypeProto.Tensor` and `TensorShapeProto`) and `OperatorSetIdProto`.
//! Only the wire types 0 (varint), 2 (length-delimited) and 5 (fixed32) are needed.

/// `TensorProto.DataType.FLOAT`.
pub const FLOAT: i32 = 1;
/// `TensorProto.DataType.UINT8`.
pub const UINT8: i32 = 2;
/// `TensorProto.DataType.INT8`.
pub const INT8: i32 = 3;
/// `TensorProto.DataType.INT32`.
pub const INT32: i32 = 6;
/// `TensorProto.DataType.INT64`.
pub const INT64: i32 = 7;

const WIRE_VARINT: u64 = 0;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

/// One protobuf message being encoded.
#[derive(Debug, Default, Clone)]
pub struct Msg(pub Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u64, wire: u64) {
        self.varint((field << 3) | wire);
    }
    /// An `int64`/`int32`/enum field (negative values as 10-byte two's complement, as protobuf).
    pub fn int(&mut self, field: u64, v: i64) -> &mut Self {
        self.key(field, WIRE_VARINT);
        self.varint(v as u64);
        self
    }
    /// A `float` field.
    pub fn float(&mut self, field: u64, v: f32) -> &mut Self {
        self.key(field, WIRE_FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A `bytes`/`string` field.
    pub fn bytes(&mut self, field: u64, b: &[u8]) -> &mut Self {
        self.key(field, WIRE_LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, field: u64, s: &str) -> &mut Self {
        self.bytes(field, s.as_bytes())
    }
    /// An embedded message field.
    pub fn msg(&mut self, field: u64, m: &Msg) -> &mut Self {
        self.bytes(field, &m.0)
    }
    /// A packed `repeated int64` field.
    pub fn packed_ints(&mut self, field: u64, vs: &[i64]) -> &mut Self {
        let mut inner = Msg::default();
        for &v in vs {
            inner.varint(v as u64);
        }
        self.bytes(field, &inner.0)
    }
}

/// A node attribute value.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
}

/// `AttributeProto`.
pub fn attribute(name: &str, value: &Attr) -> Msg {
    // AttributeType: FLOAT 1, INT 2, STRING 3, INTS 7.
    let mut m = Msg::default();
    m.str(1, name);
    match value {
        Attr::Float(f) => {
            m.float(2, *f).int(20, 1);
        }
        Attr::Int(i) => {
            m.int(3, *i).int(20, 2);
        }
        Attr::Str(s) => {
            m.str(4, s).int(20, 3);
        }
        Attr::Ints(is) => {
            for &i in is {
                m.int(8, i);
            }
            m.int(20, 7);
        }
    }
    m
}

/// `NodeProto`.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: &[(&str, Attr)],
) -> Msg {
    let mut m = Msg::default();
    for i in inputs {
        m.str(1, i);
    }
    for o in outputs {
        m.str(2, o);
    }
    m.str(3, name).str(4, op);
    for (n, a) in attrs {
        m.msg(5, &attribute(n, a));
    }
    m
}

/// `TensorProto` with `raw_data` (little-endian).
pub fn tensor(name: &str, dims: &[i64], data_type: i32, raw: &[u8]) -> Msg {
    let mut m = Msg::default();
    m.packed_ints(1, dims)
        .int(2, data_type as i64)
        .str(8, name)
        .bytes(9, raw);
    m
}

/// One dimension of a value's shape: fixed or symbolic.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    Param(String),
}

/// `ValueInfoProto` of a tensor (`shape: None`: the shape is left unknown).
pub fn value_info(name: &str, elem_type: i32, shape: Option<&[Dim]>) -> Msg {
    let mut tensor_type = Msg::default();
    tensor_type.int(1, elem_type as i64);
    if let Some(shape) = shape {
        let mut shape_m = Msg::default();
        for d in shape {
            let mut dm = Msg::default();
            match d {
                Dim::Fixed(v) => dm.int(1, *v),
                Dim::Param(p) => dm.str(2, p),
            };
            shape_m.msg(1, &dm);
        }
        tensor_type.msg(2, &shape_m);
    }
    let mut type_proto = Msg::default();
    type_proto.msg(1, &tensor_type);
    let mut m = Msg::default();
    m.str(1, name).msg(2, &type_proto);
    m
}

/// A `ModelProto` around a graph's parts.
#[allow(clippy::too_many_arguments)]
pub fn model(
    ir_version: i64,
    opset: i64,
    producer_version: &str,
    graph_name: &str,
    nodes: &[Msg],
    initializers: &[Msg],
    inputs: &[Msg],
    outputs: &[Msg],
) -> Vec<u8> {
    let mut g = Msg::default();
    for n in nodes {
        g.msg(1, n);
    }
    g.str(2, graph_name);
    for t in initializers {
        g.msg(5, t);
    }
    for i in inputs {
        g.msg(11, i);
    }
    for o in outputs {
        g.msg(12, o);
    }
    let mut opset_id = Msg::default();
    opset_id.str(1, "").int(2, opset);
    let mut m = Msg::default();
    m.int(1, ir_version)
        .str(2, "ddetr")
        .str(3, producer_version)
        .msg(7, &g)
        .msg(8, &opset_id);
    m.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_protobuf() {
        let mut m = Msg::default();
        m.int(1, 300);
        assert_eq!(m.0, vec![0x08, 0xac, 0x02]);
        let mut m = Msg::default();
        m.int(1, -1);
        assert_eq!(m.0.len(), 11, "negative int64 is a 10-byte varint");
        let mut m = Msg::default();
        m.str(2, "ab");
        assert_eq!(m.0, vec![0x12, 2, b'a', b'b']);
    }
}
