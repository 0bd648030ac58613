// libtorch glue for the fused CPU multi-scale deformable attention: an autograd Function whose
// forward and backward run the kernels of msda_kernels.inc over libtorch's intra-op thread pool,
// exported with a C ABI for the Rust side (trainer/src/model/ms_deform_attn.rs). Tensors cross
// as tch's handles, which are `at::Tensor*`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "c_api.h"
#include "msda_kernels.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Set to run the baseline kernels even where the CPU has AVX2 (tests of that build).
std::atomic<bool> force_baseline{false};

bool has_avx2() {
#if defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes && !force_baseline.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

ddetr_msda::Dims dims_of(const at::Tensor& value, const at::Tensor& loc,
                         const std::vector<int64_t>& shapes, const std::vector<int64_t>& starts) {
  ddetr_msda::Dims d;
  d.B = value.size(0);
  d.S = value.size(1);
  d.M = value.size(2);
  d.D = value.size(3);
  d.Q = loc.size(1);
  d.L = loc.size(3);
  d.P = loc.size(4);
  d.shapes = shapes.data();
  d.starts = starts.data();
  return d;
}

void check_inputs(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
                  const std::vector<int64_t>& shapes, bool cpu_only) {
  TORCH_CHECK(value.device() == loc.device() && value.device() == attn.device(),
              "value, sampling locations and attention weights must be on one device");
  TORCH_CHECK(!cpu_only || value.device().is_cpu(),
              "the fused deformable attention runs on CPU tensors only");
  TORCH_CHECK(value.scalar_type() == loc.scalar_type() && value.scalar_type() == attn.scalar_type(),
              "value, sampling locations and attention weights must share one dtype");
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "the fused deformable attention takes f32 or f64, got ", value.scalar_type());
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2, "sampling locations must be [N, Lq, M, L, P, 2]");
  const int64_t L = loc.size(3);
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == loc.size(0) && attn.size(1) == loc.size(1) &&
                  attn.size(2) == loc.size(2) && attn.size(3) == L && attn.size(4) == loc.size(4),
              "attention weights must be [N, Lq, M, L, P] like the locations");
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2),
              "locations and value disagree on batch or heads");
  TORCH_CHECK((int64_t)shapes.size() == 2 * L, "one (H, W) per level");
  TORCH_CHECK(value.size(3) <= ddetr_msda::kMaxChannels, "head width above ",
              ddetr_msda::kMaxChannels);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) total += shapes[2 * l] * shapes[2 * l + 1];
  TORCH_CHECK(total == value.size(1), "the levels' H·W sum to ", total, " but value has ",
              value.size(1), " rows");
}

std::vector<int64_t> starts_of(const std::vector<int64_t>& shapes) {
  std::vector<int64_t> starts(shapes.size() / 2);
  int64_t s = 0;
  for (size_t l = 0; l < starts.size(); ++l) {
    starts[l] = s;
    s += shapes[2 * l] * shapes[2 * l + 1];
  }
  return starts;
}

// The fused forward over libtorch's thread pool, for T = float or double.
template <typename T>
void fused_forward(const ddetr_msda::Dims& dm, const at::Tensor& value, const at::Tensor& loc,
                   const at::Tensor& attn, at::Tensor& out) {
  const T *v = value.data_ptr<T>(), *lp = loc.data_ptr<T>(), *ap = attn.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const bool avx2 = has_avx2();
  (void)avx2;
  // ~L·P·4·D multiply-adds per head and query: a grain of 16 queries keeps tasks worth a thread.
  at::parallel_for(0, dm.B * dm.Q, 16, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
    if (avx2) return ddetr_msda_avx2::forward(dm, v, lp, ap, o, b, e);
#endif
    ddetr_msda_base::forward(dm, v, lp, ap, o, b, e);
  });
}

// The fused backward; undefined gradient tensors are not computed.
template <typename T>
void fused_backward(const ddetr_msda::Dims& dm, const at::Tensor& value, const at::Tensor& loc,
                    const at::Tensor& attn, const at::Tensor& grad_out, at::Tensor& gv,
                    at::Tensor& gl, at::Tensor& ga) {
  const T *v = value.data_ptr<T>(), *lp = loc.data_ptr<T>(), *ap = attn.data_ptr<T>(),
          *go = grad_out.data_ptr<T>();
  T* gvp = gv.defined() ? gv.data_ptr<T>() : nullptr;
  T* glp = gl.defined() ? gl.data_ptr<T>() : nullptr;
  T* gap = ga.defined() ? ga.data_ptr<T>() : nullptr;
  const bool avx2 = has_avx2();
  (void)avx2;
  // One task per (image, head, level): it owns that level's rows of grad_value[b, :, m, :].
  at::parallel_for(0, dm.B * dm.M * dm.L, 1, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
    if (avx2) return ddetr_msda_avx2::backward(dm, v, lp, ap, go, gvp, glp, gap, b, e);
#endif
    ddetr_msda_base::backward(dm, v, lp, ap, go, gvp, glp, gap, b, e);
  });
}

