// The interface between the CUDA kernels (late_interaction.cu, cross_map.cu) and the torch-facing
// shim (ops_cuda.cpp): raw device pointers, sizes and the stream, nothing from torch or CUDA.
//
// Why: a CPU-only torch wheel ships neither c10/cuda's generated headers nor cuBLAS, so the .cu
// files include only the CUDA runtime and header-only c10 utilities (BFloat16, Half); CI compiles
// them with nvcc against such a wheel (csrc/check_cuda_compile.py). The shim, which needs
// c10::cuda (current stream, device guard), is compiled only when building against a CUDA torch.
#pragma once

#include <cstdint>

#include "../common.h"

namespace egma {
namespace cuda {

// Element type of the feature tensors; the kernels accumulate in fp32 (fp64 for Double).
enum class Dtype : int { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };

// An index tensor of 1, 2 or 4 bytes per entry (uint8, int16, int32: see ops.h index_dtype).
struct IndexPtr {
  void* data;
  int bytes;
};

struct LateInteractionArgs {
  const void* P;            // [Bi, n, d] contiguous, dtype
  const void* S;            // [Bt, M, d] contiguous, dtype
  const bool* smask;        // [Bt, M]
  const bool* pmask;        // [Bi, n] or nullptr
  const int32_t* n_valid;   // [Bi] valid patches per image
  const int32_t* m_valid;   // [Bt] real sentences per text
  const bool* zero_slot;    // [Bt] the text's image-side max is floored at 0 (pad_as_zero, SPEC 2.1)
  int64_t Bi, Bt, n, M, d;
  Dtype dtype;
  void* stream;             // cudaStream_t
};

// zI, zT: [Bi, Bt] accumulation dtype; win [Bi, Bt, M]; jstar [Bi, Bt, n] or data == nullptr.
// Returns a cudaError_t (0 on success).
int late_interaction_forward(const LateInteractionArgs& a, void* zI, void* zT, IndexPtr win, IndexPtr jstar);

// grad_zI, grad_zT: [Bi, Bt] accumulation dtype. jstar holds the forward's winners, or (recompute)
// receives them. gP_acc [Bi, n, d] and gS_acc [Bt, M, d] are accumulation-dtype workspaces;
// grad_P, grad_S have the features' dtype.
int late_interaction_backward(const LateInteractionArgs& a, const void* grad_zI, const void* grad_zT, IndexPtr win,
                              IndexPtr jstar, bool recompute, void* gP_acc, void* gS_acc, void* grad_P,
                              void* grad_S);

// The tensor-core kernels (late_interaction_tc.cu; the "tensor_core" option of
// egma_fast/ops/cpp_backend.py): bf16 / fp16 inputs on sm_80+, same contract and outputs as above.
// late_interaction_tc_unsupported says why a call cannot use them (nullptr: it can); the caller then
// takes the SIMT kernels. `scales` is a workspace of Bi + Bt floats; jstar receives the winners
// when recompute is set.
const char* late_interaction_tc_unsupported(const LateInteractionArgs& a);
int late_interaction_tc_forward(const LateInteractionArgs& a, void* zI, void* zT, IndexPtr win, IndexPtr jstar);
int late_interaction_tc_backward(const LateInteractionArgs& a, const void* grad_zI, const void* grad_zT, IndexPtr win,
                                 IndexPtr jstar, bool recompute, void* scales, void* grad_P, void* grad_S);

struct CrossMapArgs {
  const void* P;           // [B, n, d] contiguous, dtype
  const void* S;           // [B, M, d] contiguous, dtype
  const bool* valid;       // [B, M]
  const void* GS;          // [B, M, n] accumulation dtype
  const bool* use_gaze;    // [B]
  const void* theta;       // [B] accumulation dtype
  const void* alpha;       // one element, accumulation dtype (read on the device)
  int64_t B, n, M, d;
  CrossMapOptions opt;
  Dtype dtype;
  void* stream;
};

// Thread blocks the cross_map kernels use (one instance per block at a time) and the workspace
// they need: blocks * cross_map_workspace_elems(...) elements of the accumulation dtype.
int64_t cross_map_blocks(int64_t B);
int64_t cross_map_workspace_elems(int64_t n, int64_t M, int64_t d, Dtype dtype);

// terms: [4, B] accumulation dtype.
int cross_map_forward(const CrossMapArgs& a, void* workspace, void* terms);
// grads: [4, B] accumulation dtype; grad_P, grad_S feature dtype; alpha_share [B] accumulation dtype.
int cross_map_backward(const CrossMapArgs& a, const void* grads, void* workspace, void* grad_P, void* grad_S,
                       void* alpha_share);

}  // namespace cuda
}  // namespace egma
