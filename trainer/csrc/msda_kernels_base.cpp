// The fused kernels for the build's baseline instruction set.
#include "msda_kernels.h"

namespace ddetr_msda_base {
#include "msda_kernels.inc"
}  // namespace ddetr_msda_base