at::Tensor forward_impl(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
                        const std::vector<int64_t>& shapes) {
  const auto starts = starts_of(shapes);
  const auto dm = dims_of(value, loc, shapes, starts);
  auto out = at::empty({dm.B, dm.Q, dm.M * dm.D}, value.options());
  if (value.scalar_type() == at::kFloat) fused_forward<float>(dm, value, loc, attn, out);
  else fused_forward<double>(dm, value, loc, attn, out);
  return out;
}

// What both autograd functions keep for backward: their three inputs and the level shapes.
struct Saved {
  at::Tensor value, loc, attn;
  std::vector<int64_t> shapes, starts;
};

void save_inputs(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& loc,
                 const at::Tensor& attn, const std::vector<int64_t>& shapes) {
  ctx->save_for_backward({value, loc, attn});
  ctx->saved_data["shapes"] = shapes;
}

Saved saved_inputs(AutogradContext* ctx) {
  const auto v = ctx->get_saved_variables();
  Saved s{v[0], v[1], v[2], ctx->saved_data["shapes"].toIntVector(), {}};
  s.starts = starts_of(s.shapes);
  return s;
}

struct MsDeformAttnFunction : public torch::autograd::Function<MsDeformAttnFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& loc,
                            const at::Tensor& attn, std::vector<int64_t> shapes) {
    save_inputs(ctx, value, loc, attn, shapes);
    return forward_impl(value, loc, attn, shapes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved sv = saved_inputs(ctx);
    const at::Tensor &value = sv.value, &loc = sv.loc, &attn = sv.attn;
    const auto dm = dims_of(value, loc, sv.shapes, sv.starts);
    const at::Tensor grad_out = grads[0].contiguous();
    at::Tensor gv, gl, ga;
    if (ctx->needs_input_grad(0)) gv = at::zeros_like(value);
    if (ctx->needs_input_grad(1)) gl = at::empty_like(loc);
    if (ctx->needs_input_grad(2)) ga = at::empty_like(attn);
    if (value.scalar_type() == at::kFloat)
      fused_backward<float>(dm, value, loc, attn, grad_out, gv, gl, ga);
    else
      fused_backward<double>(dm, value, loc, attn, grad_out, gv, gl, ga);
    return {gv, gl, ga, at::Tensor()};
  }
};

// ---- Any device: upstream's grid_sample formulation, recomputed in backward ----------------
//
// The same ATen ops as `ms_deform_attn_core_pytorch`, but as one autograd node that keeps only
// value, locations and weights: the per-level [N·M, D, Lq, P] samples (16× the output, summed
// over levels, for 4 levels × 4 points) and the per-level value copies are rebuilt level by level
// in backward instead of being held from forward to backward. For devices without the fused
// kernels (CUDA).

struct GridLevel {
  at::Tensor value;  // [N·M, D, H, W]
  at::Tensor grid;   // [N·M, Lq, P, 2] in [−1, 1]
};

GridLevel grid_level(const at::Tensor& value, const at::Tensor& loc,
                     const std::vector<int64_t>& shapes, int64_t start, int64_t l) {
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
  GridLevel g;
  g.value = value.narrow(1, start, H * W).flatten(2, 3).transpose(1, 2).reshape({N * M, D, H, W});
  g.grid = (loc.select(3, l) * 2 - 1).transpose(1, 2).flatten(0, 1);
  return g;
}

at::Tensor recompute_forward_impl(const at::Tensor& value, const at::Tensor& loc,
                                  const at::Tensor& attn, const std::vector<int64_t>& shapes) {
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
  const auto weights = attn.transpose(1, 2).reshape({N * M, 1, Lq, L, P});
  const auto starts = starts_of(shapes);
  at::Tensor out;
  for (int64_t l = 0; l < L; ++l) {
    const auto g = grid_level(value, loc, shapes, starts[l], l);
    const auto sampled = at::grid_sampler_2d(g.value, g.grid, 0, 0, false);  // [N·M, D, Lq, P]
    auto contrib = (sampled * weights.select(3, l)).sum(-1);
    out = out.defined() ? out.add_(contrib) : contrib;
  }
  return out.view({N, M * D, Lq}).transpose(1, 2).contiguous();
}

