"""Shared random cases for checking a backend of the fused ops against egma_fast.reference.

Every backend test draws fresh inputs from here: odd sizes, masks (prefix and scattered), ties
from duplicated sentences and patches, one-sentence texts, all-masked texts, with and without
gaze, both presets. ``compare_late_interaction`` and ``compare_cross_map`` run a backend and the
reference on the same inputs and compare values and every gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from egma_fast import reference
from egma_fast.config import EGMAConfig
from egma_fast.ops import CrossMapParams


@dataclass
class Case:
    name: str
    P: torch.Tensor  # [Bi, n, d]
    S: torch.Tensor  # [Bt, M, d]
    mask: torch.Tensor  # [Bt, M] bool
    GS: torch.Tensor  # [Bt, M, n]
    use_gaze: torch.Tensor  # [Bt] bool


def _dyadic(x: torch.Tensor, d: int) -> torch.Tensor:
    """Unit-variance-per-dot features rounded to multiples of 1/16 (never an all-zero row)."""
    q = torch.round(x * 4 * d**0.5) / 16
    q[..., 0] = torch.where((q == 0).all(dim=-1), torch.ones_like(q[..., 0]) / 16, q[..., 0])
    return q


def make_case(
    name: str,
    Bi: int,
    Bt: int,
    n: int,
    M: int,
    d: int,
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    mask_kind: str = "prefix",  # prefix | scattered | full | one_sentence | some_empty
    ties: bool = False,
    gaze: str = "some",  # none | some | all
    device: str = "cpu",
) -> Case:
    """Fresh random L2-normalised features (seed=None draws a new seed each call)."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    P = F.normalize(torch.randn(Bi, n, d, generator=g, dtype=torch.float64), dim=-1)
    S = F.normalize(torch.randn(Bt, M, d, generator=g, dtype=torch.float64), dim=-1)
    if ties:
        # Duplicated sentences and patches give exact ties in every max. The features are first
        # rounded to multiples of 1/16 (small integers), so every dot product is a multiple of
        # 1/256 well inside fp32's (and bf16 inputs') exact range: a tie is then exact in every
        # summation order, whatever BLAS, instruction set or kernel computes it.
        P = _dyadic(P, d)
        S = _dyadic(S, d)
        if M > 1:
            S[:, M - 1] = S[:, 0]
        if n > 2:
            P[:, n - 1] = P[:, 1]
        if Bt > 1 and M > 1:
            S[1, 1] = S[0, 0]
    if mask_kind == "full":
        mask = torch.ones(Bt, M, dtype=torch.bool)
    elif mask_kind == "one_sentence":
        mask = torch.zeros(Bt, M, dtype=torch.bool)
        mask[:, 0] = True
    else:
        lengths = torch.randint(1, M + 1, (Bt,), generator=g)
        lengths[0] = M
        if Bt > 1:
            lengths[-1] = 1
        mask = torch.arange(M)[None, :] < lengths[:, None]
        if mask_kind == "scattered":
            perm = torch.stack([torch.randperm(M, generator=g) for _ in range(Bt)])
            mask = torch.gather(mask, 1, perm)
        elif mask_kind == "some_empty":
            mask[Bt // 2] = False
        elif mask_kind != "prefix":
            raise ValueError(mask_kind)
    GS = torch.rand(Bt, M, n, generator=g, dtype=torch.float64)
    GS = torch.where(GS > 0.6, GS, torch.zeros_like(GS))  # sparse, like real pooled gaze
    if gaze == "none":
        use_gaze = torch.zeros(Bt, dtype=torch.bool)
    elif gaze == "all":
        use_gaze = torch.ones(Bt, dtype=torch.bool)
    else:
        use_gaze = torch.rand(Bt, generator=g) < 0.5
        use_gaze[0] = True
        if Bt > 1:
            use_gaze[-1] = False
    to = dict(dtype=dtype, device=device)
    return Case(name, P.to(**to), S.to(**to), mask.to(device), GS.to(**to), use_gaze.to(device))


def standard_cases(dtype: torch.dtype = torch.float32, device: str = "cpu", small: bool = True) -> list[Case]:
    """The case list every backend must pass (small sizes so interpreters stay fast)."""
    sizes = [(3, 3, 5, 4, 7), (2, 3, 9, 3, 16), (4, 4, 4, 5, 33)] if small else [(8, 8, 49, 16, 64), (5, 7, 196, 16, 40)]
    cases = []
    for i, (Bi, Bt, n, M, d) in enumerate(sizes):
        for mask_kind in ("prefix", "scattered"):
            cases.append(make_case(f"{mask_kind}-{i}", Bi, Bt, n, M, d, mask_kind=mask_kind, dtype=dtype, device=device))
    cases.append(make_case("ties", 3, 3, 9, 4, 8, mask_kind="prefix", ties=True, dtype=dtype, device=device))
    cases.append(make_case("one_sentence", 3, 3, 4, 3, 6, mask_kind="one_sentence", dtype=dtype, device=device))
    cases.append(make_case("full_mask_no_gaze", 3, 3, 9, 3, 5, mask_kind="full", gaze="none", dtype=dtype, device=device))
    cases.append(make_case("all_gaze", 2, 2, 4, 2, 3, mask_kind="prefix", gaze="all", dtype=dtype, device=device))
    return cases


def _grads(outputs: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]
    loss = sum((w * o).sum() for w, o in zip(weights, outputs))
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, inputs)]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values {got}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got, want, rtol=rtol, atol=atol), f"{name}: max abs err {err:.3g}\n got {got}\nwant {want}"


