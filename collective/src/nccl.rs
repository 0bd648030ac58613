//! NCCL, opened at run time with `libloading`, so builds and CPU runs never need it.
//!
//! Where the library comes from, first match wins: `DDETR_NCCL_LIB` (a path, for users whose NCCL
//! lives elsewhere), the `nvidia-nccl-cu13` wheel next to the libtorch this binary was built
//! against, then the system loader's search for `libnccl.so.2`.

use std::path::PathBuf;

/// The error every NCCL entry point returns when the library cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NcclLoadError {
    #[error("cannot open NCCL ({tried}): {reason}; install nvidia-nccl-cu13 or set DDETR_NCCL_LIB to libnccl.so.2")]
    Open { tried: String, reason: String },
    #[error("NCCL at {path} lacks {symbol}: {reason}")]
    Symbol {
        path: String,
        symbol: &'static str,
        reason: String,
    },
    #[error("ncclGetVersion failed with code {0}")]
    Call(i32),
}

/// Candidate locations of libnccl, in the order they are tried.
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("DDETR_NCCL_LIB") {
        out.push(PathBuf::from(p));
        return out;
    }
    if let Some(torch_lib) = option_env!("DDETR_LIBTORCH_LIB") {
        // <site-packages>/torch/lib → <site-packages>/nvidia/nccl/lib/libnccl.so.2
        let wheel = PathBuf::from(torch_lib).join("../../nvidia/nccl/lib/libnccl.so.2");
        if wheel.exists() {
            out.push(wheel);
        }
    }
    out.push(PathBuf::from("libnccl.so.2"));
    out
}

/// An opened NCCL library.
pub struct NcclLibrary {
    lib: libloading::Library,
    /// Where it was opened from.
    pub path: PathBuf,
}

impl NcclLibrary {
    /// Opens the first candidate that loads.
    pub fn open() -> Result<Self, NcclLoadError> {
        let mut reasons = Vec::new();
        let tried = candidates();
        for path in &tried {
            // SAFETY: loading NCCL runs its (trusted, vendor) initialisers only.
            match unsafe { libloading::Library::new(path) } {
                Ok(lib) => {
                    return Ok(Self {
                        lib,
                        path: path.clone(),
                    })
                }
                Err(e) => reasons.push(e.to_string()),
            }
        }
        Err(NcclLoadError::Open {
            tried: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            reason: reasons.pop().unwrap_or_default(),
        })
    }

    /// NCCL's version as (major, minor, patch), from `ncclGetVersion`.
    pub fn version(&self) -> Result<(u32, u32, u32), NcclLoadError> {
        type GetVersion = unsafe extern "C" fn(*mut i32) -> i32;
        // SAFETY: ncclGetVersion has had this signature since NCCL 2.0.
        let get: libloading::Symbol<GetVersion> = unsafe { self.lib.get(b"ncclGetVersion\0") }
            .map_err(|e| NcclLoadError::Symbol {
                path: self.path.display().to_string(),
                symbol: "ncclGetVersion",
                reason: e.to_string(),
            })?;
        let mut code = 0i32;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { get(&mut code) };
        if rc != 0 {
            return Err(NcclLoadError::Call(rc));
        }
        Ok(decode_version(code as u32))
    }
}

/// NCCL ≥ 2.9 encodes major·10000 + minor·100 + patch; older ones major·1000 + minor·100 + patch.
pub fn decode_version(code: u32) -> (u32, u32, u32) {
    if code >= 10000 {
        (code / 10000, (code % 10000) / 100, code % 100)
    } else {
        (code / 1000, (code % 1000) / 100, code % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_in_both_schemes() {
        assert_eq!(decode_version(22809), (2, 28, 9));
        assert_eq!(decode_version(2708), (2, 7, 8));
    }
}
