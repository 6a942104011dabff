// Host simulation of the tensor-core late-interaction kernels (late_interaction_tc.cu), for CI
// machines without a GPU: tests/test_cuda_tc_host.py compiles it with the host compiler.
//
// It runs the kernels' own index arithmetic and phases from tc_common.h, thread by thread: every
// CTA of every grid, every thread of a phase between two barriers, every lane of a warp for the
// ldmatrix addresses and the W fragments. Only the PTX instructions are emulated, from the PTX
// ISA's definitions: ldmatrix.x4 (lane 8m + r addresses row r of matrix m; register m of a lane
// holds the elements ldsm_row / ldsm_col give) and mma.m16n8k16 (operands assembled from the
// fragments through frag_a/b/c_row/col, accumulated in fp32). The copies global -> shared follow
// the kernels' loaders (fwd_a_src, fwd_b_src, dp_b_src, ds_b_src; 8 elements per 16-byte copy,
// zero-filled past d).
//
//   tc_host_sim layouts           JSON: the fragment and ldmatrix tables, for a Python model of the PTX ISA
//   tc_host_sim selfcheck         the kernels' ldmatrix addressing + mma reproduce A . B^T and A . B
//   tc_host_sim run IN OUT        forward + backward of one case (binary format below)
//
// IN  (little endian): int64 Bi, Bt, n, M, d, dtype (0 bf16, 1 fp16), has_patch_mask, save_winners;
//     float32 P [Bi n d], S [Bt M d] (values of the dtype); uint8 sent_mask [Bt M], patch_mask [Bi n]
//     (if has_patch_mask), zero_slot [Bt]; float32 grad_zI [Bi Bt], grad_zT [Bi Bt].
// OUT float32 zI, zT [Bi Bt]; int32 win_patch [Bi Bt M], win_sentence [Bi Bt n] (saved by the
//     forward, or recomputed by the backward when save_winners is 0); float32 dP [Bi n d],
//     dS [Bt M d] (values of the dtype), then dP, dS before that final rounding (the fp32
//     accumulators, unscaled: what the hi / lo split of W and the scales must keep accurate).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tc_common.h"

using namespace egma::cuda;
using namespace egma::cuda::tc;

namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "tc_host_sim: %s\n", msg.c_str());
  std::exit(1);
}

// ----------------------------------------------------------------------------------------------
// Emulated PTX
// ----------------------------------------------------------------------------------------------
using Regs4 = uint32_t[32][4];
using Regs2 = uint32_t[32][2];
using Acc = float[32][4];

template <typename T>
uint16_t bits(T v) {
  return v.x;
}
template <typename T>
float value_of(uint16_t b) {
  T v;
  v.x = b;
  return static_cast<float>(v);
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).b16: addr(lane) is the address lane supplies.
template <typename T, typename Addr>
void ldmatrix_x4(uint32_t out[32][4], Addr addr, bool trans) {
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m) {
      uint32_t reg = 0;
      for (int half = 0; half < 2; ++half) {
        const T* row = addr(8 * m + ldsm_row(lane, half, trans));
        reg |= static_cast<uint32_t>(bits(row[ldsm_col(lane, half, trans)])) << (16 * half);
      }
      out[lane][m] = reg;
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32: d = a . b + c.
template <typename T>
void mma(Acc c, const uint32_t a[32][4], const uint32_t b[32][2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i)
      A[frag_a_row(lane, i)][frag_a_col(lane, i)] = value_of<T>(static_cast<uint16_t>(a[lane][i / 2] >> (16 * (i & 1))));
    for (int i = 0; i < 4; ++i)
      B[frag_b_row(lane, i)][frag_b_col(lane, i)] = value_of<T>(static_cast<uint16_t>(b[lane][i / 2] >> (16 * (i & 1))));
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int r = frag_c_row(lane, i), col = frag_c_col(lane, i);
      float s = c[lane][i];
      for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][col];
      c[lane][i] = s;
    }
}

// ----------------------------------------------------------------------------------------------
// A case
// ----------------------------------------------------------------------------------------------
struct Case {
  int64_t Bi, Bt, n, M, d, dtype, has_pmask, save;
  std::vector<float> P, S, gzI, gzT;
  std::vector<uint8_t> smask, pmask, zero_slot;
};

