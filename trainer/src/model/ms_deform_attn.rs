//! Multi-scale deformable attention — upstream `models/ops/modules/ms_deform_attn.py`
//! (`MSDeformAttn`) and `models/ops/functions/ms_deform_attn_func.py`
//! (`ms_deform_attn_core_pytorch`); Deformable DETR paper §4.1, Eq. 3.
//!
//! Sampling is bilinear with zero padding and `align_corners = false` (the CUDA kernel's
//! convention: sample at `loc·size − 0.5`). On CPU in f32/f64 it runs the fused kernels of
//! `trainer/csrc` (one pass over value per query, the head's channels contiguous, and a backward
//! that owns each (image, head) slice of the value gradient); elsewhere (CUDA) it is upstream's
//! `grid_sample` formulation as one autograd node that keeps only value, locations and weights
//! and rebuilds the per-level samples in backward — the official CUDA kernel's memory footprint
//! without a compiled kernel. Under fp16/bf16 the sampling runs in f32 and casts back, as TAO and
//! DINO do.

use std::f64::consts::PI;

use std::ffi::{c_char, CStr};

use tch::nn::{self, Init, Module};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::{linear, xavier_uniform};

/// `grid_sampler` interpolation mode 0 = bilinear.
const BILINEAR: i64 = 0;
/// `grid_sampler` padding mode 0 = zeros.
const ZEROS_PADDING: i64 = 0;

/// `MSDeformAttn(d_model, n_levels, n_heads, n_points)`.
#[derive(Debug)]
pub struct MSDeformAttn {
    pub d_model: i64,
    pub n_levels: i64,
    pub n_heads: i64,
    pub n_points: i64,
    pub sampling_offsets: nn::Linear,
    pub attention_weights: nn::Linear,
    pub value_proj: nn::Linear,
    pub output_proj: nn::Linear,
}

/// The ring-shaped sampling-offset bias of `_reset_parameters`: head h points in direction
/// θ_h = 2πh/n_heads, scaled so its larger component is 1, point k (0-based) at distance k+1.
pub fn sampling_offsets_bias_init(n_heads: i64, n_levels: i64, n_points: i64) -> Tensor {
    let mut v = Vec::with_capacity((n_heads * n_levels * n_points * 2) as usize);
    for h in 0..n_heads {
        // f32 as upstream: thetas = arange(n_heads, f32) * (2π / n_heads).
        let theta = h as f32 * (2.0 * PI / n_heads as f64) as f32;
        let (c, s) = (theta.cos(), theta.sin());
        let m = c.abs().max(s.abs());
        let (gx, gy) = (c / m, s / m);
        for _l in 0..n_levels {
            for p in 0..n_points {
                let k = (p + 1) as f32;
                v.push(gx * k);
                v.push(gy * k);
            }
        }
    }
    Tensor::from_slice(&v)
}

impl MSDeformAttn {
    pub fn new(p: nn::Path, d_model: i64, n_levels: i64, n_heads: i64, n_points: i64) -> Self {
        let n_off = n_heads * n_levels * n_points * 2;
        let sampling_offsets = linear(
            (&p / "sampling_offsets").set_group(crate::param_groups::GROUP_LINEAR_PROJ),
            d_model,
            n_off,
            Init::Const(0.0),
            Init::Const(0.0),
        );
        tch::no_grad(|| {
            let bias =
                sampling_offsets_bias_init(n_heads, n_levels, n_points).to_device(p.device());
            sampling_offsets
                .bs
                .as_ref()
                .expect("linear has a bias")
                .shallow_clone()
                .copy_(&bias);
        });
        let attention_weights = linear(
            &p / "attention_weights",
            d_model,
            n_heads * n_levels * n_points,
            Init::Const(0.0),
            Init::Const(0.0),
        );
        let value_proj = linear(
            &p / "value_proj",
            d_model,
            d_model,
            xavier_uniform(d_model, d_model, 1.0),
            Init::Const(0.0),
        );
        let output_proj = linear(
            &p / "output_proj",
            d_model,
            d_model,
            xavier_uniform(d_model, d_model, 1.0),
            Init::Const(0.0),
        );
        Self {
            d_model,
            n_levels,
            n_heads,
            n_points,
            sampling_offsets,
            attention_weights,
            value_proj,
            output_proj,
        }
    }

