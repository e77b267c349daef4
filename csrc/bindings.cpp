// Python bindings of slimtune._C. Only raw pointers (as ints), int64 shapes and
// strides (in elements), a dtype code, a device index (-1 = CPU) and a CUDA stream
// handle cross this boundary, so the module links nothing from torch and works with
// any torch build. Input validation lives in slimtune/_ext.py; the checks here only
// guard memory safety.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;
using slimtune::AdamWArgs;
using slimtune::ColumnsArgs;
using slimtune::DType;

namespace {

constexpr bool kCudaCompiled =
#ifdef SLIMTUNE_WITH_CUDA
    true;
#else
    false;
#endif

void require_cuda(int device) {
  if (!kCudaCompiled && device >= 0)
    throw std::runtime_error("slimtune._C was built without CUDA; rebuild with a CUDA compiler available");
}

ColumnsArgs columns_args(uintptr_t dense, int64_t rows, int64_t K, int64_t dense_s0, int64_t dense_s1,
                         uintptr_t idx, int64_t r, uintptr_t cols, int64_t cols_s0, int64_t cols_s1,
                         int dtype) {
  ST_CHECK(rows >= 0 && K >= 0 && r >= 0, "negative size");
  ST_CHECK(r == 0 || rows == 0 || (dense != 0 && cols != 0 && idx != 0), "null pointer");
  return ColumnsArgs{reinterpret_cast<void*>(dense), rows, K, dense_s0, dense_s1,
                     reinterpret_cast<void*>(cols),  cols_s0, cols_s1,
                     reinterpret_cast<const int64_t*>(idx), r, static_cast<DType>(dtype)};
}

template <bool kGather>
void columns(uintptr_t dense, int64_t rows, int64_t K, int64_t dense_s0, int64_t dense_s1, uintptr_t idx,
             int64_t r, uintptr_t cols, int64_t cols_s0, int64_t cols_s1, int dtype, int device,
             uintptr_t stream) {
  const ColumnsArgs a = columns_args(dense, rows, K, dense_s0, dense_s1, idx, r, cols, cols_s0, cols_s1, dtype);
  require_cuda(device);
  if (device < 0) {
    if (rows == 0 || r == 0) return;
    kGather ? slimtune::gather_columns_cpu(a) : slimtune::scatter_columns_cpu(a);
    return;
  }
#ifdef SLIMTUNE_WITH_CUDA
  kGather ? slimtune::gather_columns_cuda(a, device, stream) : slimtune::scatter_columns_cuda(a, device, stream);
#else
  (void)stream;
#endif
}

void partial_adamw(uintptr_t cols, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, int64_t numel,
                   int dtype, int64_t step, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool maximize, uintptr_t weight, int64_t w_s0, int64_t w_s1, int64_t K,
                   int64_t r, uintptr_t idx, int device, uintptr_t stream) {
  ST_CHECK(numel >= 0, "negative size");
  ST_CHECK(numel == 0 || (cols != 0 && grad != 0 && exp_avg != 0 && exp_avg_sq != 0), "null pointer");
  if (weight != 0 && numel > 0) {
    ST_CHECK(idx != 0 && r > 0 && numel % r == 0 && K >= 0, "weight write-back needs idx and cols of shape (M, r)");
  }
  const AdamWArgs a{reinterpret_cast<void*>(cols),
                    reinterpret_cast<const void*>(grad),
                    reinterpret_cast<float*>(exp_avg),
                    reinterpret_cast<float*>(exp_avg_sq),
                    numel,
                    static_cast<DType>(dtype),
                    slimtune::make_adamw_scalars(step, lr, beta1, beta2, eps, weight_decay, maximize),
                    reinterpret_cast<void*>(weight),
                    w_s0,
                    w_s1,
                    K,
                    r,
                    reinterpret_cast<const int64_t*>(idx)};
  require_cuda(device);
  if (device < 0) {
    slimtune::partial_adamw_cpu(a);
    return;
  }
#ifdef SLIMTUNE_WITH_CUDA
  slimtune::partial_adamw_cuda(a, device, stream);
#else
  (void)stream;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "slimtune compiled kernels (CPU, and CUDA when built with it); use slimtune._ext instead.";
  m.def("cuda_compiled", [] { return kCudaCompiled; }, "Whether the CUDA kernels were compiled in.");
  m.def("gather_columns", &columns<true>, "cols[n, j] = dense[n, idx[j]]", py::arg("dense"),
        py::arg("rows"), py::arg("K"), py::arg("dense_s0"), py::arg("dense_s1"), py::arg("idx"), py::arg("r"),
        py::arg("cols"), py::arg("cols_s0"), py::arg("cols_s1"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("scatter_columns", &columns<false>, "dense[n, idx[j]] = cols[n, j]", py::arg("dense"),
        py::arg("rows"), py::arg("K"), py::arg("dense_s0"), py::arg("dense_s1"), py::arg("idx"), py::arg("r"),
        py::arg("cols"), py::arg("cols_s0"), py::arg("cols_s1"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("partial_adamw", &partial_adamw, "Fused AdamW step on cols, optionally mirrored into weight[:, idx].",
        py::arg("cols"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("numel"),
        py::arg("dtype"), py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("maximize"), py::arg("weight"), py::arg("w_s0"), py::arg("w_s1"),
        py::arg("K"), py::arg("r"), py::arg("idx"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
