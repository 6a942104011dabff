"""The Triton backend's two ops against egma_fast.reference, under the Triton interpreter on CPU
(TRITON_INTERPRET=1, set by conftest.py when there is no GPU) or on a GPU when there is one.

Fresh random fp32 inputs from tests/op_cases.py: odd sizes, prefix and scattered masks, ties,
one-sentence and all-masked texts, rectangular Bi != Bt, with and without gaze, both presets;
values and every gradient. Tolerances are tight enough to catch a wrong index.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from egma_fast import reference  # noqa: E402
from egma_fast.config import EGMAConfig  # noqa: E402
from egma_fast.ops import available_backends, select_backend  # noqa: E402
from egma_fast.ops import triton_backend as tb  # noqa: E402
from egma_fast.ops.arguments import text_zero_slots  # noqa: E402

from op_cases import (  # noqa: E402
    EGM_GAZE_CONFIGS,
    grads_from_winners,
    assert_late_interaction_deterministic,
    Case,
    compare_cross_map,
    compare_late_interaction,
    cross_map_configs,
    late_interaction_cases,
    make_case,
    standard_cases,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

LI_TOL = dict(rtol=1e-5, atol=1e-5)
CM_TOL = dict(rtol=1e-4, atol=1e-4)


def _ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


# ----------------------------------------------------------------------------------------------
# late_interaction
# ----------------------------------------------------------------------------------------------
LI_CASES = late_interaction_cases(device=DEVICE) + [
    make_case("rect-wide", 1, 5, 6, 3, 9, mask_kind="scattered", device=DEVICE),
    make_case("rect-tall", 5, 2, 7, 2, 10, mask_kind="prefix", device=DEVICE),
    make_case("ties-rect", 2, 4, 9, 5, 8, mask_kind="scattered", ties=True, device=DEVICE),
    make_case("M1", 3, 3, 5, 1, 4, mask_kind="full", device=DEVICE),
]


def _low_memory():
    """tb.late_interaction in low-memory mode (image-side winners recomputed in the backward)."""
    return lambda P, S, mask, pmask=None, pad_as_zero=False: tb.late_interaction(P, S, mask, pmask, pad_as_zero,
                                                                                 low_memory=True)


LI_MODES = {"saved": tb.late_interaction, "low_memory": _low_memory()}


@pytest.mark.parametrize("mode", list(LI_MODES))
@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
@pytest.mark.parametrize("case", LI_CASES, ids=_ids(LI_CASES))
def test_late_interaction_matches_reference(case: Case, pad_as_zero: bool, mode: str) -> None:
    compare_late_interaction(LI_MODES[mode], case, pad_as_zero, **LI_TOL)


def test_late_interaction_low_memory_is_bitwise_saved() -> None:
    """Recomputing the image-side winners in the backward gives bitwise the saved winners' gradients
    (the recomputed tiles are the forward's), and saves Bi Bt n bytes less."""
    case = make_case("bitwise", 5, 6, 13, 7, 40, mask_kind="scattered", ties=True, device=DEVICE)
    grads = []
    for fn in LI_MODES.values():
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        zI, zT = fn(P, S, case.mask, None, True)
        g = torch.randn(2, *zI.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        grads.append(torch.autograd.grad((g[0] * zI).sum() + (g[1] * zT).sum(), (P, S)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    pmask = torch.ones(5, 13, dtype=torch.bool, device=DEVICE)
    zslot = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    saved = tb._li_fwd(case.P, case.S, case.mask, pmask, zslot, True)
    low = tb._li_fwd(case.P, case.S, case.mask, pmask, zslot, False)
    assert saved[3].shape == (5, 6, 13) and saved[3].dtype == torch.uint8 and low[3].numel() == 0
    for a, b in zip(saved[:3], low[:3]):
        assert torch.equal(a, b)


def test_backward_equals_the_gradient_at_its_winners() -> None:
    """The backward is exactly the one-hot-weight gradient at the forward's saved winners
    (op_cases.grads_from_winners, the float64 truth the GPU tests use at sizes where no input
    without near-ties exists), in both winner modes, with zero slots and masked patches."""
    case = make_case("winners", 5, 7, 9, 4, 16, mask_kind="scattered", device=DEVICE)
    pmask = torch.rand(5, 9, device=DEVICE) < 0.8
    pmask[1] = False
    zslot = text_zero_slots(case.mask, True)
    zI, zT, win_t, win_i = tb._li_fwd(case.P, case.S, case.mask, pmask, zslot, True)
    dz = torch.randn(2, 5, 7, device=DEVICE)
    want = grads_from_winners(case.P, case.S, case.mask, pmask, dz[0], dz[1], win_t, win_i)
    for slots in (win_i, win_i.new_empty(0)):
        got = tb._li_bwd(dz[0], dz[1], case.P, case.S, case.mask, pmask, zslot, win_t, slots)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([4, 0], device=DEVICE)
    part = grads_from_winners(case.P, case.S, case.mask, pmask, dz[0], dz[1], win_t, win_i, images=rows, texts=rows)
    torch.testing.assert_close(part[0], want[0][rows])
    torch.testing.assert_close(part[1], want[1][rows])


def test_custom_ops_accept_strided_views() -> None:
    """The custom ops called directly with non-contiguous views (torch.compile may hand them any
    layout) compute what they compute on dense copies."""
    case = make_case("strided", 3, 4, 6, 3, 8, mask_kind="scattered", device=DEVICE)
    pmask = torch.ones(3, 6, dtype=torch.bool, device=DEVICE)
    zslot = text_zero_slots(case.mask, True)
    P_t = case.P.transpose(1, 2).contiguous().transpose(1, 2)  # same values, d-major storage
    S_t = case.S.transpose(1, 2).contiguous().transpose(1, 2)
    mask_t = case.mask.t().contiguous().t()
    dense = tb._li_fwd(case.P, case.S, case.mask, pmask, zslot, True)
    strided = tb._li_fwd(P_t, S_t, mask_t, pmask, zslot, True)
    for a, b in zip(dense, strided):
        assert torch.equal(a, b)
    dz = torch.randn(2, 3, 4, device=DEVICE)
    want = tb._li_bwd(dz[0], dz[1], case.P, case.S, case.mask, pmask, zslot, dense[2], dense[3])
    got = tb._li_bwd(dz[0].t().contiguous().t(), dz[1], P_t, S_t, mask_t, pmask, zslot, dense[2], dense[3])
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_late_interaction_saved_winners() -> None:
    """The saved winners are what the reference's maxima pick: the first maximising patch per slot,
    the first maximising slot per patch, and M where a shorter text's zero slot wins."""
    P = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], device=DEVICE)  # [1, 3, 2]
    S = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],   # duplicated first slots: ties
                      [[-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]], device=DEVICE)  # one sentence, negative
    mask = torch.tensor([[True, True, True], [True, False, False]], device=DEVICE)
    zslot = torch.tensor([False, True], device=DEVICE)
    pmask = torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    _, _, win_t, win_i = tb._li_fwd(P, S, mask, pmask, zslot, True)
    assert win_t[0, 0].tolist() == [0, 0, 1]  # slot 2 = e2 is won by patch 1
    assert win_i[0, 0].tolist() == [0, 2, 2]  # patch 0 ties on slots 0 and 1: the first wins
    # Text 1: patch 0 and 1 score -1 (< 0: the zero slot wins, stored as M = 3), patch 2 scores +1.
    assert win_i[0, 1].tolist() == [3, 3, 0]


