"""How precisely must the late-interaction backward multiply its one-hot weight tile?

The fused backward computes dP = W S and dS = W^T P on the tensor cores, where W holds dzI/n_valid
at each patch's winning sentence and dzT/m_l at each sentence's winning patch (fp32 values). With
16-bit features the tensor cores need W in 16 bits too. This study emulates each way of doing that
on the CPU, in float64 with explicit rounding, and compares the gradient error against float64
with PyTorch's own error computing the same gradient from the same 16-bit inputs (the reference
backend: fp32 arithmetic, gradients rounded to the input dtype). The flash-attention rule the GPU
tests apply: fast error <= 2 x PyTorch's error + a floor far below a wrong-index error.

Modes (the kernels' GRAD_MODE):
    bf16         W rounded once to bf16 (what flash-attention does with its probability tile)
    bf16_split   W = hi + lo, both bf16 (two tensor-core products; ~16 mantissa bits of W)
    fp16         W rounded once to fp16 (tiny values underflow fp16's exponent range)
    fp16_scaled  W times a power of two (max |W| near 1) rounded to fp16, the product unscaled
    fp16_scaled_split  the same, as hi + lo (two tensor-core products)
    bf16_w_fp16  bf16 features converted to fp16 (exact in fp16's normal range) and W as
                 fp16_scaled: one product, W with 3 more mantissa bits than bf16
    fp32         W and the features in fp32 (the fp32 kernels; a sanity row)

Winners are taken from the fp32 similarities (what both the kernels and the reference compute), and
the float64 "truth" uses the same winners, so the study measures rounding only, never a near-tie
flip. Upstream gradients come from the contrastive loss itself (alpha = 1/0.07, both CE terms).

    python benchmarks/rounding_study.py --out benchmarks/results/rounding_study_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from egma_fast import reference  # noqa: E402
from egma_fast.ops.arguments import text_zero_slots  # noqa: E402

MODES = ("bf16", "bf16_split", "bf16_w_fp16", "fp16", "fp16_scaled", "fp16_scaled_split", "fp32")
DTYPE_OF_MODE = {"bf16": torch.bfloat16, "bf16_split": torch.bfloat16, "bf16_w_fp16": torch.bfloat16, "fp16": torch.float16,
                 "fp16_scaled": torch.float16, "fp16_scaled_split": torch.float16, "fp32": torch.float32}


def make_inputs(B: int, n: int, M: int, d: int, dtype: torch.dtype, seed: int):
    """Unit-norm features in ``dtype``, random sentence counts (one text of each extreme length)."""
    g = torch.Generator().manual_seed(seed)
    P = F.normalize(torch.randn(B, n, d, generator=g), dim=-1).to(dtype)
    S = F.normalize(torch.randn(B, M, d, generator=g), dim=-1).to(dtype)
    lengths = torch.randint(1, M + 1, (B,), generator=g)
    lengths[0], lengths[-1] = M, 1
    mask = torch.arange(M)[None, :] < lengths[:, None]
    return P, S, mask


def upstream_grads(P: torch.Tensor, S: torch.Tensor, mask: torch.Tensor, pad_as_zero: bool, alpha: float = 1 / 0.07):
    """dL_c/dzI and dL_c/dzT (fp32 [B, B]) of the fine-grained contrastive loss at these inputs."""
    zI, zT = reference.late_interaction(P.double(), S.double(), mask, pad_as_zero=pad_as_zero)
    zI, zT = zI.requires_grad_(), zT.requires_grad_()
    loss = reference.fine_grained_contrastive(alpha * zI, alpha * zT, True)
    gI, gT = torch.autograd.grad(loss, (zI, zT))
    return gI.float(), gT.float()


def winners(P: torch.Tensor, S: torch.Tensor, mask: torch.Tensor, zero_slot: torch.Tensor):
    """One-hot image-side and text-side winners [Bi, Bt, n, M] (bool) from the fp32 similarities,
    computed exactly as reference.late_interaction computes them."""
    X = torch.einsum("bnd,tmd->btnm", P.float(), S.float())
    neg = torch.tensor(float("-inf"))
    Xi = torch.where(mask[None, :, None, :], X, neg)
    best, arg = Xi.max(dim=3)
    zero_wins = zero_slot[None, :, None] & (best < 0)
    img = F.one_hot(arg, X.shape[3]).bool() & ~zero_wins[..., None] & mask[None, :, None, :]
    txt_arg = X.max(dim=2).indices  # [Bi, Bt, M]
    txt = F.one_hot(txt_arg, X.shape[2]).transpose(2, 3).bool() & mask[None, :, None, :]
    return img, txt


def weight_tile(img, txt, dzI, dzT, mask, n: int, dtype=torch.float64) -> torch.Tensor:
    """W [Bi, Bt, n, M]: dzI/n at each image-side winner plus dzT/m_l at each text-side winner,
    with the kernels' fp32 coefficients (or exact ones for dtype float64)."""
    m = mask.sum(1).clamp_min(1)
    if dtype == torch.float64:
        c_img, c_txt = dzI.double() / n, dzT.double() / m[None, :].double()
    else:
        c_img, c_txt = (dzI / n).double(), (dzT / m[None, :].float()).double()
    return img.double() * c_img[:, :, None, None] + txt.double() * c_txt[:, :, None, None]


