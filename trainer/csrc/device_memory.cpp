// Peak device memory of libtorch's caching allocator (what torch.cuda.max_memory_allocated and
// reset_peak_memory_stats read), exported with a C ABI. Through c10's generic DeviceAllocator,
// so nothing here needs CUDA headers; on a machine without CUDA the calls return an error.
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

#include "c_api.h"

namespace {
c10::DeviceAllocator* cuda_allocator() {
  return c10::getDeviceAllocator(c10::DeviceType::CUDA);
}
}  // namespace

// Resets the peak statistics of CUDA device `index`.
extern "C" const char* ddetr_cuda_reset_peak_memory(int8_t index) {
  return ddetr_c_api::guarded([&] { cuda_allocator()->resetPeakStats(index); });
}

// The peak bytes allocated on CUDA device `index` since the last reset (all pools).
extern "C" const char* ddetr_cuda_peak_memory(int8_t index, uint64_t* out) {
  return ddetr_c_api::guarded([&] {
    const auto stats = cuda_allocator()->getDeviceStats(index);
    const auto& all =
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    *out = static_cast<uint64_t>(all.peak);
  });
}
