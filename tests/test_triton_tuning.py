"""Launch-config selection (kernels.tuning) without a GPU: the tuner's choice and caching with a
fake timer, and the late-interaction launchers' proxies: tuning runs on a bounded slice of the
call, so the first call at a large batch costs what a small one does (issue: 55 s at B = 4096,
minutes at B = 16384, from autotuning on the full problem)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402

from egma_fast import reference  # noqa: E402
from egma_fast.ops import triton_backend as tb  # noqa: E402
from egma_fast.kernels.tuning import Tuner  # noqa: E402

from op_cases import make_case  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

CONFIGS = [triton.Config({"X": x}, num_warps=4, num_stages=2) for x in (1, 2, 3)]


def test_tuner_picks_fastest_once_per_key_and_skips_failures() -> None:
    cost = {1: 3.0, 2: 1.0, 3: 2.0}
    calls: list[int] = []

    def bench(config):
        calls.append(config.kwargs["X"])
        if config.kwargs["X"] == 2 and len(calls) > 99:
            raise AssertionError("unreachable")

    def timer(fn):
        fn()
        return cost[calls[-1]]

    tuner = Tuner("t", CONFIGS, timer=timer)
    assert tuner.pick("a", bench).kwargs["X"] == 2
    assert calls == [1, 2, 3]
    assert tuner.pick("a", bench).kwargs["X"] == 2 and calls == [1, 2, 3]  # cached: no new timing
    assert [name for name, _ in tuner.timings["a"]] == [str(c) for c in CONFIGS]

    def failing(config):
        if config.kwargs["X"] == 2:
            raise RuntimeError("out of resources: shared memory")
        calls.append(config.kwargs["X"])

    assert tuner.pick("b", failing).kwargs["X"] == 3  # the fastest config that compiles


def test_tuner_reports_when_nothing_compiles() -> None:
    def bench(config):
        raise RuntimeError(f"out of resources ({config.kwargs['X']})")

    with pytest.raises(RuntimeError, match=r"(?s)no launch config compiles for key.*out of resources \(1\)"):
        Tuner("t", CONFIGS, timer=lambda fn: fn() or 1.0).pick("key", bench)


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the GPU tuning path through the interpreter")
def test_late_interaction_tunes_on_a_bounded_proxy(monkeypatch) -> None:
    """Runs the launchers' GPU path (tuning included) under the interpreter, with proxies bounded to
    2 images x 3 texts: every timed launch sees at most that batch, the real call still computes
    the reference's values and gradients, and a second call reuses the choice."""
    li = tb._li
    monkeypatch.setattr(li, "interpreting", lambda: False)
    monkeypatch.setattr(li, "li_blocks", lambda n, M, d, dtype: li.LIBlocks(8, 2, triton.next_power_of_2(M), 16, 1))
    monkeypatch.setattr(li, "PROXY_IMAGES", 2)
    monkeypatch.setattr(li, "PROXY_TEXTS", 3)
    seen: list[tuple[str, int, int]] = []

    def tuner(name, configs):
        def timer(fn):
            fn()
            return float(len(seen))  # the first config wins; what matters is what ran

        return Tuner(name, configs, timer=timer)

    small = [triton.Config(c.kwargs, num_warps=1, num_stages=1) for c in li.FWD_CONFIGS[:2]]
    monkeypatch.setattr(li, "_FWD_TUNER", tuner("fwd", small))
    bwd = [triton.Config({"BLOCK_DO": 32}, num_warps=1, num_stages=s) for s in (1, 2)]
    monkeypatch.setattr(li, "_DP_TUNERS", {mode: tuner("dp", bwd) for mode in li._DP_TUNERS})
    monkeypatch.setattr(li, "_DS_TUNER", tuner("ds", bwd))
    launches = {"fwd": li._li_fwd_kernel, "dp": li._li_bwd_dp_kernel, "ds": li._li_bwd_ds_kernel}
    for name, kernel in launches.items():
        original = kernel.run

        def run(*args, _name=name, _original=original, _names=kernel.arg_names, **kwargs):
            # The batch the launch covers: images (Bi, or the dP grid's first axis) and texts (Bt).
            named = dict(zip(_names, args))
            images = named["Bi"] if "Bi" in named else kwargs["grid"][0]
            seen.append((_name, images, named["Bt"]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    case = make_case("proxy", 5, 7, 6, 3, 16, mask_kind="scattered", device="cpu")
    for _ in range(2):
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        zI, zT = tb.late_interaction(P, S, case.mask, None, True)
        (zI.sum() + 2 * zT.sum()).backward()
    want_P = case.P.clone().requires_grad_()
    want_S = case.S.clone().requires_grad_()
    wI, wT = reference.late_interaction(want_P, want_S, case.mask, pad_as_zero=True)
    (wI.sum() + 2 * wT.sum()).backward()
    torch.testing.assert_close(zI, wI.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(P.grad, want_P.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S.grad, want_S.grad, rtol=1e-5, atol=1e-5)
    # Tuning: 2 configs per kernel on proxies of at most 2 images and 3 texts, once (the second
    # call reuses the choices); then one full-size launch per kernel per call.
    proxy = [s for s in seen if s[1:] != (5, 7)]
    full = [s for s in seen if s not in proxy]
    assert len(proxy) == 6, seen
    assert all(max(s[1:]) <= 3 for s in proxy), proxy
    assert len(full) == 6, full
