"""Registers, spills and shared memory of every Triton kernel launch variant, compiled for a GPU
architecture on any machine (no GPU needed): the offline half of tuning the kernels.

    python benchmarks/gpu/ptxas_report.py --out benchmarks/results/ptxas_sm90.json

For each shape of the benchmark grid (n in {49, 196}, M = 16, d = 512; bf16 by default) it
compiles each kernel with the launchers' block sizes and every autotuner config
(egma_fast.kernels.aot.variants) and records ptxas's report. A variant that spills is a poor
autotuning candidate; a kernel with no spill-free variant is a tuning bug.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("ptxas_report: unset TRITON_INTERPRET (the interpreter has nothing to compile)")

import torch  # noqa: E402
import triton  # noqa: E402

from egma_fast.kernels import aot  # noqa: E402


def _one(job: tuple[int, int, int, str, int, int]) -> dict:
    n, M, d, dtype_name, index, arch = job
    dtype = getattr(torch, dtype_name)
    v = aot.variants(n, M, d, dtype)[index]
    start = time.perf_counter()
    usage = aot.ptxas_usage(aot.compile_variant(v, dtype, arch), arch)
    return dict(op=v.op, kernel=v.name, n=n, M=M, d=d, dtype=dtype_name,
                config={k: val for k, val in v.constexprs.items() if k in ("BLOCK_DO", "GROUP_K", "THRESHOLD")},
                num_warps=v.num_warps, num_stages=v.num_stages, compile_s=round(time.perf_counter() - start, 2), **usage)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[49, 196])
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--d", type=int, nargs="+", default=[512])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90 = H100 / H200)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    args = ap.parse_args(argv)

    jobs = [(n, args.M, d, name, i, args.arch)
            for name in args.dtype for d in args.d for n in args.n
            for i in range(len(aot.variants(n, args.M, d, getattr(torch, name))))]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_one, jobs))

    for r in rows:
        flag = "  SPILLS" if r["spill_store_bytes"] or r["spill_load_bytes"] else ""
        print(f"{r['dtype']:8s} n={r['n']:3d} d={r['d']} {r['kernel']:24s} {str(r['config']):24s} "
              f"w={r['num_warps']:2d} s={r['num_stages']} regs={r['registers']:3d} "
              f"spill={r['spill_store_bytes']}/{r['spill_load_bytes']} smem={r['shared_bytes']} "
              f"wgmma={r['wgmma']} mma.sync={r['mma_sync']}{flag}")
    # A kernel (per shape) whose every variant spills is the thing to fix.
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["n"], r["d"], r["kernel"], str(r["config"].get("THRESHOLD"))), []).append(r)
    all_spill = [k for k, rs in groups.items() if all(r["spill_store_bytes"] for r in rs)]
    print(f"{len(rows)} variants, {sum(bool(r['spill_store_bytes']) for r in rows)} spill; "
          f"kernels with no spill-free variant: {all_spill or 'none'}")

    if args.out:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        # Kernel sources differing from that commit make the report describe uncommitted code.
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "kernels"], capture_output=True, text=True).stdout.strip())
        report = dict(what="ptxas -v resource usage of every Triton launch variant (compile only, no GPU run)",
                      arch=f"sm_{args.arch}", triton=triton.__version__, torch=torch.__version__,
                      python=platform.python_version(), commit=commit or None, kernels_modified_since_commit=dirty,
                      command="python benchmarks/gpu/ptxas_report.py " + " ".join(argv or sys.argv[1:]),
                      kernels_without_spill_free_variant=[list(k) for k in all_spill], variants=rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
