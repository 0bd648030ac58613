//! libtorch's CUDA half, loaded at run time. The binaries link `libtorch_cpu` only: the linker's
//! `--as-needed` drops `libtorch_cuda.so` (torch-sys asks for it, but nothing calls into it by
//! name), and without it libtorch registers no CUDA hooks or allocator, so
//! `tch::Cuda::is_available()` says false even on a GPU machine. Where the NVIDIA driver is
//! present, [`ensure_loaded`] opens `libtorch_cuda.so` from the libtorch the binary was built
//! against (its static initialisers register CUDA with libtorch, as importing torch does in
//! Python); a CPU machine never maps the CUDA libraries. It must run before libtorch is first
//! asked about CUDA: libtorch caches its CUDA hooks on that first question.

use std::sync::OnceLock;

/// The outcome of the one load attempt of this process.
static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

/// The libtorch lib dir the binary was linked against (build/rpath.rs), if known.
fn libtorch_lib_dir() -> Option<&'static str> {
    option_env!("DDETR_LIBTORCH_LIB")
}

/// Whether the NVIDIA driver library is present (a GPU machine).
pub fn driver_present() -> bool {
    // SAFETY: opening the driver library runs no code of ours; it is closed again at once.
    unsafe { libloading::Library::new("libcuda.so.1") }.is_ok()
}

/// Opens `libtorch_cuda.so` (process-wide, never unloaded) with its symbols global.
pub fn load_torch_cuda() -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Some(dir) = libtorch_lib_dir() {
        candidates.push(format!("{dir}/libtorch_cuda.so"));
    }
    // The binary's RUNPATH, then the loader's default search.
    candidates.push("libtorch_cuda.so".to_string());
    for path in candidates {
        // SAFETY: libtorch_cuda's initialisers register CUDA with the already loaded libtorch of
        // the same build; the library stays loaded for the life of the process.
        match unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) } {
            Ok(lib) => {
                std::mem::forget(lib);
                return Ok(());
            }
            Err(e) => tried.push(format!("{path}: {e}")),
        }
    }
    Err(format!(
        "cannot load libtorch's CUDA library ({}); reinstall with `make setup` or run on the CPU",
        tried.join("; ")
    ))
}

/// Loads libtorch's CUDA half once, where the NVIDIA driver is present. Ok(()) on a machine
/// without the driver (nothing to load); the error says why CUDA cannot be used.
pub fn ensure_loaded() -> Result<(), String> {
    LOADED
        .get_or_init(|| {
            if driver_present() {
                load_torch_cuda()
            } else {
                Ok(())
            }
        })
        .clone()
}

/// `tch::Cuda::is_available()` after [`ensure_loaded`]; a failed load is logged once and reads
/// as no CUDA.
pub fn cuda_available() -> bool {
    match ensure_loaded() {
        Ok(()) => tch::Cuda::is_available(),
        Err(e) => {
            static WARNED: OnceLock<()> = OnceLock::new();
            WARNED.get_or_init(|| tracing::warn!("{e}"));
            false
        }
    }
}
