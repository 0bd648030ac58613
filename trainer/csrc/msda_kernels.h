// Declarations of the fused multi-scale deformable attention CPU kernels, compiled once per
// instruction set (see msda_kernels.inc for the semantics and layouts).
#pragma once
#include <cstdint>

namespace ddetr_msda {
struct Dims {
  int64_t B, S, M, D, Q, L, P;
  const int64_t* shapes;  // [L][2] = (H, W)
  const int64_t* starts;  // [L]
};
// The largest head width the generic (non-32) kernels accept.
constexpr int64_t kMaxChannels = 1024;
}  // namespace ddetr_msda

#define DDETR_MSDA_DECLARE(NS)                                                                   \
  namespace NS {                                                                                 \
  using ddetr_msda::Dims;                                                                        \
  void forward(const Dims&, const float*, const float*, const float*, float*, int64_t, int64_t); \
  void forward(const Dims&, const double*, const double*, const double*, double*, int64_t,       \
               int64_t);                                                                         \
  void backward(const Dims&, const float*, const float*, const float*, const float*, float*,     \
                float*, float*, int64_t, int64_t);                                               \
  void backward(const Dims&, const double*, const double*, const double*, const double*,         \
                double*, double*, double*, int64_t, int64_t);                                    \
  }

DDETR_MSDA_DECLARE(ddetr_msda_base)
#if defined(__x86_64__)
DDETR_MSDA_DECLARE(ddetr_msda_avx2)
#endif
