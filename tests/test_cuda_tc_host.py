"""The tensor-core CUDA kernels' index arithmetic, checked on a CPU (no GPU needed).

csrc/cuda/tc_common.h holds everything the kernels of csrc/cuda/late_interaction_tc.cu compute
that is not a PTX instruction. csrc/cuda/tc_host_sim.cpp, compiled here with the host compiler,
runs those functions thread by thread over the kernels' whole grids with ldmatrix and mma emulated.

* The mma.m16n8k16 / ldmatrix fragment tables of tc_common.h equal a Python model written from the
  PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"; "Warp-level matrix load
  instruction: ldmatrix") and, independently, CUTLASS's CuTe TV layouts of SM80_16x8x16_*_TN.
* The ldmatrix addresses each lane supplies in the kernels deliver exactly the mma fragments the
  PTX ISA requires (checked against the Python model, and by the simulator's own selfcheck).
* The simulated forward and backward (saved and recomputed winners, bf16 and fp16, both padding
  rules, patch masks, empty texts, exact ties, every row / column layout of the tiles, d tails)
  match egma_fast.reference.late_interaction: scores, winners, and both gradients.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from egma_fast import reference
from egma_fast.ops.arguments import text_zero_slots
from op_cases import make_case

ROOT = Path(__file__).resolve().parent.parent
SIM_SRC = ROOT / "csrc" / "cuda" / "tc_host_sim.cpp"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx})")
    from torch.utils.cpp_extension import include_paths

    exe = tmp_path_factory.mktemp("tc_sim") / "tc_host_sim"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", *[f"-I{p}" for p in include_paths()], str(SIM_SRC), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr
    return exe


# ----------------------------------------------------------------------------------------------
# Layouts: the PTX ISA, written out in Python
# ----------------------------------------------------------------------------------------------
def ptx_a(lane: int, i: int) -> tuple[int, int]:
    group, tig = lane >> 2, lane % 4
    row = group if (i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b(lane: int, i: int) -> tuple[int, int]:  # (k, n)
    group, tig = lane >> 2, lane % 4
    return tig * 2 + (i & 1) + (8 if i >= 2 else 0), group


def ptx_c(lane: int, i: int) -> tuple[int, int]:
    group, tig = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 1)


def ptx_ldmatrix(lane: int, half: int, trans: bool) -> tuple[int, int]:
    """(row, col) of the 8x8 matrix (as stored) that `lane` receives in the half `half` of a register."""
    row, col = lane >> 2, 2 * (lane % 4) + half
    return (col, row) if trans else (row, col)


def cute_tv(shape_stride, thread: int, value: int, rows: int) -> tuple[int, int]:
    """CuTe TV layout ((T0, T1), (V...)) : ((t0, t1), (v...)) -> column-major (rows x cols) coordinate."""
    (t_shape, t_stride), (v_shape, v_stride) = shape_stride
    idx = (thread % t_shape[0]) * t_stride[0] + (thread // t_shape[0]) * t_stride[1]
    rest = value
    for size, stride in zip(v_shape, v_stride):
        idx += (rest % size) * stride
        rest //= size
    return idx % rows, idx // rows


# CUTLASS include/cute/atom/mma_traits_sm80.hpp, MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>.
CUTE_A = (((4, 8), (32, 1)), ((2, 2, 2), (16, 8, 128)))  # (M16, K16)
CUTE_B = (((4, 8), (16, 1)), ((2, 2), (8, 64)))  # (N8, K16)
CUTE_C = (((4, 8), (32, 1)), ((2, 2), (16, 8)))  # (M16, N8)


@pytest.fixture(scope="module")
def tables(sim) -> dict:
    out = subprocess.run([str(sim), "layouts"], capture_output=True, text=True, check=True)
    return {k: [[tuple(e) for e in lane] for lane in v] for k, v in json.loads(out.stdout).items()}


def test_fragment_tables_match_ptx_isa_and_cute(tables) -> None:
    for lane in range(32):
        for i in range(8):
            assert tables["a"][lane][i] == ptx_a(lane, i) == cute_tv(CUTE_A, lane, i, 16), ("a", lane, i)
        for i in range(4):
            k, n = ptx_b(lane, i)
            assert tables["b"][lane][i] == (k, n), ("b", lane, i)
            assert cute_tv(CUTE_B, lane, i, 8) == (n, k), ("b/cute", lane, i)
            assert tables["c"][lane][i] == ptx_c(lane, i) == cute_tv(CUTE_C, lane, i, 16), ("c", lane, i)
        for half in range(2):
            assert tables["ldsm"][lane][half] == ptx_ldmatrix(lane, half, False)
            assert tables["ldsm_trans"][lane][half] == ptx_ldmatrix(lane, half, True)
    # Each fragment covers its operand exactly once.
    assert sorted(e for lane in tables["a"] for e in lane) == [(r, c) for r in range(16) for c in range(16)]
    assert sorted(e for lane in tables["b"] for e in lane) == [(k, n) for k in range(16) for n in range(8)]
    assert sorted(e for lane in tables["c"] for e in lane) == [(r, c) for r in range(16) for c in range(8)]


def _loaded(addr: list, trans: bool, lane: int, reg: int, half: int) -> tuple[int, int]:
    """Tile coordinate that ldmatrix.x4 delivers to (lane, register reg, half), when each lane
    supplies the start (row, col) addr[lane] of one 8-element row (PTX: lane 8m + r addresses
    row r of matrix m)."""
    r, c = ptx_ldmatrix(lane, half, trans)
    row0, col0 = addr[8 * reg + r][0]
    return row0, col0 + c


def test_ldmatrix_addresses_deliver_mma_fragments(tables) -> None:
    """The kernels' ldmatrix addressing (ldsm_a_*, ldsm_bt_*, ldsm_b_*) puts in every register the
    element the PTX mma layout expects there."""
    for lane in range(32):
        for reg in range(4):
            for half in range(2):
                # A, a row-major [m][k] tile: register reg holds a_{2 reg + half}.
                assert _loaded(tables["addr_a"], False, lane, reg, half) == ptx_a(lane, 2 * reg + half)
                # B of n tiles reg // 2 from an [n][k] tile (no transpose): b_{2 (reg % 2) + half}.
                k, n = ptx_b(lane, 2 * (reg % 2) + half)
                assert _loaded(tables["addr_bt"], False, lane, reg, half) == ((reg // 2) * 8 + n, k)
                # B from a [k][n] tile with .trans.
                assert _loaded(tables["addr_b"], True, lane, reg, half) == (k, (reg // 2) * 8 + n)


def test_simulated_ldmatrix_mma_selfcheck(sim) -> None:
    out = subprocess.run([str(sim), "selfcheck"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["bf16", "ok", "fp16", "ok"], out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------
# The simulated kernels against the reference
# ----------------------------------------------------------------------------------------------
def _index_bytes(count: int) -> int:
    return 1 if count <= 256 else (2 if count <= 32768 else 4)


def run_sim(sim: Path, tmp_path: Path, P, S, mask, zero_slot, gzI, gzT, patch_mask=None, save=True):
    """Run the simulated forward + backward; returns a dict of numpy arrays."""
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    dtype = {torch.bfloat16: 0, torch.float16: 1}[P.dtype]
    header = np.array([Bi, Bt, n, M, d, dtype, patch_mask is not None, save], dtype=np.int64)
    parts = [header.tobytes(), P.float().numpy().tobytes(), S.float().numpy().tobytes(),
             mask.numpy().astype(np.uint8).tobytes()]
    if patch_mask is not None:
        parts.append(patch_mask.numpy().astype(np.uint8).tobytes())
    parts += [zero_slot.numpy().astype(np.uint8).tobytes(), gzI.float().numpy().tobytes(), gzT.float().numpy().tobytes()]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(parts))
    proc = subprocess.run([str(sim), "run", str(src), str(dst)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = dst.read_bytes()
    out, pos = {}, 0
    for name, count, dt in (("zI", Bi * Bt, np.float32), ("zT", Bi * Bt, np.float32), ("win_patch", Bi * Bt * M, np.int32),
                            ("win_sentence", Bi * Bt * n, np.int32), ("dP", Bi * n * d, np.float32),
                            ("dS", Bt * M * d, np.float32), ("dP_acc", Bi * n * d, np.float32),
                            ("dS_acc", Bt * M * d, np.float32)):
        size = count * np.dtype(dt).itemsize
        out[name] = np.frombuffer(raw[pos:pos + size], dtype=dt)
        pos += size
    assert pos == len(raw)
    out["zI"] = out["zI"].reshape(Bi, Bt)
    out["zT"] = out["zT"].reshape(Bi, Bt)
    out["win_patch"] = out["win_patch"].reshape(Bi, Bt, M)
    out["win_sentence"] = out["win_sentence"].reshape(Bi, Bt, n)
    for name in ("dP", "dP_acc"):
        out[name] = out[name].reshape(Bi, n, d)
    for name in ("dS", "dS_acc"):
        out[name] = out[name].reshape(Bt, M, d)
    return out


def expected_winners(P, S, mask, zero_slot, patch_mask):
    """First maximisers in float64 (the contract: masked slots never win, a zero slot wins with
    its first masked slot when every real slot is below 0), and the smallest decision margin."""
    X = torch.einsum("knd,lmd->klnm", P.double(), S.double())
    Bi, Bt, n, M = X.shape
    pm = torch.ones(Bi, n, dtype=torch.bool) if patch_mask is None else patch_mask
    xi = torch.where(mask[None, :, None, :], X, torch.tensor(-math.inf, dtype=X.dtype))
    best, arg = xi.max(dim=3)
    first_masked = torch.argmax((~mask).int(), dim=1)  # [Bt]
    zero_wins = zero_slot[None, :, None] & (best < 0)
    arg = torch.where(zero_wins, first_masked[None, :, None].expand_as(arg), arg)
    xt = torch.where(pm[:, None, :, None], X, torch.tensor(-math.inf, dtype=X.dtype))
    win_patch = xt.max(dim=2).indices
    # Margins: gap between the best and second best candidate of every decision.
    cand = torch.cat([xi, torch.where(zero_slot[None, :, None, None], 0.0, -math.inf).expand(Bi, Bt, n, 1)], dim=3)
    top = cand.topk(2, dim=3).values if cand.shape[3] > 1 else None
    gaps = [top[..., 0] - top[..., 1]] if top is not None else []
    if n > 1:
        topt = xt.topk(2, dim=2).values
        gaps.append(topt[:, :, 0] - topt[:, :, 1])
    finite = [g[torch.isfinite(g)] for g in gaps]
    margin = min((float(g.min()) for g in finite if g.numel()), default=math.inf)
    return arg, win_patch, margin


def check_case(sim, tmp_path, P, S, mask, pad_as_zero, *, patch_mask=None, save=True, grad_scale=1.0, seed=0,
               exact_winners=False):
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    g = torch.Generator().manual_seed(seed)
    gzI = torch.randn(Bi, Bt, generator=g) * grad_scale
    gzT = torch.randn(Bi, Bt, generator=g) * grad_scale
    zero_slot = text_zero_slots(mask, pad_as_zero)
    got = run_sim(sim, tmp_path, P, S, mask, zero_slot, gzI, gzT, patch_mask, save)

    P64 = P.double().requires_grad_()
    S64 = S.double().requires_grad_()
    zI, zT = reference.late_interaction(P64, S64, mask, patch_mask, pad_as_zero)
    ((gzI.double() * zI).sum() + (gzT.double() * zT).sum()).backward()

    scale = max(float(zI.detach().abs().max()), float(zT.detach().abs().max()), 1e-30)
    np.testing.assert_allclose(got["zI"], zI.detach().numpy(), rtol=1e-5, atol=1e-6 * scale, err_msg="zI")
    np.testing.assert_allclose(got["zT"], zT.detach().numpy(), rtol=1e-5, atol=1e-6 * scale, err_msg="zT")

    # Winners, where a decision exists: real slots of images with a valid patch (text side);
    # valid patches of texts with a sentence (image side).
    arg, win_patch, margin = expected_winners(P, S, mask, zero_slot, patch_mask)
    assert exact_winners or margin > 1e-5, f"inputs too close to a tie for float64 vs fp32 ({margin:.3g})"
    pm = torch.ones(Bi, n, dtype=torch.bool) if patch_mask is None else patch_mask
    has_patch = pm.any(dim=1)
    sel_t = (mask[None, :, :] & has_patch[:, None, None]).numpy()
    np.testing.assert_array_equal(got["win_patch"][sel_t], win_patch.numpy()[sel_t], err_msg="win_patch")
    sel_i = (pm[:, None, :] & mask.any(dim=1)[None, :, None]).numpy()
    np.testing.assert_array_equal(got["win_sentence"][sel_i], arg.numpy()[sel_i], err_msg="win_sentence")

    # Gradients. Before the final rounding (fp32 accumulators): W = hi + lo carries ~16 (bf16) or
    # ~22 (fp16, thanks to the scales) bits, far finer than one 16-bit rounding (2^-9 / 2^-12).
    # After it: one rounding to the feature dtype, wherever the value is in its normal range.
    tiny = {torch.bfloat16: 1e-37, torch.float16: 2.0**-14}[P.dtype]
    rtol = 2.0**-8 if P.dtype == torch.bfloat16 else 2.0**-10
    for name, want in (("dP", P64.grad), ("dS", S64.grad)):
        w = want.numpy()
        big = float(np.abs(w).max())
        assert big > 0, f"{name}: the case has no gradient to check"
        np.testing.assert_allclose(got[name + "_acc"], w, rtol=2.0**-14, atol=2.0**-18 * big, err_msg=name + " (fp32)")
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=max(1e-6 * big, tiny), err_msg=name)


def _features(Bi, Bt, n, M, d, dtype, seed, mask_kind="scattered"):
    case = make_case("sim", Bi, Bt, n, M, d, seed=seed, mask_kind=mask_kind, dtype=torch.float64)
    return case.P.to(dtype), case.S.to(dtype), case.mask


def _clear_features(Bi, Bt, n, M, d, dtype, pad_as_zero, mask_kind="scattered", patch_mask=None):
    for seed in range(50):
        P, S, mask = _features(Bi, Bt, n, M, d, dtype, seed, mask_kind)
        if expected_winners(P, S, mask, text_zero_slots(mask, pad_as_zero), patch_mask)[2] > 1e-5:
            return P, S, mask
    raise RuntimeError("no input with clear decisions")


@pytest.mark.parametrize("save", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
def test_sim_n49_m16_bf16(sim, tmp_path, pad_as_zero, save) -> None:
    """The benchmark's layout (R = 64: two images per tile, Mp = 16: eight texts per tile), several
    image tiles, d = 40 (a partial K step and a partial d block)."""
    P, S, mask = _clear_features(5, 7, 49, 16, 40, torch.bfloat16, pad_as_zero)
    check_case(sim, tmp_path, P, S, mask, pad_as_zero, save=save)


def test_sim_n196_two_chunks_fp16(sim, tmp_path) -> None:
    """n = 196: one image per tile in two 128-row chunks (running column max across chunks), two
    text blocks, fp16."""
    P, S, mask = _clear_features(3, 9, 196, 16, 16, torch.float16, True, mask_kind="prefix")
    check_case(sim, tmp_path, P, S, mask, True, save=False)


def test_sim_small_n_and_m_with_masks(sim, tmp_path) -> None:
    """n = 5 (R = 16: eight images per tile), M = 3 (padded to 16 slots), a patch mask with a fully
    masked image, and a text without sentences."""
    Bi, Bt, n, M = 11, 10, 5, 3
    patch_mask = torch.rand(Bi, n, generator=torch.Generator().manual_seed(3)) < 0.7
    patch_mask[:, 0] = True
    patch_mask[4] = False
    for seed in range(50):
        P, S, mask = _features(Bi, Bt, n, M, 24, torch.bfloat16, seed)
        mask[6] = False
        zero = text_zero_slots(mask, True)
        if expected_winners(P, S, mask, zero, patch_mask)[2] > 1e-5:
            break
    check_case(sim, tmp_path, P, S, mask, True, patch_mask=patch_mask, save=False)
    check_case(sim, tmp_path, P, S, mask, False, patch_mask=patch_mask, save=True)


def test_sim_m40_two_d_blocks(sim, tmp_path) -> None:
    """M = 40 (Mp = 64: two texts per tile, a text spans a whole dP K chunk), n = 20 (R = 32),
    d = 136 (two d blocks in the backward, the second 8 wide)."""
    P, S, mask = _clear_features(6, 5, 20, 40, 136, torch.bfloat16, True)
    check_case(sim, tmp_path, P, S, mask, True, save=True)


def test_sim_m128_half_text_chunks(sim, tmp_path) -> None:
    """M = 128 (one text per tile; a dP K chunk holds half a text), n = 70 (R = 128, one chunk)."""
    P, S, mask = _clear_features(2, 3, 70, 128, 8, torch.float16, False)
    check_case(sim, tmp_path, P, S, mask, False, save=False)


@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
def test_sim_exact_ties_first_maximiser(sim, tmp_path, pad_as_zero) -> None:
    """Duplicated sentences and patches with dyadic features (exact in bf16 and in fp32 sums):
    every max goes to the lowest index, as in the reference."""
    case = make_case("ties", 3, 4, 9, 4, 8, seed=5, mask_kind="prefix", ties=True, dtype=torch.float64)
    P, S = case.P.bfloat16(), case.S.bfloat16()
    assert torch.equal(P.double(), case.P) and torch.equal(S.double(), case.S)
    check_case(sim, tmp_path, P, S, case.mask, pad_as_zero, save=False, exact_winners=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sim_tiny_gradients_keep_precision(sim, tmp_path, dtype) -> None:
    """Gradient weights of 1e-6 / n_valid lie below fp16's normal range (and 1e-6 / n_valid's lo part
    far below it): the per-row power-of-two scale of W keeps their bits in the fp32 accumulators
    (checked before the final rounding; the fp16 outputs of such gradients underflow anyway)."""
    P, S, mask = _clear_features(4, 5, 49, 16, 16, dtype, False)
    check_case(sim, tmp_path, P, S, mask, False, grad_scale=1e-6, save=True)


def test_sim_detects_a_wrong_winner(sim, tmp_path) -> None:
    """The comparison can fail: flipping the sign of one sentence of the simulated input (and not of
    the reference's) changes winners and gradients."""
    P, S, mask = _clear_features(3, 3, 49, 16, 16, torch.bfloat16, False)
    Bi, Bt = 3, 3
    g = torch.Generator().manual_seed(0)
    gzI, gzT = torch.randn(Bi, Bt, generator=g), torch.randn(Bi, Bt, generator=g)
    S_bad = S.clone()
    S_bad[1, int(mask[1].nonzero()[0])] *= -1
    got = run_sim(sim, tmp_path, P, S_bad, mask, text_zero_slots(mask, False), gzI, gzT)
    zI, _ = reference.late_interaction(P.double(), S.double(), mask, None, False)
    assert not np.allclose(got["zI"], zI.numpy(), rtol=1e-5, atol=1e-6)
