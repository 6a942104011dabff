// late_interaction on CUDA (contract: reference.late_interaction), the algorithm of DESIGN.md:
// the Bi x Bt x n x M similarities never exist.
//
// Forward: one block per pair (text l, image k). Warps compute the n x M tile chunk by chunk of
// patches (one warp per dot product, warp_dot), then threads take the image-side row max per
// patch (ties to the lower slot; masked slots never win, a zero slot floors it at 0: SPEC 2.1) and the
// text-side running column max per sentence (ties to the lower patch). Saves the winning patch per
// (k, l, sentence) and, when asked, the winning sentence per (k, l, patch).
// Backward: dP with one block per image and dS with one block per text, accumulated in fp32 (fp64)
// workspaces that only that block writes, each element by one thread in a fixed order: no atomics,
// deterministic. Without saved winners the dP kernel recomputes each tile with the same warp_dot
// (bitwise the forward's values) and stores the winners for the dS kernel.
#include "device.cuh"

namespace egma {
namespace cuda {
namespace {

// Patch rows per tile chunk: at most 4096 tile entries in shared memory.
inline int64_t chunk_rows(int64_t n, int64_t M) {
  int64_t rows = 4096 / (M > 0 ? M : 1);
  rows = rows < 1 ? 1 : (rows > 64 ? 64 : rows);
  return rows < n ? rows : (n > 0 ? n : 1);
}

// The tile rows [i0, i0 + rows) of image k against text l: tile[r * M + j] = <P_k,i0+r, S_l,j>,
// computed for real sentences and valid patches only (0 elsewhere). Ends with a barrier.
template <typename in_t, typename T>
__device__ void tile_chunk(const LateInteractionArgs& a, const in_t* Pk, const in_t* Sl, const bool* sm,
                           const bool* pm, int64_t i0, int64_t rows, T* tile) {
  const int warp = threadIdx.x / 32, warps = kThreads / 32;
  for (int64_t e = warp; e < rows * a.M; e += warps) {
    const int64_t i = i0 + e / a.M, j = e % a.M;
    T x = 0;
    if (sm[j] && (!pm || pm[i])) x = warp_dot<T>(Pk + i * a.d, Sl + j * a.d, a.d);  // warp-uniform
    if ((threadIdx.x & 31) == 0) tile[e] = x;
  }
  __syncthreads();
}

// Image side of one tile row: the first real slot attaining the max over the text's slots. A text
// with a zero slot (pad_as_zero, SPEC 2.1) floors it at 0: when every real sentence scores below
// 0 the zero slot wins, and a masked slot index is returned (it passes no gradient).
template <typename T>
__device__ __forceinline__ int64_t row_winner(const T* row, const bool* sm, int64_t M, bool zero_slot, T& best) {
  int64_t arg = -1, masked = -1;
  best = -egma_inf<T>();
  for (int64_t j = 0; j < M; ++j) {
    if (!sm[j]) {
      if (masked < 0) masked = j;
      continue;
    }
    if (arg < 0 || row[j] > best) {
      best = row[j];
      arg = j;
    }
  }
  if (zero_slot && masked >= 0 && (arg < 0 || best < T(0))) {
    best = T(0);
    arg = masked;
  }
  return arg < 0 ? 0 : arg;
}

template <typename in_t, typename T>
__global__ void __launch_bounds__(kThreads)
    li_forward_kernel(LateInteractionArgs a, int64_t chunk, T* zI, T* zT, IndexPtr win, IndexPtr jstar) {
  extern __shared__ double smem[];
  const int64_t l = blockIdx.x, k = blockIdx.y, n = a.n, M = a.M, d = a.d;
  T* tile = reinterpret_cast<T*>(smem);  // [chunk * M]
  T* col_best = tile + chunk * M;         // [M]
  T* red = col_best + M;                  // [kThreads]
  int32_t* col_arg = reinterpret_cast<int32_t*>(red + kThreads);  // [M]
  const in_t* Pk = static_cast<const in_t*>(a.P) + k * n * d;
  const in_t* Sl = static_cast<const in_t*>(a.S) + l * M * d;
  const bool* sm = a.smask + l * M;
  const bool* pm = a.pmask ? a.pmask + k * n : nullptr;
  const int64_t m = a.m_valid[l], nv = a.n_valid[k], pair = k * a.Bt + l;
  if (m == 0) {  // no sentence: both scores 0
    if (threadIdx.x == 0) zI[pair] = zT[pair] = T(0);
    return;
  }
  for (int64_t j = threadIdx.x; j < M; j += kThreads) {
    col_best[j] = -egma_inf<T>();
    col_arg[j] = 0;
  }
  T zi = 0;
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t rows = n - i0 < chunk ? n - i0 : chunk;
    __syncthreads();  // the previous chunk is read
    tile_chunk<in_t, T>(a, Pk, Sl, sm, pm, i0, rows, tile);
    for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
      if (pm && !pm[i0 + r]) continue;
      T best;
      const int64_t j = row_winner<T>(tile + r * M, sm, M, a.zero_slot[l], best);
      zi += best;
      if (jstar.data) index_set(jstar, pair * n + i0 + r, j);
    }
    for (int64_t j = threadIdx.x; j < M; j += kThreads) {
      if (!sm[j]) continue;
      T best = col_best[j];
      int32_t arg = col_arg[j];
      for (int64_t r = 0; r < rows; ++r) {
        if (pm && !pm[i0 + r]) continue;
        if (tile[r * M + j] > best) {
          best = tile[r * M + j];
          arg = static_cast<int32_t>(i0 + r);
        }
      }
      col_best[j] = best;
      col_arg[j] = arg;
    }
  }
  zi = block_sum<T>(zi, red);
  if (threadIdx.x == 0) {
    T zt = 0;
    for (int64_t j = 0; j < M; ++j) {
      if (!sm[j]) continue;
      index_set(win, pair * M + j, col_arg[j]);
      zt += col_best[j];
    }
    zI[pair] = nv > 0 ? zi / static_cast<T>(nv) : T(0);
    zT[pair] = nv > 0 ? zt / static_cast<T>(m) : T(0);
  }
}

// dP of image blockIdx.x.
template <typename in_t, typename T>
__global__ void __launch_bounds__(kThreads)
    li_backward_images_kernel(LateInteractionArgs a, int64_t chunk, const T* gzI, const T* gzT, IndexPtr win,
                              IndexPtr jstar, bool recompute, T* gP_acc, in_t* gP) {
  extern __shared__ double smem[];
  T* tile = reinterpret_cast<T*>(smem);  // [chunk * M] when recomputing
  const int64_t k = blockIdx.x, n = a.n, M = a.M, d = a.d;
  const in_t* Pk = static_cast<const in_t*>(a.P) + k * n * d;
  const in_t* S = static_cast<const in_t*>(a.S);
  const bool* pm = a.pmask ? a.pmask + k * n : nullptr;
  T* acc = gP_acc + k * n * d;
  for (int64_t idx = threadIdx.x; idx < n * d; idx += kThreads) acc[idx] = T(0);
  const int64_t nv = a.n_valid[k];
  for (int64_t l = 0; nv > 0 && l < a.Bt; ++l) {
    const int64_t m = a.m_valid[l], pair = k * a.Bt + l;
    if (m == 0) continue;  // the text scores 0: no gradient
    const bool* sm = a.smask + l * M;
    const in_t* Sl = S + l * M * d;
    const T cI = gzI[pair] / static_cast<T>(nv), cT = gzT[pair] / static_cast<T>(m);
    if (recompute) {
      for (int64_t i0 = 0; i0 < n; i0 += chunk) {
        const int64_t rows = n - i0 < chunk ? n - i0 : chunk;
        __syncthreads();
        tile_chunk<in_t, T>(a, Pk, Sl, sm, pm, i0, rows, tile);
        for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
          if (pm && !pm[i0 + r]) continue;
          T best;
          index_set(jstar, pair * n + i0 + r, row_winner<T>(tile + r * M, sm, M, a.zero_slot[l], best));
        }
      }
    }
    __syncthreads();  // winners written (global memory is visible to the block after the barrier)
    // Image side: each valid patch's winning sentence gets dzI / n_valid.
    if (cI != T(0)) {
      for (int64_t idx = threadIdx.x; idx < n * d; idx += kThreads) {
        const int64_t i = idx / d;
        if (pm && !pm[i]) continue;
        const int64_t j = index_get(jstar, pair * n + i);
        if (sm[j]) acc[idx] += cI * static_cast<T>(Sl[j * d + idx % d]);
      }
    }
    __syncthreads();
    // Text side: each sentence's winning patch gets dzT / m_l (sentences in order, threads over d).
    if (cT != T(0)) {
      for (int64_t j = 0; j < M; ++j) {
        if (!sm[j]) continue;
        const int64_t i = index_get(win, pair * M + j);
        for (int64_t x = threadIdx.x; x < d; x += kThreads) acc[i * d + x] += cT * static_cast<T>(Sl[j * d + x]);
      }
    }
    __syncthreads();
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < n * d; idx += kThreads) gP[k * n * d + idx] = static_cast<in_t>(acc[idx]);
}

