"""The GPU benchmark cases of issue 10, in priority order, one JSON line per result as it finishes.

    python benchmarks/gpu/device_check.py --out $OUT/device_check.jsonl [--budget-s 300]
    python benchmarks/gpu/device_check.py --summarize $OUT/device_check.jsonl

Run by benchmarks/gpu/device_check.sh on a lent H100 / H200 after the GPU tests. Every line holds its
case, backend and shape, the device, torch / triton versions and the git commit (first line: the
environment and the device's measured dense bf16 matmul rate), so a timeout keeps what finished.
Cases are skipped (and say so) once the time budget is spent.

Method (as shared/measurements/h200-2026-11-29.md): bf16, M = 16, d = 512, L2-normalised randn
features, sentence counts uniform in 1..16, 70% of samples with gaze scores; one step = forward +
backward; time = median of CUDA-event timings after warm-up; peak = max_memory_allocated over one
step minus what was allocated before it; first_call_s = wall time of the first step at a shape
(compilation and launch-config tuning included). Late-interaction rates count the model's matmul
work: 3U per forward + backward with U = 2 B^2 n M d.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import providers  # noqa: E402
import torch  # noqa: E402

M, D = providers.M, providers.D
DEV = "cuda"

# Issue 10's targets, checked by --summarize.
TARGETS = {
    "loss_ms_B1024_n49": 9.0,
    "loss_ms_B1024_n196": 35.0,
    "speedup_vs_eager_B1024_n49": 10.0,
    "speedup_vs_compiled_B1024_n49": 7.0,
    "li_fraction_of_dense_B4096": 0.40,
    "first_call_s_B16384": 60.0,
    "steady_s_B16384": 2.5,
    "peak_gb_B16384": 40.0,
    "memory_ratio_B1024_n49": 25.0,
    "memory_ratio_B1024_n196": 100.0,
}


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
cuda_ms = providers.cuda_ms
dense_bf16_tflops = providers.dense_bf16_tflops


free = providers.free


def copy_gbps() -> float:
    x = torch.empty(1 << 30, device=DEV, dtype=torch.uint8)
    y = torch.empty_like(x)
    y.copy_(x)
    ms = statistics.median(cuda_ms(lambda: y.copy_(x)) for _ in range(10))
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def time_step(step: Callable[[], None], rounds: int | None = None) -> dict:
    """first_call_s, then the median of CUDA-event timings (rounds by duration) and the peak."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    step()  # second warm-up (allocator, caches)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms0 = cuda_ms(step)
    peak = torch.cuda.max_memory_allocated() - base
    rounds = rounds or (10 if ms0 < 100 else 5 if ms0 < 1000 else 3)
    samples = [ms0] + [cuda_ms(step) for _ in range(rounds - 1)]
    return dict(first_call_s=round(first, 3), ms=statistics.median(samples), min_ms=min(samples),
                samples_ms=samples, peak_bytes=peak)


# ----------------------------------------------------------------------------------------------
# Inputs and steps
# ----------------------------------------------------------------------------------------------
def inputs(B: int, n: int, seed: int = 0):
    return providers.inputs(B, n, seed, DEV)


def loss_step(backend: str, B: int, n: int, preset: str = "paper", compiled: bool = False):
    from egma_fast import EGMALoss
    from egma_fast.config import EGMAConfig

    P0, S0, mask, GS, has_gaze = inputs(B, n)
    loss_fn = EGMALoss(EGMAConfig.preset(preset, lambda_egm=1.0, check_finite=False), backend=backend,
                       distributed=False).to(DEV)
    P, S = P0.clone().requires_grad_(), S0.clone().requires_grad_()

    def forward():
        return loss_fn(P, S, mask, gaze_scores=GS, has_gaze=has_gaze).total

    fwd = torch.compile(forward) if compiled else forward

    def step():
        P.grad = S.grad = None
        fwd().backward()

    return step, fwd


