//! Shared by the deformable-attention op tests: random cases over three levels and a comparison
//! of an op against upstream's `grid_sample` formulation (values and all three gradients).

use ddetr_trainer::model::ms_deform_attn::ms_deform_attn_core_grid_sample;
use tch::{Device, Kind, Tensor};

pub const SHAPES: [(i64, i64); 3] = [(5, 7), (3, 4), (1, 2)];

pub struct Case {
    pub value: Tensor,
    pub loc: Tensor,
    pub attn: Tensor,
    pub grad_out: Tensor,
}

pub fn case(kind: Kind, heads: i64, channels: i64, seed: i64) -> Case {
    tch::manual_seed(seed);
    let (b, q, l, p) = (2, 11, SHAPES.len() as i64, 3);
    let s: i64 = SHAPES.iter().map(|&(h, w)| h * w).sum();
    let opts = (kind, Device::Cpu);
    let value = Tensor::randn([b, s, heads, channels], opts);
    // Locations in [−0.3, 1.3]: some samples fully outside, some straddling the border.
    let loc = Tensor::rand([b, q, heads, l, p, 2], opts) * 1.6 - 0.3;
    let attn = Tensor::rand([b, q, heads, l, p], opts) + 0.1;
    let grad_out = Tensor::randn([b, q, heads * channels], opts);
    Case {
        value,
        loc,
        attn,
        grad_out,
    }
}

/// Output and (value, loc, attn) gradients of one implementation.
pub fn run(c: &Case, f: Core) -> (Tensor, Tensor, Tensor, Tensor) {
    let v = c.value.detach().set_requires_grad(true);
    let l = c.loc.detach().set_requires_grad(true);
    let a = c.attn.detach().set_requires_grad(true);
    let out = f(&v, &SHAPES, &l, &a);
    backward(&out, &c.grad_out);
    (out.detach(), v.grad(), l.grad(), a.grad())
}

/// Backward from `out` with the output gradient `grad_out`.
pub fn backward(out: &Tensor, grad_out: &Tensor) {
    assert_eq!(out.size(), grad_out.size());
    (out * grad_out).sum(Kind::Double).backward();
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

pub type Core = fn(&Tensor, &[(i64, i64)], &Tensor, &Tensor) -> Tensor;

pub fn compare_op(op: Core, kind: Kind, heads: i64, channels: i64, tol: f64) {
    for seed in [1, 2, 3] {
        let c = case(kind, heads, channels, seed);
        let (o1, gv1, gl1, ga1) = run(&c, op);
        let (o2, gv2, gl2, ga2) = run(&c, ms_deform_attn_core_grid_sample);
        // Scale-aware: the gradients of locations are multiplied by the level sizes.
        for (name, a, b) in [
            ("output", &o1, &o2),
            ("grad value", &gv1, &gv2),
            ("grad locations", &gl1, &gl2),
            ("grad weights", &ga1, &ga2),
        ] {
            let scale = b.abs().max().double_value(&[]).max(1.0);
            let d = max_diff(a, b);
            assert!(
                d <= tol * scale,
                "{kind:?} D={channels} seed {seed}: {name} differs by {d} (scale {scale})"
            );
        }
        // Samples fully outside contribute nothing, and some must exist for the test to mean it.
        let outside = c.loc.lt(-0.25).logical_or(&c.loc.gt(1.25));
        assert!(outside.any().int64_value(&[]) == 1);
    }
}