def compare_late_interaction(fn, case: Case, pad_as_zero: bool, rtol: float = 1e-5, atol: float = 1e-5, patch_mask=None) -> None:
    """fn has reference.late_interaction's signature; values and grads wrt P and S must match."""
    P1 = case.P.detach().clone().requires_grad_()
    S1 = case.S.detach().clone().requires_grad_()
    P2 = case.P.detach().double().clone().requires_grad_()
    S2 = case.S.detach().double().clone().requires_grad_()
    pm2 = None if patch_mask is None else patch_mask
    got = fn(P1, S1, case.mask, patch_mask, pad_as_zero)
    want = reference.late_interaction(P2, S2, case.mask, pm2, pad_as_zero)
    for name, a, b in zip(("zI", "zT"), got, want):
        assert_close(f"{case.name}/{name}", a, b, rtol, atol)
    seed = 1234
    for name, a, b in zip(("dP", "dS"), _grads(got, (P1, S1), seed), _grads(want, (P2, S2), seed)):
        assert_close(f"{case.name}/{name}", a, b, rtol, atol)


def compare_cross_map(fn, case: Case, config: EGMAConfig, alpha: float = 7.5, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """fn has reference.cross_map's signature; the four per-sample terms and grads wrt P, S, alpha must match."""
    assert case.P.shape[0] == case.S.shape[0], "cross_map works on matched pairs"
    n = case.P.shape[1]
    params = reference.cross_map_params(config, n)
    batch_has_gaze = bool(case.use_gaze.any())
    theta = clear_thetas(case, reference.egm_sample_thetas(case.use_gaze, batch_has_gaze, config), params)
    P1 = case.P.detach().clone().requires_grad_()
    S1 = case.S.detach().clone().requires_grad_()
    a1 = torch.tensor(alpha, dtype=case.P.dtype, device=case.P.device, requires_grad=True)
    P2 = case.P.detach().double().clone().requires_grad_()
    S2 = case.S.detach().double().clone().requires_grad_()
    a2 = torch.tensor(alpha, dtype=torch.float64, device=case.P.device, requires_grad=True)
    got = fn(P1, S1, case.mask, case.GS, case.use_gaze, theta, a1, params)
    want = reference.cross_map(P2, S2, case.mask, case.GS.double(), case.use_gaze, theta, a2, params)
    names = ("mlce_s2p", "mlce_p2s", "egm_image", "egm_text")
    for name, a, b in zip(names, got, want):
        assert_close(f"{case.name}/{config.preset_name}/{name}", a, b, rtol, atol)
    seed = 99
    got_g = _grads(tuple(got), (P1, S1, a1), seed)
    want_g = _grads(tuple(want), (P2, S2, a2), seed)
    for name, a, b in zip(("dP", "dS", "dalpha"), got_g, want_g):
        assert_close(f"{case.name}/{config.preset_name}/{name}", a, b, rtol, atol)


def threshold_margin(case: Case, theta: torch.Tensor, params: CrossMapParams) -> float:
    """Smallest float64 distance between a pre-threshold weight of the threshold omega (SPEC 3.1)
    and its sample's theta: how far the case is from a decision that fp32 and float64 may take
    differently (inf for the top-k omega)."""
    if params.omega != "threshold":
        return float("inf")
    P, S, valid = case.P.double(), case.S.double(), case.mask
    A = torch.einsum("bnd,bmd->bnm", P, S)
    B, n, M = A.shape
    egm_gaze = case.use_gaze & params.egm_use_gaze  # what EGM sees (SPEC 3.2)
    gaze = case.GS.double() * (egm_gaze[:, None, None] & valid[:, :, None])
    g = egm_gaze[:, None, None]
    m = valid.sum(1)
    valid_A = valid[:, None, :].expand(B, n, M)
    a_tilde = reference._minmax_rows(A, valid_A, m[:, None].expand(B, n))
    t_tilde = reference._minmax_rows(A.transpose(1, 2), torch.ones(B, M, n, dtype=torch.bool), torch.full((B, M), n))
    a_pre = torch.where(g, a_tilde + gaze.transpose(1, 2) / 2, a_tilde)
    t_pre = torch.where(g, (t_tilde + gaze) / 2, t_tilde)
    th = theta.double()[:, None, None]
    gaps = [torch.where(valid_A, (a_pre - th).abs(), torch.inf), torch.where(valid[:, :, None], (t_pre - th).abs(), torch.inf)]
    return float(min(gap.min() for gap in gaps))


def clear_thetas(case: Case, theta: torch.Tensor, params: CrossMapParams, margin: float = 1e-6) -> torch.Tensor:
    """theta, nudged upwards by multiples of 1e-4 until no pre-threshold weight of the case lies
    within ``margin`` of it. theta is an input of the op, so the comparison stays exact; the nudge
    matters for exact rational ties (dyadic tie cases can give (x - lo) / (hi - lo) = 2/7 exactly,
    which fp32 and float64 round to different sides of theta)."""
    for step in range(50):
        nudged = theta + step * 1e-4
        if threshold_margin(case, nudged, params) > margin:
            return nudged
    raise RuntimeError(f"{case.name}: no theta near {theta.tolist()} clears every threshold decision")


def cross_map_configs() -> list[EGMAConfig]:
    """Both presets with every term switched on."""
    return [EGMAConfig.preset("paper"), EGMAConfig.preset("official", lambda_egm=1.0)]


#: Each preset with egm_use_gaze the other way round from its default (official's EGM ignores gaze,
#: the paper's adds it; SPEC 3.2), every term on.
EGM_GAZE_CONFIGS = {
    "paper-egm-no-gaze": EGMAConfig.preset("paper", egm_use_gaze=False),
    "official-egm-gaze": EGMAConfig.preset("official", lambda_egm=1.0, egm_use_gaze=True),
}


def late_interaction_cases(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[Case]:
    """standard_cases plus texts whose sentences are all masked (score 0, zero gradient; only the
    op supports them: the public API rejects such texts)."""
    return standard_cases(dtype, device) + [
        make_case("some_empty", 3, 4, 5, 3, 6, mask_kind="some_empty", dtype=dtype, device=device)
    ]


def run_loss(backend: str, preset: str, inputs, *, device: str = "cpu", dtype: torch.dtype | None = None, **overrides):
    """The whole EGMALoss on one backend: (output, (dP, dS, dt)).

    inputs = (P, S, mask, heatmaps, has_gaze); heatmaps are passed only when some sample has gaze.
    """
    from egma_fast import EGMALoss

    P, S, mask, heat, has_gaze = inputs
    loss_fn = EGMALoss(preset, backend=backend, distributed=False, **overrides).to(device)
    if dtype is not None:
        loss_fn = loss_fn.to(dtype)
    P = P.clone().requires_grad_()
    S = S.clone().requires_grad_()
    kwargs = dict(gaze_heatmaps=heat, has_gaze=has_gaze) if bool(has_gaze.any()) else {}
    out = loss_fn(P, S, mask, **kwargs)
    out.total.backward()
    return out, (P.grad, S.grad, loss_fn.logit_scale.grad)


def run_reference_loss(preset: str, inputs, *, dtype: torch.dtype | None = None, **overrides):
    """reference.egma_loss on run_loss's inputs, with the oracle's own glue (pooling, regimes,
    combination, total): (output, (dP, dS, dt)). A backend's EGMALoss matching it checks
    egma_fast.loss_terms too."""
    P, S, mask, heat, has_gaze = inputs
    config = EGMAConfig.preset(preset, **overrides)
    dtype = dtype or P.dtype
    P = P.to(dtype).clone().requires_grad_()
    S = S.to(dtype).clone().requires_grad_()
    # EGMALoss's parameter: created in float32, then cast with the module.
    t = torch.full((1,), config.logit_scale_init).to(P.device, dtype).requires_grad_()
    gaze = bool(has_gaze.any())
    GS = reference.pool_gaze(heat.to(dtype), P.shape[1], config.gaze_pool) if gaze else None
    out = reference.egma_loss(P, S, mask, t, config, GS, has_gaze if gaze else None)
    out.total.backward()
    return out, (P.grad, S.grad, t.grad)


def assert_late_interaction_deterministic(fn, case: Case) -> None:
    """Two runs of fn (reference.late_interaction's signature) give bitwise-equal scores and
    gradients: the fused backends promise no atomics."""
    runs = []
    for _ in range(2):
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        zI, zT = fn(P, S, case.mask)
        (zI.square().sum() + zT.sum()).backward()
        runs.append((zI, zT, P.grad, S.grad))
    for name, a, b in zip(("zI", "zT", "dP", "dS"), *runs):
        assert torch.equal(a, b), f"{case.name}: {name} differs between two identical runs"


def grads_from_winners(P: torch.Tensor, S: torch.Tensor, sent_mask: torch.Tensor, patch_mask: torch.Tensor,
                       dzI: torch.Tensor, dzT: torch.Tensor, win_patch: torch.Tensor, win_slot: torch.Tensor,
                       images: torch.Tensor | None = None, texts: torch.Tensor | None = None):
    """dP and dS (float64) of sum(dzI * zI + dzT * zT) at the given winners, computed independently of
    any kernel: the one-hot weights dzI[k, l] / n_valid[k] at each valid patch's winning slot
    (win_slot [Bi, Bt, n]; a value >= M means the zero slot won) and dzT[k, l] / m_l at each valid
    slot's winning patch (win_patch [Bi, Bt, M]), multiplied by S and P. Exact given the winners, so
    it is a float64 truth for a backward even at sizes where near-ties make a clear-margin input
    impossible. ``images`` / ``texts``: the rows of dP / dS to compute (default: all)."""
    P64, S64 = P.double(), S.double()
    Bi, n, _ = P.shape
    Bt, M, _ = S.shape
    images = torch.arange(Bi, device=P.device) if images is None else images
    texts = torch.arange(Bt, device=P.device) if texts is None else texts
    m = sent_mask.sum(1).clamp_min(1).double()  # [Bt]
    nv = patch_mask.sum(1).double()  # [Bi]
    has_patch = nv > 0
    c_img = dzI.double() / nv.clamp_min(1)[:, None]  # [Bi, Bt]
    c_txt = dzT.double() / m[None, :]  # [Bi, Bt]
    slot = win_slot.long()  # [Bi, Bt, n]
    real = slot < M
    slot_c = slot.clamp(max=M - 1)
    won = real & torch.gather(sent_mask[None].expand(Bi, Bt, M), 2, slot_c) & patch_mask[:, None, :]
    # dP[k, i] = sum_l c_img[k, l] S[l, slot] + sum_{l, j: win_patch = i} c_txt[k, l] S[l, j]
    dP = torch.zeros(len(images), n, P.shape[2], dtype=torch.float64, device=P.device)
    for r, k in enumerate(images.tolist()):
        w = torch.where(won[k], c_img[k][:, None], torch.zeros((), dtype=torch.float64, device=P.device))  # [Bt, n]
        dP[r] = torch.einsum("li,lid->id", w, S64[torch.arange(Bt, device=P.device)[:, None], slot_c[k]])
        txt = sent_mask & has_patch[k]  # [Bt, M]
        coef = torch.where(txt, c_txt[k][:, None], torch.zeros((), dtype=torch.float64, device=P.device))
        dP[r].index_add_(0, win_patch[k].long().reshape(-1), (coef[:, :, None] * S64).reshape(Bt * M, -1))
    # dS[l, j] = sum_k c_txt[k, l] P[k, win_patch] + sum_{k, i: slot = j} c_img[k, l] P[k, i]
    dS = torch.zeros(len(texts), M, S.shape[2], dtype=torch.float64, device=P.device)
    for r, l in enumerate(texts.tolist()):
        coef = torch.where(sent_mask[l][None, :] & has_patch[:, None], c_txt[:, l][:, None],
                           torch.zeros((), dtype=torch.float64, device=P.device))  # [Bi, M]
        rows = P64[torch.arange(Bi, device=P.device)[:, None], win_patch[:, l].long()]  # [Bi, M, d]
        dS[r] = torch.einsum("kj,kjd->jd", coef, rows)
        w = torch.where(won[:, l], c_img[:, l][:, None], torch.zeros((), dtype=torch.float64, device=P.device))  # [Bi, n]
        dS[r].index_add_(0, slot_c[:, l].reshape(-1), (w[:, :, None] * P64).reshape(Bi * n, -1))
    return dP, dS
