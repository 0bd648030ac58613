//! Shared by the workspace's packages without build steps of their own (members point
//! `build = "../build.rs"`); trainer/build.rs and collective/build.rs include the same
//! build/rpath.rs before their C++ and bindgen steps.
include!("build/rpath.rs");

fn main() {
    libtorch_rpath();
}
