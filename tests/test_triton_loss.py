"""EGMALoss(backend="triton") against reference.egma_loss (the oracle, with its own glue): the whole
loss, every part and every gradient (features and the logit scale), both presets, with and without gaze. Interpreter on CPU
(fp32), or the GPU when there is one."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from op_cases import run_loss, run_reference_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def loss_inputs(B: int, n: int, M: int, d: int, gaze: str, seed: int | None = None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    P = F.normalize(torch.randn(B, n, d, generator=g), dim=-1)
    S = F.normalize(torch.randn(B, M, d, generator=g), dim=-1)
    lengths = torch.randint(1, M + 1, (B,), generator=g)
    lengths[0] = M
    lengths[-1] = 1
    mask = torch.arange(M)[None, :] < lengths[:, None]
    heat = torch.rand(B, M, 8, 8, generator=g)
    has_gaze = torch.rand(B, generator=g) < 0.5
    has_gaze[0] = gaze != "none"
    if gaze == "none":
        has_gaze[:] = False
    to = dict(device=DEVICE)
    return P.to(**to), S.to(**to), mask.to(**to), heat.to(**to), has_gaze.to(**to)


def run(backend: str, preset: str, inputs, **overrides):
    return run_loss(backend, preset, inputs, device=DEVICE, **overrides)


@pytest.mark.parametrize("gaze", ["some", "none"])
@pytest.mark.parametrize("preset,overrides", [("paper", {}), ("official", {}), ("official", {"lambda_egm": 1.0})],
                         ids=["paper", "official", "official-egm"])
def test_loss_matches_torch_backend(preset: str, overrides: dict, gaze: str) -> None:
    inputs = loss_inputs(B=4, n=9, M=4, d=12, gaze=gaze)
    got, got_grads = run("triton", preset, inputs, **overrides)
    want, want_grads = run_reference_loss(preset, inputs, **overrides)
    for name in ("total", "loss_c", "loss_mlce", "loss_egm", "loss_clip", "scores_image", "scores_text", "logit_scale"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(("dP", "dS", "dlogit_scale"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
