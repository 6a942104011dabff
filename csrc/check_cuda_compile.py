"""Compile egma_fast._C's CUDA sources without a GPU, so that CI catches syntax and type errors.

    python csrc/check_cuda_compile.py [--arch sm_90] [--nvcc PATH]

* Every csrc/cuda/*.cu is compiled to an object file by nvcc (-arch, -std=c++17, the flags of
  setup.py plus the ones torch's CUDAExtension adds, COMMON_NVCC_FLAGS) against torch's include
  directories (torch.utils.cpp_extension.include_paths()). The
  kernels include only the CUDA runtime and header-only c10 utilities, which a CPU-only torch
  wheel ships too.
* The torch-facing shim csrc/cuda/ops_cuda.cpp is checked with the host compiler
  (-fsyntax-only) against torch's headers and the CUDA toolkit's. A CPU-only torch wheel lacks
  the one generated header c10/cuda needs (c10/cuda/impl/cuda_cmake_macros.h); a stand-in with
  the content a CUDA build generates is put on the include path for this check only.

With --ptxas-report, the tensor-core kernels (csrc/cuda/late_interaction_tc.cu) are instead
compiled for sm_80 and sm_90 with ``-Xptxas -v`` and their PTX kept: per kernel, the registers,
stack frame and spill bytes ptxas reports, and the counts of the tensor-core instructions in the
PTX (mma.sync m16n8k16, ldmatrix, cp.async). --json PATH also writes that report.

Exits 0 when everything compiles, 1 otherwise (printing the compiler output); 2 without nvcc.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DEGMA_WITH_CUDA", "-Xcompiler", "-fPIC"]
CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def find_nvcc(explicit: str | None = None) -> str | None:
    """nvcc from --nvcc, $CUDA_HOME / $CUDA_PATH, PATH, or /usr/local/cuda."""
    candidates = [explicit] if explicit else []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _torch_nvcc_flags() -> list[str]:
    from torch.utils import cpp_extension

    return list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))


def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


def _cuda_include(nvcc: str) -> str:
    """The toolkit's include directory (nvcc may be a wrapper script on PATH)."""
    for root in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime_api.h").exists():
            return str(root / "include")
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    for token in (out.stdout + out.stderr).split():
        if token.startswith("-I") and Path(token[2:].strip('"'), "cuda_runtime_api.h").exists():
            return token[2:].strip('"')
    raise RuntimeError(f"cannot find the CUDA include directory of {nvcc}")


