"""The CUDA extension's late interaction on the tensor cores against its SIMT kernels and the Triton
backend, on a GPU: forward + backward of ops.late_interaction, bf16, M = 16, d = 512, over
B in {1024, 4096} x n in {49, 196} (the targets of issue 11).

Providers (one row each per (B, n)):
    cuda-tensor_core   backend="cuda", EGMA_FAST_CUDA_KERNELS=tensor_core (csrc/cuda/late_interaction_tc.cu)
    cuda-simt          backend="cuda", the default SIMT kernels (only B <= EGMA_BENCH_SIMT_MAX_B, default
                       1024: they take seconds per step beyond)
    triton             backend="triton", when Triton is installed

``extra_info`` per row, as in bench_triton.py: fwd_ms / bwd_ms / fwd_bwd_ms (medians of CUDA-event
timings, raw samples in *_samples), *_tflops (model FLOPs 2 B^2 n M d forward, twice that backward,
over the median), dense_bf16_tflops (one 8192^3 bf16 matmul in the same run) and
*_fraction_of_dense, peak_bytes and saved_for_backward_bytes (benchmarks/conftest.py), oom.

Run on a GPU machine (skipped without CUDA or without the CUDA kernels in egma_fast._C):
    pytest benchmarks/bench_cuda_tc.py --benchmark-only --benchmark-json=benchmarks/results/cuda_tc_<gpu>.json
Knobs: EGMA_BENCH_B="1024" and EGMA_BENCH_N="49" restrict the grid; EGMA_BENCH_SIMT_MAX_B.
"""
from __future__ import annotations

import gc
import os
import statistics
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from egma_fast import ops
from egma_fast.ops import available_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
M, D = 16, 512
DTYPE = torch.bfloat16


def _grid(name: str, default: list[int]) -> list[int]:
    raw = os.environ.get(name)
    return [int(x) for x in raw.split(",")] if raw else default


GRID_B = _grid("EGMA_BENCH_B", [1024, 4096])
GRID_N = _grid("EGMA_BENCH_N", [49, 196])
SIMT_MAX_B = int(os.environ.get("EGMA_BENCH_SIMT_MAX_B", "1024"))
PROVIDERS = ["cuda-tensor_core", "cuda-simt", "triton"]


def _cuda_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


_DENSE: dict[str, float] = {}


def dense_bf16_tflops() -> float:
    """TFLOP/s of one 8192^3 bf16 matmul on this device (measured once per session)."""
    if "tflops" not in _DENSE:
        a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        ms = statistics.median(_cuda_ms(lambda: a @ b) for _ in range(10))
        _DENSE["tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
        del a, b
    return _DENSE["tflops"]


def _inputs(B: int, n: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    P = F.normalize(torch.randn(B, n, D, generator=g, device=DEV), dim=-1).to(DTYPE)
    S = F.normalize(torch.randn(B, M, D, generator=g, device=DEV), dim=-1).to(DTYPE)
    lengths = torch.randint(1, M + 1, (B,), generator=g, device=DEV)
    mask = torch.arange(M, device=DEV)[None, :] < lengths[:, None]
    return P, S, mask


def _rounds(estimate_ms: float) -> int:
    return 10 if estimate_ms < 200 else 5 if estimate_ms < 2000 else 3


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("n", GRID_N)
@pytest.mark.parametrize("B", GRID_B)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_late_interaction_cuda_tc(benchmark, record, monkeypatch, provider: str, B: int, n: int) -> None:
    backend, _, kernels = provider.partition("-")
    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} unavailable")
    if kernels == "simt" and B > SIMT_MAX_B:
        pytest.skip(f"SIMT kernels only up to B = {SIMT_MAX_B} (EGMA_BENCH_SIMT_MAX_B)")
    if kernels:
        monkeypatch.setenv("EGMA_FAST_CUDA_KERNELS", kernels)
    benchmark.group = f"late_interaction-B{B}-n{n}-M{M}-d{D}-bf16"
    info = benchmark.extra_info
    info.update(target="late_interaction", provider=provider, backend=backend, kernels=kernels or None, B=B, n=n,
                M=M, d=D, dtype="bfloat16", oom=False, dense_bf16_tflops=dense_bf16_tflops())
    _free()
    P0, S0, mask = _inputs(B, n)
    P = P0.clone().requires_grad_()
    S = S0.clone().requires_grad_()

    def forward():
        zI, zT = ops.late_interaction(P, S, mask, pad_as_zero=False, backend=backend)
        return zI.sum() + 0.5 * zT.sum()

    def fwd_bwd():
        P.grad = S.grad = None
        forward().backward()

    used = False
    try:
        fwd_bwd()  # warm-up (compilation, autotuning)
        torch.cuda.synchronize()
        record(fwd_bwd, DEV, target="late_interaction", provider=provider, B=B, n=n, M=M, d=D, dtype=DTYPE)
        rounds = _rounds(_cuda_ms(fwd_bwd))
        fwd = [_cuda_ms(forward) for _ in range(rounds)]
        bwd = []
        for _ in range(rounds):
            P.grad = S.grad = None
            out = forward()
            bwd.append(_cuda_ms(out.backward))
            del out
        both: list[float] = []
        used = True
        benchmark.pedantic(lambda: both.append(_cuda_ms(fwd_bwd)), rounds=rounds, iterations=1, warmup_rounds=0)
    except torch.cuda.OutOfMemoryError as exc:
        info["oom"] = True
        info["oom_message"] = str(exc).splitlines()[0][:300]
        P = S = None
        _free()
        if not used:
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps the row (and the OOM) in the JSON
        return

    u = 2.0 * B * B * n * M * D  # forward model FLOPs; the backward is two GEMMs of the same size
    for name, samples, flops in (("fwd", fwd, u), ("bwd", bwd, 2 * u), ("fwd_bwd", both, 3 * u)):
        ms = statistics.median(samples)
        info[f"{name}_ms"] = ms
        info[f"{name}_samples"] = samples
        info[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
        info[f"{name}_fraction_of_dense"] = info[f"{name}_tflops"] / info["dense_bf16_tflops"]
    del P, S
    _free()
