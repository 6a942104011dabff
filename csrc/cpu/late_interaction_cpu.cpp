// late_interaction on the CPU (contract: reference.late_interaction; algorithm: see
// late_interaction_kernels.inc). This file checks and converts the tensors, packs S, and runs the
// kernels of the instruction set isa.h picked.
//
// Forward saves the winning patch per (image, text, sentence) and, when asked, the winning
// sentence per (image, text, patch); without the latter the backward recomputes the tiles.
// Backward writes dP parallel over images and dS parallel over texts: no atomics, deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "isa.h"

namespace egma {
namespace cpu {
namespace {

// Raw views of one call's inputs (features already in the accumulation dtype T, contiguous) and
// the packing of the real sentences into lanes (see late_interaction_kernels.inc).
template <typename T>
struct LIArgs {
  const T* P;              // [Bi, n, d]
  const T* S;              // [Bt, M, d]
  const bool* smask;       // [Bt, M]
  const bool* pmask;       // [Bi, n] or nullptr (all patches valid)
  const int64_t* n_valid;  // [Bi] valid patches per image
  const int64_t* m_valid;  // [Bt] real sentences per text
  const int64_t* lane_off;   // [Bt + 1] first lane of each text
  const int64_t* lane_row;   // [lanes] row of S (l * M + slot) of each lane
  const int64_t* first_pad;  // [Bt] a masked slot of each text with a zero slot (pad_as_zero), else -1
  const int64_t* chunk_off;  // [nchunks + 1] first text of each tile chunk
  int64_t Bi, Bt, n, M, d;
  int64_t lanes, nblk, nchunks;  // real sentences, packed blocks of W lanes, tile chunks
};

// An index tensor of 1, 2 or 4 bytes per entry (see index_dtype).
struct IndexView {
  void* data = nullptr;
  int64_t bytes = 0;
  IndexView() = default;
  explicit IndexView(const at::Tensor& t) : data(t.numel() ? t.data_ptr() : nullptr), bytes(t.element_size()) {}
  inline void set(int64_t i, int64_t v) const {
    if (bytes == 1) static_cast<uint8_t*>(data)[i] = static_cast<uint8_t>(v);
    else if (bytes == 2) static_cast<int16_t*>(data)[i] = static_cast<int16_t>(v);
    else static_cast<int32_t*>(data)[i] = static_cast<int32_t>(v);
  }
  inline int64_t get(int64_t i) const {
    if (bytes == 1) return static_cast<const uint8_t*>(data)[i];
    if (bytes == 2) return static_cast<const int16_t*>(data)[i];
    return static_cast<const int32_t*>(data)[i];
  }
};

// One copy of the kernels per instruction set (isa.h). The register blocking is chosen per set:
// rows of P x column blocks of 16 fp32 lanes held in accumulators (AVX-512: 32 registers).
namespace generic {
#define EGMA_LI_ROWS 2
#define EGMA_LI_COLS 1
#include "vec.inc"
#include "late_interaction_kernels.inc"
#undef EGMA_LI_ROWS
#undef EGMA_LI_COLS
}  // namespace generic

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define EGMA_LI_ROWS 4
#define EGMA_LI_COLS 1
#include "vec.inc"
#include "late_interaction_kernels.inc"
#undef EGMA_LI_ROWS
#undef EGMA_LI_COLS
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma")
namespace avx512 {
#define EGMA_LI_ROWS 8
#define EGMA_LI_COLS 2
#include "vec.inc"
#include "late_interaction_kernels.inc"
#undef EGMA_LI_ROWS
#undef EGMA_LI_COLS
}  // namespace avx512
#pragma GCC pop_options
#endif

constexpr int64_t kLanesBytes = 64;  // one packed column block holds 64 bytes of sentence lanes

std::vector<int64_t> count_valid(const at::Tensor& mask, int64_t rows, int64_t cols) {
  std::vector<int64_t> counts(rows, cols);
  if (!mask.defined()) return counts;
  const bool* m = mask.data_ptr<bool>();
  for (int64_t r = 0; r < rows; ++r) counts[r] = std::count(m + r * cols, m + (r + 1) * cols, true);
  return counts;
}

template <typename T>
struct Prepared {
  at::Tensor P, S, smask, pmask;
  std::vector<int64_t> n_valid, m_valid, lane_off, lane_row, first_pad, chunk_off;
  LIArgs<T> args;
};

// Texts per tile chunk: consecutive texts with at most this many lanes in total (or one text).
constexpr int64_t kChunkLanes = 128;

template <typename T>
void prepare(Prepared<T>& p, const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
             const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot,
             const std::array<int64_t, 5>& dims) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  p.P = P.to(acc).contiguous();
  p.S = S.to(acc).contiguous();
  p.smask = sent_mask.contiguous();
  if (patch_mask.has_value() && patch_mask->defined()) p.pmask = patch_mask->contiguous();
  const auto [Bi, Bt, n, M, d] = dims;
  p.n_valid = count_valid(p.pmask, Bi, n);
  p.m_valid = count_valid(p.smask, Bt, M);
  const at::Tensor& smask = p.smask;
  const bool* sm = smask.data_ptr<bool>();
  const at::Tensor zslot = zero_slot.contiguous();
  const bool* zs = zslot.data_ptr<bool>();
  p.lane_off.assign(Bt + 1, 0);
  p.first_pad.assign(Bt, -1);
  p.chunk_off.assign(1, 0);
  int64_t chunk_lanes = 0;
  for (int64_t l = 0; l < Bt; ++l) {
    for (int64_t j = 0; j < M; ++j) {
      if (sm[l * M + j]) p.lane_row.push_back(l * M + j);
      else if (zs[l] && p.first_pad[l] < 0) p.first_pad[l] = j;  // the zero slot's winner: no gradient
    }
    p.lane_off[l + 1] = static_cast<int64_t>(p.lane_row.size());
    if (chunk_lanes > 0 && chunk_lanes + p.m_valid[l] > kChunkLanes) {
      p.chunk_off.push_back(l);
      chunk_lanes = 0;
    }
    chunk_lanes += p.m_valid[l];
  }
  p.chunk_off.push_back(Bt);
  const int64_t W = kLanesBytes / static_cast<int64_t>(sizeof(T));
  const int64_t lanes = p.lane_off[Bt];
  const at::Tensor& Pc = p.P;
  const at::Tensor& Sc = p.S;
  const at::Tensor& pm = p.pmask;
  p.args = LIArgs<T>{Pc.data_ptr<T>(), Sc.data_ptr<T>(), sm, pm.defined() ? pm.data_ptr<bool>() : nullptr,
                     p.n_valid.data(), p.m_valid.data(), p.lane_off.data(), p.lane_row.data(),
                     p.first_pad.data(), p.chunk_off.data(), Bi, Bt, n, M, d, lanes, (lanes + W - 1) / W,
                     static_cast<int64_t>(p.chunk_off.size()) - 1};
}

template <typename T>
at::Tensor pack(const LIArgs<T>& a) {
  const int64_t W = kLanesBytes / static_cast<int64_t>(sizeof(T));
  at::Tensor ST = at::empty({a.nblk * a.d * W}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  if (ST.numel()) EGMA_DISPATCH_ISA(pack_sentences<T>(a, ST.data_ptr<T>()));
  return ST;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> late_interaction_fwd(
    const at::Tensor& P, const at::Tensor& S, const at::Tensor& sent_mask,
    const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot, bool save_sentence_argmax) {
  const auto dims = check_late_interaction_inputs(P, S, sent_mask, patch_mask, zero_slot);
  const auto [Bi, Bt, n, M, d] = dims;
  const auto acc = accumulate_dtype(P.scalar_type());
  const auto opts = P.options().dtype(acc);
  at::Tensor zI = at::zeros({Bi, Bt}, opts);
  at::Tensor zT = at::zeros({Bi, Bt}, opts);
  at::Tensor win_patch = at::zeros({Bi, Bt, M}, P.options().dtype(index_dtype(n)));
  at::Tensor win_sentence = save_sentence_argmax ? at::zeros({Bi, Bt, n}, P.options().dtype(index_dtype(M)))
                                                 : at::empty({0}, P.options().dtype(index_dtype(M)));
  AT_DISPATCH_FLOATING_TYPES(acc, "egma_fast late_interaction_fwd", [&] {
    Prepared<scalar_t> p;
    prepare<scalar_t>(p, P, S, sent_mask, patch_mask, zero_slot, dims);
    if (Bi * Bt == 0) return;
    at::Tensor ST = pack<scalar_t>(p.args);
    IndexView jstar = save_sentence_argmax ? IndexView(win_sentence) : IndexView();
    EGMA_DISPATCH_ISA(forward<scalar_t>(p.args, ST.data_ptr<scalar_t>(), zI.data_ptr<scalar_t>(),
                                        zT.data_ptr<scalar_t>(), IndexView(win_patch), jstar));
  });
  return {zI, zT, win_patch, win_sentence};
}

std::tuple<at::Tensor, at::Tensor> late_interaction_bwd(
    const at::Tensor& grad_zI, const at::Tensor& grad_zT, const at::Tensor& P, const at::Tensor& S,
    const at::Tensor& sent_mask, const std::optional<at::Tensor>& patch_mask, const at::Tensor& zero_slot,
    const at::Tensor& win_patch, const at::Tensor& win_sentence) {
  const auto dims = check_late_interaction_inputs(P, S, sent_mask, patch_mask, zero_slot);
  const auto [Bi, Bt, n, M, d] = dims;
  TORCH_CHECK(grad_zI.sizes() == at::IntArrayRef({Bi, Bt}) && grad_zT.sizes() == at::IntArrayRef({Bi, Bt}),
              "late_interaction_bwd: grad_zI and grad_zT must be [Bi, Bt] = [", Bi, ", ", Bt, "], got ",
              grad_zI.sizes(), " and ", grad_zT.sizes());
  TORCH_CHECK(win_patch.sizes() == at::IntArrayRef({Bi, Bt, M}) && win_patch.scalar_type() == index_dtype(n),
              "late_interaction_bwd: win_patch must be the forward's [Bi, Bt, M] index tensor");
  const bool recompute = win_sentence.dim() != 3;
  TORCH_CHECK(recompute || (win_sentence.sizes() == at::IntArrayRef({Bi, Bt, n}) &&
                            win_sentence.scalar_type() == index_dtype(M)),
              "late_interaction_bwd: win_sentence must be the forward's [Bi, Bt, n] index tensor or empty");
  const auto acc = accumulate_dtype(P.scalar_type());
  at::Tensor gP, gS;
  AT_DISPATCH_FLOATING_TYPES(acc, "egma_fast late_interaction_bwd", [&] {
    Prepared<scalar_t> p;
    prepare<scalar_t>(p, P, S, sent_mask, patch_mask, zero_slot, dims);
    at::Tensor gP_acc = at::empty({Bi, n, d}, P.options().dtype(acc));  // the kernels write every row
    at::Tensor gS_acc = at::empty({Bt, M, d}, P.options().dtype(acc));
    if (Bi * Bt * d > 0) {
      at::Tensor gzI = grad_zI.to(acc).contiguous();
      at::Tensor gzT = grad_zT.to(acc).contiguous();
      at::Tensor win = win_patch.contiguous();
      at::Tensor jstar_t = recompute ? at::empty({Bi, Bt, n}, P.options().dtype(index_dtype(M))) : win_sentence.contiguous();
      at::Tensor ST = recompute ? pack<scalar_t>(p.args) : at::Tensor();
      const scalar_t* st = recompute ? ST.data_ptr<scalar_t>() : nullptr;
      EGMA_DISPATCH_ISA(backward_images<scalar_t>(p.args, st, gzI.data_ptr<scalar_t>(), gzT.data_ptr<scalar_t>(),
                                                  IndexView(win), IndexView(jstar_t), recompute,
                                                  gP_acc.data_ptr<scalar_t>()));
      EGMA_DISPATCH_ISA(backward_texts<scalar_t>(p.args, gzI.data_ptr<scalar_t>(), gzT.data_ptr<scalar_t>(),
                                                 IndexView(win), IndexView(jstar_t), gS_acc.data_ptr<scalar_t>()));
    } else {
      gP_acc.zero_();
      gS_acc.zero_();
    }
    gP = gP_acc.to(P.scalar_type());
    gS = gS_acc.to(S.scalar_type());
  });
  return {gP, gS};
}

}  // namespace cpu
}  // namespace egma