    /// * `query` `[N, Lq, C]`
    /// * `reference_points` `[N, Lq, L, 2]` (x, y in [0, 1], padded area included) or
    ///   `[N, Lq, L, 4]` (cx, cy, w, h boxes)
    /// * `input_flatten` `[N, ΣH·W, C]`, `spatial_shapes` the (H, W) of each level
    /// * `padding_mask` `[N, ΣH·W]`, true where padded (value zeroed there)
    ///
    /// Returns `[N, Lq, C]`.
    pub fn forward(
        &self,
        query: &Tensor,
        reference_points: &Tensor,
        input_flatten: &Tensor,
        spatial_shapes: &[(i64, i64)],
        padding_mask: Option<&Tensor>,
    ) -> Tensor {
        let (n, len_q) = (query.size()[0], query.size()[1]);
        let len_in = input_flatten.size()[1];
        let (m, l, p) = (self.n_heads, self.n_levels, self.n_points);
        let mut value = self.value_proj.forward(input_flatten);
        if let Some(mask) = padding_mask {
            value = value.masked_fill(&mask.unsqueeze(-1), 0.0);
        }
        let value = value.view([n, len_in, m, self.d_model / m]);
        let offsets = self
            .sampling_offsets
            .forward(query)
            .view([n, len_q, m, l, p, 2]);
        let weights = self
            .attention_weights
            .forward(query)
            .view([n, len_q, m, l * p])
            .softmax(-1, None::<Kind>)
            .view([n, len_q, m, l, p]);
        let sampling_locations = match reference_points.size()[3] {
            2 => {
                // offset_normalizer = (W, H) per level (the issue-#6 fix).
                let wh: Vec<f32> = spatial_shapes
                    .iter()
                    .flat_map(|&(h, w)| [w as f32, h as f32])
                    .collect();
                let normalizer = Tensor::from_slice(&wh)
                    .to_device(query.device())
                    .to_kind(offsets.kind())
                    .view([1, 1, 1, l, 1, 2]);
                reference_points.view([n, len_q, 1, l, 1, 2]) + offsets / normalizer
            }
            4 => {
                let xy = reference_points
                    .narrow(-1, 0, 2)
                    .view([n, len_q, 1, l, 1, 2]);
                let wh = reference_points
                    .narrow(-1, 2, 2)
                    .view([n, len_q, 1, l, 1, 2]);
                xy + offsets / p as f64 * wh * 0.5
            }
            d => panic!("reference_points must end in 2 or 4 coordinates, got {d}"),
        };
        let out = ms_deform_attn_core(&value, spatial_shapes, &sampling_locations, &weights);
        self.output_proj.forward(&out)
    }
}

extern "C" {
    /// trainer/csrc/msda.cpp: the fused CPU op as an autograd function.
    fn ddetr_ms_deform_attn_cpu(
        value: *const C_tensor,
        loc: *const C_tensor,
        attn: *const C_tensor,
        shapes: *const i64,
        n_levels: i64,
        out: *mut *mut C_tensor,
    ) -> *const c_char;
    /// The same contract on any device: grid_sample per level, recomputed in backward.
    fn ddetr_ms_deform_attn_recompute(
        value: *const C_tensor,
        loc: *const C_tensor,
        attn: *const C_tensor,
        shapes: *const i64,
        n_levels: i64,
        out: *mut *mut C_tensor,
    ) -> *const c_char;
    fn ddetr_ms_deform_attn_cpu_avx2() -> i32;
    fn ddetr_ms_deform_attn_cpu_force_baseline(yes: i32);
}

/// Whether the fused CPU kernels run with AVX2 + FMA here (else the baseline build of the same
/// code).
pub fn fused_cpu_uses_avx2() -> bool {
    // SAFETY: reads a CPU feature flag.
    unsafe { ddetr_ms_deform_attn_cpu_avx2() == 1 }
}

/// From now on, in this whole process, run the fused kernels built for the baseline instruction
/// set even where the CPU has AVX2 + FMA (tests of that build, or ruling the AVX2 code out).
pub fn force_baseline_kernels(yes: bool) {
    // SAFETY: sets an atomic flag.
    unsafe { ddetr_ms_deform_attn_cpu_force_baseline(i32::from(yes)) }
}

/// The largest head width (d_model / n_heads) the fused kernels take (csrc/msda_kernels.h).
const FUSED_MAX_CHANNELS: i64 = 1024;

/// Whether [`ms_deform_attn_core`] takes the fused CPU path for this value tensor.
pub fn uses_fused_cpu(value: &Tensor) -> bool {
    value.device() == Device::Cpu
        && matches!(
            value.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        )
        && value.size()[3] <= FUSED_MAX_CHANNELS
}

/// Signature of the C++ entry points (trainer/csrc/msda.cpp).
type CoreOp = unsafe extern "C" fn(
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const i64,
    i64,
    *mut *mut C_tensor,
) -> *const c_char;

