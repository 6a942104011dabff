"""The CUDA kernels of egma_fast._C (backend "cuda") against egma_fast.reference on a GPU, fp32 and
bf16, values and every gradient, with the image-side winners recomputed (the CUDA default) and
saved. Needs a GPU and an extension built with CUDA (EGMA_FAST_BUILD_CUDA=on or auto).

The second half checks the tensor-core kernels (EGMA_FAST_CUDA_KERNELS=tensor_core,
csrc/cuda/late_interaction_tc.cu) on sm_80+: the op cases in bf16, the flash-attention rule at the
benchmark's shapes (bf16 / fp16, M = 16, d = 512, n in {49, 196}), many tiles against float64
gradients built from the kernels' own winners, recompute == save, determinism, the SIMT fallback
for fp32, agreement with the SIMT kernels, and the whole loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from egma_fast import reference
from egma_fast.config import EGMAConfig
from egma_fast.ops import backend_error

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if backend_error("cpp") is not None:
    pytest.skip(f"egma_fast._C unavailable: {backend_error('cpp')}", allow_module_level=True)

from egma_fast.ops import cpp_backend as cb  # noqa: E402

if not cb.WITH_CUDA:
    pytest.skip("egma_fast._C was built without CUDA kernels (EGMA_FAST_BUILD_CUDA=on)", allow_module_level=True)

from op_cases import (  # noqa: E402
    assert_late_interaction_deterministic,
    Case,
    run_loss,
    compare_cross_map,
    compare_late_interaction,
    cross_map_configs,
    late_interaction_cases,
    make_case,
    standard_cases,
)


@pytest.fixture(params=["recompute", "save"])
def winners(request, monkeypatch):
    limit = 1 << 40 if request.param == "save" else 0
    monkeypatch.setitem(cb.SAVE_SENTENCE_ARGMAX_MAX_BYTES, "cuda", limit)
    monkeypatch.setattr(cb, "TENSOR_CORE_SAVE_SENTENCE_ARGMAX_MAX_BYTES", limit)
    return request.param


def _li_cases() -> list[Case]:
    return late_interaction_cases(device="cuda") + [
        make_case("rect-wide", 1, 5, 6, 3, 9, mask_kind="scattered", device="cuda"),
        make_case("rect-tall", 5, 2, 7, 2, 10, mask_kind="prefix", device="cuda"),
        make_case("big", 8, 8, 196, 16, 64, mask_kind="scattered", ties=True, device="cuda"),
        make_case("many-slots", 3, 4, 70, 300, 20, mask_kind="scattered", device="cuda"),
    ]


@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
def test_late_interaction_fp32(winners, pad_as_zero) -> None:
    for case in _li_cases():
        compare_late_interaction(cb.late_interaction, case, pad_as_zero, rtol=1e-5, atol=1e-5)


def test_late_interaction_patch_mask(winners) -> None:
    case = make_case("patch_mask", 4, 3, 7, 3, 6, mask_kind="scattered", device="cuda")
    pmask = torch.rand(4, 7, device="cuda") < 0.6
    pmask[1] = False
    compare_late_interaction(cb.late_interaction, case, True, patch_mask=pmask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", cross_map_configs(), ids=["paper", "official-egm"])
def test_cross_map_fp32(config) -> None:
    cases = [c for c in standard_cases(device="cuda") if c.P.shape[0] == c.S.shape[0]]
    cases += [make_case("big", 8, 8, 196, 16, 64, mask_kind="scattered", device="cuda")]
    for case in cases:
        compare_cross_map(cb.cross_map, case, config, rtol=1e-4, atol=1e-4)


def _bf16_case(case: Case) -> Case:
    return Case(case.name, case.P.bfloat16(), case.S.bfloat16(), case.mask, case.GS.bfloat16(), case.use_gaze)


def test_late_interaction_bf16(winners) -> None:
    """bf16 inputs accumulate in fp32: scores match the reference on the same bf16 values, and the
    bf16 gradients are within bf16 rounding of it."""
    case = _bf16_case(make_case("bf16", 6, 7, 49, 16, 64, mask_kind="scattered", device="cuda"))
    P = case.P.clone().requires_grad_()
    S = case.S.clone().requires_grad_()
    zI, zT = cb.late_interaction(P, S, case.mask, None, True)
    g = torch.randn(2, 6, 7, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ((g[0] * zI).sum() + (g[1] * zT).sum()).backward()
    P64 = case.P.double().requires_grad_()
    S64 = case.S.double().requires_grad_()
    rI, rT = reference.late_interaction(P64, S64, case.mask, None, True)
    ((g[0].double() * rI).sum() + (g[1].double() * rT).sum()).backward()
    torch.testing.assert_close(zI.double(), rI, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zT.double(), rT, rtol=1e-5, atol=1e-5)
    assert P.grad.dtype == torch.bfloat16
    torch.testing.assert_close(P.grad.double(), P64.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(S.grad.double(), S64.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_cross_map_bf16(preset) -> None:
    case = _bf16_case(make_case("bf16", 6, 6, 49, 16, 64, mask_kind="prefix", device="cuda"))
    config = EGMAConfig.preset(preset, lambda_egm=1.0)
    params = reference.cross_map_params(config, 49)
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)
    P = case.P.clone().requires_grad_()
    alpha = torch.tensor(8.0, device="cuda", requires_grad=True)
    got = cb.cross_map(P, case.S, case.mask, case.GS, case.use_gaze, theta, alpha, params)
    P64 = case.P.double().requires_grad_()
    alpha64 = torch.tensor(8.0, device="cuda", dtype=torch.float64, requires_grad=True)
    want = reference.cross_map(P64, case.S.double(), case.mask, case.GS.double(), case.use_gaze, theta, alpha64, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in want).backward()
    torch.testing.assert_close(P.grad.double(), P64.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(alpha.grad.double(), alpha64.grad, rtol=1e-3, atol=1e-3)


def test_cuda_deterministic() -> None:
    """Two runs on the GPU give identical results (no atomics)."""
    case = make_case("det", 9, 9, 49, 16, 64, mask_kind="scattered", device="cuda")
    assert_late_interaction_deterministic(cb.late_interaction, case)


# ==============================================================================================
# The tensor-core kernels (EGMA_FAST_CUDA_KERNELS=tensor_core)
# ==============================================================================================
requires_tc = pytest.mark.skipif(
    not cb._HAS_TENSOR_CORE_OPS or torch.cuda.get_device_capability() < (8, 0),
    reason="needs the tensor-core ops and a GPU of compute capability 8.0+",
)
LOWP = [torch.bfloat16, torch.float16]
_ops = torch.ops.egma_fast_C


@pytest.fixture
def tensor_cores(monkeypatch):
    monkeypatch.setenv(cb.CUDA_KERNELS_ENV, "tensor_core")
    return "tensor_core"


def _lowp(case: Case, dtype: torch.dtype) -> Case:
    return Case(case.name, case.P.to(dtype), case.S.to(dtype), case.mask, case.GS.to(dtype), case.use_gaze)


def _value_and_grads(fn, P, S, mask, pad_as_zero, patch_mask=None, seed=0):
    P = P.detach().clone().requires_grad_()
    S = S.detach().clone().requires_grad_()
    zI, zT = fn(P, S, mask, patch_mask, pad_as_zero)
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(2, *zI.shape, generator=g, device="cuda", dtype=torch.float64)
    ((w[0] * zI.double()).sum() + (w[1] * zT.double()).sum()).backward()
    return zI.detach(), zT.detach(), P.grad, S.grad


@requires_tc
@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
def test_tc_op_cases_bf16(tensor_cores, winners, pad_as_zero) -> None:
    """Every op case (odd sizes, masks, exact ties, empty texts) in bf16: scores as the float64
    reference of the same bf16 values, gradients within bf16 rounding of it."""
    for case in _li_cases():
        case = _lowp(case, torch.bfloat16)
        got = _value_and_grads(cb.late_interaction, case.P, case.S, case.mask, pad_as_zero)
        want = _value_and_grads(reference.late_interaction, case.P.double(), case.S.double(), case.mask, pad_as_zero)
        for name, a, b in zip(("zI", "zT", "dP", "dS"), got, want):
            tol = 1e-5 if name.startswith("z") else 1e-2
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"{case.name}/{name}: {m}")
        assert got[2].dtype == torch.bfloat16


@requires_tc
def test_tc_patch_mask(tensor_cores, winners) -> None:
    case = _lowp(make_case("patch_mask", 4, 3, 7, 3, 16, mask_kind="scattered", device="cuda"), torch.bfloat16)
    pmask = torch.rand(4, 7, device="cuda") < 0.6
    pmask[1] = False
    got = _value_and_grads(cb.late_interaction, case.P, case.S, case.mask, True, pmask)
    want = _value_and_grads(reference.late_interaction, case.P.double(), case.S.double(), case.mask, True, pmask)
    for name, a, b in zip(("zI", "zT", "dP", "dS"), got, want):
        tol = 1e-5 if name.startswith("z") else 1e-2
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# The flash-attention rule (DESIGN.md): error against float64 at most 2x PyTorch's own error in the
# same dtype, on inputs whose max decisions have a clear float64 margin (as tests/test_triton_gpu.py).
def _flash_features(seed, Bi, Bt, n, M, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    P = F.normalize(torch.randn(Bi, n, d, generator=g, device="cuda"), dim=-1).to(dtype)
    S = F.normalize(torch.randn(Bt, M, d, generator=g, device="cuda"), dim=-1).to(dtype)
    lengths = torch.randint(1, M + 1, (Bt,), generator=g, device="cuda")
    lengths[0] = M
    lengths[-1] = 1
    perm = torch.argsort(torch.rand(Bt, M, generator=g, device="cuda"), dim=1)
    mask = torch.gather(torch.arange(M, device="cuda")[None, :] < lengths[:, None], 1, perm)
    return P, S, mask


def _top2_gap(x: torch.Tensor) -> float:
    if x.shape[-1] < 2:
        return math.inf
    top = x.topk(2, dim=-1).values
    gap = torch.where(torch.isfinite(top[..., 1]), top[..., 0] - top[..., 1], torch.full_like(top[..., 0], math.inf))
    return float(gap.min())


def _li_margin(P, S, mask, pad_as_zero) -> float:
    X = torch.einsum("bnd,tmd->btnm", P.double(), S.double())
    xi = torch.where(mask[None, :, None, :], X, torch.full_like(X, -math.inf))
    if pad_as_zero:
        m = mask.sum(dim=1)
        zero = torch.where((m < m.max())[None, :, None, None], torch.zeros_like(X[..., :1]), torch.full_like(X[..., :1], -math.inf))
        xi = torch.cat([xi, zero], dim=-1)
    return min(_top2_gap(xi), _top2_gap(X.transpose(2, 3)))


def _clear_li_case(Bi, Bt, n, M, d, dtype, pad_as_zero, margin=2e-6):
    for seed in range(200):
        P, S, mask = _flash_features(seed, Bi, Bt, n, M, d, dtype)
        if _li_margin(P, S, mask, pad_as_zero) > margin:
            return P, S, mask
    raise RuntimeError("no input with clear decisions found")


@requires_tc
@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
@pytest.mark.parametrize("n", [49, 196])
@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_tc_flash_rule(tensor_cores, winners, dtype, n, pad_as_zero) -> None:
    P, S, mask = _clear_li_case(6, 5, n, 16, 512, dtype, pad_as_zero)
    fast = _value_and_grads(cb.late_interaction, P, S, mask, pad_as_zero, seed=7)
    base = _value_and_grads(reference.late_interaction, P, S, mask, pad_as_zero, seed=7)
    truth = _value_and_grads(reference.late_interaction, P.double(), S.double(), mask, pad_as_zero, seed=7)
    for name, f, b, t in zip(("zI", "zT", "dP", "dS"), fast, base, truth):
        err_fast = (f.double() - t).abs().max().item()
        err_base = (b.double() - t).abs().max().item()
        floor = 1e-5 * max(t.abs().max().item(), 1e-30) + 1e-7
        assert err_fast <= 2 * err_base + floor, f"{name}: fast err {err_fast:.3g} > 2 x torch err {err_base:.3g} + {floor:.2g}"


def _expected_grads(P, S, mask, pmask, gzI, gzT, win_patch, win_sentence):
    """float64 dP, dS of sum(gzI zI + gzT zT) for the given winners (the kernels' own): robust to
    near-ties, where any correct kernel may pick either side."""
    P, S = P.double(), S.double()
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    nv = pmask.sum(1).double()
    m = mask.sum(1).double()
    scored = (nv[:, None] > 0) & (m[None, :] > 0)
    cI = torch.where(scored, gzI.double() / nv.clamp_min(1)[:, None], 0.0)  # [Bi, Bt]
    cT = torch.where(scored, gzT.double() / m.clamp_min(1)[None, :], 0.0)
    ws = win_sentence.long()  # [Bi, Bt, n]
    real_ws = torch.gather(mask[None].expand(Bi, Bt, M), 2, ws) & pmask[:, None, :]  # the zero slot passes nothing
    wI = cI[:, :, None] * real_ws  # [Bi, Bt, n]
    S_at = S[torch.arange(Bt, device=S.device)[None, :, None], ws]  # [Bi, Bt, n, d]
    dP = torch.einsum("kln,klnd->knd", wI, S_at)
    dS = torch.zeros(Bt, M, d, dtype=torch.float64, device=S.device)
    dS.index_put_((torch.arange(Bt, device=S.device)[None, :, None].expand_as(ws), ws), wI[..., None] * P[:, None], accumulate=True)
    wp = win_patch.long()  # [Bi, Bt, M]
    wT = cT[:, :, None] * mask[None]  # [Bi, Bt, M]
    P_at = P[torch.arange(Bi, device=P.device)[:, None, None], wp]  # [Bi, Bt, M, d]
    dS += torch.einsum("klj,kljd->ljd", wT, P_at)
    dP.index_put_((torch.arange(Bi, device=P.device)[:, None, None].expand_as(wp), wp), wT[..., None] * S[None], accumulate=True)
    return dP, dS


@requires_tc
@pytest.mark.parametrize("n", [49, 196])
@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_tc_many_tiles(dtype, n) -> None:
    """Bi = 37, Bt = 45 at M = 16, d = 512 (many image tiles and text blocks, partial last tiles), a
    patch mask, the zero slot: scores against float64, winners optimal within fp32 rounding,
    gradients against float64 from the kernels' own winners, recomputed winners == saved ones."""
    Bi, Bt, M, d = 37, 45, 16, 512
    P, S, mask = _flash_features(3, Bi, Bt, n, M, d, dtype)
    pmask = torch.rand(Bi, n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) < 0.9
    pmask[:, 0] = True
    zero_slot = cb.text_zero_slots(mask, True)
    zI, zT, win_patch, win_sentence = _ops.late_interaction_tc_fwd(P, S, mask, pmask, zero_slot, True)
    rI, rT = reference.late_interaction(P.double(), S.double(), mask, pmask, True)
    torch.testing.assert_close(zI.double(), rI, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zT.double(), rT, rtol=1e-5, atol=1e-5)
    # Winners: each attains its max within fp32 rounding of a 512-term sum.
    X = torch.einsum("knd,lmd->klnm", P.double(), S.double())
    xi = torch.where(mask[None, :, None, :], X, -math.inf)
    best = xi.max(3).values
    zero_wins = zero_slot[None, :, None] & (best < 0)
    at = torch.gather(X, 3, win_sentence.long()[..., None])[..., 0]
    ok_i = zero_wins | (at >= best - 1e-5) | ~pmask[:, None, :]
    assert bool(ok_i.all()), "an image-side winner is not a maximiser"
    xt = torch.where(pmask[:, None, :, None], X, -math.inf)
    at_t = torch.gather(X, 2, win_patch.long()[:, :, None, :])[:, :, 0, :]
    assert bool(((at_t >= xt.max(2).values - 1e-5) | ~mask[None]).all()), "a text-side winner is not a maximiser"
    g = torch.Generator(device="cuda").manual_seed(2)
    gzI, gzT = torch.randn(Bi, Bt, generator=g, device="cuda"), torch.randn(Bi, Bt, generator=g, device="cuda")
    dP, dS = _ops.late_interaction_tc_bwd(gzI, gzT, P, S, mask, pmask, zero_slot, win_patch, win_sentence)
    eP, eS = _expected_grads(P, S, mask, pmask, gzI, gzT, win_patch, win_sentence)
    rtol = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(dP.double(), eP, rtol=rtol, atol=1e-5 * eP.abs().max().item())
    torch.testing.assert_close(dS.double(), eS, rtol=rtol, atol=1e-5 * eS.abs().max().item())
    # The backward's recompute runs the forward kernel again: the same winners, bitwise the same gradients.
    empty = torch.empty(0, dtype=win_sentence.dtype, device="cuda")
    rP, rS = _ops.late_interaction_tc_bwd(gzI, gzT, P, S, mask, pmask, zero_slot, win_patch, empty)
    assert torch.equal(rP, dP) and torch.equal(rS, dS)


@requires_tc
def test_tc_deterministic(tensor_cores) -> None:
    case = _lowp(make_case("det", 19, 21, 49, 16, 64, mask_kind="scattered", device="cuda"), torch.bfloat16)
    assert_late_interaction_deterministic(cb.late_interaction, case)


@requires_tc
def test_tc_fp32_falls_back_to_simt(monkeypatch) -> None:
    """fp32 inputs are not the tensor-core kernels' to take: the option gives the SIMT results bitwise."""
    case = make_case("fp32", 5, 6, 49, 16, 64, mask_kind="scattered", device="cuda")
    simt = _value_and_grads(cb.late_interaction, case.P, case.S, case.mask, True)
    monkeypatch.setenv(cb.CUDA_KERNELS_ENV, "tensor_core")
    tc = _value_and_grads(cb.late_interaction, case.P, case.S, case.mask, True)
    for a, b in zip(tc, simt):
        assert torch.equal(a, b)


@requires_tc
@pytest.mark.parametrize("n", [49, 196])
def test_tc_agrees_with_simt_at_benchmark_shape(monkeypatch, n) -> None:
    """B = 256, M = 16, d = 512, bf16: the two CUDA implementations of the contract agree on the
    scores (fp32 sums in different orders) and on all but near-tie gradient rows."""
    P, S, mask = _flash_features(11, 256, 256, n, 16, 512, torch.bfloat16)
    simt = _value_and_grads(cb.late_interaction, P, S, mask, False)
    monkeypatch.setenv(cb.CUDA_KERNELS_ENV, "tensor_core")
    tc = _value_and_grads(cb.late_interaction, P, S, mask, False)
    torch.testing.assert_close(tc[0], simt[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tc[1], simt[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(tc[2:], simt[2:]):
        close = torch.isclose(a.float(), b.float(), rtol=2.0**-7, atol=1e-3 * b.float().abs().max().item())
        assert close.float().mean().item() > 0.999, f"{(~close).sum().item()} gradient entries differ"


@requires_tc
@pytest.mark.parametrize("preset", ["paper", "official"])
def test_tc_whole_loss(monkeypatch, preset) -> None:
    """EGMALoss(backend="cuda") with the tensor-core late interaction, bf16: the loss and its
    gradients as with the SIMT kernels."""
    P, S, mask = _flash_features(5, 16, 16, 49, 16, 512, torch.bfloat16)
    heat = torch.rand(16, 16, 7, 7, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    has_gaze = torch.arange(16, device="cuda") % 2 == 0
    inputs = (P, S, mask, heat, has_gaze)
    out_simt, grads_simt = run_loss("cuda", preset, inputs, device="cuda")
    monkeypatch.setenv(cb.CUDA_KERNELS_ENV, "tensor_core")
    out_tc, grads_tc = run_loss("cuda", preset, inputs, device="cuda")
    torch.testing.assert_close(out_tc.total, out_simt.total, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_tc, grads_simt):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3 * b.float().abs().max().item())


@requires_tc
def test_tc_unaligned_views() -> None:
    """P and S starting off a 16-byte boundary (contiguous views with a storage offset) are copied
    for the 16-byte cp.async loads: the ops give the results of aligned copies, bitwise."""
    case = _lowp(make_case("unaligned", 5, 6, 49, 16, 64, mask_kind="scattered", device="cuda"), torch.bfloat16)
    bufP = torch.empty(case.P.numel() + 1, dtype=torch.bfloat16, device="cuda")
    bufS = torch.empty(case.S.numel() + 1, dtype=torch.bfloat16, device="cuda")
    P = bufP[1:].view(case.P.shape).copy_(case.P)
    S = bufS[1:].view(case.S.shape).copy_(case.S)
    assert P.is_contiguous() and P.data_ptr() % 16 != 0 and S.data_ptr() % 16 != 0
    zero_slot = cb.text_zero_slots(case.mask, True)
    g = torch.Generator(device="cuda").manual_seed(0)
    gzI, gzT = torch.randn(5, 6, generator=g, device="cuda"), torch.randn(5, 6, generator=g, device="cuda")
    outs = []
    for p, s in ((P, S), (case.P, case.S)):
        fwd = _ops.late_interaction_tc_fwd(p, s, case.mask, None, zero_slot, True)
        outs.append(fwd + _ops.late_interaction_tc_bwd(gzI, gzT, p, s, case.mask, None, zero_slot, fwd[2], fwd[3]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