def test_late_interaction_index_dtypes() -> None:
    """M >= 256 slots (int16 slot winners, M as the none marker) and n > 255 patches (int16)."""
    case = make_case("M300", 2, 2, 3, 300, 4, mask_kind="scattered", device=DEVICE)
    pmask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    _, _, win_t, win_i = tb._li_fwd(case.P, case.S, case.mask, pmask, torch.ones(2, dtype=torch.bool, device=DEVICE), True)
    assert win_t.dtype == torch.uint8 and win_i.dtype == torch.int16
    assert int(win_i.max()) <= 300
    compare_late_interaction(tb.late_interaction, case, True, **LI_TOL)


@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
def test_late_interaction_patch_mask(pad_as_zero: bool) -> None:
    """Masked patches never count; an image with no valid patch scores 0 with zero gradient."""
    case = make_case("patch_mask", 4, 3, 7, 3, 6, mask_kind="scattered", device=DEVICE)
    pmask = torch.rand(4, 7, device=DEVICE) < 0.6
    pmask[0] = True
    pmask[1] = False
    pmask[2, 0] = False
    pmask[2, 3] = True
    for fn in LI_MODES.values():
        compare_late_interaction(fn, case, pad_as_zero, patch_mask=pmask, **LI_TOL)


@pytest.mark.parametrize("splits,pad_as_zero", [(2, True), (3, False)])
def test_late_interaction_ds_image_splits(monkeypatch, splits: int, pad_as_zero: bool) -> None:
    """The dS kernel's split-over-images path (used when there are few texts) sums to the same."""
    monkeypatch.setattr(tb._li, "FORCE_DS_SPLITS", splits)
    case = make_case("splits", 5, 3, 6, 3, 10, mask_kind="scattered", ties=True, device=DEVICE)
    for fn in LI_MODES.values():
        compare_late_interaction(fn, case, pad_as_zero, **LI_TOL)


