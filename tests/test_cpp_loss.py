"""EGMALoss(backend="cpp") against reference.egma_loss (the oracle, with its own glue): the whole
loss, every part and every gradient (features and the logit scale), both presets, with and without
gaze, fp32 and float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from op_cases import run_loss, run_reference_loss
from egma_fast.ops import backend_error

if backend_error("cpp") is not None:
    pytest.skip(f"backend 'cpp' unavailable: {backend_error('cpp')}", allow_module_level=True)


def loss_inputs(B: int, n: int, M: int, d: int, gaze: str, dtype: torch.dtype, seed: int | None = None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    P = F.normalize(torch.randn(B, n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    S = F.normalize(torch.randn(B, M, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    lengths = torch.randint(1, M + 1, (B,), generator=g)
    lengths[0] = M
    lengths[-1] = 1
    mask = torch.arange(M)[None, :] < lengths[:, None]
    heat = torch.rand(B, M, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    has_gaze = torch.rand(B, generator=g) < 0.5
    has_gaze[0] = gaze != "none"
    if gaze == "none":
        has_gaze[:] = False
    return P, S, mask, heat, has_gaze


def run(backend: str, preset: str, inputs, dtype: torch.dtype, **overrides):
    return run_loss(backend, preset, inputs, dtype=dtype, **overrides)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gaze", ["some", "none"])
@pytest.mark.parametrize("preset,overrides", [("paper", {}), ("official", {}), ("official", {"lambda_egm": 1.0})],
                         ids=["paper", "official", "official-egm"])
def test_loss_matches_torch_backend(preset: str, overrides: dict, gaze: str, dtype: torch.dtype) -> None:
    inputs = loss_inputs(B=6, n=9, M=5, d=24, gaze=gaze, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    got, got_grads = run("cpp", preset, inputs, dtype, **overrides)
    want, want_grads = run_reference_loss(preset, inputs, dtype=dtype, **overrides)
    for name in ("total", "loss_c", "loss_mlce", "loss_egm", "loss_clip", "scores_image", "scores_text", "logit_scale"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol, msg=name)
    for name, a, b in zip(("dP", "dS", "dlogit_scale"), got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_auto_backend_loss_is_the_cpp_loss_on_cpu() -> None:
    """backend="auto" on CPU tensors runs the C++ kernels: bitwise the cpp backend's loss."""
    from egma_fast.ops import select_backend

    assert select_backend("auto", torch.device("cpu")).name == "cpp"
    inputs = loss_inputs(B=4, n=4, M=3, d=8, gaze="some", dtype=torch.float32, seed=0)
    got, got_grads = run("auto", "paper", inputs, torch.float32)
    want, want_grads = run("cpp", "paper", inputs, torch.float32)
    assert torch.equal(got.total, want.total)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)
