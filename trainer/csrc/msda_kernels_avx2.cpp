// The fused kernels compiled for AVX2 + FMA; the glue calls them only where the CPU has both.
// Every header comes before the target pragma, so only this namespace's code is AVX2.
#include "msda_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace ddetr_msda_avx2 {
#include "msda_kernels.inc"
}  // namespace ddetr_msda_avx2
#pragma GCC pop_options
