"""The op boundary (egma_fast.ops): every backend gets its arguments checked and normalised in one
place, so bad input gives the same clear error whatever the backend, and every backend computes
from the same canonical arguments (one dtype, bool masks, top-k clipped to the row length)."""
from __future__ import annotations

import os

import pytest
import torch

from egma_fast import loss_terms, ops, reference
from egma_fast.config import EGMAConfig
from egma_fast.ops import CrossMapParams

from op_cases import make_case

BACKENDS = [b for b in ("torch", "cpp", "triton") if b in ops.available_backends()
            and (b != "triton" or os.environ.get("TRITON_INTERPRET") == "1")]


def _li_inputs():
    P = torch.randn(2, 4, 3)
    S = torch.randn(2, 3, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    return P, S, mask


def _cm_inputs():
    P, S, mask = _li_inputs()
    return P, S, mask, torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.bool), torch.zeros(2), torch.tensor(5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_late_interaction_errors_are_the_same_for_every_backend(backend: str) -> None:
    P, S, mask = _li_inputs()
    cases = [
        ((P[0], S, mask), r"P must be a 3-D float16 / bfloat16 / float32 / float64 tensor \[Bi, n, d\]"),
        ((P.long(), S, mask), "P must be a 3-D float16"),
        ((P, S[..., :2], mask), "must share d and device"),
        ((P, S, mask.float()), r"sent_mask must be a bool tensor of shape \[2, 3\]"),  # cpp used to convert it
        ((P, S, mask.to(torch.uint8)), "sent_mask must be a bool tensor"),
        ((P, S, mask, torch.ones(2, 5, dtype=torch.bool)), r"patch_mask must be a bool tensor of shape \[2, 4\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.late_interaction(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_map_errors_are_the_same_for_every_backend(backend: str) -> None:
    P, S, mask, GS, gaze, theta, alpha = _cm_inputs()
    params = CrossMapParams()
    cases = [
        ((P, S[:1], mask[:1], GS[:1], gaze[:1], theta[:1], alpha), "cross_map works on matched pairs"),
        ((P, S, mask, GS[..., :3], gaze, theta, alpha), r"GS must be a float tensor of shape \[2, 3, 4\]"),
        ((P, S, mask, GS, gaze.float(), theta, alpha), r"use_gaze must be a bool tensor of shape \[2\]"),
        ((P, S, mask.int(), GS, gaze, theta, alpha), "sent_mask must be a bool tensor"),
        ((P, S, mask, GS, gaze, theta[:1], alpha), r"theta must be a float tensor of shape \[2\]"),
        ((P, S, mask, GS, gaze, theta, torch.ones(2)), "alpha must be a one-element floating tensor"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.cross_map(*args, params, backend=backend)
    with pytest.raises(ValueError, match="params must be a CrossMapParams"):
        ops.cross_map(P, S, mask, GS, gaze, theta, alpha, {"omega": "topk"}, backend=backend)
    with pytest.raises(ValueError, match="omega must be 'topk' or 'threshold'"):
        CrossMapParams(omega="softmax")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_patches_is_clipped_once_for_every_backend(backend: str) -> None:
    """k_patches beyond n means every patch (as the reference reads it), on every backend."""
    case = make_case("clip", 3, 3, 5, 3, 8, mask_kind="prefix", gaze="some")
    config = EGMAConfig.preset("paper")
    theta = loss_terms.egm_sample_thetas(case.use_gaze, True, config)
    alpha = torch.tensor(6.0)
    big = ops.cross_map(case.P, case.S, case.mask, case.GS, case.use_gaze, theta, alpha,
                        CrossMapParams(k_patches=50), backend=backend)
    exact = reference.cross_map(case.P.double(), case.S.double(), case.mask, case.GS.double(), case.use_gaze, theta,
                                alpha.double(), CrossMapParams(k_patches=5))
    for a, b in zip(big, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_feature_dtypes_run_in_the_wider(backend: str) -> None:
    case = make_case("mixed", 2, 2, 5, 3, 16)
    P = case.P.double().requires_grad_()
    zI, _ = ops.late_interaction(P, case.S, case.mask, backend=backend)
    want, _ = reference.late_interaction(case.P.double(), case.S.double(), case.mask)
    assert zI.dtype == torch.float64
    torch.testing.assert_close(zI, want)
    zI.sum().backward()
    assert P.grad.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_memory_changes_nothing_but_memory(backend: str) -> None:
    case = make_case("lowmem", 3, 4, 6, 3, 8, mask_kind="scattered", ties=True)
    results = []
    for low_memory in (False, True):
        P, S = case.P.clone().requires_grad_(), case.S.clone().requires_grad_()
        zI, zT = ops.late_interaction(P, S, case.mask, pad_as_zero=True, backend=backend, low_memory=low_memory)
        (zI.sum() + 2 * zT.sum()).backward()
        results.append((zI, zT, P.grad, S.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
