// Gather/scatter of idx-selected columns; CPU twin in csrc/cpu/columns.cpp.
#include "../common.h"
#include "utils.cuh"

namespace slimtune {
namespace {

// One thread per (row, column) element: x over the r selected columns, y grid-strides
// over rows. kGather: cols[n, j] = dense[n, idx[j]]; otherwise the reverse.
template <typename T, bool kGather>
__global__ void copy_columns_kernel(ColumnsArgs a) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.r) return;
  const int64_t c = a.idx[j];
  if (c < 0 || c >= a.K) __trap();  // out-of-range idx: fail like a device-side assert
  T* dense = static_cast<T*>(a.dense) + c * a.dense_s1;
  T* cols = static_cast<T*>(a.cols) + j * a.cols_s1;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; n < a.rows; n += row_step) {
    if (kGather) {
      cols[n * a.cols_s0] = dense[n * a.dense_s0];
    } else {
      dense[n * a.dense_s0] = cols[n * a.cols_s0];
    }
  }
}

template <bool kGather>
void launch(const ColumnsArgs& a, int device, uintptr_t stream) {
  if (a.rows == 0 || a.r == 0) return;
  DeviceGuard guard(device);
  int tx = 1;
  while (tx < 256 && tx < a.r) tx *= 2;
  const dim3 block(tx, 256 / tx);
  const dim3 grid(static_cast<unsigned int>((a.r + tx - 1) / tx),
                  static_cast<unsigned int>(std::min<int64_t>((a.rows + block.y - 1) / block.y, 65535)));
  dispatch_elem_size(a.dtype, [&](auto tag) {
    copy_columns_kernel<decltype(tag), kGather><<<grid, block, 0, as_stream(stream)>>>(a);
  });
  check_launch();
}

}  // namespace

void gather_columns_cuda(const ColumnsArgs& a, int device, uintptr_t stream) { launch<true>(a, device, stream); }

void scatter_columns_cuda(const ColumnsArgs& a, int device, uintptr_t stream) {
  launch<false>(a, device, stream);
}

}  // namespace slimtune
