// Shared definitions for the CPU and CUDA kernels of slimtune._C.
//
// Everything that defines *what* a kernel computes per element lives here so the
// CUDA kernels and their CPU twins cannot drift apart: dtype tags, float <-> half /
// bfloat16 conversions (round-to-nearest-even on host and device) and the AdamW
// per-element update. The build disables FMA contraction (-ffp-contract=off,
// nvcc --fmad=false) so both compilers evaluate the same IEEE operations in the
// same order.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ST_HD __host__ __device__ __forceinline__
#else
#define ST_HD inline
#endif

// Throws std::invalid_argument (Python ValueError) when `cond` is false.
#define ST_CHECK(cond, msg)                                                   \
  do {                                                                        \
    if (!(cond)) throw std::invalid_argument(std::string("slimtune._C: ") + (msg)); \
  } while (0)

namespace slimtune {

// Dtype codes shared with slimtune/_ext.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// 16-bit storage tags: distinct types so overloads pick the right conversion.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

ST_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

ST_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

ST_HD float to_float(float v) { return v; }

ST_HD float to_float(BFloat16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

ST_HD float to_float(Half v) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1Fu;
  uint32_t mant = v.bits & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);  // +-0
  uint32_t e = 113;                        // subnormal: normalise mant * 2^-24
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return bits_float(sign | (e << 23) | ((mant & 0x3FFu) << 13));
#endif
}

template <typename T>
ST_HD T from_float(float v);

template <>
ST_HD float from_float<float>(float v) {
  return v;
}

template <>
ST_HD BFloat16 from_float<BFloat16>(float v) {
#ifdef __CUDA_ARCH__
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
  const uint32_t u = float_bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  return BFloat16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
#endif
}

template <>
ST_HD Half from_float<Half>(float v) {
#ifdef __CUDA_ARCH__
  return Half{__half_as_ushort(__float2half_rn(v))};
#else
  const uint32_t u = float_bits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return Half{static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu))};  // nan
  if (a >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                                 // normal half
    uint32_t r = a - 0x38000000u;                                         // rebias exponent 127 -> 15
    r += 0xFFFu + ((r >> 13) & 1u);                                       // round to nearest even
    return Half{static_cast<uint16_t>(sign | (r >> 13))};
  }
  if (a < 0x33000000u) return Half{sign};  // < 2^-25 rounds to zero
  // Subnormal half: value / 2^-24 = mant * 2^(exp - 126), rounded to nearest even.
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - (a >> 23);
  uint32_t r = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
  return Half{static_cast<uint16_t>(sign | r)};
#endif
}

// Calls f(T{}) with the storage type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      return;
    case DType::kFloat16:
      f(Half{});
      return;
    case DType::kBFloat16:
      f(BFloat16{});
      return;
  }
  throw std::invalid_argument("slimtune._C: unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

// Gather/scatter are pure copies: dispatch on element size only.
template <typename F>
void dispatch_elem_size(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(uint32_t{});
      return;
    case DType::kFloat16:
    case DType::kBFloat16:
      f(uint16_t{});
      return;
  }
  throw std::invalid_argument("slimtune._C: unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

// A dense [rows, K] matrix and r of its columns, selected by idx, as a [rows, r] matrix.
// Strides are in elements. `dense` and `cols` are host or device pointers.
struct ColumnsArgs {
  void* dense;
  int64_t rows, K, dense_s0, dense_s1;
  void* cols;
  int64_t cols_s0, cols_s1;
  const int64_t* idx;
  int64_t r;
  DType dtype;
};

// Host-side idx validation for CPU calls (a device idx cannot be read without a
// sync, so CUDA kernels trap on out-of-range indices instead).
inline void check_idx_host(const int64_t* idx, int64_t r, int64_t K, bool unique) {
  std::vector<bool> seen(unique ? static_cast<size_t>(K) : 0);
  for (int64_t j = 0; j < r; ++j) {
    const int64_t c = idx[j];
    ST_CHECK(c >= 0 && c < K, "idx[" + std::to_string(j) + "] = " + std::to_string(c) +
                                  " is out of range for " + std::to_string(K) + " columns");
    if (unique) {
      ST_CHECK(!seen[c], "idx contains column " + std::to_string(c) +
                             " twice; writes through idx need distinct columns");
      seen[c] = true;
    }
  }
}

// AdamW scalars, computed on host in double and rounded to float like torch does
// when it passes Python floats to its float32 tensor ops.
struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay
  float lerp_w;         // 1 - beta1 (weight of exp_avg.lerp_(grad, 1 - beta1))
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  bool maximize;
};

inline AdamWScalars make_adamw_scalars(int64_t step, double lr, double beta1, double beta2, double eps,
                                       double weight_decay, bool maximize) {
  ST_CHECK(step >= 1, "step must be >= 1 (the count of updates including this one)");
  const double s = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(beta1, s);
  const double bc2 = 1.0 - std::pow(beta2, s);
  return AdamWScalars{static_cast<float>(1.0 - lr * weight_decay),
                      static_cast<float>(1.0 - beta1),
                      static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2),
                      static_cast<float>(std::sqrt(bc2)),
                      static_cast<float>(eps),
                      static_cast<float>(-(lr / bc1)),
                      maximize};
}

// One element of torch.optim.AdamW (foreach=False, amsgrad=False), same op order:
//   p.mul_(1 - lr*wd); m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
//   denom = (v.sqrt() / sqrt(bc2)).add_(eps); p.addcdiv_(m, denom, value=-step_size)
ST_HD float adamw_element(float p, float g, float& m, float& v, const AdamWScalars& s) {
  if (s.maximize) g = -g;
  p = p * s.decay;
  // torch's lerp picks the formula by |weight| < 0.5 for accuracy.
  m = (std::fabs(s.lerp_w) < 0.5f) ? m + s.lerp_w * (g - m) : g - (g - m) * (1.0f - s.lerp_w);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
  return p + s.neg_step_size * m / denom;
}

struct AdamWArgs {
  void* cols;  // parameter being trained, numel elements, contiguous
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  DType dtype;
  AdamWScalars s;
  // Optional dense weight kept in sync: weight[row, idx[j]] = cols[row, j] for
  // cols viewed as [numel / r, r]. weight == nullptr disables it.
  void* weight;
  int64_t w_s0, w_s1, K, r;
  const int64_t* idx;
};

// CPU kernels (csrc/cpu). Pointers are host pointers.
void gather_columns_cpu(const ColumnsArgs& a);
void scatter_columns_cpu(const ColumnsArgs& a);
void partial_adamw_cpu(const AdamWArgs& a);

#ifdef SLIMTUNE_WITH_CUDA
// CUDA kernels (csrc/cuda). Pointers are device pointers of `device`; launched on `stream`.
void gather_columns_cuda(const ColumnsArgs& a, int device, uintptr_t stream);
void scatter_columns_cuda(const ColumnsArgs& a, int device, uintptr_t stream);
void partial_adamw_cuda(const AdamWArgs& a, int device, uintptr_t stream);
#endif

}  // namespace slimtune
