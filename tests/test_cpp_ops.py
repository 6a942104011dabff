"""The C++ CPU kernels of egma_fast._C (backend "cpp") against egma_fast.reference.

Fresh random inputs from tests/op_cases.py (odd sizes, prefix and scattered masks, ties,
one-sentence and all-masked texts, rectangular Bi != Bt, with and without gaze, both presets),
fp32 and float64, values and every gradient, on every instruction-set variant this CPU runs
(generic, AVX2, AVX-512) and with the image-side winners saved or recomputed in the backward.
Plus float64 gradcheck, torch.library.opcheck of the four ops, bf16 inputs, determinism and
torch.compile.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from egma_fast import reference
from egma_fast.config import EGMAConfig
from egma_fast.ops import backend_error, select_backend

if backend_error("cpp") is not None:
    pytest.skip(f"backend 'cpp' unavailable: {backend_error('cpp')}", allow_module_level=True)

from egma_fast import _C  # noqa: E402
from egma_fast.ops import cpp_backend as cb  # noqa: E402
from egma_fast.ops.arguments import text_zero_slots  # noqa: E402

from op_cases import (  # noqa: E402
    EGM_GAZE_CONFIGS,
    assert_late_interaction_deterministic,
    Case,
    compare_cross_map,
    compare_late_interaction,
    cross_map_configs,
    late_interaction_cases,
    make_case,
    standard_cases,
)

ops = torch.ops.egma_fast_C
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
CM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=_C.supported_cpu_isas())
def isa(request):
    """Run the test with one instruction-set variant of the kernels, then restore the default."""
    previous = _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)


@pytest.fixture(params=["save", "recompute"])
def winners(request, monkeypatch):
    """Image-side winners saved by the forward, or recomputed from the tiles in the backward."""
    monkeypatch.setitem(cb.SAVE_SENTENCE_ARGMAX_MAX_BYTES, "cpu", 1 << 40 if request.param == "save" else 0)
    return request.param


def _no_zero_slot(case: Case) -> torch.Tensor:
    return text_zero_slots(case.mask, False)


def _ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# late_interaction
# ----------------------------------------------------------------------------------------------
def _li_cases(dtype: torch.dtype) -> list[Case]:
    return late_interaction_cases(dtype) + [
        make_case("rect-wide", 1, 5, 6, 3, 9, mask_kind="scattered", dtype=dtype),
        make_case("rect-tall", 5, 2, 7, 2, 10, mask_kind="prefix", dtype=dtype),
        make_case("ties-rect", 2, 4, 9, 5, 8, mask_kind="scattered", ties=True, dtype=dtype),
        make_case("M1", 3, 3, 5, 1, 4, mask_kind="full", dtype=dtype),
        # Several vector blocks per text, texts spread over several tile chunks, tail rows.
        make_case("wide-M", 3, 9, 19, 37, 21, mask_kind="scattered", dtype=dtype),
        make_case("many-texts", 2, 13, 11, 20, 17, mask_kind="full", ties=True, dtype=dtype),
    ]


@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_late_interaction_matches_reference(isa, winners, dtype, pad_as_zero) -> None:
    for case in _li_cases(dtype):
        compare_late_interaction(cb.late_interaction, case, pad_as_zero, **TOL[dtype])


@pytest.mark.parametrize("pad_as_zero", [False, True], ids=["pad_inf", "pad_zero"])
def test_late_interaction_patch_mask(isa, winners, pad_as_zero) -> None:
    """Masked patches never count; an image with no valid patch scores 0 with zero gradient."""
    case = make_case("patch_mask", 4, 3, 7, 3, 6, mask_kind="scattered")
    pmask = torch.rand(4, 7) < 0.6
    pmask[0] = True
    pmask[1] = False
    pmask[2, 0] = False
    pmask[2, 3] = True
    compare_late_interaction(cb.late_interaction, case, pad_as_zero, patch_mask=pmask, **TOL[torch.float32])


def test_late_interaction_pad_zero_ties() -> None:
    """pad_as_zero: a real sentence scoring exactly 0 ties with a shorter text's zero slot, and the
    real sentence wins (it gets the gradient); below 0 the zero slot wins (no gradient)."""
    P = torch.zeros(2, 3, 4, dtype=torch.float64)
    P[:, :, 0] = 1.0
    S = torch.zeros(3, 3, 4, dtype=torch.float64)
    S[:, :, 1] = 1.0  # every real score is exactly 0
    S[1, 2, 0] = -1.0
    mask = torch.tensor([[False, True, True], [True, False, True], [True, True, True]])
    case = Case("zero_ties", P, S, mask, torch.zeros(3, 3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool))
    for save in (0, 1 << 40):
        cb.SAVE_SENTENCE_ARGMAX_MAX_BYTES["cpu"], old = save, cb.SAVE_SENTENCE_ARGMAX_MAX_BYTES["cpu"]
        try:
            compare_late_interaction(cb.late_interaction, case, True, **TOL[torch.float64])
        finally:
            cb.SAVE_SENTENCE_ARGMAX_MAX_BYTES["cpu"] = old


def test_late_interaction_index_dtypes() -> None:
    """More than 256 patches (int16 winning patch) and more than 256 slots (int16 winning sentence)."""
    for Bi, Bt, n, M in ((2, 2, 300, 3), (2, 2, 5, 260)):
        case = make_case("big", Bi, Bt, n, M, 6, mask_kind="scattered")
        _, _, win, win_sentence = ops.late_interaction_fwd(case.P, case.S, case.mask, None, _no_zero_slot(case), True)
        assert win.dtype == (torch.int16 if n > 256 else torch.uint8)
        assert win_sentence.dtype == (torch.int16 if M > 256 else torch.uint8)
        compare_late_interaction(cb.late_interaction, case, False, **TOL[torch.float32])


def test_late_interaction_saved_state_is_small() -> None:
    """Forward saves O(Bi Bt (M + n)) bytes of winners, never the Bi x Bt x n x M similarities."""
    case = make_case("mem", 6, 5, 49, 16, 32)
    zI, zT, win, win_sentence = ops.late_interaction_fwd(case.P, case.S, case.mask, None, _no_zero_slot(case), True)
    assert win.shape == (6, 5, 16) and win.dtype == torch.uint8
    assert win_sentence.shape == (6, 5, 49) and win_sentence.dtype == torch.uint8
    _, _, _, none = ops.late_interaction_fwd(case.P, case.S, case.mask, None, _no_zero_slot(case), False)
    assert none.numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_late_interaction_16bit(dtype) -> None:
    """16-bit features: fp32 scores, 16-bit gradients, close to the reference on the same values."""
    case = make_case("16bit", 4, 5, 9, 6, 24, mask_kind="scattered", dtype=dtype)
    P = case.P.clone().requires_grad_()
    S = case.S.clone().requires_grad_()
    zI, zT = cb.late_interaction(P, S, case.mask)
    assert zI.dtype == zT.dtype == torch.float32
    (zI.sum() + 2 * zT.sum()).backward()
    assert P.grad.dtype == S.grad.dtype == dtype
    P64 = case.P.double().requires_grad_()
    S64 = case.S.double().requires_grad_()
    rI, rT = reference.late_interaction(P64, S64, case.mask)
    (rI.sum() + 2 * rT.sum()).backward()
    torch.testing.assert_close(zI.double(), rI, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zT.double(), rT, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(P.grad.double(), P64.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(S.grad.double(), S64.grad, rtol=1e-2, atol=1e-2)


def test_non_contiguous_inputs() -> None:
    """Strided views give bitwise the results of their contiguous copies."""

    def strided(t: torch.Tensor) -> torch.Tensor:
        view = torch.stack([t, t], dim=-1)[..., 0]
        assert not view.is_contiguous() and torch.equal(view, t)
        return view

    case = make_case("strided", 4, 3, 6, 5, 10, mask_kind="scattered")
    got = cb.late_interaction(strided(case.P), strided(case.S), strided(case.mask), None, True)
    want = cb.late_interaction(case.P, case.S, case.mask, None, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    cm = make_case("strided_cm", 4, 4, 6, 5, 10, mask_kind="scattered")
    params = reference.cross_map_params(EGMAConfig.preset("official", lambda_egm=1.0), 6)
    theta = torch.full((4,), 0.3)
    got = cb.cross_map(strided(cm.P), strided(cm.S), cm.mask, strided(cm.GS), cm.use_gaze, theta, torch.tensor(3.0),
                       params)
    want = cb.cross_map(cm.P, cm.S, cm.mask, cm.GS, cm.use_gaze, theta, torch.tensor(3.0), params)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_late_interaction_recompute_is_bitwise_saved() -> None:
    """The backward's recomputed tiles give bitwise the forward's winners: identical gradients."""
    case = make_case("bitwise", 5, 6, 13, 7, 40, mask_kind="scattered", ties=True)
    grads = []
    for save in (True, False):
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        zI, zT, win, ws = ops.late_interaction_fwd(P, S, case.mask, None, text_zero_slots(case.mask, True), save)
        g = torch.randn(2, *zI.shape, generator=torch.Generator().manual_seed(3))
        grads.append(torch.autograd.grad((g[0] * zI).sum() + (g[1] * zT).sum(), (P, S)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_late_interaction_deterministic(isa) -> None:
    assert_late_interaction_deterministic(cb.late_interaction, make_case("det", 7, 9, 11, 5, 33, mask_kind="scattered"))


# ----------------------------------------------------------------------------------------------
# cross_map
# ----------------------------------------------------------------------------------------------
def _cm_cases(dtype: torch.dtype) -> list[Case]:
    cases = [c for c in standard_cases(dtype) if c.P.shape[0] == c.S.shape[0]]
    return cases + [
        make_case("some_empty", 4, 4, 5, 3, 6, mask_kind="some_empty", dtype=dtype),
        make_case("wide", 3, 3, 16, 19, 20, mask_kind="scattered", ties=True, dtype=dtype),
    ]


CM_CONFIGS = cross_map_configs() + [
    # m_k = 1 "mse" under top-k, "drop" under the threshold omega, other k, a gaze threshold,
    # and each term alone.
    EGMAConfig.preset("paper", egm_single_sentence="mse", egm_topk_sentences=2, egm_topk_patches=3, gaze_threshold=0.7),
    EGMAConfig.preset("official", lambda_egm=1.0, egm_single_sentence="drop", egm_floor=0.05),
    EGMAConfig.preset("paper", lambda_mlce=0.0),
    EGMAConfig.preset("official", lambda_egm=1.0, lambda_mlce=0.0),
    EGMAConfig.preset("paper", lambda_egm=0.0),
    *EGM_GAZE_CONFIGS.values(),
]
CM_CONFIG_IDS = ["paper", "official-egm", "paper-mse-k", "official-drop", "paper-no-mlce", "official-no-mlce",
                 "mlce-only", *EGM_GAZE_CONFIGS]


@pytest.mark.parametrize("config", CM_CONFIGS, ids=CM_CONFIG_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_cross_map_matches_reference(isa, dtype, config) -> None:
    for case in _cm_cases(dtype):
        compare_cross_map(cb.cross_map, case, config, **CM_TOL[dtype])


@pytest.mark.parametrize("config", [*cross_map_configs(), *EGM_GAZE_CONFIGS.values()],
                         ids=["paper", "official-egm", *EGM_GAZE_CONFIGS])
def test_cross_map_batch_without_gaze(config) -> None:
    """The threshold omega's no-gaze-batch regime (theta 2/7 for every sample)."""
    case = make_case("no_gaze", 4, 4, 9, 4, 12, mask_kind="scattered", gaze="none")
    compare_cross_map(cb.cross_map, case, config, **CM_TOL[torch.float32])


