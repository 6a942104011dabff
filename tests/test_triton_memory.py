"""The Triton backend never allocates the B x B x n x M similarity tensor (late interaction) nor
the B x n x n in-instance logits (cross_map), forward or backward; and what it saves for the
backward is O(B^2 M + B (n + M) d).

Measured without a GPU: every tensor created by aten ops (egma_fast.profiling.PeakMemory, a
TorchDispatchMode) while the kernels' launchers run, and every tensor autograd saves
(saved_tensors_hooks). The same measurement on the reference sees its big tensors, so the test
can fail. Under the interpreter the kernels' own tiles live in numpy, per program.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from egma_fast import reference  # noqa: E402
from egma_fast.config import EGMAConfig  # noqa: E402
from egma_fast.ops import triton_backend as tb  # noqa: E402
from egma_fast.profiling import PeakMemory, count_saved_tensors  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from op_cases import make_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


class LargestNewStorage(TorchDispatchMode):
    """The largest storage (bytes) that aten ops create inside the block, ignoring storages that
    already existed (``existing``): the Triton interpreter re-wraps argument storages as byte views
    when it launches a kernel, which are not allocations."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ptr = t.untyped_storage().data_ptr()
                if ptr != 0 and ptr not in self.existing:
                    self.largest_bytes = max(self.largest_bytes, t.untyped_storage().nbytes())
        return out


def _fwd_bwd(fn, P, S, *args):
    P = P.clone().requires_grad_()
    S = S.clone().requires_grad_()
    out = fn(P, S, *args)
    sum((o * (k + 1)).sum() for k, o in enumerate(out)).backward()


@pytest.mark.parametrize("low_memory", [False, True], ids=["saved", "low_memory"])
@pytest.mark.parametrize("splits", [1, 2])
def test_late_interaction_memory(monkeypatch, splits: int, low_memory: bool) -> None:
    monkeypatch.setattr(tb._li, "FORCE_DS_SPLITS", splits)
    B, n, M, d = 8, 40, 8, 8  # B^2 n M = 20480 dominates B^2 M = 512 and B (n + M) d = 3072
    big = B * B * n * M
    # fp32 elements, plus the 1-byte winners: B^2 M always, B^2 n unless in low-memory mode.
    small = B * B * M + B * (n + M) * d
    winner_bytes = B * B * (M + (0 if low_memory else n))
    case = make_case("mem", B, B, n, M, d, mask_kind="scattered", device=DEVICE)
    smask = case.mask.view(torch.uint8)
    pmask = torch.ones(B, n, dtype=torch.uint8, device=DEVICE)
    zslot = torch.zeros(B, dtype=torch.uint8, device=DEVICE)
    dz = torch.randn(B, B, device=DEVICE)

    # Every tensor the launchers allocate, forward and backward (fp32: 4 bytes per element).
    inputs = (case.P, case.S, smask, pmask, zslot, dz)
    slot_index = None if low_memory else torch.uint8
    with PeakMemory(DEVICE) as pm, LargestNewStorage(*inputs) as largest:
        zI, zT, win_t, win_i = tb._li.late_interaction_forward(case.P, case.S, smask, pmask, zslot, torch.uint8, slot_index)
        dP, dS = tb._li.late_interaction_backward(dz, dz, case.P, case.S, smask, pmask, zslot, win_t, win_i)
    assert largest.largest_bytes < 4 * big / 4, f"largest tensor {largest.largest_bytes} bytes vs B^2 n M = {big} elements"
    bound = 4 * 4 * small + winner_bytes
    assert pm.peak_bytes <= bound, f"peak {pm.peak_bytes} bytes vs 4 x fp32 O(B^2 M + B (n + M) d) + winners = {bound}"
    assert win_t.dtype == torch.uint8 and win_t.shape == (B, B, M)
    assert win_i.shape == ((0,) if low_memory else (B, B, n))

    # What autograd keeps for the backward: the inputs (by reference), masks and the uint8 winners.
    P = case.P.clone().requires_grad_()
    S = case.S.clone().requires_grad_()
    with count_saved_tensors() as saved:
        zI, zT = tb.late_interaction(P, S, case.mask, None, False, low_memory=low_memory)
    assert saved["largest_numel"] < big / 4
    assert saved["bytes"] <= 4 * 2 * small + winner_bytes, f"saved {saved['bytes']} bytes"

    # Through the op and autograd, the whole step stays small too.
    with PeakMemory(DEVICE) as pm_op, LargestNewStorage(case.P, case.S, case.mask) as largest_op:
        _fwd_bwd(lambda p, s: tb.late_interaction(p, s, case.mask, None, False, low_memory=low_memory), case.P, case.S)
    assert largest_op.largest_bytes < 4 * big / 4
    assert pm_op.peak_bytes <= 4 * 4 * small + winner_bytes

    # The same measurement sees the reference's B x B x n x M tensor: the bounds above can fail.
    with PeakMemory(DEVICE) as pm_ref, LargestNewStorage(case.P, case.S, case.mask) as largest_ref:
        _fwd_bwd(lambda p, s: reference.late_interaction(p, s, case.mask), case.P, case.S)
    assert pm_ref.peak_bytes >= 4 * big
    assert largest_ref.largest_bytes >= 4 * big


