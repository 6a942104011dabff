"""The GPU check's pieces that need no GPU: the benchmark providers compute the same two MaxSim
directions as the reference (those that run on CPU: the Triton kernels under the interpreter and the
reference itself), what the PyPI providers cannot express is reported, and the targets table reads
the JSON lines correctly."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from egma_fast import reference

from op_cases import make_case

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import providers  # noqa: E402

_spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "gpu" / "device_check.py")
device_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_check)


@pytest.mark.parametrize("name", ["torch", "triton", "triton_low_memory"])
def test_providers_compute_both_directions(name: str) -> None:
    pytest.importorskip("triton")
    case = make_case("providers", 3, 4, 5, 3, 16, mask_kind="prefix")
    fn = providers.provider(name)
    P, S = case.P.clone().requires_grad_(), case.S.clone().requires_grad_()
    zI, zT = fn(P, S, case.mask)
    providers.objective(zI, zT).backward()
    P64, S64 = case.P.double().requires_grad_(), case.S.double().requires_grad_()
    wI, wT = reference.late_interaction(P64, S64, case.mask)
    providers.objective(wI, wT).backward()
    for got, want in ((zI, wI), (zT, wT), (P.grad, P64.grad), (S.grad, S64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_provider_limits_are_reported() -> None:
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert "prefix" in providers.unsupported("flash_maxsim", mask)
    assert providers.unsupported("late_interaction_kernels", mask) is None
    assert "pad_as_zero" in providers.unsupported("late_interaction_kernels", mask, pad_as_zero=True)
    with pytest.raises(ValueError, match="unknown provider"):
        providers.provider("nope")


def test_summary_checks_every_target(tmp_path: Path) -> None:
    rows = [
        dict(case="environment", device="H200", torch="2.11", triton="3.6", git_commit="abc", dense_bf16_tflops=790.0),
        dict(case="loss", backend="triton", compiled=False, B=1024, n=49, preset="paper", status="ok", ms=8.0,
             peak_bytes=100, first_call_s=10.0),
        dict(case="loss", backend="torch", compiled=False, B=1024, n=49, preset="paper", status="ok", ms=96.0,
             peak_bytes=11_000),
        dict(case="loss", backend="torch", compiled=True, B=1024, n=49, preset="paper", status="ok", ms=40.0,
             peak_bytes=10_000),
        dict(case="late_interaction", backend="triton", B=4096, n=49, status="ok", ms=30.0, fraction_of_dense=0.35),
        dict(case="loss_first_call", backend="triton", B=16384, n=49, status="ok", first_call_s=50.0, ms=2400.0,
             peak_bytes=30e9),
        dict(case="loss", backend="triton", compiled=False, B=1024, n=196, preset="paper", status="oom", reason="x"),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = device_check.summarize(path)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 8 | yes |" in lines["loss_ms_B1024_n49"]
    assert "| 12 | yes |" in lines["speedup_vs_eager_B1024_n49"]
    assert "| 5 | NO |" in lines["speedup_vs_compiled_B1024_n49"]  # 40 / 8 < 7
    assert "| 0.35 | NO |" in lines["li_fraction_of_dense_B4096"]
    assert "| 110 | yes |" in lines["memory_ratio_B1024_n49"]
    assert "| 50 | yes |" in lines["first_call_s_B16384"] and "| 2.4 | yes |" in lines["steady_s_B16384"]
    assert "| 30 | yes |" in lines["peak_gb_B16384"]
    assert "not measured" in lines["loss_ms_B1024_n196"]  # the OOM row is not a measurement
