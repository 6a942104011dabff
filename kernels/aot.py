"""Ahead-of-time compilation of every EGMA Triton kernel for a GPU architecture, without a GPU.

The interpreter (how CI runs the kernels) skips the compiler's type, layout and shape checks, and
says nothing about register pressure. This module compiles each kernel with exactly the launch
variants the launchers can use on a GPU (the fixed block sizes of ``li_blocks`` / ``cm_blocks`` and
every autotuner config) and reads ptxas's resource report (registers, spill bytes, shared memory)
for each. Used by tests/test_triton_compile.py and benchmarks/gpu/ptxas_report.py.

Must run in a process without TRITON_INTERPRET=1: under the interpreter @triton.jit builds
interpreter functions (and the launchers skip autotuning), so there is nothing to compile.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton

from . import cross_map as cm
from . import late_interaction as li
from .utils import dot_precision, grad_mode

__all__ = ["Variant", "compile_variant", "ptxas_usage", "variants"]

# Argument types of every kernel argument name used in kernels/ (pointers by role; {f} is the
# feature dtype, {h} the late-interaction backward's product dtype: fp16 for 16-bit features).
_ARG_TYPES = {
    "P": "*{f}", "S": "*{f}", "GS": "*{f}", "DP": "*{f}", "DS": "*{f}",
    "SMASK": "*u8", "PMASK": "*u8", "ZSLOT": "*u8", "USE_GAZE": "*u8", "WIN": "*u8", "WIN_T": "*u8", "WIN_I": "*u8",
    "SCALES": "*fp32", "PF": "*{h}", "SF": "*{h}",
    "NVALID": "*i32", "MVALID": "*i32",
    "ZI": "*fp32", "ZT": "*fp32", "DZI": "*fp32", "DZT": "*fp32",
    "OUT": "*{f}",  # the dS kernel writes dS itself (one split: large B, the case that matters)
    "THETA": "*fp32", "ALPHA": "*fp32",
    "A0": "*fp32", "TERMS": "*fp32", "LSE_COL": "*fp32", "GTERMS": "*fp32", "DA_FULL": "*fp32", "DA_ROWS": "*fp32",
    "DALPHA": "*fp32",
    "Bi": "i32", "Bt": "i32", "n": "i32", "M": "i32", "d": "i32", "sPb": "i32", "sPn": "i32", "sSb": "i32",
    "sSm": "i32", "k_per_split": "i32", "k_s": "i32", "k_p": "i32", "floor": "fp32", "tau": "fp32",
}
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Variant:
    """One compilable launch of one kernel: its constexprs and launch options."""

    op: str  # "late_interaction" or "cross_map"
    kernel: object  # the @triton.jit function (autotuner unwrapped)
    constexprs: dict = field(hash=False)
    num_warps: int
    num_stages: int
    #: Integer arguments as a real launch would pass them (shape and strides of contiguous
    #: features): the JIT marks the multiples of 16 divisible, which enables vectorised loads.
    ints: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def describe(self) -> str:
        tuned = {k: v for k, v in self.constexprs.items() if k in ("BLOCK_DO", "GROUP_K", "THRESHOLD", "SAVED", "SAVE_WIN_I")}
        return f"{self.name} {tuned} warps={self.num_warps} stages={self.num_stages}"


def _expand(op: str, kernel, base: dict, all_configs: bool, ints: dict, configs: list | None = None) -> list[Variant]:
    """One Variant per launch config of a kernel: ``configs`` (the late-interaction tuners' lists) or
    the kernel's own autotuner configs (every launcher tunes on a GPU)."""
    if configs is None:
        if not hasattr(kernel, "configs"):
            raise RuntimeError("kernels.aot needs the GPU launchers' autotuners: run without TRITON_INTERPRET=1")
        configs = kernel.configs
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # autotuner (or heuristics) wrappers
        fn = fn.fn
    configs = configs if all_configs else configs[:1]
    return [Variant(op, fn, {**base, **cfg.kwargs}, cfg.num_warps, cfg.num_stages, ints) for cfg in configs]


def variants(n: int, M: int, d: int, dtype: torch.dtype, *, ops: tuple[str, ...] = ("late_interaction", "cross_map"),
             all_configs: bool = True, modes: bool = True) -> list[Variant]:
    """Every kernel launch the GPU launchers can make for features of this (n, M, d, dtype):
    the launchers' fixed block sizes, each tuning config (only the first with
    ``all_configs=False``), late interaction with saved and (``modes``) recomputed winners, and for
    cross_map both weight rules with every term enabled (its largest code paths), each with its
    preset's EGM gaze setting (paper: top-k with gaze; official: threshold without)."""
    out: list[Variant] = []
    ints = dict(n=n, M=M, d=d, sPb=n * d, sPn=d, sSb=M * d, sSm=d)
    if "late_interaction" in ops:
        b = li.li_blocks(n, M, d, dtype)
        tiles = dict(BLOCK_N=b.BLOCK_N, BLOCK_T=b.BLOCK_T, M_PAD=b.M_PAD, BLOCK_D=b.BLOCK_D,
                     DOT_PREC=dot_precision(dtype))
        # The default mode (winners saved) first; the low-memory mode's recomputing variants after.
        for saved in (True, False) if modes else (True,):
            out += _expand("late_interaction", li._li_fwd_kernel, dict(tiles, SAVE_WIN_I=saved), all_configs, ints,
                           li.FWD_CONFIGS)
            grads = dict(tiles, GRAD_MODE=li.weight_mode(dtype), SAVED=saved)
            out += _expand("late_interaction", li._li_bwd_dp_kernel, grads, all_configs, ints,
                           li.dp_configs(li.weight_mode(dtype)))
            out += _expand("late_interaction", li._li_bwd_ds_kernel, grads, all_configs, ints, li.DS_CONFIGS)
    if "cross_map" in ops:
        c = cm.cm_blocks(n, M, d, dtype)
        out += _expand("cross_map", cm._scores, dict(R1=c.R1, M_PAD=c.M_PAD, BLOCK_D=c.BLOCK_D,
                                                       DOT_PREC=dot_precision(dtype)), all_configs, ints)
        for threshold in (False, True):
            opts = dict(N_PAD=c.N_PAD, M_PAD=c.M_PAD, THRESHOLD=threshold, WITH_EGM=True, MSE=True,
                        EGM_GAZE=not threshold, GRAD_MODE=grad_mode(dtype))
            rows = dict(opts, R=c.R, BLOCK_D=c.BLOCK_D, WITH_MLCE=True)
            out += _expand("cross_map", cm._fwd, rows, all_configs, ints)
            out += _expand("cross_map", cm._bwd_scores, rows, all_configs, ints)
            out += _expand("cross_map", cm._bwd_feat, opts, all_configs, ints)
    return out


def compile_variant(v: Variant, dtype: torch.dtype, arch: int = 90):
    """triton.compile the variant for CUDA compute capability ``arch`` (no GPU needed)."""
    from triton.backends.compiler import GPUTarget

    f = _TRITON_DTYPE[dtype]
    fn = v.kernel
    h = "fp32" if f == "fp32" else "fp16"  # the late-interaction backward's product operands
    sig = {a: "constexpr" if a in v.constexprs else _ARG_TYPES[a].format(f=f, h=h) for a in fn.arg_names}
    # The JIT's specialisation: 16-byte-aligned pointers (torch allocations are) and integer
    # arguments that are multiples of 16 get tt.divisibility = 16, except do_not_specialize ones.
    skip = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    attrs = {}
    for idx, a in enumerate(fn.arg_names):
        kind = sig[a]
        aligned = kind.startswith("*") or (kind == "i32" and a not in skip and v.ints.get(a, 1) % 16 == 0)
        if aligned:
            attrs[(idx,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=v.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=v.num_warps, num_stages=v.num_stages))


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(arch)
    except TypeError:  # older Triton: no arch argument
        tool = nv.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def ptxas_usage(compiled, arch: int = 90) -> dict:
    """ptxas -v's resource report for a compiled kernel's PTX: registers per thread, spill store /
    load bytes, stack frame bytes, plus the shared memory Triton reserves (bytes) and the count of
    each tensor-core instruction kind in the PTX."""
    ptx = compiled.asm["ptx"]
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(
        # Tensor-core instructions in the PTX: wgmma (Hopper) or the older mma.sync.
        wgmma=ptx.count("wgmma.mma_async"),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        registers=grab(r"Used (\d+) registers"),
        spill_store_bytes=grab(r"(\d+) bytes spill stores"),
        spill_load_bytes=grab(r"(\d+) bytes spill loads"),
        stack_frame_bytes=grab(r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared),
    )