struct Outputs {
  std::vector<float> zI, zT, dP, dS, dP_acc, dS_acc;
  std::vector<int32_t> win_patch, win_sentence;
};

int index_bytes(int64_t count) { return count <= 256 ? 1 : (count <= 32768 ? 2 : 4); }

// An index tensor of the contract's dtype, exported as int32.
struct IndexTensor {
  std::vector<uint8_t> raw;
  int bytes;
  IndexTensor(int64_t size, int64_t count) : raw(static_cast<size_t>(size) * index_bytes(count), 0), bytes(index_bytes(count)) {}
  IndexPtr ptr() { return IndexPtr{raw.data(), bytes}; }
  std::vector<int32_t> as_int32() {
    std::vector<int32_t> out(raw.size() / bytes);
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int32_t>(index_load(ptr(), static_cast<int64_t>(i)));
    return out;
  }
};

template <typename T>
struct Sim {
  const Case& c;
  Geometry g;
  std::vector<T> P, S;
  std::vector<int32_t> n_valid, m_valid;
  const bool* smask;
  const bool* pmask;
  const bool* zero_slot;

  explicit Sim(const Case& cs) : c(cs) {
    g = make_geometry(c.Bi, c.Bt, static_cast<int>(c.n), static_cast<int>(c.M), static_cast<int>(c.d));
    for (float v : c.P) P.push_back(T(v));
    for (float v : c.S) S.push_back(T(v));
    smask = reinterpret_cast<const bool*>(c.smask.data());
    pmask = c.has_pmask ? reinterpret_cast<const bool*>(c.pmask.data()) : nullptr;
    zero_slot = reinterpret_cast<const bool*>(c.zero_slot.data());
    for (int64_t k = 0; k < c.Bi; ++k) {
      int nv = 0;
      for (int64_t i = 0; i < c.n; ++i) nv += pmask ? pmask[k * c.n + i] : 1;
      n_valid.push_back(nv);
    }
    for (int64_t l = 0; l < c.Bt; ++l) {
      int m = 0;
      for (int64_t j = 0; j < c.M; ++j) m += smask[l * c.M + j];
      m_valid.push_back(m);
    }
  }

  // One 16-byte cp.async: 8 elements of row `src` from x, or zeros.
  static void copy8(T* dst, const std::vector<T>& base, int64_t src, int64_t d, int x) {
    for (int e = 0; e < 8; ++e) dst[e] = src >= 0 && x < d ? base[src * d + x + e] : T(0.f);
  }

