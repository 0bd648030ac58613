//! Shared by every package of the workspace but the trainer (members point
//! `build = "../build.rs"`; trainer/build.rs adds its C++ kernels to the same rpath logic).
include!("build/rpath.rs");

fn main() {
    libtorch_rpath();
}
