"""The opt-in switch of the tensor-core CUDA kernels (EGMA_FAST_CUDA_KERNELS, egma_fast/ops/cpp_backend.py),
checked without a GPU: parsing, and that it changes nothing for CPU tensors or for backend="auto"."""
from __future__ import annotations

import pytest
import torch

from egma_fast import ops
from egma_fast.ops import backend_error

if backend_error("cpp") is not None:
    pytest.skip(f"egma_fast._C unavailable: {backend_error('cpp')}", allow_module_level=True)

from egma_fast.ops import cpp_backend as cb  # noqa: E402
from op_cases import make_case  # noqa: E402


@pytest.mark.parametrize("raw,want", [(None, "simt"), ("", "simt"), ("simt", "simt"), ("tensor_core", "tensor_core"),
                                      (" Tensor_Core ", "tensor_core")])
def test_cuda_kernels_parsing(monkeypatch, raw, want) -> None:
    if raw is None:
        monkeypatch.delenv(cb.CUDA_KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(cb.CUDA_KERNELS_ENV, raw)
    assert cb.cuda_kernels() == want


def test_cuda_kernels_rejects_unknown_values(monkeypatch) -> None:
    monkeypatch.setenv(cb.CUDA_KERNELS_ENV, "wgmma")
    with pytest.raises(ValueError, match="EGMA_FAST_CUDA_KERNELS must be one of simt, tensor_core; got 'wgmma'"):
        cb.cuda_kernels()


def test_tensor_core_ops_exist_exactly_in_cuda_builds() -> None:
    assert cb._HAS_TENSOR_CORE_OPS == cb.WITH_CUDA
    assert hasattr(torch.ops.egma_fast_C, "late_interaction_tc_fwd") == cb.WITH_CUDA


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_option_leaves_cpu_tensors_alone(monkeypatch, backend) -> None:
    """EGMA_FAST_CUDA_KERNELS only selects CUDA kernels: on CPU tensors (the C++ kernels, or
    whatever backend="auto" picks) scores and gradients are bitwise unchanged."""
    case = make_case("opt", 3, 4, 9, 5, 16, seed=1, mask_kind="scattered")

    def run():
        P = case.P.clone().requires_grad_()
        S = case.S.clone().requires_grad_()
        zI, zT = ops.late_interaction(P, S, case.mask, pad_as_zero=True, backend=backend)
        (zI.square().sum() + zT.sum()).backward()
        return zI, zT, P.grad, S.grad

    monkeypatch.delenv(cb.CUDA_KERNELS_ENV, raising=False)
    default = run()
    monkeypatch.setenv(cb.CUDA_KERNELS_ENV, "tensor_core")
    for a, b in zip(run(), default):
        assert torch.equal(a, b)
