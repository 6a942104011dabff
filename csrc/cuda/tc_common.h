// The host-and-device half of the tensor-core late interaction (late_interaction_tc.cu).
//
// Everything a kernel computes that is not a PTX instruction lives here as plain C++ (EGMA_HD is
// __host__ __device__ under nvcc, nothing under a host compiler): the mma.m16n8k16 and ldmatrix
// fragment layouts, the tile -> global index maps, the forward's epilogue phases (reductions on
// the accumulator tile), the backward's staging of the saved winners and the one-hot weight
// values W, the hi/lo split of W and the gradient scales. csrc/cuda/tc_host_sim.cpp runs these
// same functions thread by thread (one loop over threads between two barriers) with emulated
// ldmatrix / mma, so tests/test_cuda_tc_host.py checks the kernels' index arithmetic on a CPU
// against egma_fast.reference and against a Python model of the PTX ISA's layouts.
//
// Algorithm (DESIGN.md, "The hot path"; contract: reference.late_interaction):
//   forward   one CTA = one tile of 128 patch rows (kTileRows) x 128 sentence-slot columns
//             (kTileCols): X = P_rows . S_cols^T over d on the tensor cores, fp32 accumulators,
//             stored to shared memory; then the row max over each text's slots (summed into zI,
//             winner -> win_sentence) and the column max over patches (running over row chunks
//             when n > 128; winner -> win_patch), first maximiser on ties.
//   backward  dP = W S (rows: patches, K: sentence slots) and dS = W^T P (rows: slots, K: patches),
//             W one-hot: cI = dzI/n_valid at each patch's winning slot, cT = dzT/m_l at each slot's
//             winning patch, built per mma fragment in registers from the staged winners. Each
//             output element is owned by one thread of one CTA: deterministic, no atomics.
//
// Row layout (forward and dP): R = rows per image = next power of two >= n, clamped to [16, 128];
// a tile holds 128 / R images (n <= 64) or one 128-row chunk of one image (n > 128: ceil(n/128)
// chunks). Column layout: Mp = slots per text = next power of two >= M, at least 16; a tile holds
// 128 / Mp texts. So every 16-row mma tile lies in one image and every 16-wide k step of dP in
// one text (every 16-row tile of dS in one text). Padding rows / slots are zero-filled and never
// win or receive gradient.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../common.h"
#include "launch.h"

#if defined(__CUDACC__)
#define EGMA_UNROLL _Pragma("unroll")
#else
#define EGMA_UNROLL
#endif