  // li_tc_forward_kernel over the whole grid.
  void forward(const FwdArgs& a) {
    std::vector<T> As(kTileRows * kFwdLd), Bs(kTileRows * kFwdLd);
    std::vector<float> X(kTileRows * kXStride);
    FwdSmem* s = new FwdSmem;
    static Acc acc[8][kFwdMt][kFwdNt];
    const int nk = (g.d + kFwdK - 1) / kFwdK;
    for (int64_t cta = 0; cta < g.image_tiles * g.text_blocks; ++cta) {
      int64_t it, tb;
      fwd_tile_of(g, cta, it, tb);
      std::memset(s, 0xA5, sizeof(FwdSmem));  // garbage, as shared memory is
      for (int th = 0; th < kThreads; ++th) fwd_init_texts(a, tb, *s, th);
      for (int ch = 0; ch < g.chunks; ++ch) {
        for (int th = 0; th < kThreads; ++th) fwd_init_rows(a, it, ch, *s, th);
        std::memset(acc, 0, sizeof(acc));
        for (int ks = 0; ks < nk; ++ks) {
          for (int th = 0; th < kThreads; ++th) {
            const int ld_row = th >> 2, ld_q = th & 3, x = ks * kFwdK + ld_q * 8;
            for (int h = 0; h < 2; ++h) {
              const int r = ld_row + 64 * h;
              copy8(&As[r * kFwdLd + ld_q * 8], P, fwd_a_src(g, it, ch, r), g.d, x);
              copy8(&Bs[r * kFwdLd + ld_q * 8], S, fwd_b_src(g, tb, r), g.d, x);
            }
          }
          for (int warp = 0; warp < 8; ++warp) {
            const int wr = fwd_warp_row0(warp), wc = fwd_warp_col0(warp);
            for (int kk = 0; kk < kFwdK; kk += 16) {
              static Regs4 af[kFwdMt];
              static Regs2 bf[kFwdNt];
              for (int mt = 0; mt < kFwdMt; ++mt)
                ldmatrix_x4<T>(af[mt], [&](int lane) { return &As[(wr + mt * 16 + ldsm_a_row(lane)) * kFwdLd + kk + ldsm_a_col(lane)]; }, false);
              for (int np = 0; np < kFwdNt / 2; ++np) {
                Regs4 r;
                ldmatrix_x4<T>(r, [&](int lane) { return &Bs[(wc + np * 16 + ldsm_bt_n(lane)) * kFwdLd + kk + ldsm_bt_k(lane)]; }, false);
                for (int lane = 0; lane < 32; ++lane) {
                  bf[2 * np][lane][0] = r[lane][0];
                  bf[2 * np][lane][1] = r[lane][1];
                  bf[2 * np + 1][lane][0] = r[lane][2];
                  bf[2 * np + 1][lane][1] = r[lane][3];
                }
              }
              for (int mt = 0; mt < kFwdMt; ++mt)
                for (int nt = 0; nt < kFwdNt; ++nt) mma<T>(acc[warp][mt][nt], af[mt], bf[nt]);
            }
          }
        }
        for (float& v : X) v = std::nanf("");  // the stage buffers' leftovers
        for (int warp = 0; warp < 8; ++warp) {
          const int wr = fwd_warp_row0(warp), wc = fwd_warp_col0(warp);
          for (int lane = 0; lane < 32; ++lane)
            for (int mt = 0; mt < kFwdMt; ++mt)
              for (int nt = 0; nt < kFwdNt; ++nt)
                for (int e = 0; e < 4; ++e)
                  X[(wr + mt * 16 + frag_c_row(lane, e)) * kXStride + wc + nt * 8 + frag_c_col(lane, e)] = acc[warp][mt][nt][lane][e];
        }
        for (int th = 0; th < kThreads; ++th) fwd_phase_rows(a, it, tb, ch, X.data(), *s, th);
        for (int th = 0; th < kThreads; ++th) fwd_phase_cols(a, ch, X.data(), *s, th);
        for (int th = 0; th < kThreads; ++th) fwd_phase_zsum(a, *s, th);
        for (int th = 0; th < kThreads; ++th) fwd_phase_merge(a, *s, th);
      }
      for (int th = 0; th < kThreads; ++th) fwd_phase_final(a, it, tb, *s, th);
    }
    delete s;
  }

  // li_tc_scales_kernel.
  void scales(const BwdArgs& a, float* row_scale, float* col_scale) {
    for (int64_t k = 0; k < g.Bi; ++k) {
      float m = 0.f;
      for (int64_t l = 0; l < g.Bt; ++l) m = fmaxf(m, coef_abs(a.gzI, a.gzT, g.Bt, n_valid[k], m_valid[l], k, l));
      row_scale[k] = pow2_scale(m);
    }
    for (int64_t l = 0; l < g.Bt; ++l) {
      float m = 0.f;
      for (int64_t k = 0; k < g.Bi; ++k) m = fmaxf(m, coef_abs(a.gzI, a.gzT, g.Bt, n_valid[k], m_valid[l], k, l));
      col_scale[l] = pow2_scale(m);
    }
  }

