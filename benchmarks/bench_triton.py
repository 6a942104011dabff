"""Triton backend vs the torch backend (reference.py) on a GPU: each fused op and the whole loss,
eager and under torch.compile, over B in {256, 1024, 4096, 16384} x n in {49, 196}, M = 16,
d = 512, bf16.

Each row is one (target, backend, compile, B, n); its pytest-benchmark timing is forward + backward
(wall time with a device sync), and ``extra_info`` holds:
    fwd_ms / bwd_ms / fwd_bwd_ms     medians of CUDA-event timings (and the raw samples *_samples)
    *_tflops                         model FLOPs / median time (model FLOPs: the matmul work the
                                     math needs, without the kernels' recomputation)
    dense_bf16_tflops                a dense bf16 matmul measured in the same run, and each
    *_fraction_of_dense              achieved rate as a fraction of it
    peak_bytes                       torch.cuda.max_memory_allocated over one forward + backward
    saved_for_backward_bytes         what autograd keeps between them
    oom                              True where the case ran out of device memory (then no times)

Run on a GPU machine (skipped without CUDA; benchmarks/gpu/device_check.sh runs the priority cases
within a device lease):
    pytest benchmarks/bench_triton.py --benchmark-only --benchmark-json=benchmarks/results/triton_<gpu>.json
Environment knobs (the full grid is long at B = 16384): EGMA_BENCH_B="256,1024" and
EGMA_BENCH_N="49" restrict the grid; EGMA_BENCH_PRESET=official switches the loss/op options.
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Callable

import pytest
import torch

import providers
from egma_fast import EGMALoss, ops, reference
from egma_fast.config import EGMAConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _grid(name: str, default: list[int]) -> list[int]:
    raw = os.environ.get(name)
    return [int(x) for x in raw.split(",")] if raw else default


GRID_B = _grid("EGMA_BENCH_B", [256, 1024, 4096, 16384])
GRID_N = _grid("EGMA_BENCH_N", [49, 196])
M, D, DTYPE = providers.M, providers.D, providers.DTYPE
PRESET = os.environ.get("EGMA_BENCH_PRESET", "paper")
TARGETS = ["late_interaction", "cross_map", "loss"]
DEV = "cuda"


# ----------------------------------------------------------------------------------------------
# Timing and inputs: the shared setup (benchmarks/providers.py)
# ----------------------------------------------------------------------------------------------
_cuda_ms = providers.cuda_ms
dense_bf16_tflops = providers.dense_bf16_tflops


def _rounds(estimate_ms: float) -> int:
    """Fewer rounds for long cases (B = 16384 runs for seconds)."""
    return 10 if estimate_ms < 200 else 5 if estimate_ms < 2000 else 3


# ----------------------------------------------------------------------------------------------
# Cases: each target is a function (P, S) -> scalar objective on fixed masks / gaze
# ----------------------------------------------------------------------------------------------
def _inputs(B: int, n: int, seed: int = 0):
    return providers.inputs(B, n, seed, DEV)


def _objective(target: str, backend: str, B: int, n: int, mask, GS, has_gaze) -> Callable:
    config = EGMAConfig.preset(PRESET, lambda_egm=1.0, check_finite=False)
    if target == "late_interaction":

        def fn(P, S):
            zI, zT = ops.late_interaction(P, S, mask, pad_as_zero=config.pad_as_zero, backend=backend)
            return zI.sum() + 0.5 * zT.sum()

        return fn
    if target == "cross_map":
        params = reference.cross_map_params(config, n)
        theta = reference.egm_sample_thetas(has_gaze, True, config)
        alpha = torch.tensor(math.exp(config.logit_scale_init), device=DEV, requires_grad=True)

        def fn(P, S):
            terms = ops.cross_map(P, S, mask, GS, has_gaze, theta, alpha, params, backend=backend)
            return sum(t.sum() for t in terms)

        return fn
    loss_fn = EGMALoss(config, backend=backend, distributed=False).to(DEV)

    def fn(P, S):
        return loss_fn(P, S, mask, gaze_scores=GS, has_gaze=has_gaze).total

    return fn


def model_flops(target: str, B: int, n: int) -> dict[str, float]:
    """Matmul FLOPs the math needs (forward; backward = the two gradient products)."""
    li = 2.0 * B * B * n * M * D
    cm = 2.0 * B * n * M * D + 2.0 * B * (n * n * M + M * M * n)
    fwd = {"late_interaction": li, "cross_map": cm, "loss": li + cm}[target]
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}


_free = providers.free


def _measure(benchmark, record, forward: Callable[[], torch.Tensor], params: tuple, info: dict, flops: dict) -> None:
    """Warm-up (compilation, launch-config tuning), memory of one step (record), then CUDA-event
    timings of the forward, the backward and the step into ``info``; an out-of-memory case keeps
    its row with the message. ``params``: the leaves whose .grad a step resets."""

    def fwd_bwd():
        for p in params:
            p.grad = None
        forward().backward()

    used = False  # benchmark.pedantic may run once per test
    try:
        fwd_bwd()
        torch.cuda.synchronize()
        record(fwd_bwd, DEV, **{k: info[k] for k in ("target", "backend", "B", "n", "M", "d")}, dtype=DTYPE)
        rounds = _rounds(_cuda_ms(fwd_bwd))
        fwd = [_cuda_ms(forward) for _ in range(rounds)]
        bwd = []
        for _ in range(rounds):
            for p in params:
                p.grad = None
            out = forward()
            bwd.append(_cuda_ms(out.backward))
            del out
        both: list[float] = []
        used = True
        benchmark.pedantic(lambda: both.append(_cuda_ms(fwd_bwd)), rounds=rounds, iterations=1, warmup_rounds=0)
    except torch.cuda.OutOfMemoryError as exc:
        info["oom"] = True
        info["oom_message"] = str(exc).splitlines()[0][:300]
        _free()
        if not used:
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps the row (and the OOM) in the JSON
        return
    for name, samples in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", both)):
        ms = statistics.median(samples)
        info[f"{name}_ms"] = ms
        info[f"{name}_samples"] = samples
        info[f"{name}_tflops"] = flops[name] / (ms * 1e-3) / 1e12
        info[f"{name}_fraction_of_dense"] = info[f"{name}_tflops"] / info["dense_bf16_tflops"]


# ----------------------------------------------------------------------------------------------
# The benchmark: each op and the whole loss, Triton against the reference (eager, compiled)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", GRID_N)
@pytest.mark.parametrize("B", GRID_B)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("target", TARGETS)
def test_triton_vs_torch(benchmark, record, target: str, backend: str, compiled: bool, B: int, n: int) -> None:
    benchmark.group = f"{target}-B{B}-n{n}-M{M}-d{D}-bf16"
    info = benchmark.extra_info
    info.update(target=target, backend=backend, compiled=compiled, B=B, n=n, M=M, d=D, dtype="bfloat16",
                preset=PRESET, oom=False, dense_bf16_tflops=dense_bf16_tflops())
    _free()
    P0, S0, mask, GS, has_gaze = _inputs(B, n)
    fn = _objective(target, backend, B, n, mask, GS, has_gaze)
    if compiled:
        fn = torch.compile(fn)
    P, S = P0.clone().requires_grad_(), S0.clone().requires_grad_()
    _measure(benchmark, record, lambda: fn(P, S), (P, S), info, model_flops(target, B, n))


# ----------------------------------------------------------------------------------------------
# Late interaction across implementations (benchmarks/providers.py, one setup for all): egma_fast's
# Triton kernels (winners saved / low-memory), the CUDA extension (SIMT / tensor cores), and the
# PyPI MaxSim kernels where installed and able to express the case. A provider that cannot run a
# case keeps its row with the reason ("unsupported").
# ----------------------------------------------------------------------------------------------
#: The CUDA extension's SIMT kernels take seconds per step beyond this batch (issue 11's baseline).
SIMT_MAX_B = int(os.environ.get("EGMA_BENCH_SIMT_MAX_B", "1024"))
LI_PROVIDERS = ["triton", "triton_low_memory", "cuda", "cuda_tensor_core", "late_interaction_kernels", "flash_maxsim"]


@pytest.mark.parametrize("n", GRID_N)
@pytest.mark.parametrize("B", GRID_B)
@pytest.mark.parametrize("name", LI_PROVIDERS)
def test_late_interaction_providers(benchmark, record, name: str, B: int, n: int) -> None:
    benchmark.group = f"late_interaction_providers-B{B}-n{n}-M{M}-d{D}-bf16"
    info = benchmark.extra_info
    info.update(target="late_interaction", backend=name, compiled=False, B=B, n=n, M=M, d=D, dtype="bfloat16",
                oom=False, dense_bf16_tflops=dense_bf16_tflops())
    _free()
    P0, S0, mask, _, _ = _inputs(B, n)
    try:
        why = providers.unsupported(name, mask)
        if why is None and name == "cuda" and B > SIMT_MAX_B:
            why = f"the SIMT kernels take seconds per step beyond B = {SIMT_MAX_B} (EGMA_BENCH_SIMT_MAX_B)"
        if why:
            raise NotImplementedError(why)
        fn = providers.provider(name)
    except (ImportError, NotImplementedError, ValueError) as exc:
        info["unsupported"] = f"{type(exc).__name__}: {exc}"[:300]
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    P, S = P0.clone().requires_grad_(), S0.clone().requires_grad_()
    _measure(benchmark, record, lambda: providers.objective(*fn(P, S, mask)), (P, S), info,
             model_flops("late_interaction", B, n))
