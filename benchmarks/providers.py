"""Late-interaction implementations the GPU benchmarks put side by side, one setup for all.

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

import importlib
import os
from typing import Callable

import torch

from egma_fast import reference

Tensor = torch.Tensor
CUDA_KERNELS_ENV = "EGMA_FAST_CUDA_KERNELS"  # egma_fast.ops.cpp_backend reads it at every forward
Provider = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


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