  // The warp-level k step of li_tc_dp_kernel / li_tc_ds_kernel (bwd_mma_step).
  template <typename MakeW>
  void bwd_step(Acc acc[kBwdMt][kBwdNt], MakeW make_w, const std::vector<T>& Bs, int ks, int wc) {
    static Regs4 hi[kBwdMt], lo[kBwdMt];
    for (int mt = 0; mt < kBwdMt; ++mt)
      for (int lane = 0; lane < 32; ++lane) {
        float w[8];
        make_w(mt, lane, w);
        split_hi_lo<T>(w, hi[mt][lane], lo[mt][lane]);
      }
    for (int np = 0; np < kBwdNt / 2; ++np) {
      Regs4 r;
      ldmatrix_x4<T>(r, [&](int lane) { return &Bs[(ks * 16 + ldsm_b_k(lane)) * kBwdLd + wc + np * 16 + ldsm_b_n(lane)]; }, true);
      static Regs2 b0, b1;
      for (int lane = 0; lane < 32; ++lane) {
        b0[lane][0] = r[lane][0];
        b0[lane][1] = r[lane][1];
        b1[lane][0] = r[lane][2];
        b1[lane][1] = r[lane][3];
      }
      for (int mt = 0; mt < kBwdMt; ++mt) {
        mma<T>(acc[mt][2 * np], hi[mt], b0);
        mma<T>(acc[mt][2 * np], lo[mt], b0);
        mma<T>(acc[mt][2 * np + 1], hi[mt], b1);
        mma<T>(acc[mt][2 * np + 1], lo[mt], b1);
      }
    }
  }

  void load_b(std::vector<T>& Bs, const std::vector<T>& base, int db, int64_t (*src_of)(const Geometry&, int64_t, int),
              int64_t kc) {
    for (int th = 0; th < kThreads; ++th)
      for (int s = 0; s < (kBwdK * kTileCols / 8) / kThreads; ++s) {
        const int idx = th + s * kThreads, row = idx >> 4, q = idx & 15;
        copy8(&Bs[row * kBwdLd + q * 8], base, src_of(g, kc, row), g.d, db * kTileCols + q * 8);
      }
  }

  // li_tc_dp_kernel over the whole grid.
  void dp(const BwdArgs& a, std::vector<T>& out, std::vector<float>& out_acc) {
    std::vector<T> Bs(kBwdK * kBwdLd);
    DpStage* stage = new DpStage[2];
    static Acc acc[8][kBwdMt][kBwdNt];
    const int64_t n_db = bwd_d_blocks(g), nk = dp_k_chunks(g);
    for (int64_t cta = 0; cta < g.image_tiles * g.chunks * n_db; ++cta) {
      const int db = static_cast<int>(cta % n_db);
      const int64_t rt = cta / n_db, it = rt / g.chunks;
      const int ch = static_cast<int>(rt % g.chunks);
      std::memset(stage, 0xA5, 2 * sizeof(DpStage));
      std::memset(acc, 0, sizeof(acc));
      for (int th = 0; th < kThreads; ++th) {
        DpPrefetch f;
        f.fetch(a, it, ch, 0, th);
        f.put(g, stage[0], th);
      }
      for (int64_t kc = 0; kc < nk; ++kc) {
        std::vector<DpPrefetch> f(kThreads);
        if (kc + 1 < nk)
          for (int th = 0; th < kThreads; ++th) f[th].fetch(a, it, ch, kc + 1, th);
        load_b(Bs, S, db, dp_b_src, kc);
        const DpStage& st = stage[kc & 1];
        for (int warp = 0; warp < 8; ++warp) {
          const int wr = bwd_warp_row0(warp), wc = bwd_warp_col0(warp);
          for (int ks = 0; ks < kBwdK / 16; ++ks)
            bwd_step(acc[warp], [&](int mt, int lane, float w[8]) { dp_a_frag(g, st, ch, kc, ks, wr + mt * 16, lane, w); },
                     Bs, ks, wc);
        }
        if (kc + 1 < nk)
          for (int th = 0; th < kThreads; ++th) f[th].put(g, stage[(kc + 1) & 1], th);
      }
      for (int warp = 0; warp < 8; ++warp) {
        const int wr = bwd_warp_row0(warp), wc = bwd_warp_col0(warp);
        for (int lane = 0; lane < 32; ++lane)
          for (int mt = 0; mt < kBwdMt; ++mt)
            for (int e = 0; e < 4; e += 2) {
              const RowRef row = tile_row(g, it, ch, wr + mt * 16 + frag_c_row(lane, e));
              if (!row.valid) continue;
              const float inv = 1.f / a.row_scale[row.k];
              for (int nt = 0; nt < kBwdNt; ++nt) {
                const int x = db * kTileCols + wc + nt * 8 + frag_c_col(lane, e);
                if (x >= g.d) continue;
                T* dst = &out[(row.k * g.n + row.i) * g.d + x];
                out_acc[(row.k * g.n + row.i) * g.d + x] = acc[warp][mt][nt][lane][e] * inv;
                out_acc[(row.k * g.n + row.i) * g.d + x + 1] = acc[warp][mt][nt][lane][e + 1] * inv;
                const uint32_t v = pack2<T>(T(acc[warp][mt][nt][lane][e] * inv), T(acc[warp][mt][nt][lane][e + 1] * inv));
                dst[0].x = static_cast<uint16_t>(v);
                dst[1].x = static_cast<uint16_t>(v >> 16);
              }
            }
      }
    }
    delete[] stage;
  }

