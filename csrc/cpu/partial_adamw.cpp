// CPU twin of csrc/cuda/partial_adamw.cu: fused AdamW step on trained columns,
// optionally writing the new values into the dense weight's columns too.
#include "../common.h"

namespace slimtune {
namespace {

template <typename T>
void adamw(const AdamWArgs& a) {
  T* cols = static_cast<T*>(a.cols);
  const T* grad = static_cast<const T*>(a.grad);
  T* weight = static_cast<T*>(a.weight);
  auto update = [&](int64_t i) {
    const float p = adamw_element(to_float(cols[i]), to_float(grad[i]), a.exp_avg[i], a.exp_avg_sq[i], a.s);
    cols[i] = from_float<T>(p);
    return cols[i];
  };
  if (weight == nullptr) {
    for (int64_t i = 0; i < a.numel; ++i) update(i);
    return;
  }
  const int64_t rows = a.numel / a.r;
  for (int64_t n = 0; n < rows; ++n) {
    T* wrow = weight + n * a.w_s0;
    for (int64_t j = 0; j < a.r; ++j) wrow[a.idx[j] * a.w_s1] = update(n * a.r + j);
  }
}

}  // namespace

void partial_adamw_cpu(const AdamWArgs& a) {
  if (a.weight != nullptr) check_idx_host(a.idx, a.r, a.K, /*unique=*/true);
  dispatch_dtype(a.dtype, [&](auto tag) { adamw<decltype(tag)>(a); });
}

}  // namespace slimtune