def test_late_interaction_int16_winners() -> None:
    """n > 255 stores the winning patch as int16; indices above 255 must survive."""
    case = make_case("n300", 2, 2, 300, 2, 3, mask_kind="full", device=DEVICE)
    # Make a late patch the clear winner of every sentence.
    case.P[:, 290] = case.S[0, 0]
    case.P[:, 297] = case.S[1, 1]
    no_slot = torch.zeros(2, dtype=torch.bool, device=DEVICE)
    _, _, win, _ = tb._li_fwd(case.P, case.S, case.mask, torch.ones(2, 300, dtype=torch.bool, device=DEVICE), no_slot, True)
    assert win.dtype == torch.int16
    assert int(win[0, 0, 0]) == 290 and int(win[1, 1, 1]) == 297
    compare_late_interaction(tb.late_interaction, case, False, **LI_TOL)


def _exact_tie_inputs():
    """Hand-built exact ties: duplicated sentences, duplicated patches across patch chunks, and a
    valid sentence scoring exactly 0 next to a masked slot (the pad_as_zero tie rule)."""
    d = 6
    e = torch.eye(d, device=DEVICE)
    # image 0: 9 patches spanning e0..e2; patch 8 duplicates patch 1 (different chunk).
    P = torch.stack([e[i % 3] * (1.0 + i / 10) for i in range(9)])
    P[8] = P[1]
    P = torch.stack([P, P.flip(0)])  # [2, 9, d]
    S = torch.zeros(3, 4, d, device=DEVICE)
    S[0, 0] = e[0]
    S[0, 2] = e[0]  # duplicate sentence: ties in every patch's max
    S[0, 1] = e[1]
    S[1, 0] = e[5]  # masked slot before ...
    S[1, 1] = e[4]  # ... a valid sentence orthogonal to every patch: scores exactly 0
    S[1, 2] = e[2]
    S[2, 0] = e[4]  # valid, scores 0, before a masked slot
    S[2, 3] = e[1]
    mask = torch.tensor([[True, True, True, False], [False, True, True, False], [True, False, False, True]], device=DEVICE)
    return P, S, mask


@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
def test_late_interaction_exact_ties_first_index(pad_as_zero: bool) -> None:
    P, S, mask = _exact_tie_inputs()
    case = Case("exact_ties", P, S, mask, torch.zeros(3, 4, 9, device=DEVICE), torch.zeros(3, dtype=torch.bool, device=DEVICE))
    for fn in LI_MODES.values():
        compare_late_interaction(fn, case, pad_as_zero, **LI_TOL)


def test_late_interaction_deterministic() -> None:
    case = make_case("det", 3, 4, 9, 3, 12, mask_kind="scattered", device=DEVICE)
    assert_late_interaction_deterministic(tb.late_interaction, case)


