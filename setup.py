"""Build script: the Python packages, plus the compiled extension egma_fast._C.

The Triton kernels live in the top-level folder kernels/ but are installed as the subpackage
egma_fast.kernels (another PyPI package owns the top-level name `kernels`).

egma_fast._C holds the C++ CPU kernels (always built) and the CUDA kernels, built when
EGMA_FAST_BUILD_CUDA is "on", or "auto" (the default) and both a CUDA build of torch and a CUDA
toolkit are present. Metadata lives in pyproject.toml; install with
``pip install --no-build-isolation -e .`` so the build uses the installed torch. If the
extension is missing, egma_fast still imports and falls back to the PyTorch backend.
"""
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["egma_fast", "egma_fast.*"]) + ["egma_fast.kernels"]

CPU_SOURCES = [
    "csrc/ops.cpp",
    "csrc/checks.cpp",
    "csrc/cpu/isa.cpp",
    "csrc/cpu/late_interaction_cpu.cpp",
    "csrc/cpu/cross_map_cpu.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/ops_cuda.cpp",
    "csrc/cuda/late_interaction.cu",
    "csrc/cuda/late_interaction_tc.cu",  # tensor-core kernels (sm_80+; empty stubs for older archs)
    "csrc/cuda/cross_map.cu",
]


def _want_cuda() -> bool:
    mode = os.environ.get("EGMA_FAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("off", "on", "auto"):
        raise SystemExit(f"EGMA_FAST_BUILD_CUDA must be off, on or auto, got {mode!r}")
    if mode == "off":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        missing = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True
    if mode == "on":
        raise SystemExit(f"EGMA_FAST_BUILD_CUDA=on but {missing}")
    print(f"egma_fast: building the CPU kernels only ({missing})", file=sys.stderr)
    return False


def _extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only invocations without torch: no extension
        return [], {}

    linux = sys.platform.startswith("linux")
    # -ffp-contract=fast: fused multiply-adds in the kernels (C++17 mode would disable them);
    # -fopenmp: at::parallel_for is inline OpenMP code, as in torch's own build.
    cxx = ["-O3", "-ffp-contract=fast", "-Wno-psabi"] + (["-fopenmp"] if linux else [])
    link = ["-fopenmp"] if linux else []
    sources = list(CPU_SOURCES)
    if _want_cuda():
        ext = CUDAExtension(
            "egma_fast._C",
            sources + CUDA_SOURCES,
            define_macros=[("EGMA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("egma_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir={"egma_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