// dS of text blockIdx.x; every element is accumulated by the thread owning its feature x.
template <typename in_t, typename T>
__global__ void __launch_bounds__(kThreads)
    li_backward_texts_kernel(LateInteractionArgs a, const T* gzI, const T* gzT, IndexPtr win, IndexPtr jstar,
                             T* gS_acc, in_t* gS) {
  const int64_t l = blockIdx.x, n = a.n, M = a.M, d = a.d;
  const in_t* P = static_cast<const in_t*>(a.P);
  const bool* sm = a.smask + l * M;
  T* acc = gS_acc + l * M * d;
  for (int64_t j = 0; j < M; ++j)
    for (int64_t x = threadIdx.x; x < d; x += kThreads) acc[j * d + x] = T(0);
  const int64_t m = a.m_valid[l];
  for (int64_t k = 0; m > 0 && k < a.Bi; ++k) {
    const int64_t nv = a.n_valid[k], pair = k * a.Bt + l;
    if (nv == 0) continue;  // the image scores 0: no gradient
    const in_t* Pk = P + k * n * d;
    const bool* pm = a.pmask ? a.pmask + k * n : nullptr;
    const T cI = gzI[pair] / static_cast<T>(nv), cT = gzT[pair] / static_cast<T>(m);
    if (cI != T(0)) {
      for (int64_t i = 0; i < n; ++i) {
        if (pm && !pm[i]) continue;
        const int64_t j = index_get(jstar, pair * n + i);
        if (!sm[j]) continue;  // the zero slot won: no gradient
        for (int64_t x = threadIdx.x; x < d; x += kThreads) acc[j * d + x] += cI * static_cast<T>(Pk[i * d + x]);
      }
    }
    if (cT != T(0)) {
      for (int64_t j = 0; j < M; ++j) {
        if (!sm[j]) continue;
        const int64_t i = index_get(win, pair * M + j);
        for (int64_t x = threadIdx.x; x < d; x += kThreads) acc[j * d + x] += cT * static_cast<T>(Pk[i * d + x]);
      }
    }
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < M * d; idx += kThreads) gS[l * M * d + idx] = static_cast<in_t>(acc[idx]);
}

}  // namespace

