"""Every Triton kernel compiles for an H100 (sm_90) without a GPU: the interpreter runs kernels in
numpy and skips the compiler's type, layout and shape checks (dot operand sizes, loop-carried
types, reshape layouts), so CI compiles them ahead of time here (egma_fast.kernels.aot) with the
block sizes the GPU launchers use, and reads ptxas's register report.

Runs the compiler in a subprocess: this test process has TRITON_INTERPRET=1, under which
@triton.jit builds interpreter functions instead of compilable ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent

# Compiled in one subprocess: (dtype, n, M, d, ops). Odd M and the largest d / n of the SPEC.
_SHAPES = [
    ("bfloat16", 196, 16, 768, ("late_interaction", "cross_map")),
    ("float16", 49, 5, 512, ("late_interaction", "cross_map")),
    ("float32", 196, 16, 512, ("late_interaction",)),
]

_SCRIPT = r"""
import json, sys, torch
from egma_fast.kernels import aot
shapes = json.loads(sys.argv[1])
rows = []
for name, n, M, d, ops in shapes:
    dtype = getattr(torch, name)
    for v in aot.variants(n, M, d, dtype, ops=tuple(ops), all_configs=False):
        usage = aot.ptxas_usage(aot.compile_variant(v, dtype))
        rows.append(dict(kernel=v.name, dtype=name, n=n, M=M, d=d, **usage))
print("RESULT " + json.dumps(rows))
"""


def _compile(shapes: list) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(shapes)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_kernels_compile_for_sm90() -> None:
    rows = _compile(_SHAPES)
    compiled = {(r["kernel"], r["dtype"], r["n"]) for r in rows}
    for kernel in ("_li_fwd_kernel", "_li_bwd_dp_kernel", "_li_bwd_ds_kernel"):
        for dtype, n in (("bfloat16", 196), ("float16", 49), ("float32", 196)):
            assert (kernel, dtype, n) in compiled
    for kernel in ("_cm_scores_kernel", "_cm_fwd_kernel", "_cm_bwd_scores_kernel", "_cm_bwd_feat_kernel"):
        for dtype, n in (("bfloat16", 196), ("float16", 49)):
            assert (kernel, dtype, n) in compiled
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        # Hopper: at most 227 KiB of shared memory per block.
        assert r["shared_bytes"] <= 227 * 1024, r
    # The hot path's forward (B^2 work) keeps its similarity tile and running max/argmax in
    # registers: a spill here is a performance regression (benchmarks/gpu/ptxas_report.py).
    for r in rows:
        if r["kernel"] == "_li_fwd_kernel" and r["dtype"] != "float32":
            assert r["spill_store_bytes"] == 0, r
    # 16-bit late interaction runs on Hopper's wgmma, not the older mma.sync (li_blocks' 64-row tiles).
    for r in rows:
        if r["kernel"].startswith("_li_") and r["dtype"] != "float32":
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, r


_ALL_CONFIGS_SCRIPT = r"""
import json, sys, torch
from egma_fast.kernels import aot
rows = []
for name, n in json.loads(sys.argv[1]):
    dtype = getattr(torch, name)
    for v in aot.variants(n, 16, 512, dtype, ops=("late_interaction",), all_configs=True, modes=False):
        rows.append(dict(kernel=v.name, variant=v.describe(), dtype=name, n=n, **aot.ptxas_usage(aot.compile_variant(v, dtype))))
print("RESULT " + json.dumps(rows))
"""


def test_late_interaction_default_mode_configs_spill_free() -> None:
    """Whatever the GPU tuner picks for the default (winners saved) mode at the benchmark's shapes,
    it runs on wgmma without register spills: every tuning config of all three late-interaction
    kernels is checked, for bf16 at n = 49 and 196 and fp16 at n = 49 (M = 16, d = 512)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    shapes = [("bfloat16", 49), ("bfloat16", 196), ("float16", 49)]
    proc = subprocess.run([sys.executable, "-c", _ALL_CONFIGS_SCRIPT, json.dumps(shapes)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert {r["kernel"] for r in rows} == {"_li_fwd_kernel", "_li_bwd_dp_kernel", "_li_bwd_ds_kernel"}
    for r in rows:
        assert r["spill_store_bytes"] == 0 and r["stack_frame_bytes"] == 0, r
        assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
        assert r["shared_bytes"] <= 227 * 1024, r


def test_aot_variants_cover_every_autotuner_config() -> None:
    """aot.variants enumerates exactly the launchers' tuning spaces (late interaction: both winner
    modes), so the compile check and the ptxas report cannot drift from what a GPU run tries."""
    code = (
        "import torch, json\n"
        "from egma_fast.kernels import aot, late_interaction as li, cross_map as cm\n"
        "vs = aot.variants(49, 16, 512, torch.bfloat16)\n"
        "count = {}\n"
        "for v in vs: count[v.name] = count.get(v.name, 0) + 1\n"
        "expect = {'_li_fwd_kernel': 2 * len(li.FWD_CONFIGS), '_li_bwd_dp_kernel': 2 * len(li.dp_configs(li.weight_mode(torch.bfloat16))),\n"
        "          '_li_bwd_ds_kernel': 2 * len(li.DS_CONFIGS), '_cm_scores_kernel': len(cm._scores.configs),\n"
        "          '_cm_fwd_kernel': 2 * len(cm._fwd.configs), '_cm_bwd_scores_kernel': 2 * len(cm._bwd_scores.configs),\n"
        "          '_cm_bwd_feat_kernel': 2 * len(cm._bwd_feat.configs)}\n"
        "print('RESULT ' + json.dumps([count, expect]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    count, expect = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert count == expect
    assert all(c > 1 for c in expect.values() if c)  # every kernel is autotuned on a GPU
