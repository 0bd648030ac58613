// libtorch glue for the fused CPU multi-scale deformable attention: an autograd Function whose
// forward and backward run the kernels of msda_kernels.inc over libtorch's intra-op thread pool,
// exported with a C ABI for the Rust side (trainer/src/model/ms_deform_attn.rs). Tensors cross
// as tch's handles, which are `at::Tensor*`.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <string>
#include <vector>

#include "msda_kernels.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool has_avx2() {
#if defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
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
                  const std::vector<int64_t>& shapes) {
  TORCH_CHECK(value.device().is_cpu() && loc.device().is_cpu() && attn.device().is_cpu(),
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

at::Tensor forward_impl(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
                        const std::vector<int64_t>& shapes) {
  const auto starts = starts_of(shapes);
  const auto dm = dims_of(value, loc, shapes, starts);
  auto out = at::empty({dm.B, dm.Q, dm.M * dm.D}, value.options());
  const bool avx2 = has_avx2();
  // ~L·P·4·D multiply-adds per head and query: a grain of 16 queries keeps tasks ≥ 100 µs-ish.
  if (value.scalar_type() == at::kFloat) {
    const float *v = value.data_ptr<float>(), *lp = loc.data_ptr<float>(),
                *ap = attn.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, dm.B * dm.Q, 16, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
      if (avx2) return ddetr_msda_avx2::forward_f32(dm, v, lp, ap, o, b, e);
#endif
      ddetr_msda_base::forward_f32(dm, v, lp, ap, o, b, e);
    });
  } else {
    const double *v = value.data_ptr<double>(), *lp = loc.data_ptr<double>(),
                 *ap = attn.data_ptr<double>();
    double* o = out.data_ptr<double>();
    at::parallel_for(0, dm.B * dm.Q, 16, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
      if (avx2) return ddetr_msda_avx2::forward_f64(dm, v, lp, ap, o, b, e);
#endif
      ddetr_msda_base::forward_f64(dm, v, lp, ap, o, b, e);
    });
  }
  (void)avx2;
  return out;
}

struct MsDeformAttnFunction : public torch::autograd::Function<MsDeformAttnFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& loc,
                            const at::Tensor& attn, std::vector<int64_t> shapes) {
    ctx->save_for_backward({value, loc, attn});
    ctx->saved_data["shapes"] = shapes;
    return forward_impl(value, loc, attn, shapes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &value = saved[0], &loc = saved[1], &attn = saved[2];
    const auto shapes = ctx->saved_data["shapes"].toIntVector();
    const auto starts = starts_of(shapes);
    const auto dm = dims_of(value, loc, shapes, starts);
    const at::Tensor grad_out = grads[0].contiguous();
    at::Tensor gv, gl, ga;
    if (ctx->needs_input_grad(0)) gv = at::zeros_like(value);
    if (ctx->needs_input_grad(1)) gl = at::empty_like(loc);
    if (ctx->needs_input_grad(2)) ga = at::empty_like(attn);
    const bool avx2 = has_avx2();
    if (value.scalar_type() == at::kFloat) {
      const float *v = value.data_ptr<float>(), *lp = loc.data_ptr<float>(),
                  *ap = attn.data_ptr<float>(), *go = grad_out.data_ptr<float>();
      float* gvp = gv.defined() ? gv.data_ptr<float>() : nullptr;
      float* glp = gl.defined() ? gl.data_ptr<float>() : nullptr;
      float* gap = ga.defined() ? ga.data_ptr<float>() : nullptr;
      // One task per (image, head): it owns grad_value[b, :, m, :].
      at::parallel_for(0, dm.B * dm.M, 1, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
        if (avx2) return ddetr_msda_avx2::backward_f32(dm, v, lp, ap, go, gvp, glp, gap, b, e);
#endif
        ddetr_msda_base::backward_f32(dm, v, lp, ap, go, gvp, glp, gap, b, e);
      });
    } else {
      const double *v = value.data_ptr<double>(), *lp = loc.data_ptr<double>(),
                   *ap = attn.data_ptr<double>(), *go = grad_out.data_ptr<double>();
      double* gvp = gv.defined() ? gv.data_ptr<double>() : nullptr;
      double* glp = gl.defined() ? gl.data_ptr<double>() : nullptr;
      double* gap = ga.defined() ? ga.data_ptr<double>() : nullptr;
      at::parallel_for(0, dm.B * dm.M, 1, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
        if (avx2) return ddetr_msda_avx2::backward_f64(dm, v, lp, ap, go, gvp, glp, gap, b, e);
#endif
        ddetr_msda_base::backward_f64(dm, v, lp, ap, go, gvp, glp, gap, b, e);
      });
    }
    (void)avx2;
    return {gv, gl, ga, at::Tensor()};
  }
};

thread_local std::string last_error;

}  // namespace

// value [N, S, M, D], loc [N, Lq, M, L, P, 2], attn [N, Lq, M, L, P] (CPU, contiguous, f32 or
// f64), shapes = n_levels (H, W) pairs → *out = [N, Lq, M·D], differentiable in all three
// tensors. Returns null, or the error message (valid until the thread's next call).
extern "C" const char* ddetr_ms_deform_attn_cpu(const at::Tensor* value, const at::Tensor* loc,
                                                 const at::Tensor* attn, const int64_t* shapes,
                                                 int64_t n_levels, at::Tensor** out) {
  try {
    std::vector<int64_t> sh(shapes, shapes + 2 * n_levels);
    const at::Tensor v = value->contiguous(), l = loc->contiguous(), a = attn->contiguous();
    check_inputs(v, l, a, sh);
    *out = new at::Tensor(MsDeformAttnFunction::apply(v, l, a, sh));
    return nullptr;
  } catch (const c10::Error& e) {
    last_error = e.what_without_backtrace();
    return last_error.c_str();
  } catch (const std::exception& e) {
    last_error = e.what();
    return last_error.c_str();
  }
}

// 1 when the kernels run with AVX2 + FMA on this CPU.
extern "C" int ddetr_ms_deform_attn_cpu_avx2() { return has_avx2() ? 1 : 0; }