# ----------------------------------------------------------------------------------------------
# cross_map
# ----------------------------------------------------------------------------------------------
CM_CASES = [c for c in standard_cases(device=DEVICE) if c.P.shape[0] == c.S.shape[0]] + [
    make_case("n49", 2, 2, 49, 5, 16, mask_kind="scattered", gaze="all", device=DEVICE),
    make_case("ties-some", 3, 3, 9, 4, 8, mask_kind="scattered", ties=True, gaze="some", device=DEVICE),
]
CONFIGS = [*cross_map_configs(), *EGM_GAZE_CONFIGS.values()]


@pytest.mark.parametrize("config", CONFIGS, ids=["paper", "official", *EGM_GAZE_CONFIGS])
@pytest.mark.parametrize("case", CM_CASES, ids=_ids(CM_CASES))
def test_cross_map_matches_reference(case: Case, config: EGMAConfig) -> None:
    compare_cross_map(tb.cross_map, case, config, **CM_TOL)


# Every option the presets do not cover on their own.
VARIANTS = {
    "paper-mse": EGMAConfig.preset("paper", egm_single_sentence="mse"),
    "official-drop": EGMAConfig.preset("official", lambda_egm=1.0, egm_single_sentence="drop"),
    "paper-k2-k3": EGMAConfig.preset("paper", egm_topk_sentences=2, egm_topk_patches=3),
    "paper-kbig": EGMAConfig.preset("paper", egm_topk_sentences=9, egm_topk_patches=50),
    "paper-tau": EGMAConfig.preset("paper", gaze_threshold=0.75),
    "official-mlce-only": EGMAConfig.preset("official", lambda_egm=0.0),
    "paper-egm-only": EGMAConfig.preset("paper", lambda_mlce=0.0),
    "official-floor": EGMAConfig.preset("official", lambda_egm=1.0, egm_floor=0.05),
    "official-egm-gaze-mse": EGMAConfig.preset("official", lambda_egm=1.0, egm_use_gaze=True),
    "paper-egm-no-gaze-mse": EGMAConfig.preset("paper", egm_use_gaze=False, egm_single_sentence="mse"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cross_map_options(name: str) -> None:
    config = VARIANTS[name]
    for case in (
        make_case("var", 3, 3, 7, 4, 10, mask_kind="scattered", gaze="some", ties=True, device=DEVICE),
        make_case("var1", 2, 2, 5, 3, 6, mask_kind="one_sentence", gaze="some", device=DEVICE),
    ):
        compare_cross_map(tb.cross_map, case, config, **CM_TOL)


def test_cross_map_everything_off() -> None:
    """with_mlce and with_egm both off: zeros and zero gradients (the reference returns constants)."""
    case = make_case("off", 2, 2, 5, 3, 4, device=DEVICE)
    config = EGMAConfig.preset("paper", lambda_mlce=0.0, lambda_egm=0.0)
    P = case.P.clone().requires_grad_()
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)
    alpha = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    terms = tb.cross_map(P, case.S, case.mask, case.GS, case.use_gaze, theta, alpha, reference.cross_map_params(config, 5))
    assert all(torch.equal(t, torch.zeros(2, device=DEVICE)) for t in terms)
    sum(t.sum() for t in terms).backward()
    assert torch.equal(P.grad, torch.zeros_like(P)) and alpha.grad == 0


def test_cross_map_no_gaze_batch_regime() -> None:
    """official with a batch without gaze (theta = 2/7 for everyone) and alpha != 7.5."""
    case = make_case("nogaze", 3, 3, 9, 4, 7, mask_kind="prefix", gaze="none", device=DEVICE)
    compare_cross_map(tb.cross_map, case, EGMAConfig.preset("official", lambda_egm=1.0), alpha=20.0, **CM_TOL)
    compare_cross_map(tb.cross_map, case, EGMAConfig.preset("paper"), alpha=1.5, **CM_TOL)


def test_cross_map_flat_rows() -> None:
    """Rows whose min-max range is zero (the 1/count rule): identical sentences and patches."""
    case = make_case("flat", 2, 2, 5, 3, 4, mask_kind="full", gaze="none", device=DEVICE)
    case.S[0, 1] = case.S[0, 0]
    case.S[0, 2] = case.S[0, 0]  # every row of A over sentences is flat for instance 0
    case.P[1] = case.P[1, 0]  # every row of T over patches is flat for instance 1
    compare_cross_map(tb.cross_map, case, EGMAConfig.preset("official", lambda_egm=1.0), **CM_TOL)


# ----------------------------------------------------------------------------------------------
# Entry points: registry, validation, float64 fallback, torch.library registration
# ----------------------------------------------------------------------------------------------
def test_registered_backend() -> None:
    assert "triton" in available_backends()
    backend = select_backend("triton", torch.device(DEVICE))
    assert backend.late_interaction is tb.late_interaction and backend.cross_map is tb.cross_map
    assert backend.auto_priority == {"cuda": 20}
    assert not backend.supports(torch.device("meta"))


def test_float64_goes_to_reference() -> None:
    case = make_case("f64", 2, 3, 5, 3, 4, dtype=torch.float64, device=DEVICE)
    got = tb.late_interaction(case.P, case.S, case.mask)
    want = reference.late_interaction(case.P, case.S, case.mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_cpu_16bit_inputs_run_in_fp32() -> None:
    """Under the interpreter (CPU), bf16 inputs are computed in fp32; gradients come back in bf16."""
    if DEVICE != "cpu":
        pytest.skip("CPU (interpreter) behaviour")
    case = make_case("bf16cpu", 2, 3, 5, 3, 4, device=DEVICE)
    P = case.P.bfloat16().requires_grad_()
    zI, zT = tb.late_interaction(P, case.S.bfloat16(), case.mask)
    want, _ = reference.late_interaction(P.detach().double(), case.S.bfloat16().double(), case.mask)
    torch.testing.assert_close(zI.double(), want, rtol=1e-5, atol=1e-5)
    zI.sum().backward()
    assert P.grad.dtype == torch.bfloat16


@pytest.mark.gpu
def test_mixed_feature_dtypes_promote() -> None:
    """P and S of different float dtypes run in the wider one (here fp32 x fp32 after the cast)."""
    case = make_case("mixed", 2, 2, 5, 3, 16, device=DEVICE)
    zI, _ = tb.late_interaction(case.P, case.S.bfloat16(), case.mask)
    want, _ = reference.late_interaction(case.P.double(), case.S.bfloat16().double(), case.mask)
    torch.testing.assert_close(zI.double(), want, rtol=1e-5, atol=1e-5)


def test_opcheck_late_interaction() -> None:
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT
    dispatch (what torch.compile relies on)."""
    case = make_case("opcheck", 2, 3, 5, 3, 4, mask_kind="scattered", device=DEVICE)
    P = case.P.clone().requires_grad_()
    S = case.S.clone().requires_grad_()
    pmask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    zslot = torch.tensor([True, False, True], device=DEVICE)
    for save in (True, False):
        torch.library.opcheck(torch.ops.egma_fast.triton_late_interaction_fwd.default, (P, S, case.mask, pmask, zslot, save))


def test_opcheck_cross_map() -> None:
    case = make_case("opcheck", 2, 2, 5, 3, 4, mask_kind="prefix", gaze="some", device=DEVICE)
    P = case.P.clone().requires_grad_()
    S = case.S.clone().requires_grad_()
    alpha = torch.tensor([6.0], device=DEVICE, requires_grad=True)
    theta = torch.full((2,), 2 / 7, device=DEVICE)
    for omega in ("topk", "threshold"):
        params = reference.CrossMapParams(omega=omega, k_patches=2, single_sentence="mse")
        args = (P, S, case.mask, case.GS, case.use_gaze, theta, alpha, *params.op_args())
        torch.library.opcheck(torch.ops.egma_fast.triton_cross_map_fwd.default, args)


def test_cross_map_schema_options_are_crossmapparams() -> None:
    """The Triton ops declare exactly CrossMapParams.OP_SCHEMA's options."""
    want = [tuple(reversed(item.strip().split(" "))) for item in reference.CrossMapParams.OP_SCHEMA.split(",")]
    for op in (torch.ops.egma_fast.triton_cross_map_fwd, torch.ops.egma_fast.triton_cross_map_bwd):
        args = op.default._schema.arguments
        assert [(a.name, str(a.type)) for a in args if str(a.type) != "Tensor"] == want


@pytest.mark.parametrize("M", [2048, 4096])
def test_cross_map_too_many_slots_is_rejected_up_front(M: int) -> None:
    """One program holds an instance's M x M tile: beyond Triton's largest tensor the backend says
    so, naming the limit, before any kernel runs (it used to fail inside kernels/cross_map.py)."""
    case = make_case("wideM", 1, 1, 4, 3, 4, mask_kind="prefix", device=DEVICE)
    S = torch.nn.functional.pad(case.S, (0, 0, 0, M - 3))
    mask = torch.nn.functional.pad(case.mask, (0, M - 3))
    GS = torch.zeros(1, M, 4, device=DEVICE)
    params = reference.CrossMapParams()
    with pytest.raises(ValueError, match=r"backend='triton' cross_map supports at most M = 1024 sentence slots for n = 4"):
        tb.cross_map(case.P, S, mask, GS, case.use_gaze, torch.zeros(1, device=DEVICE), torch.tensor(2.0), params)
    assert tb._cm.max_slots(4) == 1024 and tb._cm.max_slots(196) == 1024
    tb._cm.check_sizes(196, 1024)  # the largest accepted size passes


def test_compiles_without_graph_breaks() -> None:
    """torch.compile(fullgraph=True) traces through both ops (fake implementations) and matches eager."""
    case = make_case("compile", 3, 3, 5, 3, 4, mask_kind="prefix", gaze="some", device=DEVICE)
    config = EGMAConfig.preset("official", lambda_egm=1.0)
    params = reference.cross_map_params(config, 5)
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)

    def fn(P, S, alpha):
        zI, zT = tb.late_interaction(P, S, case.mask, None, True)
        terms = tb.cross_map(P, S, case.mask, case.GS, case.use_gaze, theta, alpha, params)
        return F.cross_entropy(alpha * zI, torch.arange(3, device=P.device)) + zT.sum() + sum(t.sum() for t in terms)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    results = []
    for f in (fn, compiled):
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        alpha = torch.tensor(7.0, device=DEVICE, requires_grad=True)
        loss = f(P, S, alpha)
        loss.backward()
        results.append((loss.detach(), P.grad, S.grad, alpha.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_interpreter_numpy_incompatibility_is_reported_plainly() -> None:
    """Triton <= 3.6's interpreter cannot run under numpy >= 2.4: the backend says so and how to fix
    it, instead of failing inside the first kernel loop."""
    import subprocess
    import sys

    code = (
        "import numpy, triton\n"
        "triton.__version__, numpy.__version__ = '3.6.0', '2.4.1'\n"
        "from egma_fast.ops import backend_error, select_backend\n"
        "import torch\n"
        "try:\n"
        "    select_backend('triton', torch.device('cpu'))\n"
        "except ValueError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR backend 'triton' is unavailable" in proc.stdout, proc.stdout
    assert "numpy<2.4 or triton>=3.7" in proc.stdout


# ----------------------------------------------------------------------------------------------
# The backward's 16-bit weight modes, run by the interpreter (numpy has fp16, not bf16)
# ----------------------------------------------------------------------------------------------
def _winners_then_grads(P, S, mask, upstream: float):
    """zI, zT and the gradients of upstream * (weighted sum) through the custom ops directly (the
    backend function would upcast 16-bit CPU inputs to fp32)."""
    P = P.clone().requires_grad_()
    S = S.clone().requires_grad_()
    pmask = torch.ones(P.shape[:2], dtype=torch.bool, device=DEVICE)
    zslot = torch.zeros(S.shape[0], dtype=torch.bool, device=DEVICE)
    zI, zT, _, _ = tb._li_fwd(P, S, mask, pmask, zslot, True)
    g = torch.randn(2, *zI.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    dP, dS = torch.autograd.grad(upstream * ((g[0] * zI).sum() + (g[1] * zT).sum()), (P, S))
    return zI, zT, dP, dS, g


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter coverage; the GPU tests run the real dtypes")
@pytest.mark.parametrize("upstream", [1.0, 1e-3, 3e3], ids=["unit", "small", "large"])
def test_weight_mode_fp16_split(upstream: float) -> None:
    """fp16 features: W scaled by a power of two and split into fp16 hi + lo. Gradients match the
    float64 reference to fp16 output precision across upstream magnitudes (W's entries go down to
    ~1e-5, fp16 subnormals, in the small case: the scale keeps their 11 bits)."""
    case = make_case("fp16", 3, 4, 9, 5, 24, mask_kind="scattered", device=DEVICE)
    P, S = case.P.half(), case.S.half()
    _, _, dP, dS, g = _winners_then_grads(P, S, case.mask, upstream)
    assert dP.dtype == torch.float16
    P64, S64 = P.double().requires_grad_(), S.double().requires_grad_()
    zI, zT = reference.late_interaction(P64, S64, case.mask)
    want = torch.autograd.grad(upstream * ((g[0].double() * zI).sum() + (g[1].double() * zT).sum()), (P64, S64))
    for got, ref in zip((dP, dS), want):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-3, float(err)  # fp16 output rounding is 2^-11 ~ 5e-4 of an element


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter coverage; the GPU tests run the real dtypes")
def test_weight_mode_fp16_split_keeps_tiny_weights() -> None:
    """dS sums many images' tiny weights (here ~1e-6, fp16 subnormals with ~6% precision unscaled)
    into a representable gradient: the power-of-two scale keeps each weight's 11 bits."""
    g = torch.Generator().manual_seed(0)
    Bi, Bt, n, M, d = 64, 2, 4, 2, 16
    P = (torch.rand(Bi, n, d, generator=g) + 0.5).half()  # positive: the sums add up coherently
    S = (torch.rand(Bt, M, d, generator=g) + 0.5).half()
    mask = torch.ones(Bt, M, dtype=torch.bool)
    P1, S1 = P.clone().requires_grad_(), S.clone().requires_grad_()
    pmask = torch.ones(Bi, n, dtype=torch.bool)
    zI, zT, _, _ = tb._li_fwd(P1, S1, mask, pmask, torch.zeros(Bt, dtype=torch.bool), True)
    (dS,) = torch.autograd.grad(4e-6 * (zI.sum() + zT.sum()), (S1,))
    P64, S64 = P.double(), S.double().requires_grad_()
    wI, wT = reference.late_interaction(P64, S64, mask)
    (want,) = torch.autograd.grad(4e-6 * (wI.sum() + wT.sum()), (S64,))
    assert float(want.abs().min()) > 6.2e-5  # the output itself is a normal fp16 number
    assert float((dS.double() - want).abs().max() / want.abs().max()) < 2e-3


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter coverage; the GPU tests run the real dtypes")
def test_weight_mode_fp16_products_for_bf16(monkeypatch) -> None:
    """The bf16 features' mode (one fp16 product of scaled W and scaled fp16 features), forced on fp32
    inputs: the scales are undone exactly and the gradients match to fp16 precision."""
    monkeypatch.setattr(tb._li, "FORCE_WEIGHT_MODE", tb._li.W_FP16)
    case = make_case("w16", 3, 4, 9, 5, 24, mask_kind="scattered", device=DEVICE)
    for scale in (1.0, 1e-6, 300.0):  # feature scale: the features' power-of-two scale must adapt
        scaled = Case("w16", case.P * scale, case.S * scale, case.mask, case.GS, case.use_gaze)
        compare_late_interaction(tb.late_interaction, scaled, True, rtol=3e-3, atol=3e-3 * scale)
