// CUDA helpers shared by the .cu files: error checks and a device guard.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

// Throws std::runtime_error (Python RuntimeError) carrying the CUDA error string.
#define ST_CUDA_CHECK(expr)                                                                    \
  do {                                                                                         \
    const cudaError_t err_ = (expr);                                                           \
    if (err_ != cudaSuccess)                                                                   \
      throw std::runtime_error(std::string("slimtune._C CUDA error: ") + cudaGetErrorString(err_) + \
                               " (" #expr ")");                                                \
  } while (0)

namespace slimtune {

// Our static CUDA runtime has its own notion of the current device: select the
// tensors' device for the launch and restore the previous one afterwards, since the
// current context is shared with torch's runtime through the driver.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    ST_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device_) ST_CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

inline void check_launch() { ST_CUDA_CHECK(cudaGetLastError()); }

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Blocks for a grid-stride loop over n elements.
inline unsigned int grid_blocks(int64_t n, int threads) {
  return static_cast<unsigned int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

}  // namespace slimtune