def test_cross_map_memory() -> None:
    """official preset: the threshold omega keeps the most state (A0, both dA0 buffers)."""
    preset = "official"
    B, n, M, d = 3, 48, 4, 8  # B n n = 6912 (all image-side logits) dominates B n M and B (n + M) d
    big = B * n * n
    small = B * n * M + B * (n + M) * d
    case = make_case("mem", B, B, n, M, d, mask_kind="prefix", gaze="some", device=DEVICE)
    config = EGMAConfig.preset(preset, lambda_egm=1.0)
    params = reference.cross_map_params(config, n)
    theta = reference.egm_sample_thetas(case.use_gaze, True, config)
    alpha = torch.tensor([7.0], device=DEVICE)
    opts = params.replace(with_mlce=True, with_egm=True)  # the launchers take the op's params
    smask = case.mask.view(torch.uint8)
    gaze = case.use_gaze.view(torch.uint8)

    gterms = torch.ones(B, 4, device=DEVICE)
    inputs = (case.P, case.S, smask, case.GS, gaze, theta, alpha, gterms)
    with PeakMemory(DEVICE) as pm, LargestNewStorage(*inputs) as largest:
        terms, a0, lse = tb._cm.cross_map_forward(case.P, case.S, smask, case.GS, gaze, theta, alpha, opts)
        tb._cm.cross_map_backward(gterms, case.P, case.S, smask, case.GS, gaze, theta, alpha, a0, lse, opts)
    assert largest.largest_bytes < 4 * big / 4, f"largest tensor {largest.largest_bytes} bytes vs B n n = {big} elements"
    assert pm.peak_bytes <= 4 * 4 * small

    P = case.P.clone().requires_grad_()
    a = torch.tensor(7.0, device=DEVICE, requires_grad=True)
    with count_saved_tensors() as saved:
        tb.cross_map(P, case.S, case.mask, case.GS, case.use_gaze, theta, a, params)
    assert saved["largest_numel"] < big / 4
    assert saved["bytes"] <= 4 * 2 * small, f"saved {saved['bytes']} bytes"

    a_ref = torch.tensor(7.0, device=DEVICE, requires_grad=True)
    with LargestNewStorage(case.P, case.S, case.mask, case.GS) as largest_ref:
        _fwd_bwd(lambda p, s: reference.cross_map(p, s, case.mask, case.GS, case.use_gaze, theta, a_ref, params),
                 case.P, case.S)
    assert largest_ref.largest_bytes >= 4 * big
