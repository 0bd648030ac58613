//! The workspace's libtorch rpath (build/rpath.rs), plus the trainer's C++ (trainer/csrc): the
//! fused CPU multi-scale deformable attention and the device-memory statistics, compiled against the headers of the libtorch
//! torch-sys linked, with the same C++ ABI flag torch-sys uses.
use std::path::PathBuf;

include!("../build/rpath.rs");

fn main() {
    let Some(lib) = libtorch_rpath() else {
        panic!("torch-sys did not publish DEP_TCH_LIBTORCH_LIB; cannot find the libtorch headers");
    };
    let root = PathBuf::from(&lib).join("..");
    let includes = [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
    ];
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    for f in [
        "msda.cpp",
        "device_memory.cpp",
        "c_api.h",
        "msda_kernels.h",
        "msda_kernels.inc",
        "msda_kernels_base.cpp",
        "msda_kernels_avx2.cpp",
    ] {
        println!("cargo:rerun-if-changed=csrc/{f}");
    }
    let x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        // The kernels are the point: optimise them in test and dev builds too.
        .opt_level(3)
        .debug(false)
        .includes(&includes)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/msda.cpp")
        .file("csrc/device_memory.cpp")
        .file("csrc/msda_kernels_base.cpp");
    if x86_64 {
        build.file("csrc/msda_kernels_avx2.cpp");
    }
    build.compile("ddetr_msda");
}
