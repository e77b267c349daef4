// Fused AdamW step on trained columns with optional dense-weight write-back;
// CPU twin in csrc/cpu/partial_adamw.cpp.
#include "../common.h"
#include "utils.cuh"

namespace slimtune {
namespace {

// Grid-stride over all elements of cols. kWithWeight: cols is [numel / r, r] and the
// new value is also stored at weight[row, idx[j]], so no second kernel is needed.
template <typename T, bool kWithWeight>
__global__ void partial_adamw_kernel(AdamWArgs a) {
  T* cols = static_cast<T*>(a.cols);
  const T* grad = static_cast<const T*>(a.grad);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel; i += stride) {
    float m = a.exp_avg[i];
    float v = a.exp_avg_sq[i];
    const T p = from_float<T>(adamw_element(to_float(cols[i]), to_float(grad[i]), m, v, a.s));
    a.exp_avg[i] = m;
    a.exp_avg_sq[i] = v;
    cols[i] = p;
    if (kWithWeight) {
      const int64_t n = i / a.r;
      const int64_t j = i - n * a.r;
      const int64_t c = a.idx[j];
      if (c < 0 || c >= a.K) __trap();  // out-of-range idx: fail like a device-side assert
      static_cast<T*>(a.weight)[n * a.w_s0 + c * a.w_s1] = p;
    }
  }
}

}  // namespace

void partial_adamw_cuda(const AdamWArgs& a, int device, uintptr_t stream) {
  if (a.numel == 0) return;
  DeviceGuard guard(device);
  constexpr int kThreads = 256;
  const unsigned int blocks = grid_blocks(a.numel, kThreads);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.weight != nullptr) {
      partial_adamw_kernel<T, true><<<blocks, kThreads, 0, as_stream(stream)>>>(a);
    } else {
      partial_adamw_kernel<T, false><<<blocks, kThreads, 0, as_stream(stream)>>>(a);
    }
  });
  check_launch();
}

}  // namespace slimtune
