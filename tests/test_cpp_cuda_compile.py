"""The CUDA sources of egma_fast._C compile with nvcc for an H100 (sm_90, -std=c++17) against
torch's headers, without a GPU (and against a CPU-only torch wheel): csrc/check_cuda_compile.py.
The torch-facing shim is syntax-checked with the host compiler. The tensor-core kernels are also
compiled for sm_80 and sm_90 with ptxas's report: no spills, and the mma.sync / ldmatrix /
cp.async instructions of their design in the PTX. Skipped only without nvcc."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_cuda_compile", ROOT / "csrc" / "check_cuda_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_sources_compile() -> None:
    checker = _checker()
    nvcc = checker.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    failures = checker.check(nvcc, arch="sm_90")
    assert not failures, "\n\n".join(f"{name}\n{output}" for name, output in failures)


# The tensor-core kernels (csrc/cuda/late_interaction_tc.cu), per GPU architecture: ptxas must keep
# every kernel free of spills, the forward within 128 registers (two 256-thread CTAs per SM), and
# the PTX must hold the tensor-core instructions of each kernel's design.
TC_KERNELS = {
    "li_tc_forward_kernel<bf16>": {"mma_bf16", "ldmatrix_x4", "cp_async"},
    "li_tc_forward_kernel<fp16>": {"mma_f16", "ldmatrix_x4", "cp_async"},
    "li_tc_dp_kernel<bf16>": {"mma_bf16", "ldmatrix_x4_trans", "cp_async"},
    "li_tc_dp_kernel<fp16>": {"mma_f16", "ldmatrix_x4_trans", "cp_async"},
    "li_tc_ds_kernel<bf16>": {"mma_bf16", "ldmatrix_x4_trans", "cp_async"},
    "li_tc_ds_kernel<fp16>": {"mma_f16", "ldmatrix_x4_trans", "cp_async"},
    "li_tc_scales_kernel": set(),
}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tensor_core_kernels_ptxas(arch: str) -> None:
    checker = _checker()
    nvcc = checker.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    report = checker.ptxas_report(nvcc, arch)
    assert set(report) == set(TC_KERNELS), f"kernels compiled: {sorted(report)}"
    for name, needed in TC_KERNELS.items():
        entry = report[name]
        assert entry["arch"] == arch, (name, entry)
        assert entry["spill_store_bytes"] == 0 and entry["spill_load_bytes"] == 0, (name, entry)
        assert entry["stack_bytes"] == 0, (name, entry)
        assert entry["registers"] <= (128 if "forward" in name else 255), (name, entry)
        for kind in checker.PTX_PATTERNS:
            if kind in needed:
                assert entry[kind] > 0, f"{name}: no {kind} in the PTX ({entry})"
            elif kind.startswith("mma") or kind.startswith("ldmatrix"):
                assert entry[kind] == 0, f"{name}: unexpected {kind} ({entry})"
