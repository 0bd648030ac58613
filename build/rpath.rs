/// Gives the package's binaries and tests an rpath to the libtorch that torch-sys linked, so they
/// run without LD_LIBRARY_PATH (torch-sys publishes its lib dir as DEP_TCH_LIBTORCH_LIB).
/// Returns that lib dir.
fn libtorch_rpath() -> Option<String> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?;
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=DDETR_LIBTORCH_LIB={lib}");
    Some(lib)
}
