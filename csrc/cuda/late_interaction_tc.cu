// late_interaction on the tensor cores (contract: reference.late_interaction), bf16 / fp16 inputs,
// sm_80+: mma.sync.m16n8k16 with fp32 accumulators, ldmatrix, cp.async pipelines. The algorithm,
// tile shapes and all index arithmetic are in tc_common.h (shared with the host simulation
// tc_host_sim.cpp); this file holds the PTX wrappers, the main loops and the launchers.
//
// Why hand-written PTX rather than CUTLASS / CuTe: the epilogues (row and column max with first-
// maximiser ties) and the one-hot W built in registers are custom either way, the kernels are
// three small GEMM loops, and CI must compile them in minutes on two cores with no extra build
// dependency; the fragment layouts they rely on are unit-tested on the host instead.
//
// Kernels:
//   li_tc_forward_kernel  grid: image tiles x text blocks (swizzled); 128 x 128 tile, K = d in steps
//                         of 32 through a 4-stage cp.async pipeline; epilogue in shared memory.
//                         Also the backward's recompute of the image-side winners (zI == nullptr).
//   li_tc_scales_kernel   per image / per text power-of-two scale of the gradient coefficients.
//   li_tc_dp_kernel       dP = W S: grid row tiles x d blocks of 128; K = all texts' slots, chunks of
//                         64 through a 3-stage pipeline; winners staged one chunk ahead.
//   li_tc_ds_kernel       dS = W^T P: grid text blocks x d blocks; K = all images' patches (16-patch
//                         groups).
#include <cuda_runtime.h>

#include <climits>

#include "tc_common.h"

