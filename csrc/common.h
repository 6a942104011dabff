// Helpers shared by the CPU (g++) and CUDA (nvcc) kernels of egma_fast._C.
//
// Nothing here includes torch's ATen or CUDA headers: the .cu files must compile against the
// headers a CPU-only torch wheel ships (see csrc/check_cuda_compile.py).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EGMA_HD __host__ __device__
#define EGMA_INLINE __host__ __device__ __forceinline__
#else
#define EGMA_HD
#define EGMA_INLINE inline
#endif

namespace egma {

// Static options of cross_map (egma_fast.ops.CrossMapParams), flattened for the kernels. A new
// option goes here, in CrossMapParams (its OP_SCHEMA and op_args) and in ops.h's
// EGMA_CROSS_MAP_OPTION_* macros, in the same order.
struct CrossMapOptions {
  bool threshold_omega;   // "threshold" (official) instead of "topk" (paper)
  int64_t k_sentences;    // top-k over a patch's sentences (clipped to m_k)
  int64_t k_patches;      // top-k over a sentence's patches (clipped to n)
  double floor_value;     // threshold omega: + floor after thresholding
  bool single_mse;        // m_k = 1: ||Cross_S - S||^2 ("mse") instead of dropping ("drop")
  double gaze_threshold;  // GL = GS > gaze_threshold
  bool with_mlce;
  bool with_egm;
  bool egm_use_gaze;      // EGM adds the gaze prior (else EGM sees no gaze; MLCE still does)
};

EGMA_INLINE float egma_exp(float x) { return expf(x); }
EGMA_INLINE double egma_exp(double x) { return exp(x); }
EGMA_INLINE float egma_log(float x) { return logf(x); }
EGMA_INLINE double egma_log(double x) { return log(x); }

template <typename T>
EGMA_INLINE T egma_inf() {
  return static_cast<T>(INFINITY);  // INFINITY, unlike numeric_limits, is usable in device code
}

}  // namespace egma