struct MsDeformAttnRecompute : public torch::autograd::Function<MsDeformAttnRecompute> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& loc,
                            const at::Tensor& attn, std::vector<int64_t> shapes) {
    save_inputs(ctx, value, loc, attn, shapes);
    return recompute_forward_impl(value, loc, attn, shapes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved sv = saved_inputs(ctx);
    const at::Tensor &value = sv.value, &loc = sv.loc, &attn = sv.attn;
    const auto &shapes = sv.shapes, &starts = sv.starts;
    const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
    const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
    const bool need_v = ctx->needs_input_grad(0), need_l = ctx->needs_input_grad(1),
               need_a = ctx->needs_input_grad(2);
    // [N, Lq, M·D] → [N·M, D, Lq, 1]
    const auto g = grads[0].transpose(1, 2).reshape({N * M, D, Lq}).unsqueeze(-1);
    const auto weights = attn.transpose(1, 2).reshape({N * M, 1, Lq, L, P});
    at::Tensor gv, gl, ga;
    if (need_v) gv = at::zeros_like(value);
    if (need_l) gl = at::empty_like(loc);
    if (need_a) ga = at::empty_like(attn);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const auto lv = grid_level(value, loc, shapes, starts[l], l);
      if (need_a) {
        const auto sampled = at::grid_sampler_2d(lv.value, lv.grid, 0, 0, false);
        // Σ_D sampled·g → [N·M, Lq, P] → [N, Lq, M, P]
        const auto gw = (sampled * g).sum(1).view({N, M, Lq, P}).transpose(1, 2);
        ga.select(3, l).copy_(gw);
      }
      if (need_v || need_l) {
        const auto grad_sampled = g * weights.select(3, l);  // [N·M, D, Lq, P]
        auto r = at::grid_sampler_2d_backward(grad_sampled, lv.value, lv.grid, 0, 0, false,
                                              {need_v, need_l});
        if (need_v) {
          // [N·M, D, H, W] → [N, M, D, H·W] → [N, H·W, M, D]
          const auto gvl = std::get<0>(r).view({N, M, D, H * W}).permute({0, 3, 1, 2});
          gv.narrow(1, starts[l], H * W).copy_(gvl);
        }
        if (need_l) {
          // d grid / d loc = 2; [N·M, Lq, P, 2] → [N, Lq, M, P, 2]
          const auto ggl = (std::get<1>(r) * 2).view({N, M, Lq, P, 2}).transpose(1, 2);
          gl.select(3, l).copy_(ggl);
        }
      }
    }
    return {gv, gl, ga, at::Tensor()};
  }
};

// Checks the inputs, applies the autograd function Op and hands back a new tensor handle.
template <typename Op>
const char* apply_op(const at::Tensor* value, const at::Tensor* loc, const at::Tensor* attn,
                     const int64_t* shapes, int64_t n_levels, bool cpu_only, at::Tensor** out) {
  return ddetr_c_api::guarded([&] {
    std::vector<int64_t> sh(shapes, shapes + 2 * n_levels);
    const at::Tensor v = value->contiguous(), l = loc->contiguous(), a = attn->contiguous();
    check_inputs(v, l, a, sh, cpu_only);
    *out = new at::Tensor(Op::apply(v, l, a, sh));
  });
}

}  // namespace

// value [N, S, M, D], loc [N, Lq, M, L, P, 2], attn [N, Lq, M, L, P] (CPU, contiguous, f32 or
// f64), shapes = n_levels (H, W) pairs → *out = [N, Lq, M·D], differentiable in all three
// tensors. Returns null, or the error message (valid until the thread's next call).
extern "C" const char* ddetr_ms_deform_attn_cpu(const at::Tensor* value, const at::Tensor* loc,
                                                 const at::Tensor* attn, const int64_t* shapes,
                                                 int64_t n_levels, at::Tensor** out) {
  return apply_op<MsDeformAttnFunction>(value, loc, attn, shapes, n_levels, true, out);
}

// The same contract on any device (CUDA included): grid_sample per level, one autograd node
// that recomputes the samples in backward (see MsDeformAttnRecompute).
extern "C" const char* ddetr_ms_deform_attn_recompute(const at::Tensor* value,
                                                       const at::Tensor* loc,
                                                       const at::Tensor* attn,
                                                       const int64_t* shapes, int64_t n_levels,
                                                       at::Tensor** out) {
  return apply_op<MsDeformAttnRecompute>(value, loc, attn, shapes, n_levels, false, out);
}

// 1 when the kernels run with AVX2 + FMA on this CPU.
extern "C" int ddetr_ms_deform_attn_cpu_avx2() { return has_avx2() ? 1 : 0; }

// Nonzero: run the baseline-ISA kernels from now on, in the whole process (for tests).
extern "C" void ddetr_ms_deform_attn_cpu_force_baseline(int yes) { force_baseline.store(yes != 0); }