int late_interaction_forward(const LateInteractionArgs& a, void* zI, void* zT, IndexPtr win, IndexPtr jstar) {
  if (a.Bi == 0 || a.Bt == 0) return 0;
  return dispatch_dtype(a.dtype, [&](auto in_tag, auto acc_tag) {
    using in_t = decltype(in_tag);
    using T = decltype(acc_tag);
    const int64_t chunk = chunk_rows(a.n, a.M);
    const size_t smem = (chunk * a.M + a.M + kThreads) * sizeof(T) + a.M * sizeof(int32_t);
    const dim3 grid(static_cast<unsigned>(a.Bt), static_cast<unsigned>(a.Bi));
    li_forward_kernel<in_t, T><<<grid, kThreads, smem, static_cast<cudaStream_t>(a.stream)>>>(
        a, chunk, static_cast<T*>(zI), static_cast<T*>(zT), win, jstar);
    return static_cast<int>(cudaGetLastError());
  });
}

int late_interaction_backward(const LateInteractionArgs& a, const void* grad_zI, const void* grad_zT, IndexPtr win,
                              IndexPtr jstar, bool recompute, void* gP_acc, void* gS_acc, void* grad_P,
                              void* grad_S) {
  return dispatch_dtype(a.dtype, [&](auto in_tag, auto acc_tag) {
    using in_t = decltype(in_tag);
    using T = decltype(acc_tag);
    const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
    const T* gzI = static_cast<const T*>(grad_zI);
    const T* gzT = static_cast<const T*>(grad_zT);
    const int64_t chunk = chunk_rows(a.n, a.M);
    if (a.Bi > 0) {
      const size_t smem = recompute ? chunk * a.M * sizeof(T) : 0;
      li_backward_images_kernel<in_t, T><<<static_cast<unsigned>(a.Bi), kThreads, smem, stream>>>(
          a, chunk, gzI, gzT, win, jstar, recompute, static_cast<T*>(gP_acc), static_cast<in_t*>(grad_P));
      const int err = static_cast<int>(cudaGetLastError());
      if (err != 0) return err;
    }
    if (a.Bt > 0) {
      li_backward_texts_kernel<in_t, T><<<static_cast<unsigned>(a.Bt), kThreads, 0, stream>>>(
          a, gzI, gzT, win, jstar, static_cast<T*>(gS_acc), static_cast<in_t*>(grad_S));
    }
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace egma
