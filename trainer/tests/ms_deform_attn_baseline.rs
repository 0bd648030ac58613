//! The fused CPU kernels built for the baseline instruction set (what a CPU without AVX2 + FMA
//! runs) against upstream's `grid_sample` formulation. Its own test binary: forcing the baseline
//! is process-wide.

mod msda_common;

use ddetr_trainer::model::ms_deform_attn::{
    force_baseline_kernels, fused_cpu_uses_avx2, ms_deform_attn_core_fused_cpu,
};
use msda_common::*;
use tch::Kind;

#[test]
fn baseline_kernels_match_grid_sample() {
    force_baseline_kernels(true);
    assert!(!fused_cpu_uses_avx2());
    compare_op(ms_deform_attn_core_fused_cpu, Kind::Double, 4, 32, 1e-12);
    compare_op(ms_deform_attn_core_fused_cpu, Kind::Double, 3, 5, 1e-12);
    compare_op(ms_deform_attn_core_fused_cpu, Kind::Float, 8, 32, 2e-5);
}