fn call_core(
    op: CoreOp,
    value: &Tensor,
    spatial_shapes: &[(i64, i64)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Tensor {
    let shapes: Vec<i64> = spatial_shapes.iter().flat_map(|&(h, w)| [h, w]).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the three handles are live tch tensors (`at::Tensor*`), `shapes` holds
    // 2·len values, and on success `out` receives a new `at::Tensor*` that the returned Tensor
    // owns (tch frees it with `delete`).
    let err = unsafe {
        op(
            value.as_ptr(),
            sampling_locations.as_ptr(),
            attention_weights.as_ptr(),
            shapes.as_ptr(),
            spatial_shapes.len() as i64,
            &mut out,
        )
    };
    if !err.is_null() {
        // SAFETY: a NUL-terminated message owned by the calling thread until its next call.
        let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy();
        panic!("multi-scale deformable attention: {msg}");
    }
    // SAFETY: see above; `out` is a fresh heap tensor handle.
    unsafe { Tensor::from_ptr(out) }
}

/// The fused CPU op: same contract as [`ms_deform_attn_core_grid_sample`] for CPU f32/f64
/// tensors, differentiable in value, locations and weights.
pub fn ms_deform_attn_core_fused_cpu(
    value: &Tensor,
    spatial_shapes: &[(i64, i64)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Tensor {
    call_core(
        ddetr_ms_deform_attn_cpu,
        value,
        spatial_shapes,
        sampling_locations,
        attention_weights,
    )
}

/// Upstream's `grid_sample` formulation on any device as one autograd node that keeps only its
/// three inputs and recomputes the per-level samples in backward (f32/f64): what CUDA runs.
pub fn ms_deform_attn_core_recompute(
    value: &Tensor,
    spatial_shapes: &[(i64, i64)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Tensor {
    call_core(
        ddetr_ms_deform_attn_recompute,
        value,
        spatial_shapes,
        sampling_locations,
        attention_weights,
    )
}

/// `ms_deform_attn_core_pytorch`: `value` `[N, S, M, D]`, `sampling_locations`
/// `[N, Lq, M, L, P, 2]`, `attention_weights` `[N, Lq, M, L, P]` → `[N, Lq, M·D]`.
/// The fused kernels on CPU, upstream's `grid_sample` formulation recomputed in backward
/// elsewhere.
pub fn ms_deform_attn_core(
    value: &Tensor,
    spatial_shapes: &[(i64, i64)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Tensor {
    let op = if uses_fused_cpu(value) {
        ms_deform_attn_core_fused_cpu
    } else {
        ms_deform_attn_core_recompute
    };
    // The sampling runs in f32 under fp16/bf16 (as TAO and DINO do), else in value's dtype.
    let out_kind = value.kind();
    let work_kind = match out_kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    };
    let as_work = |t: &Tensor| {
        if t.kind() == work_kind {
            t.shallow_clone()
        } else {
            t.to_kind(work_kind)
        }
    };
    let out = op(
        &as_work(value),
        spatial_shapes,
        &as_work(sampling_locations),
        &as_work(attention_weights),
    );
    if out_kind == work_kind {
        out
    } else {
        out.to_kind(out_kind)
    }
}

/// Upstream's `ms_deform_attn_core_pytorch` as written: per level `grid_sample`, weighted sum.
pub fn ms_deform_attn_core_grid_sample(
    value: &Tensor,
    spatial_shapes: &[(i64, i64)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Tensor {
    let out_kind = value.kind();
    let low_precision = matches!(out_kind, Kind::Half | Kind::BFloat16);
    let (value, sampling_locations, attention_weights) = if low_precision {
        (
            value.to_kind(Kind::Float),
            sampling_locations.to_kind(Kind::Float),
            attention_weights.to_kind(Kind::Float),
        )
    } else {
        (
            value.shallow_clone(),
            sampling_locations.shallow_clone(),
            attention_weights.shallow_clone(),
        )
    };
    let vs = value.size();
    let (n, m, d) = (vs[0], vs[2], vs[3]);
    let ls = sampling_locations.size();
    let (len_q, l, p) = (ls[1], ls[3], ls[4]);
    let sizes: Vec<i64> = spatial_shapes.iter().map(|&(h, w)| h * w).collect();
    let value_list = value.split_with_sizes(&sizes, 1);
    let grids = sampling_locations * 2.0 - 1.0;
    // [N, Lq, M, L, P] → [N·M, 1, Lq, L, P]
    let weights = attention_weights
        .transpose(1, 2)
        .reshape([n * m, 1, len_q, l, p]);
    let mut out: Option<Tensor> = None;
    for (lid, &(h, w)) in spatial_shapes.iter().enumerate() {
        // [N, H·W, M, D] → [N·M, D, H, W]
        let value_l = value_list[lid]
            .flatten(2, 3)
            .transpose(1, 2)
            .reshape([n * m, d, h, w]);
        // [N, Lq, M, P, 2] → [N·M, Lq, P, 2]
        let grid_l = grids.select(3, lid as i64).transpose(1, 2).flatten(0, 1);
        // [N·M, D, Lq, P], weighted and summed over the level's points. Accumulating level by
        // level equals upstream's stack-then-sum up to float summation order.
        let sampled = value_l.grid_sampler(&grid_l, BILINEAR, ZEROS_PADDING, false);
        let contrib =
            (sampled * weights.select(3, lid as i64)).sum_dim_intlist(-1, false, None::<Kind>);
        out = Some(match out {
            Some(acc) => acc + contrib,
            None => contrib,
        });
    }
    let out = out.expect("at least one level").view([n, m * d, len_q]);
    let out = out.transpose(1, 2).contiguous();
    if low_precision {
        out.to_kind(out_kind)
    } else {
        out
    }
}
