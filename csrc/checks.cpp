// Argument checks shared by the CPU and CUDA implementations of the ops (messages name the argument).
#include <c10/util/Exception.h>

#include "ops.h"

namespace egma {
namespace {

void check_features(const char* op, const char* name, const at::Tensor& t, const char* shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be ", shape, ", got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", dt);
}

void check_bool(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

}  // namespace

std::array<int64_t, 5> check_late_interaction_inputs(const at::Tensor& P, const at::Tensor& S,
                                                     const at::Tensor& sent_mask,
                                                     const std::optional<at::Tensor>& patch_mask,
                                                     const at::Tensor& zero_slot) {
  const char* op = "late_interaction";
  check_features(op, "P", P, "[Bi, n, d]");
  check_features(op, "S", S, "[Bt, M, d]");
  TORCH_CHECK(S.scalar_type() == P.scalar_type(), op, ": P and S must have the same dtype, got ", P.scalar_type(),
              " and ", S.scalar_type());
  TORCH_CHECK(S.device() == P.device(), op, ": S must be on P's device ", P.device(), ", got ", S.device());
  TORCH_CHECK(S.size(2) == P.size(2), op, ": P [Bi, n, d] and S [Bt, M, d] must share d, got ", P.sizes(), " and ",
              S.sizes());
  const int64_t Bi = P.size(0), n = P.size(1), d = P.size(2), Bt = S.size(0), M = S.size(1);
  check_bool(op, "sent_mask", sent_mask, {Bt, M}, P);
  if (patch_mask.has_value() && patch_mask->defined()) check_bool(op, "patch_mask", *patch_mask, {Bi, n}, P);
  check_bool(op, "zero_slot", zero_slot, {Bt}, P);
  return {Bi, Bt, n, M, d};
}

std::array<int64_t, 4> check_cross_map_inputs(const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
                                              const at::Tensor& GS, const at::Tensor& use_gaze,
                                              const at::Tensor& theta, const at::Tensor& alpha) {
  const char* op = "cross_map";
  check_features(op, "P", P, "[B, n, d]");
  check_features(op, "S", S, "[B, M, d]");
  TORCH_CHECK(S.scalar_type() == P.scalar_type(), op, ": P and S must have the same dtype, got ", P.scalar_type(),
              " and ", S.scalar_type());
  TORCH_CHECK(S.device() == P.device(), op, ": S must be on P's device ", P.device(), ", got ", S.device());
  const int64_t B = P.size(0), n = P.size(1), d = P.size(2), M = S.size(1);
  TORCH_CHECK(S.size(0) == B && S.size(2) == d, op, ": P [B, n, d] and S [B, M, d] must share B and d, got ",
              P.sizes(), " and ", S.sizes());
  TORCH_CHECK(n > 0, op, ": P must have at least one patch (n > 0)");
  check_bool(op, "sent_mask", sent_mask, {B, M}, P);
  check_bool(op, "use_gaze", use_gaze, {B}, P);
  TORCH_CHECK(GS.sizes() == at::IntArrayRef({B, M, n}), op, ": GS must be [B, M, n] = [", B, ", ", M, ", ", n,
              "], got ", GS.sizes());
  TORCH_CHECK(GS.is_floating_point() && GS.device() == P.device(), op, ": GS must be a floating tensor on ",
              P.device());
  TORCH_CHECK(theta.sizes() == at::IntArrayRef({B}) && theta.is_floating_point() && theta.device() == P.device(), op,
              ": theta must be a floating [B] tensor on ", P.device(), ", got ", theta.sizes());
  TORCH_CHECK(alpha.numel() == 1 && alpha.is_floating_point() && alpha.device() == P.device(), op,
              ": alpha must be a floating one-element tensor on ", P.device(), ", got shape ", alpha.sizes());
  return {B, n, M, d};
}

CrossMapOptions cross_map_options(const CrossMapOptions& options) {
  TORCH_CHECK(options.k_sentences >= 1, "cross_map: k_sentences must be >= 1, got ", options.k_sentences);
  TORCH_CHECK(options.k_patches >= 1, "cross_map: k_patches must be >= 1, got ", options.k_patches);
  return options;
}

}  // namespace egma
