//! ONNX Runtime, opened at run time: the `ort` crate with `load-dynamic`, loading the
//! `libonnxruntime.so` of the Python wheel in the venv that also holds libtorch (so nothing is
//! downloaded at build time and nothing links against it). `ddetr quantize` runs exported models
//! with it to calibrate, score and time them.
//!
//! The library is found, in order, at `ORT_DYLIB_PATH`; in the `onnxruntime/capi` folder beside
//! the `torch` package this process loaded libtorch from; in `$VIRTUAL_ENV`'s site-packages.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;

use crate::TrainerError;

/// One error line: what failed and how to fix it.
fn err(what: &str, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Config(format!("onnxruntime: {what}: {e}"))
}

/// `libonnxruntime.so*` in a wheel's `onnxruntime/capi` folder under `site_packages`.
fn in_site_packages(site_packages: &Path) -> Option<PathBuf> {
    let capi = site_packages.join("onnxruntime").join("capi");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&capi)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The site-packages folder of the loaded libtorch (`…/site-packages/torch/lib/libtorch*.so`).
fn torch_site_packages() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/torch/lib/libtorch"))
        .and_then(|p| {
            Path::new(p)
                .parent()?
                .parent()?
                .parent()
                .map(Path::to_path_buf)
        })
}

fn venv_site_packages() -> Vec<PathBuf> {
    let Some(venv) = std::env::var_os("VIRTUAL_ENV") else {
        return Vec::new();
    };
    let lib = Path::new(&venv).join("lib");
    std::fs::read_dir(lib)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path().join("site-packages")))
                .collect()
        })
        .unwrap_or_default()
}

/// Where `libonnxruntime.so` is (see the module doc for the order).
pub fn library_path() -> Result<PathBuf, TrainerError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(err(
                "ORT_DYLIB_PATH",
                format!(
                    "{} is not a file: point it at libonnxruntime.so",
                    p.display()
                ),
            ))
        };
    }
    torch_site_packages()
        .into_iter()
        .chain(venv_site_packages())
        .find_map(|sp| in_site_packages(&sp))
        .ok_or_else(|| {
            err(
                "libonnxruntime.so not found",
                "install the onnxruntime wheel into the venv that holds torch (scripts/setup.sh does) or set ORT_DYLIB_PATH to libonnxruntime.so",
            )
        })
}

/// The process's one ONNX Runtime environment (`ort` allows one per process).
fn environment() -> Result<&'static ort::environment::Environment, TrainerError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        ort::init_from(&path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?
            .with_name("ddetr")
            .build()
            .map_err(|e| format!("cannot start onnxruntime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(|e| TrainerError::Config(format!("onnxruntime: {e}")))
}

/// An output tensor: its shape and values.
pub type Output = (Vec<i64>, Vec<f32>);

/// One loaded model, run on the CPU.
pub struct OnnxModel {
    session: Session,
    input: String,
}

impl OnnxModel {
    /// Loads an ONNX model's bytes with all graph optimizations (QDQ fusion included) and
    /// `threads` intra-op threads (0: onnxruntime's default, one per core).
    pub fn new(bytes: &[u8], threads: usize) -> Result<Self, TrainerError> {
        let env = environment()?;
        let mut builder = Session::builder(env)
            .map_err(|e| err("session", e))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| err("optimization level", e))?;
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| err("threads", e))?;
        }
        let session = builder
            .commit_from_memory(bytes)
            .map_err(|e| err("cannot load the model", e))?;
        let input = session
            .inputs()
            .first()
            .map(|i| i.name().to_string())
            .ok_or_else(|| err("the model", "has no input"))?;
        Ok(Self { session, input })
    }

    /// Runs one batch (`images` `[N, 3, H, W]` row-major, normalised) and returns the named
    /// outputs as (shape, values), in the order asked. Never ask for a graph input as an output:
    /// onnxruntime returns the input's own buffer, which is gone when the call returns.
    pub fn run(
        &mut self,
        images: Vec<f32>,
        shape: [i64; 4],
        outputs: &[&str],
    ) -> Result<Vec<Output>, TrainerError> {
        let input = Tensor::from_array((shape.to_vec(), images)).map_err(|e| err("input", e))?;
        let out = self
            .session
            .run(ort::inputs![self.input.as_str() => input])
            .map_err(|e| err("run", e))?;
        outputs
            .iter()
            .map(|name| {
                let v = out
                    .get(*name)
                    .ok_or_else(|| err("run", format!("the model has no output {name}")))?;
                let (s, data) = v
                    .try_extract_tensor::<f32>()
                    .map_err(|e| err(&format!("output {name}"), e))?;
                Ok((s.to_vec(), data.to_vec()))
            })
            .collect()
    }
}
