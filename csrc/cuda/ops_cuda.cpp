// The CUDA kernels as torch ops: checks, allocations, the current stream, and the registration
// of egma_fast_C's ops for the CUDA dispatch key. Compiled only when building against a CUDA
// torch (setup.py, EGMA_WITH_CUDA); the kernels behind launch.h need nothing from torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../ops.h"
#include "launch.h"

namespace egma {
namespace cuda {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble:
      return Dtype::Double;
    case at::kBFloat16:
      return Dtype::BFloat16;
    case at::kHalf:
      return Dtype::Half;
    default:
      return Dtype::Float;
  }
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "egma_fast._C: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

IndexPtr index_ptr(const at::Tensor& t) { return IndexPtr{t.numel() ? t.data_ptr() : nullptr, static_cast<int>(t.element_size())}; }

struct LIInputs {
  at::Tensor P, S, smask, pmask, n_valid, m_valid, zero_slot;
  LateInteractionArgs args;
};

LIInputs li_inputs(const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
                   const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot,
                   const std::array<int64_t, 5>& dims) {
  const auto [Bi, Bt, n, M, d] = dims;
  LIInputs in;
  in.P = P.contiguous();
  in.S = S.contiguous();
  in.smask = sent_mask.contiguous();
  const bool has_pmask = patch_mask.has_value() && patch_mask->defined();
  if (has_pmask) in.pmask = patch_mask->contiguous();
  in.n_valid = has_pmask ? in.pmask.sum(1, false, at::kInt) : at::full({Bi}, n, P.options().dtype(at::kInt));
  in.m_valid = in.smask.sum(1, false, at::kInt);
  in.zero_slot = zero_slot.contiguous();
  in.args = LateInteractionArgs{in.P.data_ptr(),
                                in.S.data_ptr(),
                                in.smask.data_ptr<bool>(),
                                has_pmask ? in.pmask.data_ptr<bool>() : nullptr,
                                in.n_valid.data_ptr<int32_t>(),
                                in.m_valid.data_ptr<int32_t>(),
                                in.zero_slot.data_ptr<bool>(),
                                Bi, Bt, n, M, d, dtype_of(P),
                                c10::cuda::getCurrentCUDAStream(P.get_device()).stream()};
  return in;
}

// Limits of the SIMT kernels (late_interaction.cu): grid.y = Bi, per-block shared memory ~ M.
void check_simt_limits(const std::array<int64_t, 5>& dims) {
  const auto [Bi, Bt, n, M, d] = dims;
  TORCH_CHECK(M <= 1024, "late_interaction (CUDA): at most 1024 sentence slots (M), got ", M);
  TORCH_CHECK(Bi <= 65535, "late_interaction (CUDA): at most 65535 images (Bi) per call, got ", Bi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> late_interaction_fwd(
    const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
    const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot, bool save_sentence_argmax) {
  const auto dims = check_late_interaction_inputs(P, S, sent_mask, patch_mask, zero_slot);
  check_simt_limits(dims);
  const auto [Bi, Bt, n, M, d] = dims;
  const c10::cuda::CUDAGuard guard(P.device());
  const auto opts = P.options().dtype(accumulate_dtype(P.scalar_type()));
  at::Tensor zI = at::zeros({Bi, Bt}, opts), zT = at::zeros({Bi, Bt}, opts);
  at::Tensor win_patch = at::zeros({Bi, Bt, M}, P.options().dtype(index_dtype(n)));
  at::Tensor win_sentence = save_sentence_argmax ? at::zeros({Bi, Bt, n}, P.options().dtype(index_dtype(M)))
                                                 : at::empty({0}, P.options().dtype(index_dtype(M)));
  const LIInputs in = li_inputs(P, S, sent_mask, patch_mask, zero_slot, dims);
  check_launch(late_interaction_forward(in.args, zI.data_ptr(), zT.data_ptr(), index_ptr(win_patch),
                                        save_sentence_argmax ? index_ptr(win_sentence) : IndexPtr{nullptr, 1}),
               "late_interaction forward");
  return {zI, zT, win_patch, win_sentence};
}

// The backward's gradient and winner arguments; returns whether the image-side winners must be
// recomputed (win_sentence empty).
bool check_bwd_inputs(const at::Tensor& grad_zI, const at::Tensor& grad_zT, const at::Tensor& win_patch,
                      const at::Tensor& win_sentence, const std::array<int64_t, 5>& dims) {
  const auto [Bi, Bt, n, M, d] = dims;
  TORCH_CHECK(grad_zI.sizes() == at::IntArrayRef({Bi, Bt}) && grad_zT.sizes() == at::IntArrayRef({Bi, Bt}),
              "late_interaction_bwd: grad_zI and grad_zT must be [Bi, Bt] = [", Bi, ", ", Bt, "]");
  TORCH_CHECK(win_patch.sizes() == at::IntArrayRef({Bi, Bt, M}) && win_patch.scalar_type() == index_dtype(n),
              "late_interaction_bwd: win_patch must be the forward's [Bi, Bt, M] index tensor");
  const bool recompute = win_sentence.dim() != 3;
  TORCH_CHECK(recompute || (win_sentence.sizes() == at::IntArrayRef({Bi, Bt, n}) &&
                            win_sentence.scalar_type() == index_dtype(M)),
              "late_interaction_bwd: win_sentence must be the forward's [Bi, Bt, n] index tensor or empty");
  return recompute;
}

std::tuple<at::Tensor, at::Tensor> late_interaction_bwd(
    const at::Tensor& grad_zI, const at::Tensor& grad_zT, const at::Tensor& P, const at::Tensor& S,
    const at::Tensor& sent_mask, const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot,
    const at::Tensor& win_patch, const at::Tensor& win_sentence) {
  const auto dims = check_late_interaction_inputs(P, S, sent_mask, patch_mask, zero_slot);
  check_simt_limits(dims);
  const auto [Bi, Bt, n, M, d] = dims;
  const bool recompute = check_bwd_inputs(grad_zI, grad_zT, win_patch, win_sentence, dims);
  const c10::cuda::CUDAGuard guard(P.device());
  const auto acc = accumulate_dtype(P.scalar_type());
  const LIInputs in = li_inputs(P, S, sent_mask, patch_mask, zero_slot, dims);
  at::Tensor gzI = grad_zI.to(acc).contiguous(), gzT = grad_zT.to(acc).contiguous();
  at::Tensor win = win_patch.contiguous();
  at::Tensor jstar = recompute ? at::empty({Bi, Bt, n}, P.options().dtype(index_dtype(M))) : win_sentence.contiguous();
  at::Tensor gP = at::empty({Bi, n, d}, P.options()), gS = at::empty({Bt, M, d}, S.options());
  at::Tensor gP_acc = P.scalar_type() == acc ? gP : at::empty({Bi, n, d}, P.options().dtype(acc));
  at::Tensor gS_acc = S.scalar_type() == acc ? gS : at::empty({Bt, M, d}, S.options().dtype(acc));
  check_launch(late_interaction_backward(in.args, gzI.data_ptr(), gzT.data_ptr(), index_ptr(win), index_ptr(jstar),
                                         recompute, gP_acc.data_ptr(), gS_acc.data_ptr(), gP.data_ptr(),
                                         gS.data_ptr()),
               "late_interaction backward");
  return {gP, gS};
}

// ----------------------------------------------------------------------------------------------
// The tensor-core kernels (late_interaction_tc.cu): same contract and outputs as the ops above.
// Inputs they do not cover (fp32 / fp64, M > 128, d not a multiple of 8, a device older than
// sm_80) run the SIMT kernels, with a one-time warning saying why.
// ----------------------------------------------------------------------------------------------
// cp.async copies 16-byte pieces: a view starting off a 16-byte boundary is copied first.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone(at::MemoryFormat::Contiguous);
}

bool tc_usable(const LIInputs& in) {
  const char* why = late_interaction_tc_unsupported(in.args);
  if (why == nullptr) return true;
  TORCH_WARN_ONCE("egma_fast late_interaction: ", why, "; using the SIMT CUDA kernels for such inputs");
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> late_interaction_tc_fwd(
    const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
    const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot, bool save_sentence_argmax) {
  const auto dims = check_late_interaction_inputs(P, S, sent_mask, patch_mask, zero_slot);
  const auto [Bi, Bt, n, M, d] = dims;
  const c10::cuda::CUDAGuard guard(P.device());
  const LIInputs in = li_inputs(aligned16(P), aligned16(S), sent_mask, patch_mask, zero_slot, dims);
  if (!tc_usable(in)) return late_interaction_fwd(P, S, sent_mask, patch_mask, zero_slot, save_sentence_argmax);
  const auto opts = P.options().dtype(at::kFloat);
  at::Tensor zI = at::empty({Bi, Bt}, opts), zT = at::empty({Bi, Bt}, opts);
  // Zero-filled: only real slots (patches) get a winner written, as in the SIMT kernels.
  at::Tensor win_patch = at::zeros({Bi, Bt, M}, P.options().dtype(index_dtype(n)));
  at::Tensor win_sentence = save_sentence_argmax ? at::zeros({Bi, Bt, n}, P.options().dtype(index_dtype(M)))
                                                 : at::empty({0}, P.options().dtype(index_dtype(M)));
  check_launch(late_interaction_tc_forward(in.args, zI.data_ptr(), zT.data_ptr(), index_ptr(win_patch),
                                           save_sentence_argmax ? index_ptr(win_sentence) : IndexPtr{nullptr, 1}),
               "late_interaction forward (tensor cores)");
  return {zI, zT, win_patch, win_sentence};
}

std::tuple<at::Tensor, at::Tensor> late_interaction_tc_bwd(
    const at::Tensor& grad_zI, const at::Tensor& grad_zT, const at::Tensor& P, const at::Tensor& S,
    const at::Tensor& sent_mask, const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot,
    const at::Tensor& win_patch, const at::Tensor& win_sentence) {
  const auto dims = check_late_interaction_inputs(P, S, sent_mask, patch_mask, zero_slot);
  const auto [Bi, Bt, n, M, d] = dims;
  const bool recompute = check_bwd_inputs(grad_zI, grad_zT, win_patch, win_sentence, dims);
  const c10::cuda::CUDAGuard guard(P.device());
  const LIInputs in = li_inputs(aligned16(P), aligned16(S), sent_mask, patch_mask, zero_slot, dims);
  if (!tc_usable(in)) {
    return late_interaction_bwd(grad_zI, grad_zT, P, S, sent_mask, patch_mask, zero_slot, win_patch, win_sentence);
  }
  if (Bi == 0 || Bt == 0) return {at::zeros({Bi, n, d}, P.options()), at::zeros({Bt, M, d}, S.options())};
  at::Tensor gzI = grad_zI.to(at::kFloat).contiguous(), gzT = grad_zT.to(at::kFloat).contiguous();
  at::Tensor win = win_patch.contiguous();
  // Recompute: the forward kernel fills a transient [Bi, Bt, n] buffer (B^2 n bytes during the backward).
  at::Tensor jstar = recompute ? at::empty({Bi, Bt, n}, P.options().dtype(index_dtype(M))) : win_sentence.contiguous();
  at::Tensor scales = at::empty({Bi + Bt}, P.options().dtype(at::kFloat));
  at::Tensor gP = at::empty({Bi, n, d}, P.options()), gS = at::empty({Bt, M, d}, S.options());
  check_launch(late_interaction_tc_backward(in.args, gzI.data_ptr(), gzT.data_ptr(), index_ptr(win),
                                            index_ptr(jstar), recompute, scales.data_ptr(), gP.data_ptr(),
                                            gS.data_ptr()),
               "late_interaction backward (tensor cores)");
  return {gP, gS};
}

struct CMInputs {
  at::Tensor P, S, valid, GS, use_gaze, theta, alpha;
  CrossMapArgs args;
};

CMInputs cm_inputs(const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask, const at::Tensor& GS,
                   const at::Tensor& use_gaze, const at::Tensor& theta, const at::Tensor& alpha,
                   const CrossMapOptions& opt, const std::array<int64_t, 4>& dims) {
  const auto [B, n, M, d] = dims;
  const auto acc = accumulate_dtype(P.scalar_type());
  CMInputs in;
  in.P = P.contiguous();
  in.S = S.contiguous();
  in.valid = sent_mask.contiguous();
  in.GS = GS.to(acc).contiguous();
  in.use_gaze = use_gaze.contiguous();
  in.theta = theta.to(acc).contiguous();
  in.alpha = alpha.to(acc).contiguous();
  in.args = CrossMapArgs{in.P.data_ptr(),   in.S.data_ptr(),        in.valid.data_ptr<bool>(),
                         in.GS.data_ptr(),  in.use_gaze.data_ptr<bool>(), in.theta.data_ptr(),
                         in.alpha.data_ptr(), B, n, M, d, opt, dtype_of(P),
                         c10::cuda::getCurrentCUDAStream(P.get_device()).stream()};
  return in;
}

at::Tensor cm_workspace(const CMInputs& in) {
  const CrossMapArgs& a = in.args;
  return at::empty({cross_map_blocks(a.B) * cross_map_workspace_elems(a.n, a.M, a.d, a.dtype)},
                   in.P.options().dtype(accumulate_dtype(in.P.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_map_fwd(
    const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask, const at::Tensor& GS,
    const at::Tensor& use_gaze, const at::Tensor& theta, const at::Tensor& alpha, EGMA_CROSS_MAP_OPTION_PARAMS) {
  const auto dims = check_cross_map_inputs(P, S, sent_mask, GS, use_gaze, theta, alpha);
  const auto opt = EGMA_CROSS_MAP_OPTIONS;
  const c10::cuda::CUDAGuard guard(P.device());
  const CMInputs in = cm_inputs(P, S, sent_mask, GS, use_gaze, theta, alpha, opt, dims);
  at::Tensor terms = at::zeros({4, dims[0]}, P.options().dtype(accumulate_dtype(P.scalar_type())));
  at::Tensor workspace = cm_workspace(in);
  check_launch(cross_map_forward(in.args, workspace.data_ptr(), terms.data_ptr()), "cross_map forward");
  return {terms[0].clone(), terms[1].clone(), terms[2].clone(), terms[3].clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_map_bwd(
    const at::Tensor& grad_mlce_s2p, const at::Tensor& grad_mlce_p2s, const at::Tensor& grad_egm_image,
    const at::Tensor& grad_egm_text, const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
    const at::Tensor& GS, const at::Tensor& use_gaze, const at::Tensor& theta, const at::Tensor& alpha,
    EGMA_CROSS_MAP_OPTION_PARAMS) {
  const auto dims = check_cross_map_inputs(P, S, sent_mask, GS, use_gaze, theta, alpha);
  const auto [B, n, M, d] = dims;
  for (const at::Tensor* g : {&grad_mlce_s2p, &grad_mlce_p2s, &grad_egm_image, &grad_egm_text}) {
    TORCH_CHECK(g->sizes() == at::IntArrayRef({B}), "cross_map_bwd: every output gradient must be [B] = [", B,
                "], got ", g->sizes());
  }
  const auto opt = EGMA_CROSS_MAP_OPTIONS;
  const c10::cuda::CUDAGuard guard(P.device());
  const auto acc = accumulate_dtype(P.scalar_type());
  const CMInputs in = cm_inputs(P, S, sent_mask, GS, use_gaze, theta, alpha, opt, dims);
  at::Tensor grads = at::stack({grad_mlce_s2p, grad_mlce_p2s, grad_egm_image, grad_egm_text}).to(acc).contiguous();
  at::Tensor gP = at::empty({B, n, d}, P.options()), gS = at::empty({B, M, d}, S.options());
  at::Tensor shares = at::zeros({B}, P.options().dtype(acc));
  at::Tensor workspace = cm_workspace(in);
  check_launch(cross_map_backward(in.args, grads.data_ptr(), workspace.data_ptr(), gP.data_ptr(), gS.data_ptr(),
                                  shares.data_ptr()),
               "cross_map backward");
  // alpha's gradient: the per-instance shares summed by a fixed-order reduction.
  at::Tensor galpha = shares.sum().to(alpha.scalar_type()).reshape(alpha.sizes()).contiguous();
  return {gP, gS, galpha};
}

}  // namespace
}  // namespace cuda
}  // namespace egma

// The tensor-core variants exist only in CUDA builds; egma_fast/ops/cpp_backend.py calls them when
// EGMA_FAST_CUDA_KERNELS=tensor_core (and registers their fake and autograd implementations).
TORCH_LIBRARY_FRAGMENT(egma_fast_C, m) {
  m.def(
      "late_interaction_tc_fwd(Tensor P, Tensor S, Tensor sent_mask, Tensor? patch_mask, Tensor zero_slot, "
      "bool save_sentence_argmax) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "late_interaction_tc_bwd(Tensor grad_zI, Tensor grad_zT, Tensor P, Tensor S, Tensor sent_mask, "
      "Tensor? patch_mask, Tensor zero_slot, Tensor win_patch, Tensor win_sentence) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(egma_fast_C, CUDA, m) {
  m.impl("late_interaction_fwd", &egma::cuda::late_interaction_fwd);
  m.impl("late_interaction_bwd", &egma::cuda::late_interaction_bwd);
  m.impl("late_interaction_tc_fwd", &egma::cuda::late_interaction_tc_fwd);
  m.impl("late_interaction_tc_bwd", &egma::cuda::late_interaction_tc_bwd);
  m.impl("cross_map_fwd", &egma::cuda::cross_map_fwd);
  m.impl("cross_map_bwd", &egma::cuda::cross_map_bwd);
}