  // li_tc_ds_kernel over the whole grid.
  void ds(const BwdArgs& a, std::vector<T>& out, std::vector<float>& out_acc) {
    std::vector<T> Bs(kBwdK * kBwdLd);
    DsStage* stage = new DsStage[2];
    static Acc acc[8][kBwdMt][kBwdNt];
    const int64_t n_db = bwd_d_blocks(g), nk = ds_k_chunks(g);
    for (int64_t cta = 0; cta < g.text_blocks * n_db; ++cta) {
      const int db = static_cast<int>(cta % n_db);
      const int64_t tb = cta / n_db;
      std::memset(stage, 0xA5, 2 * sizeof(DsStage));
      std::memset(acc, 0, sizeof(acc));
      for (int th = 0; th < kThreads; ++th) {
        DsPrefetch f;
        f.fetch(a, tb, 0, th);
        f.put(g, stage[0], th);
      }
      for (int64_t kc = 0; kc < nk; ++kc) {
        std::vector<DsPrefetch> f(kThreads);
        if (kc + 1 < nk)
          for (int th = 0; th < kThreads; ++th) f[th].fetch(a, tb, kc + 1, th);
        load_b(Bs, P, db, ds_b_src, kc);
        const DsStage& st = stage[kc & 1];
        for (int warp = 0; warp < 8; ++warp) {
          const int wr = bwd_warp_row0(warp), wc = bwd_warp_col0(warp);
          for (int ks = 0; ks < kDsGroupsPerChunk; ++ks)
            bwd_step(acc[warp], [&](int mt, int lane, float w[8]) { ds_a_frag(g, st, ks, wr + mt * 16, lane, w); }, Bs, ks,
                     wc);
        }
        if (kc + 1 < nk)
          for (int th = 0; th < kThreads; ++th) f[th].put(g, stage[(kc + 1) & 1], th);
      }
      for (int warp = 0; warp < 8; ++warp) {
        const int wr = bwd_warp_row0(warp), wc = bwd_warp_col0(warp);
        for (int lane = 0; lane < 32; ++lane)
          for (int mt = 0; mt < kBwdMt; ++mt)
            for (int e = 0; e < 4; e += 2) {
              const ColRef col = tile_col(g, tb, wr + mt * 16 + frag_c_row(lane, e));
              if (!col.valid) continue;
              const float inv = 1.f / a.col_scale[col.l];
              for (int nt = 0; nt < kBwdNt; ++nt) {
                const int x = db * kTileCols + wc + nt * 8 + frag_c_col(lane, e);
                if (x >= g.d) continue;
                T* dst = &out[(col.l * g.M + col.j) * g.d + x];
                out_acc[(col.l * g.M + col.j) * g.d + x] = acc[warp][mt][nt][lane][e] * inv;
                out_acc[(col.l * g.M + col.j) * g.d + x + 1] = acc[warp][mt][nt][lane][e + 1] * inv;
                dst[0] = T(acc[warp][mt][nt][lane][e] * inv);
                dst[1] = T(acc[warp][mt][nt][lane][e + 1] * inv);
              }
            }
      }
    }
    delete[] stage;
  }

