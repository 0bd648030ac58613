//! `ddetr doctor`: what this binary runs on, honestly — versions, threads, devices, NCCL, venv.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One line of the report: a label and what was found.
pub struct Check {
    pub label: &'static str,
    pub value: String,
}

/// Collects the report (no printing here; the binary prints it).
pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    out.push(Check {
        label: "ddetr",
        value: env!("CARGO_PKG_VERSION").to_string(),
    });
    let torch_lib = loaded_libtorch_dir();
    let torch_version = torch_lib
        .as_deref()
        .and_then(|lib| std::fs::read_to_string(lib.join("../version.py")).ok())
        .and_then(|text| parse_torch_version(&text))
        .unwrap_or_else(|| "unknown".into());
    out.push(Check {
        label: "libtorch",
        value: match &torch_lib {
            Some(dir) => format!("{torch_version} ({})", clean(dir).display()),
            None => format!("{torch_version} (location unknown)"),
        },
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    out.push(Check {
        label: "cpu",
        value: format!(
            "{cores} cores available, libtorch intra-op threads {}",
            tch::get_num_threads()
        ),
    });
    out.push(Check {
        label: "cuda",
        value: cuda_line(),
    });
    out.push(Check {
        label: "nccl",
        value: match ddetr_collective::nccl::NcclLibrary::open() {
            Ok(lib) => match lib.version() {
                Ok((a, b, c)) => format!("{a}.{b}.{c} ({})", clean(&lib.path).display()),
                Err(e) => format!("opened {} but {e}", lib.path.display()),
            },
            Err(e) => format!("not available: {e}"),
        },
    });
    out.push(Check {
        label: "venv",
        value: venv_line(torch_lib.as_deref()),
    });
    out
}

/// The report as text, one `label  value` line per check.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let _ = writeln!(s, "{:<9} {}", c.label, c.value);
    }
    s
}

fn cuda_line() -> String {
    if let Err(e) = ddetr_trainer::cuda_runtime::ensure_loaded() {
        return e;
    }
    let n = tch::Cuda::device_count();
    if n > 0 {
        let names: Vec<String> = (0..n).map(|i| format!("cuda:{i}")).collect();
        return format!(
            "{n} device(s): {} (cudnn {})",
            names.join(", "),
            tch::Cuda::cudnn_is_available()
        );
    }
    // SAFETY: probing for the driver library runs only its initialisers.
    let driver = unsafe { libloading::Library::new("libcuda.so.1") };
    match driver {
        Ok(_) => "no CUDA device visible (the driver loads, but reports no device; check CUDA_VISIBLE_DEVICES)".into(),
        Err(_) => "none (no NVIDIA driver: libcuda.so.1 not found); training runs on CPU".into(),
    }
}

fn venv_line(torch_lib: Option<&Path>) -> String {
    // <venv>/lib/pythonX.Y/site-packages/torch/lib → <venv>
    let from_lib = torch_lib.map(|lib| clean(&lib.join("../../../../..")));
    match (from_lib, std::env::var_os("VIRTUAL_ENV")) {
        (Some(v), _) if v.join("bin/python").exists() => {
            format!("{} (holds the libtorch in use)", v.display())
        }
        (_, Some(env)) => format!("{} (from VIRTUAL_ENV)", PathBuf::from(env).display()),
        _ => "none found (libtorch is not from a virtualenv)".into(),
    }
}

/// The directory of the libtorch_cpu.so mapped into this process (from /proc/self/maps), or the
/// one the build linked against.
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mapped = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf));
    mapped.or_else(|| option_env!("DDETR_LIBTORCH_LIB").map(PathBuf::from))
}

fn parse_torch_version(version_py: &str) -> Option<String> {
    version_py
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_string())
}

/// Resolves `..` without touching the filesystem's symlinks more than canonicalize would.
fn clean(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_version_is_read_from_version_py() {
        let text = "from typing import Optional\n__version__ = '2.11.0+cu130'\ndebug = False\n";
        assert_eq!(parse_torch_version(text).as_deref(), Some("2.11.0+cu130"));
    }
}