def test_cross_map_bf16() -> None:
    case = make_case("bf16", 4, 4, 9, 5, 16, mask_kind="prefix", dtype=torch.bfloat16)
    config = EGMAConfig.preset("official", lambda_egm=1.0)
    params = reference.cross_map_params(config, 9)
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)
    P = case.P.clone().requires_grad_()
    alpha = torch.tensor(5.0, requires_grad=True)
    got = cb.cross_map(P, case.S, case.mask, case.GS, case.use_gaze, theta, alpha, params)
    want = reference.cross_map(case.P.double(), case.S.double(), case.mask, case.GS.double(), case.use_gaze, theta,
                               torch.tensor(5.0, dtype=torch.float64), params)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    sum(t.sum() for t in got).backward()
    assert P.grad.dtype == torch.bfloat16 and torch.isfinite(P.grad.float()).all()
    assert alpha.grad.dtype == torch.float32


def test_cross_map_deterministic(isa) -> None:
    case = make_case("det", 6, 6, 10, 5, 17, mask_kind="scattered")
    config = EGMAConfig.preset("official", lambda_egm=1.0)
    params = reference.cross_map_params(config, 10)
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)
    runs = []
    for _ in range(2):
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        alpha = torch.tensor(9.0, requires_grad=True)
        terms = cb.cross_map(P, S, case.mask, case.GS, case.use_gaze, theta, alpha, params)
        sum((i + 1) * t.sum() for i, t in enumerate(terms)).backward()
        runs.append((*terms, P.grad, S.grad, alpha.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cross_map_rejects_bad_params() -> None:
    case = make_case("bad", 2, 2, 4, 3, 5)
    theta = torch.zeros(2)
    alpha = torch.tensor(1.0)
    with pytest.raises(ValueError, match="omega"):
        cb.cross_map(case.P, case.S, case.mask, case.GS, case.use_gaze, theta, alpha,
                     dataclasses.replace(reference.CrossMapParams(), omega="nope"))
    with pytest.raises(RuntimeError, match="k_patches must be >= 1"):
        ops.cross_map_fwd(case.P, case.S, case.mask, case.GS, case.use_gaze, theta, alpha,
                          *reference.CrossMapParams().op_args()[:2], 0, *reference.CrossMapParams().op_args()[3:])
    with pytest.raises(RuntimeError, match="GS must be"):
        cb.cross_map(case.P, case.S, case.mask, case.GS[:, :, :2], case.use_gaze, theta, alpha, reference.CrossMapParams())
    with pytest.raises(RuntimeError, match="sent_mask must have shape"):
        cb.late_interaction(case.P, case.S, case.mask[:, :2])


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, dispatch
# ----------------------------------------------------------------------------------------------
def test_gradcheck_late_interaction() -> None:
    case = make_case("gc", 2, 3, 4, 3, 5, mask_kind="scattered", dtype=torch.float64, seed=11)
    pmask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    for pad_as_zero in (False, True):
        fn = lambda P, S: cb.late_interaction(P, S, case.mask, pmask, pad_as_zero)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (case.P.clone().requires_grad_(), case.S.clone().requires_grad_()))


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_gradcheck_cross_map(preset: str) -> None:
    case = make_case("gc", 3, 3, 4, 3, 5, mask_kind="prefix", dtype=torch.float64, seed=5)
    config = EGMAConfig.preset(preset, lambda_egm=1.0)
    params = reference.cross_map_params(config, 4)
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)

    def fn(P, S, alpha):
        return tuple(cb.cross_map(P, S, case.mask, case.GS, case.use_gaze, theta, alpha, params))

    inputs = (case.P.clone().requires_grad_(), case.S.clone().requires_grad_(),
              torch.tensor(3.0, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(fn, inputs)


def _op_samples():
    case = make_case("opcheck", 3, 4, 5, 3, 6, mask_kind="scattered", ties=True)
    P = case.P.clone().requires_grad_()
    S = case.S.clone().requires_grad_()
    pmask = torch.rand(3, 5) < 0.8
    cm = make_case("opcheck_cm", 3, 3, 5, 3, 6, mask_kind="scattered")
    config = EGMAConfig.preset("official", lambda_egm=1.0)
    params = reference.cross_map_params(config, 5).op_args()
    theta = reference.egm_sample_thetas(cm.use_gaze, True, config)
    alpha = torch.tensor(4.0, requires_grad=True)
    cm_inputs = (cm.P.clone().requires_grad_(), cm.S.clone().requires_grad_(), cm.mask, cm.GS, cm.use_gaze, theta,
                 alpha)
    zslot = text_zero_slots(case.mask, True)
    _, _, win, ws = ops.late_interaction_fwd(case.P, case.S, case.mask, pmask, zslot, True)
    g = torch.randn(3, 4)
    return [
        (ops.late_interaction_fwd.default, (P, S, case.mask, pmask, zslot, True)),
        (ops.late_interaction_fwd.default, (P, S, case.mask, None, _no_zero_slot(case), False)),
        (ops.late_interaction_bwd.default, (g, g, case.P, case.S, case.mask, pmask, zslot, win, ws)),
        (ops.cross_map_fwd.default, (*cm_inputs, *params)),
        (ops.cross_map_bwd.default, (*(torch.randn(3) for _ in range(4)), cm.P, cm.S, cm.mask, cm.GS, cm.use_gaze,
                                     theta, alpha.detach(), *params)),
    ]


@pytest.mark.parametrize("index", range(5), ids=["li_fwd", "li_fwd_recompute", "li_bwd", "cm_fwd", "cm_bwd"])
def test_opcheck(index: int) -> None:
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def _schema_options(op) -> list[tuple[str, str]]:
    """(name, type) of an op schema's arguments after its tensors: cross_map's options."""
    args = op.default._schema.arguments
    return [(a.name, str(a.type)) for a in args if str(a.type) not in ("Tensor", "Optional[Tensor]")]


def test_cross_map_schema_options_are_crossmapparams() -> None:
    """csrc/ops.h's option macros and CrossMapParams.OP_SCHEMA / op_args agree: names, types, order."""
    want = [tuple(reversed(item.strip().split(" "))) for item in reference.CrossMapParams.OP_SCHEMA.split(",")]
    want = [(name, {"bool": "bool", "int": "int", "float": "float"}[kind]) for name, kind in want]
    for op in (ops.cross_map_fwd, ops.cross_map_bwd):
        assert _schema_options(op) == want
    values = reference.CrossMapParams(omega="threshold", k_sentences=2, k_patches=3, floor=0.05, single_sentence="mse",
                                      gaze_threshold=0.25, with_mlce=False, with_egm=True, egm_use_gaze=False)
    assert type(values).from_op_args(*values.op_args()) == values
    assert [type(v).__name__ for v in values.op_args()] == [kind for _, kind in want]


def test_fakes_check_shapes() -> None:
    """The fake (meta) implementations state the ops' shape contracts with torch._check: a wrongly
    shaped argument fails while tracing, naming it."""
    case = make_case("fake", 3, 3, 5, 4, 6, mask_kind="scattered")
    params = reference.CrossMapParams().op_args()
    theta, alpha = torch.zeros(3), torch.tensor([2.0])
    zslot = text_zero_slots(case.mask, True)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        P, S, mask, GS, gaze = (mode.from_tensor(t) for t in (case.P, case.S, case.mask, case.GS, case.use_gaze))
        fz, fth, fa = mode.from_tensor(zslot), mode.from_tensor(theta), mode.from_tensor(alpha)
        assert ops.cross_map_fwd(P, S, mask, GS, gaze, fth, fa, *params)[0].shape == (3,)
        with pytest.raises(RuntimeError, match="GS must have shape"):
            ops.cross_map_fwd(P, S, mask, GS[:, :, :4], gaze, fth, fa, *params)
        with pytest.raises(RuntimeError, match="theta must have shape"):
            ops.cross_map_fwd(P, S, mask, GS, gaze, fth[:2], fa, *params)
        with pytest.raises(RuntimeError, match="zero_slot must have shape"):
            ops.late_interaction_fwd(P, S, mask, None, fz[:2], False)
        with pytest.raises(RuntimeError, match="sent_mask must have shape"):
            ops.late_interaction_fwd(P, S, mask[:, :2], None, fz, False)


def test_torch_compile_traces_through_ops() -> None:
    case = make_case("compile", 3, 3, 6, 4, 8, mask_kind="prefix")
    config = EGMAConfig.preset("official", lambda_egm=1.0)
    params = reference.cross_map_params(config, 6)
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)

    def loss(P, S, alpha):
        zI, zT = cb.late_interaction(P, S, case.mask, None, True)
        terms = cb.cross_map(P, S, case.mask, case.GS, case.use_gaze, theta, alpha, params)
        return zI.logsumexp(1).sum() + zT.square().sum() + sum(t.sum() for t in terms)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        alpha = torch.tensor(6.0, requires_grad=True)
        value = fn(P, S, alpha)
        value.backward()
        results.append((value, P.grad, S.grad, alpha.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_auto_backend_on_cpu_is_cpp() -> None:
    assert select_backend("auto", torch.device("cpu")).name == "cpp"
    assert select_backend("cpp", torch.device("cpu")).late_interaction is cb.late_interaction
    with pytest.raises(ValueError, match="does not support"):
        select_backend("cpp", torch.device("meta"))


def test_set_cpu_isa_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown instruction set"):
        _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() in _C.supported_cpu_isas()