  Outputs run() {
    Outputs o;
    const int64_t Bi = c.Bi, Bt = c.Bt, n = c.n, M = c.M, d = c.d;
    o.zI.assign(Bi * Bt, std::nanf(""));
    o.zT.assign(Bi * Bt, std::nanf(""));
    IndexTensor win(Bi * Bt * M, n), jstar(Bi * Bt * n, M);
    FwdArgs fa{P.data(), S.data(), smask, pmask, n_valid.data(), m_valid.data(), zero_slot,
               o.zI.data(), o.zT.data(), win.ptr(), c.save ? jstar.ptr() : IndexPtr{nullptr, 1}, g};
    forward(fa);
    if (!c.save) {  // the backward's recompute: the same kernel, winners only
      std::memset(jstar.raw.data(), 0xA5, jstar.raw.size());
      FwdArgs ra = fa;
      ra.zI = ra.zT = nullptr;
      ra.win_patch = IndexPtr{nullptr, 1};
      ra.win_sentence = jstar.ptr();
      forward(ra);
    }
    std::vector<float> scale(Bi + Bt, std::nanf(""));
    std::vector<T> gP(Bi * n * d, T(std::nanf(""))), gS(Bt * M * d, T(std::nanf("")));
    BwdArgs ba{P.data(), S.data(), smask, pmask, n_valid.data(), m_valid.data(), c.gzI.data(), c.gzT.data(),
               win.ptr(), jstar.ptr(), scale.data(), scale.data() + Bi, gP.data(), gS.data(), g};
    scales(ba, scale.data(), scale.data() + Bi);
    o.dP_acc.assign(gP.size(), std::nanf(""));
    o.dS_acc.assign(gS.size(), std::nanf(""));
    dp(ba, gP, o.dP_acc);
    ds(ba, gS, o.dS_acc);
    o.win_patch = win.as_int32();
    o.win_sentence = jstar.as_int32();
    for (const T& v : gP) o.dP.push_back(static_cast<float>(v));
    for (const T& v : gS) o.dS.push_back(static_cast<float>(v));
    return o;
  }
};

// ----------------------------------------------------------------------------------------------
// I/O
// ----------------------------------------------------------------------------------------------
template <typename V>
void read_into(FILE* f, std::vector<V>& v, int64_t count) {
  v.resize(static_cast<size_t>(count));
  if (count && std::fread(v.data(), sizeof(V), v.size(), f) != v.size()) fail("truncated input");
}
template <typename V>
void write_out(FILE* f, const std::vector<V>& v) {
  if (!v.empty() && std::fwrite(v.data(), sizeof(V), v.size(), f) != v.size()) fail("short write");
}

Case read_case(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) fail(std::string("cannot open ") + path);
  Case c;
  int64_t h[8];
  if (std::fread(h, sizeof(int64_t), 8, f) != 8) fail("truncated header");
  c.Bi = h[0], c.Bt = h[1], c.n = h[2], c.M = h[3], c.d = h[4], c.dtype = h[5], c.has_pmask = h[6], c.save = h[7];
  if (c.n < 1 || c.M < 1 || c.M > kMaxM || c.d < 8 || c.d % 8) fail("unsupported shape");
  read_into(f, c.P, c.Bi * c.n * c.d);
  read_into(f, c.S, c.Bt * c.M * c.d);
  read_into(f, c.smask, c.Bt * c.M);
  if (c.has_pmask) read_into(f, c.pmask, c.Bi * c.n);
  read_into(f, c.zero_slot, c.Bt);
  read_into(f, c.gzI, c.Bi * c.Bt);
  read_into(f, c.gzT, c.Bi * c.Bt);
  std::fclose(f);
  return c;
}

int run_case(const char* in, const char* out_path) {
  const Case c = read_case(in);
  const Outputs o = c.dtype == 1 ? Sim<c10::Half>(c).run() : Sim<c10::BFloat16>(c).run();
  FILE* f = std::fopen(out_path, "wb");
  if (!f) fail(std::string("cannot write ") + out_path);
  write_out(f, o.zI);
  write_out(f, o.zT);
  write_out(f, o.win_patch);
  write_out(f, o.win_sentence);
  write_out(f, o.dP);
  write_out(f, o.dS);
  write_out(f, o.dP_acc);
  write_out(f, o.dS_acc);
  std::fclose(f);
  return 0;
}

