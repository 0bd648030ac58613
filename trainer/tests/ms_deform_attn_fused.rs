//! The C++ multi-scale deformable attention ops (trainer/csrc) against upstream's `grid_sample`
//! formulation as plain tch ops: the fused CPU kernels and the recompute-in-backward node CUDA
//! runs (tested here on the CPU: the same ATen ops), values and the gradients of value, sampling
//! locations and attention weights, in f64 (to rounding) and f32, with samples inside, across and
//! outside each level's border, for the specialised 32-channel heads and the generic width.

use ddetr_trainer::model::ms_deform_attn::{
    ms_deform_attn_core, ms_deform_attn_core_fused_cpu, ms_deform_attn_core_grid_sample,
    ms_deform_attn_core_recompute, uses_fused_cpu,
};
use tch::Kind;

mod msda_common;

use msda_common::*;

fn compare(kind: Kind, heads: i64, channels: i64, tol: f64) {
    compare_op(ms_deform_attn_core_fused_cpu, kind, heads, channels, tol);
}

#[test]
fn fused_matches_grid_sample_in_f64_for_32_channel_heads() {
    compare(Kind::Double, 4, 32, 1e-12);
}

#[test]
fn fused_matches_grid_sample_in_f64_for_other_head_widths() {
    compare(Kind::Double, 3, 5, 1e-12);
    compare(Kind::Double, 2, 40, 1e-12);
}

#[test]
fn fused_matches_grid_sample_in_f32() {
    compare(Kind::Float, 8, 32, 2e-5);
    compare(Kind::Float, 3, 12, 2e-5);
}

#[test]
fn recompute_in_backward_matches_grid_sample() {
    compare_op(ms_deform_attn_core_recompute, Kind::Double, 4, 32, 1e-12);
    compare_op(ms_deform_attn_core_recompute, Kind::Double, 3, 5, 1e-12);
    compare_op(ms_deform_attn_core_recompute, Kind::Float, 8, 32, 2e-5);
}

#[test]
fn recompute_gives_only_the_gradients_asked_for() {
    let c = case(Kind::Double, 2, 8, 5);
    let l = c.loc.detach().set_requires_grad(true);
    let out = ms_deform_attn_core_recompute(&c.value, &SHAPES, &l, &c.attn);
    backward(&out, &c.grad_out);
    let l2 = c.loc.detach().set_requires_grad(true);
    let out2 = ms_deform_attn_core_grid_sample(&c.value, &SHAPES, &l2, &c.attn);
    backward(&out2, &c.grad_out);
    assert!(max_diff(&l.grad(), &l2.grad()) < 1e-10);
    assert!(!c.value.grad().defined() && !c.attn.grad().defined());
}

#[test]
fn the_core_takes_the_fused_path_on_cpu_and_casts_half_precision() {
    let c = case(Kind::Float, 2, 32, 7);
    assert!(uses_fused_cpu(&c.value));
    let want = ms_deform_attn_core_grid_sample(&c.value, &SHAPES, &c.loc, &c.attn);
    let got = ms_deform_attn_core(&c.value, &SHAPES, &c.loc, &c.attn);
    assert!(max_diff(&got, &want) < 1e-5);
    let half = ms_deform_attn_core(
        &c.value.to_kind(Kind::BFloat16),
        &SHAPES,
        &c.loc.to_kind(Kind::BFloat16),
        &c.attn.to_kind(Kind::BFloat16),
    );
    assert_eq!(half.kind(), Kind::BFloat16);
    assert!(max_diff(&half.to_kind(Kind::Float), &want) < 0.1);
}

#[test]
fn only_the_inputs_that_need_gradients_get_them() {
    let c = case(Kind::Float, 2, 32, 9);
    let v = c.value.detach().set_requires_grad(true);
    let out = ms_deform_attn_core_fused_cpu(&v, &SHAPES, &c.loc, &c.attn);
    backward(&out, &c.grad_out);
    let v2 = c.value.detach().set_requires_grad(true);
    let out2 = ms_deform_attn_core_grid_sample(&v2, &SHAPES, &c.loc, &c.attn);
    backward(&out2, &c.grad_out);
    assert!(max_diff(&v.grad(), &v2.grad()) < 1e-5);
    assert!(!c.loc.grad().defined() && !c.attn.grad().defined());
}

#[test]
fn the_backward_is_deterministic() {
    let c = case(Kind::Float, 8, 32, 11);
    let (_, gv1, gl1, ga1) = run(&c, ms_deform_attn_core_fused_cpu);
    let (_, gv2, gl2, ga2) = run(&c, ms_deform_attn_core_fused_cpu);
    assert!(gv1.equal(&gv2) && gl1.equal(&gl2) && ga1.equal(&ga2));
}

#[test]
fn inconsistent_shapes_fail_with_one_line() {
    let c = case(Kind::Float, 2, 32, 13);
    let wrong = [(5, 7), (3, 4), (2, 2)]; // 35 + 12 + 4 = 51 rows, value has 49
    let err = std::panic::catch_unwind(|| {
        ms_deform_attn_core_fused_cpu(&c.value, &wrong, &c.loc, &c.attn)
    })
    .expect_err("mismatched level sizes must fail");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("sum to 51 but value has 49 rows") && !msg.contains('\n'),
        "{msg}"
    );
}
