"""The GPU benchmarks' shared setup (bench_triton.py, gpu/device_check.py): the inputs, CUDA-event
timing, the dense bf16 matmul rate, and the late-interaction implementations put side by side.

Each provider maps (P [B, n, d], S [B, M, d], sent_mask [B, M]) to the two pooled MaxSim directions
of EGMA (SPEC 2.1), zI[k, l] = mean_i max_j <P_ki, S_lj> and zT[k, l] = mean_j max_i <P_ki, S_lj>,
with autograd. The timed objective is zI.sum() + 0.5 * zT.sum() (both directions' gradients).

    triton, triton_low_memory   egma_fast's fused kernels (winners saved / recomputed)
    cuda, cuda_tensor_core      the CUDA extension (when built with CUDA kernels): its SIMT kernels,
                                or its tensor-core kernels (EGMA_FAST_CUDA_KERNELS=tensor_core)
    torch, torch_compile        the reference (materialises B x B x n x M), eager and compiled
    late_interaction_kernels    PyPI late-interaction-kernels' maxsim (ColBERT's sum, /n, /m_l)
    flash_maxsim                PyPI flash-maxsim's flash_maxsim_batched_train (prefix lengths)

The two PyPI kernels are ColBERT scorers: each gives one direction per call, so a provider calls
them twice (patches as queries over sentences; sentences as queries over patches). Where one cannot
express a case (a mask that is not a prefix, pad_as_zero) ``unsupported`` says why.
"""
from __future__ import annotations

import gc
import importlib
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from egma_fast import reference

Tensor = torch.Tensor
M, D = 16, 512  # the benchmark's sentence slots and feature width (the authors' setup)
DTYPE = torch.bfloat16
CUDA_KERNELS_ENV = "EGMA_FAST_CUDA_KERNELS"  # egma_fast.ops.cpp_backend reads it at every forward
Provider = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------------
# Inputs and timing
# ----------------------------------------------------------------------------------------------
def inputs(B: int, n: int, seed: int = 0, device: str = "cuda"):
    """(P [B, n, D], S [B, M, D], mask [B, M], GS [B, M, n], has_gaze [B]): L2-normalised randn
    features in bf16, sentence counts uniform in 1..M (prefix masks), gaze scores on the real
    sentences, 70% of samples with gaze (the method of benchmarks/results/h200_baseline_*.md)."""
    g = torch.Generator(device=device).manual_seed(seed)
    P = F.normalize(torch.randn(B, n, D, generator=g, device=device), dim=-1).to(DTYPE)
    S = F.normalize(torch.randn(B, M, D, generator=g, device=device), dim=-1).to(DTYPE)
    lengths = torch.randint(1, M + 1, (B,), generator=g, device=device)
    mask = torch.arange(M, device=device)[None, :] < lengths[:, None]
    GS = (torch.rand(B, M, n, generator=g, device=device) * mask[:, :, None]).to(DTYPE)
    has_gaze = torch.rand(B, generator=g, device=device) < 0.7
    return P, S, mask, GS, has_gaze


def cuda_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of fn on the GPU, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def free() -> None:
    """Return cached device memory between cases (so each case's peak is its own)."""
    gc.collect()
    torch.cuda.empty_cache()


_DENSE: dict[str, float] = {}


def dense_bf16_tflops() -> float:
    """TFLOP/s of one 8192^3 bf16 matmul on this device (median of 10; measured once per process)."""
    if "tflops" not in _DENSE:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        ms = statistics.median(cuda_ms(lambda: a @ b) for _ in range(10))
        _DENSE["tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return _DENSE["tflops"]


# ----------------------------------------------------------------------------------------------
# The late-interaction providers
# ----------------------------------------------------------------------------------------------
def _backend(backend: str, low_memory: bool = False, cuda_kernels: str | None = None) -> Provider:
    """egma_fast.ops.late_interaction on one backend; ``cuda_kernels`` sets EGMA_FAST_CUDA_KERNELS for
    the forward (which picks the kernels; the backward follows the forward's op)."""
    from egma_fast import ops

    if backend not in ops.available_backends():
        raise ImportError(f"backend {backend!r} is unavailable: {ops.backend_error(backend)}")

    def run(P, S, mask):
        old = os.environ.get(CUDA_KERNELS_ENV)
        if cuda_kernels is not None:
            os.environ[CUDA_KERNELS_ENV] = cuda_kernels
        try:
            return ops.late_interaction(P, S, mask, backend=backend, low_memory=low_memory)
        finally:
            if cuda_kernels is not None:
                if old is None:
                    os.environ.pop(CUDA_KERNELS_ENV, None)
                else:
                    os.environ[CUDA_KERNELS_ENV] = old

    return run


def _torch(compiled: bool) -> Provider:
    fn = lambda P, S, mask: reference.late_interaction(P, S, mask)  # noqa: E731
    return torch.compile(fn) if compiled else fn


def _late_interaction_kernels() -> Provider:
    lik = importlib.import_module("late_interaction_kernels")

    def run(P, S, mask):
        n = P.shape[1]
        m = mask.sum(1).clamp_min(1).to(torch.float32)
        # Patches as queries, sentences as documents: sum over patches of the best sentence.
        zI = lik.maxsim(P, S, None, mask) / n
        # Sentences as queries (masked), patches as documents: [Bt, Bi] -> [Bi, Bt].
        zT = (lik.maxsim(S, P, mask, None) / m[:, None]).t()
        return zI, zT

    return run


def _flash_maxsim() -> Provider:
    fm = importlib.import_module("flash_maxsim")

    def run(P, S, mask):
        n = P.shape[1]
        lengths = mask.sum(1).to(torch.int32)
        m = lengths.clamp_min(1).to(torch.float32)
        zI = fm.flash_maxsim_batched_train(P, S, shared_docs=True, doc_lengths=lengths) / n
        zT = (fm.flash_maxsim_batched_train(S, P, shared_docs=True, query_lengths=lengths) / m[:, None]).t()
        return zI, zT

    return run


_FACTORIES: dict[str, Callable[[], Provider]] = {
    "triton": lambda: _backend("triton"),
    "triton_low_memory": lambda: _backend("triton", low_memory=True),
    "cuda": lambda: _backend("cuda", cuda_kernels="simt"),
    "cuda_tensor_core": lambda: _backend("cuda", cuda_kernels="tensor_core"),
    "torch": lambda: _torch(False),
    "torch_compile": lambda: _torch(True),
    "late_interaction_kernels": _late_interaction_kernels,
    "flash_maxsim": _flash_maxsim,
}
PROVIDERS = tuple(_FACTORIES)


def provider(name: str) -> Provider:
    """The provider function; raises ImportError / ValueError with the reason it is unavailable."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown provider {name!r}; known: {PROVIDERS}")
    return _FACTORIES[name]()


def unsupported(name: str, mask: Tensor, pad_as_zero: bool = False) -> str | None:
    """Why a provider cannot compute this case exactly (None when it can)."""
    if name in ("late_interaction_kernels", "flash_maxsim") and pad_as_zero:
        return f"{name} has no zero-slot padding rule (pad_as_zero)"
    if name == "flash_maxsim":
        prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < mask.sum(1, keepdim=True)
        if not torch.equal(prefix, mask):
            return "flash_maxsim takes lengths: masks must be prefixes"
    return None


def objective(zI: Tensor, zT: Tensor) -> Tensor:
    """The scalar the benchmarks differentiate: both directions' gradients flow."""
    return zI.float().sum() + 0.5 * zT.float().sum()