def li_step(provider_name: str, B: int, n: int):
    P0, S0, mask, _, _ = inputs(B, n)
    why = providers.unsupported(provider_name, mask)
    if why:
        raise NotImplementedError(why)
    fn = providers.provider(provider_name)
    P, S = P0.clone().requires_grad_(), S0.clone().requires_grad_()

    def step():
        P.grad = S.grad = None
        providers.objective(*fn(P, S, mask)).backward()

    return step


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
class Run:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.common: dict = {}
        out.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> dict:
        row = {**self.common, **row, "t": round(time.perf_counter() - self.t0, 1)}
        with open(self.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        brief = {k: v for k, v in row.items() if k not in self.common and k != "samples_ms"}
        print(json.dumps(brief), flush=True)
        return row

    def case(self, name: str, make: Callable[[], Callable[[], None]], **meta) -> dict:
        if time.perf_counter() - self.t0 > self.budget_s:
            return self.write(dict(case=name, **meta, status="skipped", reason="time budget spent"))
        free()
        try:
            step = make()
            row = dict(case=name, **meta, status="ok", **time_step(step))
        except torch.cuda.OutOfMemoryError as exc:
            row = dict(case=name, **meta, status="oom", reason=str(exc).splitlines()[0][:300])
        except (ImportError, NotImplementedError, ValueError) as exc:
            row = dict(case=name, **meta, status="unsupported", reason=f"{type(exc).__name__}: {exc}"[:400])
        except Exception as exc:  # keep going: one broken case must not hide the others
            row = dict(case=name, **meta, status="error", reason=f"{type(exc).__name__}: {exc}"[:400])
        step = None
        free()
        if row["status"] == "ok" and meta.get("target") == "late_interaction":
            u = 2.0 * meta["B"] ** 2 * meta["n"] * M * D
            row["tflops_3U"] = 3 * u / (row["ms"] * 1e-3) / 1e12
            row["fraction_of_dense"] = row["tflops_3U"] / self.common["dense_bf16_tflops"]
        return self.write(row)


def environment() -> dict:
    import triton

    import egma_fast
    from egma_fast.ops import available_backends

    commit = os.environ.get("EGMA_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, egma_fast=egma_fast.__version__, backends=available_backends(),
                git_commit=commit)


def first_call_subprocess(B: int, n: int, timeout_s: float) -> dict:
    """The first fwd + bwd at a new shape in a fresh process with an empty Triton cache: compiling
    and launch-config tuning included, as a user's first step at that batch size."""
    code = (
        "import json, sys, time, torch\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "import device_check as dc\n"
        "B, n = int(sys.argv[1]), int(sys.argv[2])\n"
        "t0 = time.perf_counter()\n"
        "step, _ = dc.loss_step('triton', B, n)\n"
        "r = dc.time_step(step, rounds=3)\n"
        "r['process_s'] = round(time.perf_counter() - t0, 2)\n"
        "print('RESULT ' + json.dumps(r))\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        proc = subprocess.run([sys.executable, "-c", code, str(B), str(n), str(Path(__file__).parent)], env=env,
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout)[-400:]
        if "OutOfMemoryError" in tail:
            raise torch.cuda.OutOfMemoryError(tail)
        raise RuntimeError(tail)
    return json.loads(line[len("RESULT "):])


def main_run(out: Path, budget_s: float) -> None:
    run = Run(out, budget_s)
    env = environment()
    env["dense_bf16_tflops"] = round(dense_bf16_tflops(), 1)
    env["copy_gbps"] = round(copy_gbps(), 1)
    run.common = dict(device=env["device"], git_commit=env["git_commit"])
    run.write(dict(case="environment", **env))
    run.common["dense_bf16_tflops"] = env["dense_bf16_tflops"]

    # 1. The headline: the whole loss at B = 1024, n = 49 against eager and compiled PyTorch.
    for backend, compiled in (("triton", False), ("torch", False), ("torch", True)):
        run.case("loss", lambda: loss_step(backend, 1024, 49, compiled=compiled)[0], target="loss", backend=backend,
                 compiled=compiled, B=1024, n=49, preset="paper")
    # 2. n = 196.
    for backend in ("triton", "torch"):
        run.case("loss", lambda: loss_step(backend, 1024, 196)[0], target="loss", backend=backend, compiled=False,
                 B=1024, n=196, preset="paper")
    # 3. Late interaction at B = 4096 against the dense matmul rate.
    run.case("late_interaction", lambda: li_step("triton", 4096, 49), target="late_interaction", backend="triton",
             B=4096, n=49)
    # 4. B = 16384: first call in a fresh process (empty Triton cache), then steady state and peak.
    left = budget_s - (time.perf_counter() - run.t0)
    if left < 45:
        run.write(dict(case="loss_first_call", target="loss", backend="triton", B=16384, n=49, status="skipped",
                       reason="time budget spent"))
    else:
        try:
            r = first_call_subprocess(16384, 49, timeout_s=left)
            run.write(dict(case="loss_first_call", target="loss", backend="triton", B=16384, n=49, status="ok", **r))
        except Exception as exc:
            status = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
            run.write(dict(case="loss_first_call", target="loss", backend="triton", B=16384, n=49, status=status,
                           reason=f"{type(exc).__name__}: {exc}"[:400]))
    # 5. Low-memory mode, official preset, the other providers, more shapes.
    for n in (49, 196):
        run.case("late_interaction", lambda: li_step("triton_low_memory", 1024, n), target="late_interaction",
                 backend="triton_low_memory", B=1024, n=n)
    run.case("loss", lambda: loss_step("triton", 1024, 49, preset="official")[0], target="loss", backend="triton",
             compiled=False, B=1024, n=49, preset="official")
    for name in ("late_interaction_kernels", "flash_maxsim", "triton", "torch"):
        for B, n in ((1024, 49), (4096, 49), (1024, 196)):
            if name == "torch" and B > 1024:
                continue
            run.case("late_interaction", lambda: li_step(name, B, n), target="late_interaction", backend=name, B=B, n=n)
    run.case("late_interaction", lambda: li_step("triton", 4096, 196), target="late_interaction", backend="triton",
             B=4096, n=196)
    # 6. The CUDA extension (built when device_check.sh runs with EGMA_CHECK_CUDA=1): its tensor-core
    #    kernels at issue 11's shapes, its SIMT kernels at B = 1024 for reference.
    for B, n in ((1024, 49), (4096, 49), (1024, 196), (4096, 196)):
        run.case("late_interaction", lambda: li_step("cuda_tensor_core", B, n), target="late_interaction",
                 backend="cuda_tensor_core", B=B, n=n)
    run.case("late_interaction", lambda: li_step("cuda", 1024, 49), target="late_interaction", backend="cuda",
             B=1024, n=49)


# ----------------------------------------------------------------------------------------------
# Summary and targets
# ----------------------------------------------------------------------------------------------
def _find(rows, **match):
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def summarize(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    env = rows[0] if rows and rows[0].get("case") == "environment" else {}
    lines = [f"# {path}", f"{env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | "
             f"commit {env.get('git_commit')} | dense bf16 {env.get('dense_bf16_tflops')} TFLOP/s", "",
             "| case | backend | B | n | status | ms | first call s | peak MiB | of dense |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        backend = r.get("backend", "") + (" (compiled)" if r.get("compiled") else "") + \
            (f" {r['preset']}" if r.get("preset") not in (None, "paper") else "")
        ms = r.get("ms")
        peak = r.get("peak_bytes")
        frac = r.get("fraction_of_dense")
        lines.append(f"| {r.get('case')} | {backend} | {r.get('B', '')} | {r.get('n', '')} | {r.get('status')} "
                     f"{r.get('reason', '')[:60]} | {'' if ms is None else f'{ms:.2f}'} | {r.get('first_call_s', '')} | "
                     f"{'' if peak is None else f'{peak / 2**20:.0f}'} | {'' if frac is None else f'{frac:.2f}'} |")
    got = {}
    t49 = _find(rows, case="loss", backend="triton", B=1024, n=49, preset="paper")
    e49 = _find(rows, case="loss", backend="torch", compiled=False, B=1024, n=49)
    c49 = _find(rows, case="loss", backend="torch", compiled=True, B=1024, n=49)
    t196 = _find(rows, case="loss", backend="triton", B=1024, n=196)
    e196 = _find(rows, case="loss", backend="torch", B=1024, n=196)
    li = _find(rows, case="late_interaction", backend="triton", B=4096, n=49)
    big = _find(rows, case="loss_first_call", B=16384)
    if t49:
        got["loss_ms_B1024_n49"] = t49["ms"]
        if e49:
            got["speedup_vs_eager_B1024_n49"] = e49["ms"] / t49["ms"]
            got["memory_ratio_B1024_n49"] = e49["peak_bytes"] / max(t49["peak_bytes"], 1)
        if c49:
            got["speedup_vs_compiled_B1024_n49"] = c49["ms"] / t49["ms"]
    if t196:
        got["loss_ms_B1024_n196"] = t196["ms"]
        if e196:
            got["memory_ratio_B1024_n196"] = e196["peak_bytes"] / max(t196["peak_bytes"], 1)
    if li:
        got["li_fraction_of_dense_B4096"] = li["fraction_of_dense"]
    if big:
        got["first_call_s_B16384"] = big["first_call_s"]
        got["steady_s_B16384"] = big["ms"] / 1e3
        got["peak_gb_B16384"] = big["peak_bytes"] / 1e9
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    lower_is_better = ("loss_ms", "first_call", "steady", "peak_gb")
    for name, goal in TARGETS.items():
        value = got.get(name)
        if value is None:
            lines.append(f"| {name} | {goal} | not measured | - |")
            continue
        met = value <= goal if name.startswith(lower_is_better) else value >= goal
        lines.append(f"| {name} | {goal} | {value:.3g} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON-lines file to append results to")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new case after this many seconds")
    ap.add_argument("--summarize", type=Path, help="print the table and the targets of a results file")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if not torch.cuda.is_available():
        print("device_check: no CUDA device", file=sys.stderr)
        return 2
    if args.out is None:
        ap.error("--out is required to run the cases")
    main_run(args.out, args.budget_s)
    print(summarize(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