namespace egma {
namespace cuda {
namespace tc {

constexpr int kThreads = 256;   // 8 warps per CTA in every tensor-core kernel
constexpr int kTileRows = 128;  // forward / dP: patch rows; dS: slot rows
constexpr int kTileCols = 128;  // forward: slot columns; dP / dS: d columns
constexpr int kMaxM = 128;      // sentence slots per text the tensor-core kernels support
constexpr int kMaxImagesPerTile = 8;  // 128 / 16
constexpr int kMaxTextsPerTile = 8;   // 128 / 16
constexpr uint8_t kNoSlot = 0xFF;     // staged "no winning slot" (slots are < kMaxM = 128)

// Forward main loop: K steps of 32 features, 4 cp.async stages of A [128][32] and B [128][32].
constexpr int kFwdK = 32;
constexpr int kFwdStages = 4;
constexpr int kFwdLd = kFwdK + 8;   // 80-byte rows: the 8 rows of an ldmatrix hit 8 distinct 16-byte bank groups
constexpr int kXStride = kTileCols + 1;  // fp32 accumulator tile in shared memory: row and column scans conflict-free
// Backward main loops: K chunks of 64 (4 mma k steps), 3 cp.async stages of B [64][128].
constexpr int kBwdK = 64;
constexpr int kBwdStages = 3;
constexpr int kBwdLd = kTileCols + 8;  // 272-byte rows: conflict-free ldmatrix.trans
constexpr int kDsGroupsPerChunk = kBwdK / 16;

static_assert(kThreads == 2 * kTileCols, "fwd_phase_cols gives each column two threads");
static_assert(kThreads == 4 * 64, "fwd_phase_zsum gives each (image, text) pair four threads");

// ----------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"); groupID = lane >> 2,
// threadID_in_group = lane & 3. Element i of a lane's fragment sits at (row, col) of the operand:
// A 16x16 (i < 8, two per 32-bit register, low half first), B 16x8 (i < 4; row = k, col = n),
// C/D 16x8 (i < 4, fp32).
// ----------------------------------------------------------------------------------------------
EGMA_HD constexpr int frag_a_row(int lane, int i) { return (lane >> 2) + ((i & 2) ? 8 : 0); }
EGMA_HD constexpr int frag_a_col(int lane, int i) { return (lane & 3) * 2 + (i & 1) + ((i & 4) ? 8 : 0); }
EGMA_HD constexpr int frag_b_row(int lane, int i) { return (lane & 3) * 2 + (i & 1) + ((i & 2) ? 8 : 0); }
EGMA_HD constexpr int frag_b_col(int lane, int /*i*/) { return lane >> 2; }
EGMA_HD constexpr int frag_c_row(int lane, int i) { return (lane >> 2) + ((i & 2) ? 8 : 0); }
EGMA_HD constexpr int frag_c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane supplies the address of row (lane & 7) of
// matrix (lane >> 3); its register m receives two elements (low half = `half` 0) of matrix m at
// (ldsm_row, ldsm_col) of that 8x8 matrix as stored.
EGMA_HD constexpr int ldsm_row(int lane, int half, bool trans) { return trans ? (lane & 3) * 2 + half : lane >> 2; }
EGMA_HD constexpr int ldsm_col(int lane, int half, bool trans) { return trans ? lane >> 2 : (lane & 3) * 2 + half; }

// Where each lane points its ldmatrix.x4 (row, column offsets inside a 16 x 16 block):
// A from a row-major [m][k] tile (the forward's P): matrices {m0-7,k0-7} {m8-15,k0-7} {m0-7,k8-15}
// {m8-15,k8-15} are the registers a0a1, a2a3, a4a5, a6a7.
EGMA_HD constexpr int ldsm_a_row(int lane) { return lane & 15; }
EGMA_HD constexpr int ldsm_a_col(int lane) { return (lane >> 4) << 3; }
// B for two n8 tiles from an [n][k] tile (k contiguous; the forward's S), no transpose: matrices
// {n0-7,k0-7} {n0-7,k8-15} {n8-15,k0-7} {n8-15,k8-15} are b0b1, b2b3 of n tile 0, then of n tile 1.
EGMA_HD constexpr int ldsm_bt_n(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
EGMA_HD constexpr int ldsm_bt_k(int lane) { return ((lane >> 3) & 1) << 3; }
// B for two n8 tiles from a [k][n] tile (n contiguous; the backward's S and P), with .trans:
// matrices {k0-7,n0-7} {k8-15,n0-7} {k0-7,n8-15} {k8-15,n8-15}, same register order.
EGMA_HD constexpr int ldsm_b_k(int lane) { return (lane & 7) + (((lane >> 3) & 1) << 3); }
EGMA_HD constexpr int ldsm_b_n(int lane) { return (lane >> 4) << 3; }

// Warp tiles. Forward: 8 warps as 2 (rows) x 4 (columns), 64 x 32 each = 4 x 4 mma tiles.
// Backward: 4 (rows) x 2 (d columns), 32 x 64 each = 2 x 8 mma tiles (each W fragment built in
// registers feeds 8 n tiles, twice: hi and lo).
constexpr int kFwdWarpRows = 64, kFwdWarpCols = 32, kFwdMt = 4, kFwdNt = 4;
constexpr int kBwdWarpRows = 32, kBwdWarpCols = 64, kBwdMt = 2, kBwdNt = 8;
EGMA_HD constexpr int fwd_warp_row0(int warp) { return (warp >> 2) * kFwdWarpRows; }
EGMA_HD constexpr int fwd_warp_col0(int warp) { return (warp & 3) * kFwdWarpCols; }
EGMA_HD constexpr int bwd_warp_row0(int warp) { return (warp >> 1) * kBwdWarpRows; }
EGMA_HD constexpr int bwd_warp_col0(int warp) { return (warp & 1) * kBwdWarpCols; }

// ----------------------------------------------------------------------------------------------
// Geometry: the tile decomposition of one call (computed on the host, passed by value).
// ----------------------------------------------------------------------------------------------
struct Geometry {
  int64_t Bi, Bt;
  int n, M, d;
  int lgR;      // rows per image in a tile: R = 1 << lgR in [16, 128]
  int ipc;      // images per tile: 128 >> lgR
  int chunks;   // 128-row chunks per image (1 unless n > 128)
  int lgMp;     // slot columns per text: Mp = 1 << lgMp in [16, 128]
  int bt;       // texts per 128-column tile: 128 >> lgMp
  int groups;   // dS: 16-patch k groups per image, ceil(n / 16)
  int64_t image_tiles;  // ceil(Bi / ipc)
  int64_t text_blocks;  // ceil(Bt / bt)
};

EGMA_HD inline int ceil_log2(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

// Only for 1 <= M <= kMaxM, n >= 1 (see tc_unsupported in late_interaction_tc.cu).
EGMA_HD inline Geometry make_geometry(int64_t Bi, int64_t Bt, int n, int M, int d) {
  Geometry g{};
  g.Bi = Bi;
  g.Bt = Bt;
  g.n = n;
  g.M = M;
  g.d = d;
  const int lg_n = ceil_log2(n);
  g.lgR = lg_n < 4 ? 4 : (lg_n > 7 ? 7 : lg_n);
  g.ipc = kTileRows >> g.lgR;
  g.chunks = (n + (1 << g.lgR) - 1) >> g.lgR;
  const int lg_m = ceil_log2(M);
  g.lgMp = lg_m < 4 ? 4 : lg_m;
  g.bt = kTileCols >> g.lgMp;
  g.groups = (n + 15) / 16;
  g.image_tiles = (Bi + g.ipc - 1) / g.ipc;
  g.text_blocks = (Bt + g.bt - 1) / g.bt;
  return g;
}

// Row r of image tile `it`, row chunk `ch` (forward and dP): patch i of image k.
struct RowRef {
  int64_t k;
  int i;
  bool valid;  // an existing image and patch (not padding)
};
EGMA_HD inline RowRef tile_row(const Geometry& g, int64_t it, int ch, int r) {
  RowRef x;
  x.k = it * g.ipc + (r >> g.lgR);
  x.i = (ch << g.lgR) + (r & ((1 << g.lgR) - 1));
  x.valid = x.k < g.Bi && x.i < g.n;
  return x;
}

// Column c of text block tb (forward columns, dS rows): slot j of text l.
struct ColRef {
  int64_t l;
  int j;
  bool valid;  // an existing text and slot j < M (the slot may still be masked)
};
EGMA_HD inline ColRef tile_col(const Geometry& g, int64_t tb, int c) {
  ColRef x;
  x.l = tb * g.bt + (c >> g.lgMp);
  x.j = c & ((1 << g.lgMp) - 1);
  x.valid = x.l < g.Bt && x.j < g.M;
  return x;
}

// dP's K dimension: slot column cc over all texts (Mp per text); chunk kc covers [64 kc, 64 kc + 64).
EGMA_HD inline int64_t dp_k_chunks(const Geometry& g) { return (g.Bt * (int64_t{1} << g.lgMp) + kBwdK - 1) / kBwdK; }
EGMA_HD inline int dp_texts_per_chunk(const Geometry& g) { return g.lgMp >= 6 ? 1 : kBwdK >> g.lgMp; }
EGMA_HD inline int64_t dp_first_text(const Geometry& g, int64_t kc) { return (kc * kBwdK) >> g.lgMp; }
EGMA_HD inline ColRef dp_slot(const Geometry& g, int64_t kc, int c) {
  const int64_t cc = kc * kBwdK + c;
  ColRef x;
  x.l = cc >> g.lgMp;
  x.j = static_cast<int>(cc & ((int64_t{1} << g.lgMp) - 1));
  x.valid = x.l < g.Bt && x.j < g.M;
  return x;
}

// dS's K dimension: 16-patch groups q of every image (image q / groups, patches 16 (q % groups) + 0..15);
// chunk kc covers the groups [4 kc, 4 kc + 4).
struct GroupRef {
  int64_t k;
  int i0;
  bool valid;
};
EGMA_HD inline int64_t ds_k_chunks(const Geometry& g) {
  return (g.Bi * g.groups + kDsGroupsPerChunk - 1) / kDsGroupsPerChunk;
}
// 32-bit division: Bi * groups < 2^31 (late_interaction_tc_unsupported), and 64-bit division costs
// a subroutine and registers in the kernels' loops.
EGMA_HD inline GroupRef ds_group(const Geometry& g, int64_t q) {
  const uint32_t q32 = static_cast<uint32_t>(q), k = q32 / static_cast<uint32_t>(g.groups);
  GroupRef x;
  x.k = k;
  x.i0 = static_cast<int>(q32 - k * static_cast<uint32_t>(g.groups)) * 16;
  x.valid = x.k < g.Bi;
  return x;
}
EGMA_HD inline RowRef ds_patch(const Geometry& g, int64_t kc, int row) {  // row < kBwdK of chunk kc
  const GroupRef q = ds_group(g, kc * kDsGroupsPerChunk + (row >> 4));
  RowRef x;
  x.k = q.k;
  x.i = q.i0 + (row & 15);
  x.valid = q.valid && x.i < g.n;
  return x;
}
EGMA_HD inline int64_t ds_b_src(const Geometry& g, int64_t kc, int row) {
  const RowRef x = ds_patch(g, kc, row);
  return x.valid ? x.k * g.n + x.i : -1;
}

// Source rows of the operand tiles the kernels copy into shared memory (-1: a zero-filled
// padding row). Forward: A row r = a patch of P, B row c = a slot of S. dP: B row = slot row of
// chunk kc. dS: B row = patch row of chunk kc.
EGMA_HD inline int64_t fwd_a_src(const Geometry& g, int64_t it, int ch, int r) {
  const RowRef x = tile_row(g, it, ch, r);
  return x.valid ? x.k * g.n + x.i : -1;
}
EGMA_HD inline int64_t fwd_b_src(const Geometry& g, int64_t tb, int c) {
  const ColRef x = tile_col(g, tb, c);
  return x.valid ? x.l * g.M + x.j : -1;
}
EGMA_HD inline int64_t dp_b_src(const Geometry& g, int64_t kc, int row) {
  const ColRef x = dp_slot(g, kc, row);
  return x.valid ? x.l * g.M + x.j : -1;
}

// Forward CTA order: groups of 8 image tiles sweep the text blocks together (GEMM-style swizzle),
// so the CTAs resident at once share a few images' patches and a band of texts in L2.
constexpr int64_t kFwdGroup = 8;
EGMA_HD inline void fwd_tile_of(const Geometry& g, int64_t cta, int64_t& it, int64_t& tb) {
  const int64_t per_group = kFwdGroup * g.text_blocks;
  const int64_t first = (cta / per_group) * kFwdGroup;
  const int64_t rest = g.image_tiles - first;
  const int64_t size = rest < kFwdGroup ? rest : kFwdGroup;
  const int64_t local = cta % per_group;
  it = first + local % size;
  tb = local / size;
}
// Backward CTA order: the d blocks of one row tile (dP) / text block (dS) run next to each other.
EGMA_HD inline int64_t bwd_d_blocks(const Geometry& g) { return (g.d + kTileCols - 1) / kTileCols; }

// ----------------------------------------------------------------------------------------------
// Index tensors (uint8 / int16 / int32 by element size, see ops.h index_dtype).
// ----------------------------------------------------------------------------------------------
EGMA_HD inline int64_t index_load(IndexPtr p, int64_t i) {
  if (p.bytes == 1) return static_cast<const uint8_t*>(p.data)[i];
  if (p.bytes == 2) return static_cast<const int16_t*>(p.data)[i];
  return static_cast<const int32_t*>(p.data)[i];
}
EGMA_HD inline void index_store(IndexPtr p, int64_t i, int64_t v) {
  if (p.bytes == 1) static_cast<uint8_t*>(p.data)[i] = static_cast<uint8_t>(v);
  else if (p.bytes == 2) static_cast<int16_t*>(p.data)[i] = static_cast<int16_t>(v);
  else static_cast<int32_t*>(p.data)[i] = static_cast<int32_t>(v);
}

// ----------------------------------------------------------------------------------------------
// Forward: arguments, the persistent shared memory, and the epilogue phases. A phase is run by
// every thread th of the CTA between two barriers; it touches no other thread's outputs.
// ----------------------------------------------------------------------------------------------
struct FwdArgs {
  const void* P;            // [Bi, n, d] bf16 / fp16
  const void* S;            // [Bt, M, d]
  const bool* smask;        // [Bt, M]
  const bool* pmask;        // [Bi, n] or nullptr
  const int32_t* n_valid;   // [Bi]
  const int32_t* m_valid;   // [Bt]
  const bool* zero_slot;    // [Bt]
  float* zI;                // [Bi, Bt]; nullptr: winners only (the backward's recompute)
  float* zT;                // [Bi, Bt]
  IndexPtr win_patch;       // [Bi, Bt, M]; data nullptr: not written
  IndexPtr win_sentence;    // [Bi, Bt, n]; data nullptr: not written
  Geometry g;
};

struct FwdSmem {
  float rowval[kTileRows][kMaxTextsPerTile];       // image side: row max per (row, text), this chunk
  float cm_val[kMaxImagesPerTile][kTileCols];      // text side: running column max per (image, column)
  int32_t cm_arg[kMaxImagesPerTile][kTileCols];    // ... and its patch (first maximiser)
  float part_val[2][kTileCols];                    // R = 128: column max of each 64-row half
  int32_t part_arg[2][kTileCols];
  float zq[4][kMaxImagesPerTile * kMaxTextsPerTile];  // zI partial sums over quarters of an image's rows
  float zi[kMaxImagesPerTile * kMaxTextsPerTile];     // zI running sums per (image, text) pair
  int32_t txt_m[kMaxTextsPerTile];
  int32_t txt_first_masked[kMaxTextsPerTile];
  uint8_t txt_zero[kMaxTextsPerTile];              // the text's max is floored at 0 (has a zero slot)
  uint8_t col_real[kTileCols];                     // the column is a real sentence of an existing text
  uint8_t row_ok[kTileRows];                       // the row is a valid patch of an existing image (this chunk)
};

struct Winner {
  float value;
  int arg;
};

// Image side of one row: the first real slot attaining the max of x[0, M). A text with a zero slot
// (pad_as_zero, SPEC 2.1) floors the max at 0: when no real slot reaches 0 the zero slot wins with
// value 0, recorded as its first masked slot (which passes no gradient). Same rule as the SIMT
// kernels' row_winner.
EGMA_HD inline Winner row_winner(const float* x, const uint8_t* real, int M, bool zero_slot, int first_masked) {
  Winner w{-INFINITY, -1};
  for (int j = 0; j < M; ++j) {
    if (!real[j]) continue;
    if (w.arg < 0 || x[j] > w.value) {
      w.value = x[j];
      w.arg = j;
    }
  }
  if (zero_slot && (w.arg < 0 || w.value < 0.f)) {
    w.value = 0.f;
    w.arg = first_masked;
  }
  if (w.arg < 0) w.arg = 0;  // no real slot: the text scores 0 and the winner is never used
  return w;
}

// Running column max: a later candidate (higher patch) replaces the best only when strictly
// greater, so the first maximiser wins.
EGMA_HD inline void col_update(float& best, int32_t& arg, float cand, int32_t cand_arg) {
  if (cand > best) {
    best = cand;
    arg = cand_arg;
  }
}

EGMA_HD inline void fwd_init_texts(const FwdArgs& a, int64_t tb, FwdSmem& s, int th) {
  const Geometry& g = a.g;
  for (int c = th; c < kTileCols; c += kThreads) {
    const ColRef col = tile_col(g, tb, c);
    s.col_real[c] = col.valid && a.smask[col.l * g.M + col.j];
    for (int gi = 0; gi < kMaxImagesPerTile; ++gi) {
      s.cm_val[gi][c] = -INFINITY;
      s.cm_arg[gi][c] = 0;
    }
  }
  for (int t = th; t < kMaxTextsPerTile; t += kThreads) {
    const int64_t l = tb * g.bt + t;
    int m = 0, first_masked = -1;
    bool zero = false;
    if (t < g.bt && l < g.Bt) {
      m = a.m_valid[l];
      zero = a.zero_slot[l];
      for (int j = 0; j < g.M; ++j) {
        if (!a.smask[l * g.M + j]) {
          first_masked = j;
          break;
        }
      }
    }
    s.txt_m[t] = m;
    s.txt_first_masked[t] = first_masked;
    s.txt_zero[t] = zero && first_masked >= 0;
  }
  for (int p = th; p < kMaxImagesPerTile * kMaxTextsPerTile; p += kThreads) s.zi[p] = 0.f;
}

EGMA_HD inline void fwd_init_rows(const FwdArgs& a, int64_t it, int ch, FwdSmem& s, int th) {
  for (int r = th; r < kTileRows; r += kThreads) {
    const RowRef row = tile_row(a.g, it, ch, r);
    s.row_ok[r] = row.valid && (!a.pmask || a.pmask[row.k * a.g.n + row.i]);
  }
}

// Phase 1 (after the tile X is in shared memory): image side of every (row, text).
EGMA_HD inline void fwd_phase_rows(const FwdArgs& a, int64_t it, int64_t tb, int ch, const float* X, FwdSmem& s,
                                   int th) {
  const Geometry& g = a.g;
  for (int p = th; p < kTileRows * g.bt; p += kThreads) {
    const int r = p & (kTileRows - 1), t = p >> 7;  // neighbouring threads: neighbouring rows
    float v = 0.f;
    if (s.row_ok[r] && s.txt_m[t] > 0) {
      const int c0 = t << g.lgMp;
      const Winner w = row_winner(X + r * kXStride + c0, s.col_real + c0, g.M, s.txt_zero[t], s.txt_first_masked[t]);
      v = w.value;
      if (a.win_sentence.data) {
        const RowRef row = tile_row(g, it, ch, r);
        index_store(a.win_sentence, (row.k * g.Bt + tb * g.bt + t) * g.n + row.i, w.arg);
      }
    }
    s.rowval[r][t] = v;
  }
}

// Phase 2a: text side, each column scanned by two threads (rows [0, 64) and [64, 128)). With
// R <= 64 a half holds whole images and updates their running max directly; with R = 128 the
// halves go to part_* for phase 3.
EGMA_HD inline void fwd_phase_cols(const FwdArgs& a, int ch, const float* X, FwdSmem& s, int th) {
  const Geometry& g = a.g;
  const int c = th >> 1, h = th & 1, R = 1 << g.lgR;
  const int seg = R < 64 ? R : 64;
  for (int r0 = h * 64; r0 < h * 64 + 64; r0 += seg) {
    float best = -INFINITY;
    int32_t arg = 0;
    for (int r = r0; r < r0 + seg; ++r) {
      if (!s.row_ok[r]) continue;
      col_update(best, arg, X[r * kXStride + c], (ch << g.lgR) + (r & (R - 1)));
    }
    if (R <= 64) {
      const int gi = r0 >> g.lgR;
      col_update(s.cm_val[gi][c], s.cm_arg[gi][c], best, arg);
    } else {
      s.part_val[h][c] = best;
      s.part_arg[h][c] = arg;
    }
  }
}

// Phase 2b (same barrier interval as 2a): zI partial sums, four threads per (image, text) pair,
// each over a contiguous quarter of the image's rows.
EGMA_HD inline void fwd_phase_zsum(const FwdArgs& a, FwdSmem& s, int th) {
  const Geometry& g = a.g;
  const int p = th >> 2, q = th & 3;
  if (p >= g.ipc * g.bt) return;
  const int gi = p / g.bt, t = p % g.bt, R = 1 << g.lgR, len = R / 4;
  float sum = 0.f;
  for (int r = gi * R + q * len; r < gi * R + (q + 1) * len; ++r) sum += s.rowval[r][t];
  s.zq[q][p] = sum;
}

// Phase 3: merge the halves (R = 128) in row order, and add the quarters to the running zI.
EGMA_HD inline void fwd_phase_merge(const FwdArgs& a, FwdSmem& s, int th) {
  const Geometry& g = a.g;
  if (g.lgR == 7 && th < kTileCols) {
    col_update(s.cm_val[0][th], s.cm_arg[0][th], s.part_val[0][th], s.part_arg[0][th]);
    col_update(s.cm_val[0][th], s.cm_arg[0][th], s.part_val[1][th], s.part_arg[1][th]);
  }
  if (th < g.ipc * g.bt) s.zi[th] += ((s.zq[0][th] + s.zq[1][th]) + s.zq[2][th]) + s.zq[3][th];
}

// Phase 4 (after the last chunk): zI, zT and the winning patch of every real slot.
EGMA_HD inline void fwd_phase_final(const FwdArgs& a, int64_t it, int64_t tb, FwdSmem& s, int th) {
  const Geometry& g = a.g;
  if (a.zI) {
    for (int p = th; p < g.ipc * g.bt; p += kThreads) {
      const int gi = p / g.bt, t = p % g.bt;
      const int64_t k = it * g.ipc + gi, l = tb * g.bt + t;
      if (k >= g.Bi || l >= g.Bt) continue;
      const int nv = a.n_valid[k], m = s.txt_m[t];
      float zt = 0.f;
      for (int j = 0; j < g.M; ++j) {
        const int c = (t << g.lgMp) + j;
        if (s.col_real[c]) zt += s.cm_val[gi][c];
      }
      const bool scored = nv > 0 && m > 0;  // an image without patches or a text without sentences scores 0
      a.zI[k * g.Bt + l] = scored ? s.zi[p] / static_cast<float>(nv) : 0.f;
      a.zT[k * g.Bt + l] = scored ? zt / static_cast<float>(m) : 0.f;
    }
  }
  if (a.win_patch.data) {
    for (int e = th; e < g.ipc * kTileCols; e += kThreads) {
      const int gi = e >> 7, c = e & (kTileCols - 1);
      const int64_t k = it * g.ipc + gi;
      const ColRef col = tile_col(g, tb, c);
      if (k < g.Bi && s.col_real[c]) index_store(a.win_patch, (k * g.Bt + col.l) * g.M + col.j, s.cm_arg[gi][c]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Backward: arguments, gradient coefficients and scales, staging of the winners per K chunk, and
// the one-hot weights of each mma A fragment.
// ----------------------------------------------------------------------------------------------
struct BwdArgs {
  const void* P;             // [Bi, n, d] bf16 / fp16
  const void* S;             // [Bt, M, d]
  const bool* smask;         // [Bt, M]
  const bool* pmask;         // [Bi, n] or nullptr
  const int32_t* n_valid;    // [Bi]
  const int32_t* m_valid;    // [Bt]
  const float* gzI;          // [Bi, Bt]
  const float* gzT;          // [Bi, Bt]
  IndexPtr win_patch;        // [Bi, Bt, M]: the winning patch per (k, l, slot)
  IndexPtr win_sentence;     // [Bi, Bt, n]: the winning slot per (k, l, patch)
  const float* row_scale;    // [Bi]: dP's W rows of image k are multiplied by row_scale[k] (a power of 2)
  const float* col_scale;    // [Bt]: dS's W^T rows of text l by col_scale[l]
  void* dP;                  // [Bi, n, d] feature dtype
  void* dS;                  // [Bt, M, d]
  Geometry g;
};

// d zI[k,l] / d X[k,l,i,j*] = dzI / n_valid and d zT / d X[k,l,i*,j] = dzT / m_l; zero for an image
// without valid patches or a text without sentences (they score 0).
EGMA_HD inline float coef_image(float gz, int nv, int m) { return nv > 0 && m > 0 ? gz / static_cast<float>(nv) : 0.f; }
EGMA_HD inline float coef_text(float gz, int nv, int m) { return nv > 0 && m > 0 ? gz / static_cast<float>(m) : 0.f; }

// A power of two that brings maxabs into [0.5, 1) (1 for 0, inf, NaN). W is rounded to 16 bits
// as hi + lo; scaling each output row's W by such a factor (undone exactly in fp32 afterwards)
// keeps fp16's narrow exponent range from flushing small gradients to zero.
EGMA_HD inline float pow2_scale(float maxabs) {
  if (!(maxabs > 0.f) || !(maxabs <= FLT_MAX)) return 1.f;
  int e = 0;
  frexpf(maxabs, &e);  // maxabs = f * 2^e, f in [0.5, 1)
  e = e < -126 ? -126 : (e > 126 ? 126 : e);
  return ldexpf(1.f, -e);
}

// max(|cI|, |cT|) of one (image, text) pair, unscaled: the quantity the scales normalise.
EGMA_HD inline float coef_abs(const float* gzI, const float* gzT, int64_t Bt, int nv, int m, int64_t k, int64_t l) {
  const float a = fabsf(coef_image(gzI[k * Bt + l], nv, m)), b = fabsf(coef_text(gzT[k * Bt + l], nv, m));
  return fmaxf(a, b);  // NaN never wins: the scale stays finite
}

// The weight of W[row patch i][column slot j] of one (image, text): cI at the patch's winning slot
// js, cT at the slot's winning patch win (both when they coincide). js is kNoSlot and win -1 where
// no gradient flows.
EGMA_HD inline float w_value(int js, int j, int64_t win, int i, float cI, float cT) {
  return (js == j ? cI : 0.f) + (win == i ? cT : 0.f);
}

// A saved winning slot, kept only when it is a real sentence (the zero slot's winner is a masked
// slot: no gradient).
EGMA_HD inline uint8_t fold_slot(int64_t js, const bool* smask_row, int M) {
  return js >= 0 && js < M && smask_row[js] ? static_cast<uint8_t>(js) : kNoSlot;
}

// dP: one K chunk = 64 slot columns = dp_texts_per_chunk texts (a half text when Mp = 128).
struct DpStage {
  uint8_t js[4][kTileRows];               // [text of the chunk][row]: the row's winning slot in that text
  int32_t win[kMaxImagesPerTile][kBwdK];  // [image of the tile][column]: the slot's winning patch, -1: none
  float cI[kMaxImagesPerTile][4];         // [image][text of the chunk], scaled by row_scale
  float cT[kMaxImagesPerTile][4];
};
EGMA_HD inline int dp_js_items(const Geometry& g) { return dp_texts_per_chunk(g) * kTileRows; }
EGMA_HD inline int dp_win_items(const Geometry& g) { return g.ipc * kBwdK; }
EGMA_HD inline int dp_coef_items(const Geometry& g) { return g.ipc * dp_texts_per_chunk(g); }

EGMA_HD inline uint8_t dp_js_item(const BwdArgs& a, int64_t it, int ch, int64_t kc, int e) {
  const Geometry& g = a.g;
  const int64_t l = dp_first_text(g, kc) + (e >> 7);
  const RowRef row = tile_row(g, it, ch, e & (kTileRows - 1));
  if (!row.valid || l >= g.Bt) return kNoSlot;
  if (a.pmask && !a.pmask[row.k * g.n + row.i]) return kNoSlot;
  return fold_slot(index_load(a.win_sentence, (row.k * g.Bt + l) * g.n + row.i), a.smask + l * g.M, g.M);
}

EGMA_HD inline int32_t dp_win_item(const BwdArgs& a, int64_t it, int64_t kc, int e) {
  const Geometry& g = a.g;
  const int64_t k = it * g.ipc + (e / kBwdK);
  const ColRef col = dp_slot(g, kc, e % kBwdK);
  if (k >= g.Bi || !col.valid || !a.smask[col.l * g.M + col.j]) return -1;
  return static_cast<int32_t>(index_load(a.win_patch, (k * g.Bt + col.l) * g.M + col.j));
}

EGMA_HD inline void dp_coef_item(const BwdArgs& a, int64_t it, int64_t kc, int e, float& cI, float& cT) {
  const Geometry& g = a.g;
  const int tpc = dp_texts_per_chunk(g);
  const int64_t k = it * g.ipc + e / tpc, l = dp_first_text(g, kc) + e % tpc;
  cI = cT = 0.f;
  if (k >= g.Bi || l >= g.Bt) return;
  const int nv = a.n_valid[k], m = a.m_valid[l];
  const float scale = a.row_scale[k];
  cI = coef_image(a.gzI[k * g.Bt + l], nv, m) * scale;
  cT = coef_text(a.gzT[k * g.Bt + l], nv, m) * scale;
}

// The 8 weights of `lane`'s A fragment (16 rows from rb, k step ks of chunk kc) of dP.
EGMA_HD inline void dp_a_frag(const Geometry& g, const DpStage& st, int ch, int64_t kc, int ks, int rb, int lane,
                              float w[8]) {
  const int64_t cc0 = kc * kBwdK + ks * 16;
  const int tt = static_cast<int>((cc0 >> g.lgMp) - dp_first_text(g, kc));
  const int j0 = static_cast<int>(cc0 & ((int64_t{1} << g.lgMp) - 1));
  const int gi = rb >> g.lgR, R = 1 << g.lgR;
  const float cI = st.cI[gi][tt], cT = st.cT[gi][tt];
EGMA_UNROLL
  for (int e = 0; e < 8; ++e) {
    const int r = rb + frag_a_row(lane, e), c = frag_a_col(lane, e);
    w[e] = w_value(st.js[tt][r], j0 + c, st.win[gi][ks * 16 + c], (ch << g.lgR) + (r & (R - 1)), cI, cT);
  }
}

// dS: one K chunk = 4 groups of 16 patches (each group in one image).
struct DsStage {
  uint8_t js[kMaxTextsPerTile][kBwdK];          // [text of the block][patch column of the chunk]
  int32_t win[kDsGroupsPerChunk][kTileRows];    // [group][slot row]: the slot's winning patch, -1: none
  float cI[kDsGroupsPerChunk][kMaxTextsPerTile];  // [group][text], scaled by col_scale
  float cT[kDsGroupsPerChunk][kMaxTextsPerTile];
  int32_t i0[kDsGroupsPerChunk];                  // [group]: its first patch (ds_group(...).i0)
};
EGMA_HD inline int ds_js_items(const Geometry& g) { return g.bt * kBwdK; }
EGMA_HD inline int ds_win_items(const Geometry&) { return kDsGroupsPerChunk * kTileRows; }
EGMA_HD inline int ds_coef_items(const Geometry& g) { return kDsGroupsPerChunk * g.bt; }

EGMA_HD inline uint8_t ds_js_item(const BwdArgs& a, int64_t tb, int64_t kc, int e) {
  const Geometry& g = a.g;
  const int64_t l = tb * g.bt + e / kBwdK;
  const RowRef p = ds_patch(g, kc, e % kBwdK);
  if (!p.valid || l >= g.Bt) return kNoSlot;
  if (a.pmask && !a.pmask[p.k * g.n + p.i]) return kNoSlot;
  return fold_slot(index_load(a.win_sentence, (p.k * g.Bt + l) * g.n + p.i), a.smask + l * g.M, g.M);
}

EGMA_HD inline int32_t ds_win_item(const BwdArgs& a, int64_t tb, int64_t kc, int e) {
  const Geometry& g = a.g;
  const GroupRef q = ds_group(g, kc * kDsGroupsPerChunk + e / kTileRows);
  const ColRef col = tile_col(g, tb, e % kTileRows);
  if (!q.valid || !col.valid || !a.smask[col.l * g.M + col.j]) return -1;
  return static_cast<int32_t>(index_load(a.win_patch, (q.k * g.Bt + col.l) * g.M + col.j));
}

EGMA_HD inline void ds_coef_item(const BwdArgs& a, int64_t tb, int64_t kc, int e, float& cI, float& cT) {
  const Geometry& g = a.g;
  const GroupRef q = ds_group(g, kc * kDsGroupsPerChunk + e / g.bt);
  const int64_t l = tb * g.bt + e % g.bt;
  cI = cT = 0.f;
  if (!q.valid || l >= g.Bt) return;
  const int nv = a.n_valid[q.k], m = a.m_valid[l];
  const float scale = a.col_scale[l];
  cI = coef_image(a.gzI[q.k * g.Bt + l], nv, m) * scale;
  cT = coef_text(a.gzT[q.k * g.Bt + l], nv, m) * scale;
}

// The 8 weights of `lane`'s A fragment (16 slot rows from rb, k step ks of chunk kc) of dS = W^T P.
EGMA_HD inline void ds_a_frag(const Geometry& g, const DsStage& st, int ks, int rb, int lane, float w[8]) {
  const int t = rb >> g.lgMp, mask = (1 << g.lgMp) - 1, i0 = st.i0[ks];
  const float cI = st.cI[ks][t], cT = st.cT[ks][t];
EGMA_UNROLL
  for (int e = 0; e < 8; ++e) {
    const int r = rb + frag_a_row(lane, e), c = frag_a_col(lane, e);
    w[e] = w_value(st.js[t][ks * 16 + c], r & mask, st.win[ks][r], i0 + c, cI, cT);
  }
}

// Staging of one K chunk's winners by thread th: fetch() reads global memory into registers (the
// kernels issue it one chunk ahead, before the current chunk's mma), put() stores them into a
// DpStage / DsStage after the next barrier interval. Every staging count is <= kStageItems *
// kThreads, so each thread handles at most kStageItems items of each kind.
constexpr int kStageItems = 2;
static_assert(4 * kTileRows <= kStageItems * kThreads && kMaxImagesPerTile * kBwdK <= kStageItems * kThreads &&
                  kMaxTextsPerTile * kBwdK <= kStageItems * kThreads &&
                  kDsGroupsPerChunk * kTileRows <= kStageItems * kThreads &&
                  kMaxImagesPerTile * 4 <= kThreads && kDsGroupsPerChunk * kMaxTextsPerTile <= kThreads,
              "staging items fit the prefetch registers");

struct DpPrefetch {
  uint8_t js[kStageItems];
  int32_t win[kStageItems];
  float cI, cT;
  EGMA_HD void fetch(const BwdArgs& a, int64_t it, int ch, int64_t kc, int th) {
    const Geometry& g = a.g;
    const int n_js = dp_js_items(g), n_win = dp_win_items(g);
EGMA_UNROLL
    for (int s = 0; s < kStageItems; ++s) {
      const int e = th + s * kThreads;
      js[s] = e < n_js ? dp_js_item(a, it, ch, kc, e) : kNoSlot;
      win[s] = e < n_win ? dp_win_item(a, it, kc, e) : -1;
    }
    cI = cT = 0.f;
    if (th < dp_coef_items(g)) dp_coef_item(a, it, kc, th, cI, cT);
  }
  EGMA_HD void put(const Geometry& g, DpStage& st, int th) const {
    const int n_js = dp_js_items(g), n_win = dp_win_items(g), tpc = dp_texts_per_chunk(g);
EGMA_UNROLL
    for (int s = 0; s < kStageItems; ++s) {
      const int e = th + s * kThreads;
      if (e < n_js) st.js[e >> 7][e & (kTileRows - 1)] = js[s];
      if (e < n_win) st.win[e / kBwdK][e % kBwdK] = win[s];
    }
    if (th < dp_coef_items(g)) {
      st.cI[th / tpc][th % tpc] = cI;
      st.cT[th / tpc][th % tpc] = cT;
    }
  }
};

struct DsPrefetch {
  uint8_t js[kStageItems];
  int32_t win[kStageItems];
  float cI, cT;
  int32_t i0;  // th < kDsGroupsPerChunk: the first patch of group th of the chunk
  EGMA_HD void fetch(const BwdArgs& a, int64_t tb, int64_t kc, int th) {
    const Geometry& g = a.g;
    const int n_js = ds_js_items(g), n_win = ds_win_items(g);
EGMA_UNROLL
    for (int s = 0; s < kStageItems; ++s) {
      const int e = th + s * kThreads;
      js[s] = e < n_js ? ds_js_item(a, tb, kc, e) : kNoSlot;
      win[s] = e < n_win ? ds_win_item(a, tb, kc, e) : -1;
    }
    cI = cT = 0.f;
    if (th < ds_coef_items(g)) ds_coef_item(a, tb, kc, th, cI, cT);
    i0 = th < kDsGroupsPerChunk ? ds_group(g, kc * kDsGroupsPerChunk + th).i0 : 0;
  }
  EGMA_HD void put(const Geometry& g, DsStage& st, int th) const {
    const int n_js = ds_js_items(g), n_win = ds_win_items(g);
EGMA_UNROLL
    for (int s = 0; s < kStageItems; ++s) {
      const int e = th + s * kThreads;
      if (e < n_js) st.js[e / kBwdK][e % kBwdK] = js[s];
      if (e < n_win) st.win[e / kTileRows][e % kTileRows] = win[s];
    }
    if (th < ds_coef_items(g)) {
      st.cI[th / g.bt][th % g.bt] = cI;
      st.cT[th / g.bt][th % g.bt] = cT;
    }
    if (th < kDsGroupsPerChunk) st.i0[th] = i0;
  }
};

// W (fp32) as hi + lo in the feature dtype T (bf16 / fp16), two elements per 32-bit mma register
// (element 2p in the low half): hi + lo carries 16 (bf16) / 22 (fp16) bits of each weight, so the
// gradient is not limited by one 16-bit rounding of dzI / n_valid (kernels/utils.py GRAD_MODE
// explains the same choice for the Triton kernels).
template <typename T>
EGMA_HD inline uint32_t pack2(T lo_elem, T hi_elem) {
  return static_cast<uint32_t>(lo_elem.x) | (static_cast<uint32_t>(hi_elem.x) << 16);
}
template <typename T>
EGMA_HD inline void split_hi_lo(const float w[8], uint32_t hi[4], uint32_t lo[4]) {
EGMA_UNROLL
  for (int p = 0; p < 4; ++p) {
    const T h0(w[2 * p]), h1(w[2 * p + 1]);
    const T l0(w[2 * p] - static_cast<float>(h0)), l1(w[2 * p + 1] - static_cast<float>(h1));
    hi[p] = pack2<T>(h0, h1);
    lo[p] = pack2<T>(l0, l1);
  }
}

}  // namespace tc
}  // namespace cuda
}  // namespace egma
