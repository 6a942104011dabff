"""The late-interaction backward's weight-tile precision (kernels/late_interaction.py GRAD_MODE),
checked on the CPU by emulation (benchmarks/rounding_study.py): with the mode the kernels use for
each 16-bit dtype, gradient errors against float64 stay within the flash-attention rule (2x
PyTorch's own error from the same inputs, plus a floor), and the alternative the mode replaced
for fp16 (one unscaled fp16 rounding) is measurably worse. The GPU tests check the kernels
themselves against the same rule."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from egma_fast.ops import triton_backend as tb  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "rounding_study", Path(__file__).resolve().parent.parent / "benchmarks" / "rounding_study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

li = tb._li
STUDY_MODE = {li.W_FP16: "bf16_w_fp16", li.W_FP16_SPLIT: "fp16_scaled_split"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [49, 196])
def test_kernel_weight_mode_meets_flash_rule(dtype: torch.dtype, n: int) -> None:
    mode = STUDY_MODE[li.weight_mode(dtype)]
    B = 24 if n == 49 else 8
    for seed in range(2):
        row = study.study_case(B, n, 16, 256, dtype, pad_as_zero=seed == 1, seed=seed)
        for name in ("dP", "dS"):
            assert row[f"{name}_{mode}_rule"], (name, mode, row[f"{name}_{mode}_ratio"])
            assert row[f"{name}_{mode}_ratio"] < 2.0, (name, mode, row)


def test_chosen_modes_beat_the_alternatives() -> None:
    """Why the kernels do what they do: rounding W to bf16 (what a bf16 product would need) and one
    fp16 rounding for fp16 features both give larger gradient errors than the chosen modes."""
    bf16 = study.study_case(24, 49, 16, 256, torch.bfloat16, pad_as_zero=True, seed=1)
    fp16 = study.study_case(24, 49, 16, 256, torch.float16, pad_as_zero=False, seed=0)
    assert bf16["dP_bf16_w_fp16_err"] < bf16["dP_bf16_err"]
    for name in ("dP", "dS"):
        assert fp16[f"{name}_fp16_scaled_split_err"] < fp16[f"{name}_fp16_err"]


def test_product_scales_are_powers_of_two_near_the_peaks() -> None:
    for peak in (3e-9, 1e-4, 0.3, 1.0, 7.5):
        dzI = torch.tensor([[peak / 4, -peak / 4]])
        dzT = torch.tensor([[0.0, -3 * peak / 4]])
        P = torch.full((1, 2, 3), 2 * peak)
        S = torch.full((2, 1, 3), -peak / 3)
        pmask, smask = torch.ones(1, 2, dtype=torch.uint8), torch.ones(2, 1, dtype=torch.uint8)
        PF, SF, scales = li._product_operands(li.W_FP16, dzI, dzT, P, S, pmask, smask)
        w_scale = float(scales[0])
        assert math.log2(w_scale) == round(math.log2(w_scale))
        assert 0.5 <= (peak / 4 + 3 * peak / 4) * w_scale <= 1.0
        assert PF.dtype == SF.dtype == torch.float16
        assert 0.5 <= float(PF.abs().max()) <= 1.0 and 0.5 <= float(SF.abs().max()) <= 1.0
        # the unscale factors undo W's and the features' (power-of-two) scales exactly
        s_scale = 2.0 ** round(math.log2(float(SF.float().abs().max() / S.abs().max())))
        p_scale = 2.0 ** round(math.log2(float(PF.float().abs().max() / P.abs().max())))
        assert float(scales[1]) * w_scale * s_scale == 1.0
        assert float(scales[2]) * w_scale * p_scale == 1.0
    _, _, scales = li._product_operands(li.W_FP16_SPLIT, torch.zeros(2, 2), torch.zeros(2, 2), P, S, pmask, smask)
    assert scales.tolist() == [1.0, 1.0, 1.0]


def test_masked_rows_neither_set_the_scale_nor_overflow() -> None:
    """A masked slot or patch may hold anything (the reference ignores it): it must not shrink the
    valid rows' fp16 precision through the scale, nor become an fp16 infinity (0 x inf = NaN)."""
    S = torch.randn(2, 3, 8) * 0.1
    S[0, 2] = 1e9  # a masked slot's junk
    smask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.uint8)
    P = torch.randn(2, 4, 8) * 0.1
    P[1, 3] = -3e38
    pmask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.uint8)
    PF, SF, _ = li._product_operands(li.W_FP16, torch.ones(2, 2), torch.ones(2, 2), P, S, pmask, smask)
    assert torch.isfinite(PF).all() and torch.isfinite(SF).all()
    assert SF[0, 2].abs().max() == 0 and PF[1, 3].abs().max() == 0
    assert 0.5 <= float(SF.float().abs().max()) <= 1.0 and 0.5 <= float(PF.float().abs().max()) <= 1.0


def test_pow2_scale_stays_finite() -> None:
    """A subnormal or infinite peak gives a finite power of two (never inf x 0 = NaN in W)."""
    for peak in (1e-45, 1e-40, float("inf"), 3e38):
        scale = li._pow2_scale(torch.tensor(peak))
        assert torch.isfinite(scale) and float(scale) > 0, peak