def _run(cmd: list[str]) -> tuple[list[str], int, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, proc.returncode, proc.stdout + proc.stderr


def check(nvcc: str, arch: str = "sm_90", jobs: int | None = None) -> list[tuple[str, str]]:
    """Compile everything; returns (what, compiler output) for each failure."""
    includes = _torch_includes()
    cu_files = sorted((CSRC / "cuda").glob("*.cu"))
    if not cu_files:
        return [("csrc/cuda", "no .cu files found")]
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp, "stub")
        torch_has_macros = any(Path(p[2:], "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes)
        if not torch_has_macros:
            (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
            (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(CUDA_CMAKE_MACROS)
        commands = {
            f"nvcc {cu.relative_to(CSRC.parent)}": [nvcc, "-c", str(cu), "-o", str(Path(tmp, cu.stem + ".o")),
                                                    f"-arch={arch}", *NVCC_FLAGS, *_torch_nvcc_flags(), *includes]
            for cu in cu_files
        }
        cxx = os.environ.get("CXX", "c++")
        commands["c++ -fsyntax-only csrc/cuda/ops_cuda.cpp"] = [
            cxx, "-fsyntax-only", "-std=c++17", "-DEGMA_WITH_CUDA", *includes, f"-I{stub}",
            f"-I{_cuda_include(nvcc)}", f"-I{sysconfig.get_paths()['include']}", str(CSRC / "cuda" / "ops_cuda.cpp"),
        ]
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            results = dict(zip(commands, pool.map(_run, commands.values())))
        for name, (cmd, code, output) in results.items():
            print(f"{'ok  ' if code == 0 else 'FAIL'} {name}", flush=True)
            if code != 0:
                failures.append((name, " ".join(cmd) + "\n" + output))
    return failures


TC_SOURCE = CSRC / "cuda" / "late_interaction_tc.cu"
TC_ARCHS = ("sm_80", "sm_90")
# PTX instruction kinds counted per kernel.
PTX_PATTERNS = {
    "mma_bf16": r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32",
    "mma_f16": r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32",
    "ldmatrix_x4": r"ldmatrix\.sync\.aligned\.m8n8\.x4\.shared\.b16",
    "ldmatrix_x4_trans": r"ldmatrix\.sync\.aligned\.m8n8\.x4\.trans\.shared\.b16",
    "cp_async": r"cp\.async\.cg\.shared\.global",
}


def _short_name(mangled: str) -> str:
    """li_tc_forward_kernel<bf16> from the mangled entry name."""
    m = re.search(r"(li_tc_[a-z_]+?_kernel)", mangled)
    name = m.group(1) if m else mangled
    if "BFloat16" in mangled:
        name += "<bf16>"
    elif "Half" in mangled:
        name += "<fp16>"
    return name


def _ptx_counts(ptx: str) -> dict[str, dict[str, int]]:
    counts = {}
    entries = re.split(r"^\.(?:visible )?\.?entry ", ptx, flags=re.M)[1:]
    for body in entries:
        mangled = body.split("(", 1)[0].strip()
        counts[mangled] = {kind: len(re.findall(pat, body)) for kind, pat in PTX_PATTERNS.items()}
    return counts


def ptxas_report(nvcc: str, arch: str, source: Path = TC_SOURCE) -> dict[str, dict]:
    """{kernel: {registers, stack_bytes, spill_store_bytes, spill_load_bytes, <PTX counts>}} for one arch."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", str(source), "-o", str(Path(tmp, "tc.o")), f"-arch={arch}", *NVCC_FLAGS,
               *_torch_nvcc_flags(), *_torch_includes(), "--keep", "--keep-dir", tmp, "-Xptxas", "-v"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        ptx_files = list(Path(tmp).glob("*.ptx"))
        ptx = ptx_files[0].read_text() if ptx_files else ""
    counts = _ptx_counts(ptx)
    report: dict[str, dict] = {}
    current = None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            current = m.group(1)
            report[_short_name(current)] = {"arch": m.group(2), **counts.get(current, {})}
            continue
        if current is None:
            continue
        entry = report[_short_name(current)]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            entry.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            entry["registers"] = int(m.group(1))
    return report


def _print_report(reports: dict[str, dict[str, dict]]) -> None:
    kinds = list(PTX_PATTERNS)
    print(f"{'arch':6s} {'kernel':28s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} " + " ".join(f"{k:>17s}" for k in kinds))
    for arch, report in reports.items():
        for name, e in sorted(report.items()):
            spills = f"{e.get('spill_store_bytes', '?')}/{e.get('spill_load_bytes', '?')}"
            print(f"{arch:6s} {name:28s} {e.get('registers', '?'):>4} {e.get('stack_bytes', '?'):>5} {spills:>11s} "
                  + " ".join(f"{e.get(k, 0):>17d}" for k in kinds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", help="GPU architecture for nvcc -arch (default sm_90)")
    parser.add_argument("--nvcc", default=None, help="path to nvcc (default: CUDA_HOME, PATH, /usr/local/cuda)")
    parser.add_argument("--ptxas-report", action="store_true",
                        help="ptxas register / spill report and PTX tensor-core instruction counts of the tensor-core "
                        "kernels for sm_80 and sm_90")
    parser.add_argument("--json", default=None, help="with --ptxas-report: also write the report to this file")
    args = parser.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    if args.ptxas_report:
        with ThreadPoolExecutor(max_workers=len(TC_ARCHS)) as pool:
            reports = dict(zip(TC_ARCHS, pool.map(lambda arch: ptxas_report(nvcc, arch), TC_ARCHS)))
        _print_report(reports)
        if args.json:
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
            Path(args.json).write_text(json.dumps({"nvcc": version, "source": str(TC_SOURCE.relative_to(CSRC.parent)),
                                                   "reports": reports}, indent=1) + "\n")
        return 0
    failures = check(nvcc, args.arch)
    for name, output in failures:
        print(f"\n===== {name} =====\n{output}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