def round_weights(W: torch.Tensor, mode: str) -> torch.Tensor:
    """W as the tensor cores would see it in ``mode`` (returned in float64)."""
    if mode == "fp32":
        return W.float().double()
    if mode == "bf16":
        return W.float().bfloat16().double()
    if mode == "bf16_split":
        hi = W.float().bfloat16()
        lo = (W.float() - hi.float()).bfloat16()
        return hi.double() + lo.double()
    if mode == "fp16":
        return W.float().half().double()
    if mode in ("fp16_scaled", "fp16_scaled_split", "bf16_w_fp16"):
        peak = W.abs().max().item()
        scale = 2.0 ** -math.ceil(math.log2(peak)) if peak > 0 else 1.0
        hi = (W.float() * scale).half()
        if mode in ("fp16_scaled", "bf16_w_fp16"):
            return hi.double() / scale
        lo = (W.float() * scale - hi.float()).half()
        return (hi.double() + lo.double()) / scale
    raise ValueError(mode)


def gradients(W: torch.Tensor, P: torch.Tensor, S: torch.Tensor, out_dtype: torch.dtype, feature_dtype=None):
    """dP [Bi, n, d] = sum_{l, j} W S_lj and dS [Bt, M, d] = sum_{k, i} W P_ki, accumulated in
    float64 (fp32 accumulation adds ~1e-7 relative: negligible here), rounded like the kernels'
    fp32 accumulator and then to the output dtype. ``feature_dtype``: the dtype the features are
    converted to for the product (the bf16_w_fp16 mode's fp16)."""
    if feature_dtype is not None:
        P, S = P.to(feature_dtype), S.to(feature_dtype)
    dP = torch.einsum("ktij,tjd->kid", W, S.double())
    dS = torch.einsum("ktij,kid->tjd", W, P.double())
    return dP.float().to(out_dtype), dS.float().to(out_dtype)


def study_case(B: int, n: int, M: int, d: int, dtype: torch.dtype, pad_as_zero: bool, seed: int) -> dict:
    P, S, mask = make_inputs(B, n, M, d, dtype, seed)
    zero_slot = text_zero_slots(mask, pad_as_zero)
    dzI, dzT = upstream_grads(P, S, mask, pad_as_zero)
    img, txt = winners(P, S, mask, zero_slot)
    truth = gradients(weight_tile(img, txt, dzI, dzT, mask, n, torch.float64), P, S, torch.float64)

    # PyTorch: the reference backend on the same 16-bit leaves (fp32 arithmetic, grads in dtype).
    Pl, Sl = P.clone().requires_grad_(), S.clone().requires_grad_()
    zI, zT = reference.late_interaction(Pl, Sl, mask, pad_as_zero=pad_as_zero)
    base = torch.autograd.grad((dzI * zI).sum() + (dzT * zT).sum(), (Pl, Sl))

    W = weight_tile(img, txt, dzI, dzT, mask, n, torch.float32)
    row = dict(B=B, n=n, M=M, d=d, dtype=str(dtype).replace("torch.", ""), pad_as_zero=pad_as_zero, seed=seed)
    for name, t, b in zip(("dP", "dS"), truth, base):
        peak = t.abs().max().item()
        row[f"{name}_torch_err"] = (b.double() - t).abs().max().item()
        row[f"{name}_floor"] = 1e-5 * peak + 1e-7
        row[f"{name}_peak"] = peak
    for mode in MODES:
        if DTYPE_OF_MODE[mode] not in (dtype, torch.float32) or (mode == "fp32") != (dtype == torch.float32):
            continue
        fast = gradients(round_weights(W, mode), P, S, dtype, torch.float16 if mode == "bf16_w_fp16" else None)
        for name, t, f in zip(("dP", "dS"), truth, fast):
            err = (f.double() - t).abs().max().item()
            row[f"{name}_{mode}_err"] = err
            row[f"{name}_{mode}_ratio"] = err / max(row[f"{name}_torch_err"], 1e-30)
            row[f"{name}_{mode}_rule"] = err <= 2 * row[f"{name}_torch_err"] + row[f"{name}_floor"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--d", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for B, n in ((32, 49), (128, 49), (24, 196)):
            for pad_as_zero in (False, True):
                for seed in range(args.seeds):
                    rows.append(study_case(B, n, 16, args.d, dtype, pad_as_zero, seed))
                    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()
                                      if k.endswith("ratio") or k in ("B", "n", "dtype", "pad_as_zero", "seed")}), flush=True)
    summary = {}
    for mode in MODES:
        for name in ("dP", "dS"):
            ratios = [r[f"{name}_{mode}_ratio"] for r in rows if f"{name}_{mode}_ratio" in r]
            if ratios:
                summary[f"{name}_{mode}"] = dict(max_ratio=max(ratios), all_pass=all(r[f"{name}_{mode}_rule"] for r in rows
                                                                                      if f"{name}_{mode}_rule" in r))
    print(json.dumps(summary, indent=1))
    if args.out:
        env = dict(torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
                   command="python benchmarks/rounding_study.py " + " ".join(argv or sys.argv[1:]))
        Path(args.out).write_text(json.dumps(dict(env=env, summary=summary, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
