//! Shared by every package of the workspace (members point `build = "../build.rs"`).
//! Gives the package's binaries and tests an rpath to the libtorch that torch-sys linked, so they
//! run without LD_LIBRARY_PATH (torch-sys publishes its lib dir as DEP_TCH_LIBTORCH_LIB).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=DDETR_LIBTORCH_LIB={lib}");
    }
}
