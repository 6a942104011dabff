// The ops of egma_fast._C: argument checks shared by the CPU and CUDA implementations, and the
// kernels' entry points. Schemas live in ops.cpp; the autograd and fake (meta) implementations
// are registered from Python (egma_fast/ops/cpp_backend.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <optional>
#include <tuple>

#include "common.h"

namespace egma {

// The index dtype that holds 0..count-1: uint8 up to 256, int16 up to 32768, else int32.
inline c10::ScalarType index_dtype(int64_t count) {
  if (count <= 256) return c10::ScalarType::Byte;
  if (count <= 32768) return c10::ScalarType::Short;
  return c10::ScalarType::Int;
}

// float64 stays float64; fp32, bf16 and fp16 accumulate in fp32 (reference._compute_dtype).
inline c10::ScalarType accumulate_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

// Shape, dtype and device checks of late_interaction's inputs; returns {Bi, Bt, n, M, d}.
// zero_slot [Bt] bool: the texts whose image-side max is floored at 0 (egma_fast.ops.arguments).
std::array<int64_t, 5> check_late_interaction_inputs(const at::Tensor& P, const at::Tensor& S,
                                                     const at::Tensor& sent_mask,
                                                     const std::optional<at::Tensor>& patch_mask,
                                                     const at::Tensor& zero_slot);
// The same for cross_map; returns {B, n, M, d}.
std::array<int64_t, 4> check_cross_map_inputs(const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
                                              const at::Tensor& GS, const at::Tensor& use_gaze,
                                              const at::Tensor& theta, const at::Tensor& alpha);

// cross_map's options in the op schemas (egma_fast.ops.CrossMapParams.OP_SCHEMA, in that order; a
// test compares them): the schema text, the C++ parameters of an implementation, and the
// CrossMapOptions they make (checked).
#define EGMA_CROSS_MAP_OPTION_SCHEMA                                                                  \
  "bool threshold_omega, int k_sentences, int k_patches, float floor_value, bool single_mse, "      \
  "float gaze_threshold, bool with_mlce, bool with_egm, bool egm_use_gaze"
#define EGMA_CROSS_MAP_OPTION_PARAMS                                                                  \
  bool threshold_omega, int64_t k_sentences, int64_t k_patches, double floor_value, bool single_mse, \
      double gaze_threshold, bool with_mlce, bool with_egm, bool egm_use_gaze
#define EGMA_CROSS_MAP_OPTIONS                                                                        \
  ::egma::cross_map_options(::egma::CrossMapOptions{threshold_omega, k_sentences, k_patches, floor_value,     \
                                            single_mse, gaze_threshold, with_mlce, with_egm, egm_use_gaze})

// The options after their checks (k >= 1).
CrossMapOptions cross_map_options(const CrossMapOptions& options);

namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> late_interaction_fwd(
    const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
    const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot, bool save_sentence_argmax);

std::tuple<at::Tensor, at::Tensor> late_interaction_bwd(
    const at::Tensor& grad_zI, const at::Tensor& grad_zT, const at::Tensor& P, const at::Tensor& S,
    const at::Tensor& sent_mask, const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot,
    const at::Tensor& win_patch, const at::Tensor& win_sentence);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_map_fwd(
    const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask, const at::Tensor& GS,
    const at::Tensor& use_gaze, const at::Tensor& theta, const at::Tensor& alpha, const CrossMapOptions& opt);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_map_bwd(
    const at::Tensor& grad_mlce_s2p, const at::Tensor& grad_mlce_p2s, const at::Tensor& grad_egm_image,
    const at::Tensor& grad_egm_text, const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
    const at::Tensor& GS, const at::Tensor& use_gaze, const at::Tensor& theta, const at::Tensor& alpha,
    const CrossMapOptions& opt);

}  // namespace cpu
}  // namespace egma
