// CPU twins of csrc/cuda/columns.cu: gather/scatter of idx-selected columns.
#include <cstdlib>

#include "../common.h"

namespace slimtune {
namespace {

// kGather: cols[n, j] = dense[n, idx[j]]; otherwise dense[n, idx[j]] = cols[n, j].
template <typename T, bool kGather>
void copy_columns(const ColumnsArgs& a) {
  T* dense = static_cast<T*>(a.dense);
  T* cols = static_cast<T*>(a.cols);
  auto copy_one = [&](int64_t n, int64_t j) {
    T* d = dense + n * a.dense_s0 + a.idx[j] * a.dense_s1;
    T* c = cols + n * a.cols_s0 + j * a.cols_s1;
    if (kGather) {
      *c = *d;
    } else {
      *d = *c;
    }
  };
  // Walk the dense matrix along its contiguous axis: it is the large, strided side.
  if (std::llabs(a.dense_s1) <= std::llabs(a.dense_s0)) {
    for (int64_t n = 0; n < a.rows; ++n)
      for (int64_t j = 0; j < a.r; ++j) copy_one(n, j);
  } else {
    for (int64_t j = 0; j < a.r; ++j)
      for (int64_t n = 0; n < a.rows; ++n) copy_one(n, j);
  }
}

}  // namespace

void gather_columns_cpu(const ColumnsArgs& a) {
  check_idx_host(a.idx, a.r, a.K, /*unique=*/false);
  dispatch_elem_size(a.dtype, [&](auto tag) { copy_columns<decltype(tag), true>(a); });
}

void scatter_columns_cpu(const ColumnsArgs& a) {
  check_idx_host(a.idx, a.r, a.K, /*unique=*/true);
  dispatch_elem_size(a.dtype, [&](auto tag) { copy_columns<decltype(tag), false>(a); });
}

}  // namespace slimtune
