//! Training checkpoints: one safetensors file holding the model (official keys), the optimizer
//! state (`optim.<key>.<slot>`), and in the header's `__metadata__` the epoch, step, sampler
//! position, seed, the resolved spec and a SHA-256 of the data section. Written atomically (temp
//! file in the same folder, fsync, rename, fsync of the folder); read back with the checksum
//! verified, so a torn or bit-flipped file is reported instead of loaded.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::TrainerError;

/// Metadata key of the data-section checksum.
pub const CHECKSUM_KEY: &str = "ddetr.sha256";

/// What a checkpoint holds besides tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Epochs fully done when `step` is 0; else the epoch in progress.
    pub epoch: u32,
    /// Steps of `epoch` already done (a mid-epoch checkpoint has step > 0).
    pub step: usize,
    /// Optimizer steps since the start of training.
    pub global_step: u64,
    pub seed: i64,
    pub world: usize,
    /// The resolved spec (YAML).
    pub spec_yaml: String,
}

fn dtype_name(k: Kind) -> Result<&'static str, String> {
    Ok(match k {
        Kind::Float => "F32",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        other => return Err(format!("dtype {other:?} cannot go in a checkpoint")),
    })
}

fn kind_of(name: &str) -> Option<Kind> {
    Some(match name {
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        _ => return None,
    })
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::WriteWeights {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::ReadWeights {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `tensors` and `meta` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &CheckpointMeta,
) -> Result<(), TrainerError> {
    let mut data: Vec<u8> = Vec::new();
    let mut header = serde_json::Map::new();
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in sorted {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = dtype_name(t.kind()).map_err(|e| write_err(path, format!("{name}: {e}")))?;
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let start = data.len();
        data.resize(start + bytes, 0);
        t.copy_data_u8(&mut data[start..], t.numel());
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.size(), "data_offsets": [start, start + bytes]}),
        );
    }
    let sum = hex::encode(Sha256::digest(&data));
    let mut m = serde_json::Map::new();
    let s = |v: String| serde_json::Value::String(v);
    m.insert("ddetr.epoch".into(), s(meta.epoch.to_string()));
    m.insert("ddetr.step".into(), s(meta.step.to_string()));
    m.insert("ddetr.global_step".into(), s(meta.global_step.to_string()));
    m.insert("ddetr.seed".into(), s(meta.seed.to_string()));
    m.insert("ddetr.world".into(), s(meta.world.to_string()));
    m.insert("ddetr.spec".into(), s(meta.spec_yaml.clone()));
    m.insert(CHECKSUM_KEY.into(), s(sum));
    header.insert("__metadata__".into(), serde_json::Value::Object(m));
    let mut h = serde_json::to_vec(&header).map_err(|e| write_err(path, e))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("ckpt"),
        std::process::id()
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(path, e));
    }
    Ok(())
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: CheckpointMeta,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Reads and verifies a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint, TrainerError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| read_err(path, e))?;
    if bytes.len() < 8 {
        return Err(read_err(path, "file is truncated"));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if 8 + n > bytes.len() {
        return Err(read_err(path, "header is truncated"));
    }
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n])
            .map_err(|e| read_err(path, format!("header is not valid JSON ({e})")))?;
    let data = &bytes[8 + n..];
    let meta_json = header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .ok_or_else(|| read_err(path, "not a ddetr training checkpoint (no metadata)"))?;
    let get = |k: &str| -> Result<&str, TrainerError> {
        meta_json
            .get(k)
            .and_then(|v| v.as_str())
            .ok_or_else(|| read_err(path, format!("not a ddetr training checkpoint (no {k})")))
    };
    let want = get(CHECKSUM_KEY)?;
    let got = hex::encode(Sha256::digest(data));
    if want != got {
        return Err(read_err(
            path,
            format!("checksum mismatch (stored {want}, computed {got}): the file is corrupt"),
        ));
    }
    let num = |k: &str| -> Result<i64, TrainerError> {
        get(k)?
            .parse::<i64>()
            .map_err(|_| read_err(path, format!("metadata {k} is not a number")))
    };
    let meta = CheckpointMeta {
        epoch: num("ddetr.epoch")? as u32,
        step: num("ddetr.step")? as usize,
        global_step: num("ddetr.global_step")? as u64,
        seed: num("ddetr.seed")?,
        world: num("ddetr.world")? as usize,
        spec_yaml: get("ddetr.spec")?.to_string(),
    };
    let mut tensors = BTreeMap::new();
    for (name, v) in &header {
        if name == "__metadata__" {
            continue;
        }
        let bad = || read_err(path, format!("tensor {name} has a malformed header entry"));
        let kind = v["dtype"].as_str().and_then(kind_of).ok_or_else(bad)?;
        let shape: Vec<i64> = v["shape"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|x| x.as_i64().ok_or_else(bad))
            .collect::<Result<_, _>>()?;
        let off = v["data_offsets"].as_array().ok_or_else(bad)?;
        let (a, b) = (
            off.first().and_then(|x| x.as_u64()).ok_or_else(bad)? as usize,
            off.get(1).and_then(|x| x.as_u64()).ok_or_else(bad)? as usize,
        );
        let numel: i64 = shape.iter().product();
        if a > b || b > data.len() || (b - a) != numel as usize * kind.elt_size_in_bytes() {
            return Err(bad());
        }
        let t = Tensor::from_data_size(&data[a..b], &shape, kind);
        tensors.insert(name.clone(), t);
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        meta,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            epoch: 3,
            step: 7,
            global_step: 40,
            seed: 1234,
            world: 2,
            spec_yaml: "a: 1\n".into(),
        }
    }

    #[test]
    fn round_trip_keeps_tensors_and_meta() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[5i64]);
        save(
            &p,
            &[("w".into(), a.shallow_clone()), ("n".into(), b)],
            &meta(),
        )
        .unwrap();
        let c = load(&p).unwrap();
        assert_eq!(c.meta, meta());
        assert!(c.tensors["w"].equal(&a));
        assert_eq!(c.tensors["n"].int64_value(&[0]), 5);
        // Standard safetensors: libtorch's reader opens it too.
        let std = Tensor::read_safetensors(&p).unwrap();
        assert_eq!(std.len(), 2);
    }

    #[test]
    fn a_flipped_byte_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let a = Tensor::from_slice(&[1.0f32; 64]);
        save(&p, &[("w".into(), a)], &meta()).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 5;
        bytes[last] ^= 0x10;
        std::fs::write(&p, &bytes).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }
}
