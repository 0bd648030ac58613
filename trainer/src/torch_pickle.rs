//! A reader for `torch.save` zip archives (`.pth`), enough for model checkpoints: the pickle
//! program in `<archive>/data.pkl` is interpreted by a small stack machine that knows the
//! opcodes `torch.save` emits (protocol 2) and the few globals a state dict uses
//! (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, `collections.OrderedDict`, typed
//! storages); any other object (the `argparse.Namespace` of an official checkpoint's `args`, the
//! OmegaConf `hyper_parameters` and the loop and callback states of a Lightning checkpoint) becomes
//! an opaque value. Tensors are rebuilt from `<archive>/data/<key>` with their storage offset,
//! size and stride (a broadcast view, stride 0, comes back as the full tensor), and only those of
//! the state dict picked are read: a Lightning checkpoint's optimizer state stays on disk.
//! libtorch's own `pickle_load` rejects such files (it needs TorchScript types), hence this reader.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::TrainerError;

/// A tensor of the archive, read from its storage only when the state dict is collected.
#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    storage: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// A pickled value.
#[derive(Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        kind: Kind,
        key: String,
    },
    Tensor(TensorRef),
    /// An object this reader does not model.
    Opaque(String),
    Mark,
}

impl Value {
    fn clone_shallow(&self) -> Value {
        match self {
            Value::None => Value::None,
            Value::Bool(b) => Value::Bool(*b),
            Value::Int(i) => Value::Int(*i),
            Value::Float(f) => Value::Float(*f),
            Value::Str(s) => Value::Str(s.clone()),
            Value::Bytes(b) => Value::Bytes(b.clone()),
            Value::Tuple(v) => Value::Tuple(v.iter().map(Value::clone_shallow).collect()),
            Value::List(v) => Value::List(v.iter().map(Value::clone_shallow).collect()),
            Value::Dict(v) => Value::Dict(
                v.iter()
                    .map(|(k, x)| (k.clone_shallow(), x.clone_shallow()))
                    .collect(),
            ),
            Value::Global(m, n) => Value::Global(m.clone(), n.clone()),
            Value::Storage { kind, key } => Value::Storage {
                kind: *kind,
                key: key.clone(),
            },
            Value::Tensor(t) => Value::Tensor(t.clone()),
            Value::Opaque(s) => Value::Opaque(s.clone()),
            Value::Mark => Value::Mark,
        }
    }
    fn as_ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::Tuple(v) | Value::List(v) => v
                .iter()
                .map(|x| match x {
                    Value::Int(i) => Some(*i),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl Unpickler<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.pos + n > self.data.len() {
            return Err("truncated pickle".into());
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn line(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("pickle MARK missing")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, String> {
        let Value::Global(module, name) = callable else {
            return Ok(Value::Opaque("call of a non-global".into()));
        };
        let args = match args {
            Value::Tuple(a) => a,
            _ => Vec::new(),
        };
        Ok(match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let (
                    Some(Value::Storage { kind, key }),
                    Some(Value::Int(offset)),
                    Some(size),
                    Some(stride),
                ) = (
                    args.first(),
                    args.get(1),
                    args.get(2).and_then(Value::as_ints),
                    args.get(3).and_then(Value::as_ints),
                )
                else {
                    return Err(format!("unexpected arguments to {module}.{name}"));
                };
                Value::Tensor(TensorRef {
                    kind: *kind,
                    storage: key.clone(),
                    offset: *offset,
                    size,
                    stride,
                })
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => t,
                _ => return Err("unexpected arguments to _rebuild_parameter".into()),
            },
            ("collections", "OrderedDict") | ("builtins", "dict") => Value::Dict(Vec::new()),
            _ => Value::Opaque(format!("{module}.{name}")),
        })
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?.to_vec();
                    let mut v: i64 = 0;
                    for (i, b) in bytes.iter().enumerate().take(8) {
                        v |= i64::from(*b) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s));
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'T' {
                        Value::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Value::Bytes(b)
                    });
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'U' {
                        Value::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Value::Bytes(b)
                    });
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(self.global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (module, name) else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    self.stack.push(self.global(m, n));
                }
                b'q' => {
                    let i = u32::from(self.u8()?);
                    let v = self.top()?.clone_shallow();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone_shallow();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone_shallow();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        u32::from(self.u8()?)
                    } else {
                        self.u32()?
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .ok_or_else(|| format!("pickle memo {i} missing"))?
                        .clone_shallow();
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self
                        .stack
                        .len()
                        .checked_sub(n)
                        .ok_or("pickle stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let mut pairs = Vec::new();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    self.stack.push(Value::Dict(pairs));
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(l) = self.top()? {
                        l.push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top()? {
                        l.extend(items);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top()? {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Value::Dict(d) = self.top()? {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let name = match cls {
                        Value::Global(m, n) => format!("{m}.{n}"),
                        _ => "object".into(),
                    };
                    self.stack.push(Value::Opaque(name));
                }
                b'b' => {
                    // BUILD: state is irrelevant for the values this reader models.
                    self.pop()?;
                }
                b'Q' => {
                    // BINPERSID: ('storage', storage_type, key, location, numel)
                    let pid = self.pop()?;
                    let Value::Tuple(t) = pid else {
                        return Err("persistent id is not a tuple".into());
                    };
                    let (Some(Value::Global(_, ty)), Some(Value::Str(key))) = (t.get(1), t.get(2))
                    else {
                        return Err("unexpected persistent id".into());
                    };
                    let kind =
                        storage_kind(ty).ok_or_else(|| format!("unsupported storage type {ty}"))?;
                    self.stack.push(Value::Storage {
                        kind,
                        key: key.clone(),
                    });
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone_shallow();
                    self.stack.push(v);
                }
                0x8f => self.stack.push(Value::List(Vec::new())), // EMPTY_SET (as a list)
                0x90 => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top()? {
                        l.extend(items);
                    }
                }
                _ => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{op:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }

    fn global(&self, module: String, name: String) -> Value {
        Value::Global(module, name)
    }
}

/// Collects `prefix + key → tensor` from nested dicts.
fn collect(v: Value, prefix: &str, out: &mut Vec<(String, TensorRef)>) {
    if let Value::Dict(pairs) = v {
        for (k, x) in pairs {
            let key = match k {
                Value::Str(s) => s,
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            match x {
                Value::Tensor(t) => out.push((format!("{prefix}{key}"), t)),
                d @ Value::Dict(_) => collect(d, &format!("{prefix}{key}."), out),
                _ => {}
            }
        }
    }
}

/// The state dict of a `torch.save` archive and where in the archive it was.
#[derive(Debug)]
pub struct ArchiveStateDict {
    /// The top-level entry holding the tensors: `model` (official checkpoints), `state_dict`
    /// (Lightning), or `None` when the archive is the state dict itself.
    pub container: Option<&'static str>,
    /// The names of the top-level entries (`epoch`, `args`, `pytorch-lightning_version`, …).
    pub top_level: Vec<String>,
    pub tensors: Vec<(String, Tensor)>,
}

/// Reads the model state dict of a `torch.save` archive: the `model` (official checkpoints),
/// `state_dict` or top-level dict of tensors.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, TrainerError> {
    read_archive(path).map(|a| a.tensors)
}

/// [`read_state_dict`], saying which entry of the archive held the tensors.
pub fn read_archive(path: &Path) -> Result<ArchiveStateDict, TrainerError> {
    let err = |reason: String| TrainerError::ReadWeights {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        err(format!(
            "{e}: not a torch.save zip archive (legacy pre-1.6 format is not supported)"
        ))
    })?;
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_string)
        .ok_or_else(|| err("no data.pkl in the archive".into()))?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    let mut data = Vec::new();
    zip.by_name(&pkl)
        .map_err(|e| err(e.to_string()))?
        .read_to_end(&mut data)
        .map_err(|e| err(e.to_string()))?;
    let mut up = Unpickler {
        data: &data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let root = up.run().map_err(err)?;
    let Value::Dict(mut pairs) = root else {
        return Err(err("the archive does not hold a dict".into()));
    };
    let top_level: Vec<String> = pairs
        .iter()
        .filter_map(|(k, _)| match k {
            Value::Str(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let pick = CONTAINERS.iter().find_map(|want| {
        pairs
            .iter()
            .position(|(k, v)| {
                matches!(k, Value::Str(s) if s == want) && matches!(v, Value::Dict(_))
            })
            .map(|i| (*want, i))
    });
    let (container, root) = match pick {
        Some((name, i)) => (Some(name), pairs.swap_remove(i).1),
        None => (None, Value::Dict(pairs)),
    };
    let mut refs = Vec::new();
    collect(root, "", &mut refs);
    if refs.is_empty() {
        return Err(err(
            "no tensors found in the checkpoint's model/state_dict".into()
        ));
    }
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut tensors = Vec::with_capacity(refs.len());
    for (name, r) in refs {
        let storage = match storages.get(&r.storage) {
            Some(t) => t.shallow_clone(),
            None => {
                let t = read_storage(&mut zip, &format!("{prefix}data/{}", r.storage), r.kind)
                    .map_err(|e| err(format!("storage {}: {e}", r.storage)))?;
                storages.insert(r.storage.clone(), t.shallow_clone());
                t
            }
        };
        let numel = storage.numel() as i64;
        let last = r.offset
            + r.size
                .iter()
                .zip(&r.stride)
                .map(|(n, s)| (n - 1).max(0) * s)
                .sum::<i64>();
        let empty = r.size.contains(&0);
        if !empty && (r.offset < 0 || r.stride.iter().any(|s| *s < 0) || last >= numel) {
            return Err(err(format!(
                "tensor {name} reaches past its storage ({numel} elements)"
            )));
        }
        let t = storage
            .as_strided(r.size.as_slice(), r.stride.as_slice(), r.offset)
            .contiguous();
        tensors.push((name, t));
    }
    Ok(ArchiveStateDict {
        container,
        top_level,
        tensors,
    })
}

/// The top-level entries that hold a checkpoint's state dict, in order of preference.
const CONTAINERS: [&str; 2] = ["model", "state_dict"];

/// One storage record of the archive as a flat tensor of `kind`.
fn read_storage(
    zip: &mut zip::ZipArchive<std::fs::File>,
    name: &str,
    kind: Kind,
) -> Result<Tensor, String> {
    let mut bytes = Vec::new();
    zip.by_name(name)
        .map_err(|e| e.to_string())?
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let elem = kind.elt_size_in_bytes();
    Ok(Tensor::from_data_size(
        &bytes,
        &[(bytes.len() / elem) as i64],
        kind,
    ))
}
