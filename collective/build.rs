//! Build script of ddetr-collective:
//! 1. the libtorch rpath and DDETR_LIBTORCH_LIB (the workspace's ../build/rpath.rs);
//! 2. NCCL bindings: bindgen over the `nccl.h` of the venv's nvidia-nccl-cu13 wheel, allowlisting
//!    only the functions the NCCL backend calls, as a struct whose constructor opens the library at
//!    run time (libloading), so neither the build nor CPU runs need libnccl.
//!
//! The wheel ships no complete CUDA headers (`crt/host_config.h` is missing), so bindgen gets a
//! small shim include directory ahead of NCCL's: a `cuda_runtime.h` declaring just
//! `cudaStream_t`, and empty `cuda_fp16.h` / `cuda_bf16.h`.
//! nccl.h is found at DDETR_NCCL_INCLUDE, else next to the libtorch torch-sys linked
//! (<site-packages>/nvidia/nccl/include).

use std::path::PathBuf;

include!("../build/rpath.rs");

/// The NCCL entry points the backend uses; nothing else is bound.
const FUNCTIONS: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRankConfig",
    "ncclCommGetAsyncError",
    "ncclCommFinalize",
    "ncclCommDestroy",
    "ncclCommAbort",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclAllReduce",
    "ncclBroadcast",
    "ncclAllGather",
    "ncclReduceScatter",
    "ncclGroupStart",
    "ncclGroupEnd",
];

const SHIM_CUDA_RUNTIME: &str = "#pragma once\n#include <stddef.h>\n#include <stdint.h>\n#define CUDART_VERSION 13000\ntypedef struct CUstream_st* cudaStream_t;\n";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build/rpath.rs");
    println!("cargo:rerun-if-env-changed=DDETR_NCCL_INCLUDE");
    let torch_lib = libtorch_rpath();

    let include = std::env::var_os("DDETR_NCCL_INCLUDE")
        .map(PathBuf::from)
        .or_else(|| torch_lib.as_ref().map(|lib| PathBuf::from(lib).join("../../nvidia/nccl/include")))
        .filter(|dir| dir.join("nccl.h").exists())
        .unwrap_or_else(|| {
            panic!(
                "nccl.h not found: install the nvidia-nccl-cu13 wheel next to torch (scripts/setup.sh does) \
                 or set DDETR_NCCL_INCLUDE to the directory holding nccl.h"
            )
        });
    let header = include.join("nccl.h");
    println!("cargo:rerun-if-changed={}", header.display());

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let shim = out.join("cuda-shim");
    std::fs::create_dir_all(&shim).expect("create the CUDA shim include dir");
    std::fs::write(shim.join("cuda_runtime.h"), SHIM_CUDA_RUNTIME)
        .expect("write cuda_runtime.h shim");
    std::fs::write(shim.join("cuda_fp16.h"), "#pragma once\n").expect("write cuda_fp16.h shim");
    std::fs::write(shim.join("cuda_bf16.h"), "#pragma once\n").expect("write cuda_bf16.h shim");

    let mut builder = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", shim.display()))
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_type("nccl.*")
        .allowlist_var("NCCL_.*")
        .dynamic_library_name("NcclLib")
        .dynamic_link_require_all(true)
        .derive_default(true)
        .layout_tests(false)
        .prepend_enum_name(false);
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {}: {e}", header.display()));
    bindings
        .write_to_file(out.join("nccl_bindings.rs"))
        .expect("write nccl_bindings.rs");
}