namespace egma {
namespace cuda {
namespace {

using namespace tc;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define EGMA_TC_NO_ARCH 1  // cp.async and bf16 mma need sm_80; the host never launches these kernels there
#endif

// ----------------------------------------------------------------------------------------------
// PTX wrappers
// ----------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; bytes = 0 zero-fills (padding rows, the d tail).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#ifndef EGMA_TC_NO_ARCH
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef EGMA_TC_NO_ARCH
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef EGMA_TC_NO_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* p) {
#ifndef EGMA_TC_NO_ARCH
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const void* p) {
#ifndef EGMA_TC_NO_ARCH
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#endif
}

// c += a . b for one m16n8k16 tile (fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma16816<c10::BFloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifndef EGMA_TC_NO_ARCH
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma16816<c10::Half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifndef EGMA_TC_NO_ARCH
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two consecutive output elements (col even, d a multiple of 8: one aligned 32-bit store).
template <typename T>
__device__ __forceinline__ void store2(T* dst, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(dst) = pack2<T>(T(v0), T(v1));
}

// ----------------------------------------------------------------------------------------------
// Shared-memory plans
// ----------------------------------------------------------------------------------------------
constexpr size_t kFwdPipeBytes = size_t{kFwdStages} * 2 * kTileRows * kFwdLd * 2;  // A and B stages, 16-bit
constexpr size_t kFwdXBytes = size_t{kTileRows} * kXStride * sizeof(float);        // aliases the stages
constexpr size_t kFwdRegion = kFwdPipeBytes > kFwdXBytes ? kFwdPipeBytes : kFwdXBytes;
constexpr size_t kFwdSmemBytes = kFwdRegion + sizeof(FwdSmem);
constexpr size_t kBwdPipeBytes = size_t{kBwdStages} * kBwdK * kBwdLd * 2;
constexpr size_t kDpSmemBytes = kBwdPipeBytes + 2 * sizeof(DpStage);
constexpr size_t kDsSmemBytes = kBwdPipeBytes + 2 * sizeof(DsStage);
static_assert(kFwdRegion % 16 == 0 && kBwdPipeBytes % 16 == 0, "stage buffers stay 16-byte aligned");
constexpr size_t kMaxSmemBytes =
    kFwdSmemBytes > kDpSmemBytes ? (kFwdSmemBytes > kDsSmemBytes ? kFwdSmemBytes : kDsSmemBytes)
                                 : (kDpSmemBytes > kDsSmemBytes ? kDpSmemBytes : kDsSmemBytes);

// ----------------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------------
template <typename in_t>
__global__ void __launch_bounds__(kThreads, 2) li_tc_forward_kernel(FwdArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  in_t* pipe = reinterpret_cast<in_t*>(smem);     // [stage][A | B][128][kFwdLd]
  float* X = reinterpret_cast<float*>(smem);      // [128][kXStride], after the main loop
  FwdSmem& s = *reinterpret_cast<FwdSmem*>(smem + kFwdRegion);
  const Geometry& g = a.g;
  const int th = threadIdx.x, lane = th & 31, warp = th >> 5;
  const int wr = fwd_warp_row0(warp), wc = fwd_warp_col0(warp);
  int64_t it, tb;
  fwd_tile_of(g, blockIdx.x, it, tb);
  fwd_init_texts(a, tb, s, th);

  const in_t* P = static_cast<const in_t*>(a.P);
  const in_t* S = static_cast<const in_t*>(a.S);
  // This thread's loads: rows ld_row and ld_row + 64 of A and B, 8 features at ld_q * 8 of each K step.
  const int ld_row = th >> 2, ld_q = th & 3;
  const in_t* b_src[2];
  for (int h = 0; h < 2; ++h) {
    const int64_t src = fwd_b_src(g, tb, ld_row + 64 * h);
    b_src[h] = src >= 0 ? S + src * g.d : nullptr;
  }
  const int nk = (g.d + kFwdK - 1) / kFwdK;

  for (int ch = 0; ch < g.chunks; ++ch) {
    fwd_init_rows(a, it, ch, s, th);
    const in_t* a_src[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t src = fwd_a_src(g, it, ch, ld_row + 64 * h);
      a_src[h] = src >= 0 ? P + src * g.d : nullptr;
    }
    auto load_stage = [&](int stage, int kstep) {
      const int x = kstep * kFwdK + ld_q * 8;
      in_t* As = pipe + static_cast<size_t>(stage) * 2 * kTileRows * kFwdLd;
      in_t* Bs = As + kTileRows * kFwdLd;
      for (int h = 0; h < 2; ++h) {
        const int r = ld_row + 64 * h;
        cp_async16(As + r * kFwdLd + ld_q * 8, a_src[h] ? a_src[h] + x : P, a_src[h] && x < g.d ? 16 : 0);
        cp_async16(Bs + r * kFwdLd + ld_q * 8, b_src[h] ? b_src[h] + x : S, b_src[h] && x < g.d ? 16 : 0);
      }
    };

    float acc[kFwdMt][kFwdNt][4];
#pragma unroll
    for (int mt = 0; mt < kFwdMt; ++mt)
#pragma unroll
      for (int nt = 0; nt < kFwdNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    __syncthreads();  // the previous chunk's epilogue is done with X (the stage buffers)
#pragma unroll
    for (int st = 0; st < kFwdStages - 1; ++st) {
      if (st < nk) load_stage(st, st);
      cp_async_commit();
    }
    for (int ks = 0; ks < nk; ++ks) {
      cp_async_wait<kFwdStages - 2>();
      __syncthreads();  // stage ks landed for every thread; stage ks - 1 is free
      const int nxt = ks + kFwdStages - 1;
      if (nxt < nk) load_stage(nxt % kFwdStages, nxt);
      cp_async_commit();
      const in_t* As = pipe + static_cast<size_t>(ks % kFwdStages) * 2 * kTileRows * kFwdLd;
      const in_t* Bs = As + kTileRows * kFwdLd;
#pragma unroll
      for (int kk = 0; kk < kFwdK; kk += 16) {
        uint32_t af[kFwdMt][4], bf[kFwdNt][2];
#pragma unroll
        for (int mt = 0; mt < kFwdMt; ++mt)
          ldsm_x4(af[mt], As + (wr + mt * 16 + ldsm_a_row(lane)) * kFwdLd + kk + ldsm_a_col(lane));
#pragma unroll
        for (int np = 0; np < kFwdNt / 2; ++np) {
          uint32_t r[4];
          ldsm_x4(r, Bs + (wc + np * 16 + ldsm_bt_n(lane)) * kFwdLd + kk + ldsm_bt_k(lane));
          bf[2 * np][0] = r[0];
          bf[2 * np][1] = r[1];
          bf[2 * np + 1][0] = r[2];
          bf[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < kFwdMt; ++mt)
#pragma unroll
          for (int nt = 0; nt < kFwdNt; ++nt) mma16816<in_t>(acc[mt][nt], af[mt], bf[nt]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done reading the stages: X may overwrite them

#pragma unroll
    for (int mt = 0; mt < kFwdMt; ++mt)
#pragma unroll
      for (int nt = 0; nt < kFwdNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          X[(wr + mt * 16 + frag_c_row(lane, e)) * kXStride + wc + nt * 8 + frag_c_col(lane, e)] = acc[mt][nt][e];
    __syncthreads();
    fwd_phase_rows(a, it, tb, ch, X, s, th);
    __syncthreads();
    fwd_phase_cols(a, ch, X, s, th);
    fwd_phase_zsum(a, s, th);
    __syncthreads();
    fwd_phase_merge(a, s, th);
  }
  __syncthreads();
  fwd_phase_final(a, it, tb, s, th);
}

// ----------------------------------------------------------------------------------------------
// Gradient scales: row_scale[k] over texts (dP), col_scale[l] over images (dS). A max is exact, so
// any reduction order gives the same bits.
// ----------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) li_tc_scales_kernel(BwdArgs a, float* row_scale, float* col_scale,
                                                                 int64_t row_blocks) {
  const Geometry& g = a.g;
  if (blockIdx.x < row_blocks) {
    const int64_t k = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
    if (k >= g.Bi) return;  // whole warps leave together
    float m = 0.f;
    for (int64_t l = threadIdx.x & 31; l < g.Bt; l += 32) m = fmaxf(m, coef_abs(a.gzI, a.gzT, g.Bt, a.n_valid[k], a.m_valid[l], k, l));
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if ((threadIdx.x & 31) == 0) row_scale[k] = pow2_scale(m);
  } else {
    const int64_t l = (static_cast<int64_t>(blockIdx.x) - row_blocks) * kThreads + threadIdx.x;
    if (l >= g.Bt) return;
    float m = 0.f;
    for (int64_t k = 0; k < g.Bi; ++k) m = fmaxf(m, coef_abs(a.gzI, a.gzT, g.Bt, a.n_valid[k], a.m_valid[l], k, l));
    col_scale[l] = pow2_scale(m);
  }
}

// ----------------------------------------------------------------------------------------------
// Backward GEMMs. Per K chunk: wait for its B stage, issue the loads of chunk + 2, read the next
// chunk's winners into registers (global latency hidden behind this chunk's mma), compute 4 k
// steps (W fragments built in registers, split hi / lo, 2 x 8 mma per fragment pair), then store
// the prefetched winners into the other staging buffer.
// ----------------------------------------------------------------------------------------------
template <typename in_t, typename RowOf>
__device__ __forceinline__ void bwd_load_stage(in_t* Bs, const in_t* base, const Geometry& g, int db, int th,
                                               RowOf row_of) {
#pragma unroll
  for (int s = 0; s < (kBwdK * kTileCols / 8) / kThreads; ++s) {
    const int idx = th + s * kThreads, row = idx >> 4, q = idx & 15;
    const int x = db * kTileCols + q * 8;
    const int64_t src_row = row_of(row);  // -1: padding
    const bool ok = src_row >= 0 && x < g.d;
    cp_async16(Bs + row * kBwdLd + q * 8, ok ? base + src_row * g.d + x : base, ok ? 16 : 0);
  }
}

// One k step of a backward warp tile: the kBwdMt W fragments are built (make_w(mt, w)) and split
// into hi / lo one at a time, then B is streamed one ldmatrix.x4.trans (two n tiles) at a time, so
// next to the 64 accumulators only 16 A and 4 B registers stay live.
template <typename in_t, typename MakeW>
__device__ __forceinline__ void bwd_mma_step(float acc[kBwdMt][kBwdNt][4], MakeW make_w, const in_t* Bs, int ks,
                                             int wc, int lane) {
  uint32_t hi[kBwdMt][4], lo[kBwdMt][4];
#pragma unroll
  for (int mt = 0; mt < kBwdMt; ++mt) {
    float w[8];
    make_w(mt, w);
    split_hi_lo<in_t>(w, hi[mt], lo[mt]);
  }
#pragma unroll
  for (int np = 0; np < kBwdNt / 2; ++np) {
    uint32_t r[4];
    ldsm_x4_trans(r, Bs + (ks * 16 + ldsm_b_k(lane)) * kBwdLd + wc + np * 16 + ldsm_b_n(lane));
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
    for (int mt = 0; mt < kBwdMt; ++mt) {
      mma16816<in_t>(acc[mt][2 * np], hi[mt], b0);
      mma16816<in_t>(acc[mt][2 * np], lo[mt], b0);
      mma16816<in_t>(acc[mt][2 * np + 1], hi[mt], b1);
      mma16816<in_t>(acc[mt][2 * np + 1], lo[mt], b1);
    }
  }
}

// Minimum CTAs per SM for ptxas. Forward: 2 (128 registers, no spills). Backward: 1; under a
// 128-register cap the staging of the next chunk's winners spills a few bytes, and any count
// between 129 and 255 gives the same occupancy at 256 threads (one CTA of 8 warps per SM).
constexpr int kBwdMinBlocks = 1;

template <typename in_t>
__global__ void __launch_bounds__(kThreads, kBwdMinBlocks) li_tc_dp_kernel(BwdArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  in_t* pipe = reinterpret_cast<in_t*>(smem);
  DpStage* stage = reinterpret_cast<DpStage*>(smem + kBwdPipeBytes);  // [2]
  const Geometry& g = a.g;
  const int th = threadIdx.x, lane = th & 31, warp = th >> 5;
  const int wr = bwd_warp_row0(warp), wc = bwd_warp_col0(warp);
  const int64_t n_db = bwd_d_blocks(g);
  const int db = static_cast<int>(blockIdx.x % n_db);
  const int64_t rt = blockIdx.x / n_db, it = rt / g.chunks;
  const int ch = static_cast<int>(rt % g.chunks);
  const int nk = static_cast<int>(dp_k_chunks(g));  // < 2^31: late_interaction_tc_unsupported
  const in_t* S = static_cast<const in_t*>(a.S);

  auto load = [&](int kc) {
    bwd_load_stage<in_t>(pipe + static_cast<size_t>(kc % kBwdStages) * kBwdK * kBwdLd, S, g, db, th,
                         [&](int row) { return dp_b_src(g, kc, row); });
  };
  float acc[kBwdMt][kBwdNt][4];
#pragma unroll
  for (int mt = 0; mt < kBwdMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < kBwdNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  {
    DpPrefetch f;
    f.fetch(a, it, ch, 0, th);
    f.put(g, stage[0], th);
  }
#pragma unroll
  for (int st = 0; st < kBwdStages - 1; ++st) {
    if (st < nk) load(st);
    cp_async_commit();
  }
  for (int kc = 0; kc < nk; ++kc) {
    cp_async_wait<kBwdStages - 2>();
    __syncthreads();
    if (kc + kBwdStages - 1 < nk) load(kc + kBwdStages - 1);
    cp_async_commit();
    DpPrefetch f;
    if (kc + 1 < nk) f.fetch(a, it, ch, kc + 1, th);
    const in_t* Bs = pipe + static_cast<size_t>(kc % kBwdStages) * kBwdK * kBwdLd;
    const DpStage& st = stage[kc & 1];
    // Not unrolled: unrolled, ptxas keeps every k step's fragment addresses live across the
    // chunk loop (up to 255 registers).
#pragma unroll 1
    for (int ks = 0; ks < kBwdK / 16; ++ks) {
      bwd_mma_step<in_t>(
          acc, [&](int mt, float w[8]) { dp_a_frag(g, st, ch, kc, ks, wr + mt * 16, lane, w); }, Bs, ks, wc, lane);
    }
    if (kc + 1 < nk) f.put(g, stage[(kc + 1) & 1], th);
  }
  cp_async_wait<0>();

  in_t* dP = static_cast<in_t*>(a.dP);
#pragma unroll
  for (int mt = 0; mt < kBwdMt; ++mt)
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
      const RowRef row = tile_row(g, it, ch, wr + mt * 16 + frag_c_row(lane, e));
      if (!row.valid) continue;
      const float inv = 1.f / a.row_scale[row.k];  // a power of two: exact
      in_t* out = dP + (row.k * g.n + row.i) * static_cast<int64_t>(g.d);
#pragma unroll
      for (int nt = 0; nt < kBwdNt; ++nt) {
        const int x = db * kTileCols + wc + nt * 8 + frag_c_col(lane, e);
        if (x < g.d) store2<in_t>(out + x, acc[mt][nt][e] * inv, acc[mt][nt][e + 1] * inv);
      }
    }
}

template <typename in_t>
__global__ void __launch_bounds__(kThreads, kBwdMinBlocks) li_tc_ds_kernel(BwdArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  in_t* pipe = reinterpret_cast<in_t*>(smem);
  DsStage* stage = reinterpret_cast<DsStage*>(smem + kBwdPipeBytes);  // [2]
  const Geometry& g = a.g;
  const int th = threadIdx.x, lane = th & 31, warp = th >> 5;
  const int wr = bwd_warp_row0(warp), wc = bwd_warp_col0(warp);
  const int64_t n_db = bwd_d_blocks(g);
  const int db = static_cast<int>(blockIdx.x % n_db);
  const int64_t tb = blockIdx.x / n_db;
  const int nk = static_cast<int>(ds_k_chunks(g));
  const in_t* P = static_cast<const in_t*>(a.P);

  auto load = [&](int kc) {
    bwd_load_stage<in_t>(pipe + static_cast<size_t>(kc % kBwdStages) * kBwdK * kBwdLd, P, g, db, th,
                         [&](int row) { return ds_b_src(g, kc, row); });
  };
  float acc[kBwdMt][kBwdNt][4];
#pragma unroll
  for (int mt = 0; mt < kBwdMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < kBwdNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  {
    DsPrefetch f;
    f.fetch(a, tb, 0, th);
    f.put(g, stage[0], th);
  }
#pragma unroll
  for (int st = 0; st < kBwdStages - 1; ++st) {
    if (st < nk) load(st);
    cp_async_commit();
  }
  for (int kc = 0; kc < nk; ++kc) {
    cp_async_wait<kBwdStages - 2>();
    __syncthreads();
    if (kc + kBwdStages - 1 < nk) load(kc + kBwdStages - 1);
    cp_async_commit();
    DsPrefetch f;
    if (kc + 1 < nk) f.fetch(a, tb, kc + 1, th);
    const in_t* Bs = pipe + static_cast<size_t>(kc % kBwdStages) * kBwdK * kBwdLd;
    const DsStage& st = stage[kc & 1];
    // Not unrolled: unrolled, ptxas keeps every k step's fragment addresses live across the
    // chunk loop (up to 255 registers).
#pragma unroll 1
    for (int ks = 0; ks < kDsGroupsPerChunk; ++ks) {
      bwd_mma_step<in_t>(
          acc, [&](int mt, float w[8]) { ds_a_frag(g, st, ks, wr + mt * 16, lane, w); }, Bs, ks, wc, lane);
    }
    if (kc + 1 < nk) f.put(g, stage[(kc + 1) & 1], th);
  }
  cp_async_wait<0>();

  in_t* dS = static_cast<in_t*>(a.dS);
#pragma unroll
  for (int mt = 0; mt < kBwdMt; ++mt)
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
      const ColRef col = tile_col(g, tb, wr + mt * 16 + frag_c_row(lane, e));
      if (!col.valid) continue;
      const float inv = 1.f / a.col_scale[col.l];
      in_t* out = dS + (col.l * g.M + col.j) * static_cast<int64_t>(g.d);
#pragma unroll
      for (int nt = 0; nt < kBwdNt; ++nt) {
        const int x = db * kTileCols + wc + nt * 8 + frag_c_col(lane, e);
        if (x < g.d) store2<in_t>(out + x, acc[mt][nt][e] * inv, acc[mt][nt][e + 1] * inv);
      }
    }
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------
template <typename F>
int dispatch_16bit(Dtype dtype, F&& f) {
  return dtype == Dtype::Half ? f(c10::Half{}) : f(c10::BFloat16{});
}

Geometry geometry_of(const LateInteractionArgs& a) {
  return make_geometry(a.Bi, a.Bt, static_cast<int>(a.n), static_cast<int>(a.M), static_cast<int>(a.d));
}

FwdArgs fwd_args(const LateInteractionArgs& a, void* zI, void* zT, IndexPtr win, IndexPtr jstar) {
  return FwdArgs{a.P, a.S, a.smask, a.pmask, a.n_valid, a.m_valid, a.zero_slot,
                 static_cast<float*>(zI), static_cast<float*>(zT), win, jstar, geometry_of(a)};
}

int run_forward(const FwdArgs& fa, Dtype dtype, cudaStream_t stream) {
  const int64_t blocks = fa.g.image_tiles * fa.g.text_blocks;
  return dispatch_16bit(dtype, [&](auto tag) {
    using in_t = decltype(tag);
    auto kernel = li_tc_forward_kernel<in_t>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kFwdSmemBytes));
    if (err != cudaSuccess) return static_cast<int>(err);
    kernel<<<static_cast<unsigned>(blocks), kThreads, kFwdSmemBytes, stream>>>(fa);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace

const char* late_interaction_tc_unsupported(const LateInteractionArgs& a) {
  if (a.dtype != Dtype::BFloat16 && a.dtype != Dtype::Half) return "the tensor-core kernels take bf16 / fp16 inputs";
  if (a.M < 1 || a.M > kMaxM) return "the tensor-core kernels support 1 <= M <= 128 sentence slots";
  if (a.n < 1 || a.n > INT_MAX / 2) return "the tensor-core kernels need 1 <= n < 2^30 patches";
  if (a.d < 8 || a.d % 8 != 0 || a.d > INT_MAX / 2) return "the tensor-core kernels need d a multiple of 8";
  if (reinterpret_cast<uintptr_t>(a.P) % 16 != 0 || reinterpret_cast<uintptr_t>(a.S) % 16 != 0)
    return "the tensor-core kernels need 16-byte aligned P and S";
  int device = 0, major = 0, smem_optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return "the device's compute capability could not be read";
  }
  if (major < 8) return "the tensor-core kernels need compute capability 8.0 or newer";
  if (static_cast<size_t>(smem_optin) < kMaxSmemBytes) return "the device has too little shared memory per block";
  const Geometry g = geometry_of(a);
  if (g.image_tiles * g.text_blocks > INT_MAX || g.image_tiles * g.chunks * bwd_d_blocks(g) > INT_MAX ||
      g.text_blocks * bwd_d_blocks(g) > INT_MAX)
    return "Bi x Bt is too large for one launch of the tensor-core kernels";
  return nullptr;
}

int late_interaction_tc_forward(const LateInteractionArgs& a, void* zI, void* zT, IndexPtr win, IndexPtr jstar) {
  if (a.Bi == 0 || a.Bt == 0) return 0;
  return run_forward(fwd_args(a, zI, zT, win, jstar), a.dtype, static_cast<cudaStream_t>(a.stream));
}

int late_interaction_tc_backward(const LateInteractionArgs& a, const void* grad_zI, const void* grad_zT, IndexPtr win,
                                 IndexPtr jstar, bool recompute, void* scales, void* grad_P, void* grad_S) {
  if (a.Bi == 0 || a.Bt == 0) return 0;  // the gradients are empty or zero-filled by the caller
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const Geometry g = geometry_of(a);
  if (recompute) {  // the forward's tiles again (the same kernel, so bitwise the same winners)
    const int err = run_forward(fwd_args(a, nullptr, nullptr, IndexPtr{nullptr, 1}, jstar), a.dtype, stream);
    if (err != 0) return err;
  }
  float* row_scale = static_cast<float*>(scales);
  float* col_scale = row_scale + a.Bi;
  const BwdArgs ba{a.P, a.S, a.smask, a.pmask, a.n_valid, a.m_valid,
                   static_cast<const float*>(grad_zI), static_cast<const float*>(grad_zT), win, jstar,
                   row_scale, col_scale, grad_P, grad_S, g};
  const int64_t row_blocks = (a.Bi + kThreads / 32 - 1) / (kThreads / 32);
  const int64_t col_blocks = (a.Bt + kThreads - 1) / kThreads;
  li_tc_scales_kernel<<<static_cast<unsigned>(row_blocks + col_blocks), kThreads, 0, stream>>>(ba, row_scale, col_scale,
                                                                                              row_blocks);
  int err = static_cast<int>(cudaGetLastError());
  if (err != 0) return err;
  const int64_t n_db = bwd_d_blocks(g);
  return dispatch_16bit(a.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    auto dp = li_tc_dp_kernel<in_t>;
    auto ds = li_tc_ds_kernel<in_t>;
    cudaError_t e = cudaFuncSetAttribute(dp, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kDpSmemBytes));
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(ds, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kDsSmemBytes));
    if (e != cudaSuccess) return static_cast<int>(e);
    dp<<<static_cast<unsigned>(g.image_tiles * g.chunks * n_db), kThreads, kDpSmemBytes, stream>>>(ba);
    int r = static_cast<int>(cudaGetLastError());
    if (r != 0) return r;
    ds<<<static_cast<unsigned>(g.text_blocks * n_db), kThreads, kDsSmemBytes, stream>>>(ba);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace egma