void print_table(const char* name, int count, int (*row)(int, int), int (*col)(int, int), bool last = false) {
  std::printf("\"%s\": [", name);
  for (int lane = 0; lane < 32; ++lane) {
    std::printf("%s[", lane ? ", " : "");
    for (int i = 0; i < count; ++i) std::printf("%s[%d, %d]", i ? ", " : "", row(lane, i), col(lane, i));
    std::printf("]");
  }
  std::printf("]%s\n", last ? "" : ",");
}

int layouts() {
  std::printf("{\n");
  print_table("a", 8, frag_a_row, frag_a_col);
  print_table("b", 4, frag_b_row, frag_b_col);
  print_table("c", 4, frag_c_row, frag_c_col);
  print_table("ldsm", 2, [](int lane, int half) { return ldsm_row(lane, half, false); },
              [](int lane, int half) { return ldsm_col(lane, half, false); });
  print_table("ldsm_trans", 2, [](int lane, int half) { return ldsm_row(lane, half, true); },
              [](int lane, int half) { return ldsm_col(lane, half, true); });
  print_table("addr_a", 1, [](int lane, int) { return ldsm_a_row(lane); }, [](int lane, int) { return ldsm_a_col(lane); });
  print_table("addr_bt", 1, [](int lane, int) { return ldsm_bt_n(lane); }, [](int lane, int) { return ldsm_bt_k(lane); });
  print_table("addr_b", 1, [](int lane, int) { return ldsm_b_k(lane); }, [](int lane, int) { return ldsm_b_n(lane); },
              true);
  std::printf("}\n");
  return 0;
}

// A [16][16] row-major times B: (1) B as an [n][k] tile (the forward's S, ldmatrix without .trans),
// (2) B as a [k][n] tile (the backward's operands, .trans); both through the kernels' addressing,
// for both 16-bit types. Exact: small integers.
template <typename T>
int selfcheck_type(const char* name) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dist(-8, 8);
  const int ld = 24;  // a padded leading dimension, like the kernels' tiles
  std::vector<T> A(16 * ld), Bnk(16 * ld), Bkn(16 * ld);
  float a[16][16], b[16][16];  // b[k][n]
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      a[r][c] = static_cast<float>(dist(rng));
      b[r][c] = static_cast<float>(dist(rng));
      A[r * ld + c] = T(a[r][c]);
      Bkn[r * ld + c] = T(b[r][c]);
      Bnk[c * ld + r] = T(b[r][c]);
    }
  Regs4 af;
  ldmatrix_x4<T>(af, [&](int lane) { return &A[ldsm_a_row(lane) * ld + ldsm_a_col(lane)]; }, false);
  int bad = 0;
  for (int trans = 0; trans < 2; ++trans) {
    Regs4 r;
    if (trans)
      ldmatrix_x4<T>(r, [&](int lane) { return &Bkn[ldsm_b_k(lane) * ld + ldsm_b_n(lane)]; }, true);
    else
      ldmatrix_x4<T>(r, [&](int lane) { return &Bnk[ldsm_bt_n(lane) * ld + ldsm_bt_k(lane)]; }, false);
    for (int nt = 0; nt < 2; ++nt) {
      Regs2 bf;
      for (int lane = 0; lane < 32; ++lane) {
        bf[lane][0] = r[lane][2 * nt];
        bf[lane][1] = r[lane][2 * nt + 1];
      }
      Acc acc = {};
      mma<T>(acc, af, bf);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
          const int row = frag_c_row(lane, i), col = nt * 8 + frag_c_col(lane, i);
          float want = 0.f;
          for (int k = 0; k < 16; ++k) want += a[row][k] * b[k][col];
          if (acc[lane][i] != want) ++bad;
        }
    }
  }
  std::printf("%s %s\n", name, bad ? "FAIL" : "ok");
  return bad ? 1 : 0;
}

int selfcheck() { return selfcheck_type<c10::BFloat16>("bf16") | selfcheck_type<c10::Half>("fp16"); }

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "layouts") return layouts();
  if (mode == "selfcheck") return selfcheck();
  if (mode == "run" && argc == 4) return run_case(argv[2], argv[3]);
  std::fprintf(stderr, "usage: tc_host_sim layouts | selfcheck | run IN OUT\n");
  return 2;
}
