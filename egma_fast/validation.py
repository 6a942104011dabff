"""Checks at the public API boundary: every bad input raises an error that names the argument and
says what was expected. Nothing is cast or dropped silently.

Two kinds of check, so that a training step never waits for the host:

* metadata (type, dtype, rank, shape, device): plain Python, raises ValueError at once;
* values (NaN / Inf, gaze outside [0, 1], mask entries other than 0 / 1, texts without a real
  sentence, lengths out of range, has_gaze without gaze maps): :func:`device_assert`, computed and
  asserted on the tensors' device with ``torch._assert_async``. On CPU tensors it raises a
  RuntimeError with the message at once; on a GPU the step is not stalled and a failure
  surfaces as a device-side assert at the next synchronisation (rerun on CPU, or with
  CUDA_LAUNCH_BLOCKING=1, to see the message). torch.compile traces it without a graph break.
"""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def device_assert(ok: torch.Tensor, message: str) -> None:
    """Assert a one-element bool tensor on its device, without a host sync (see the module)."""
    torch._assert_async(ok, message)


def check_features(name: str, x: object, rank: int, layout: str) -> torch.Tensor:
    """A floating tensor of the given rank (integer and bool tensors are rejected, not cast)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got shape {tuple(x.shape)}")
    return x


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, dims: dict[int, int] | None = None) -> None:
    """x lives on ref's device with ref's dtype, and x.shape[a] == ref.shape[b] for each a: b in dims."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; both must be on one device")
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
    for a, b in (dims or {}).items():
        if x.shape[a] != ref.shape[b]:
            raise ValueError(
                f"{name} has size {x.shape[a]} in dim {a} but {ref_name} has size {ref.shape[b]} in dim {b}; they must match"
                f" ({name} shape {tuple(x.shape)}, {ref_name} shape {tuple(ref.shape)})"
            )


def _finite(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # min and max propagate NaN, and an Inf is the min or the max: one pass, no temporary, no
    # overflow (unlike a sum).
    return torch.isfinite(lo) & torch.isfinite(hi)


def _finite_message(name: str) -> str:
    return f"{name} contains a non-finite value (NaN or Inf); pass check_finite=False to skip this check"


def check_finite(name: str, x: torch.Tensor) -> None:
    """Assert on the device that x holds no NaN or Inf."""
    if x.numel():
        device_assert(_finite(*torch.aminmax(x)), _finite_message(name))


def check_gaze_values(name: str, x: torch.Tensor, finite: bool) -> None:
    """Assert on the device that gaze maps lie in [0, 1] (SPEC 1) and, with ``finite``, hold no
    NaN / Inf: one min / max pass for both."""
    if not x.numel():
        return
    lo, hi = torch.aminmax(x)
    if finite:
        device_assert(_finite(lo, hi), _finite_message(name))
    # NaN compares False both ways: without ``finite`` it is not reported as out of range.
    device_assert(~((lo < 0) | (hi > 1)), f"{name} values must lie in [0, 1]; some are below 0 or above 1")


def sentence_mask_from(
    sentence_mask: torch.Tensor | None,
    sentence_lengths: torch.Tensor | None,
    batch: int,
    slots: int,
    device: torch.device,
) -> torch.Tensor:
    """The [B, M] bool sentence mask from a mask or per-text lengths (not both); all-valid if neither.

    Every text must keep at least one real sentence (asserted on the device).
    """
    if sentence_mask is not None and sentence_lengths is not None:
        raise ValueError("pass sentence_mask or sentence_lengths, not both")
    if sentence_lengths is not None:
        if not isinstance(sentence_lengths, torch.Tensor) or sentence_lengths.dtype.is_floating_point or sentence_lengths.dtype == torch.bool:
            raise ValueError("sentence_lengths must be an integer tensor of shape [B]")
        if sentence_lengths.shape != (batch,):
            raise ValueError(f"sentence_lengths must have shape [B] = [{batch}], got {tuple(sentence_lengths.shape)}")
        if sentence_lengths.device != device:
            raise ValueError(f"sentence_lengths is on {sentence_lengths.device} but sentence_features is on {device}")
        device_assert(((sentence_lengths >= 1) & (sentence_lengths <= slots)).all(),
                      f"sentence_lengths must lie in [1, M] = [1, {slots}] (every text needs a real sentence)")
        return torch.arange(slots, device=device)[None, :] < sentence_lengths[:, None]
    if sentence_mask is None:
        return torch.ones(batch, slots, dtype=torch.bool, device=device)
    if not isinstance(sentence_mask, torch.Tensor):
        raise ValueError(f"sentence_mask must be a bool tensor of shape [B, M], got {type(sentence_mask).__name__}")
    if sentence_mask.dtype.is_floating_point:
        raise ValueError(f"sentence_mask must be bool (or integer 0/1) of shape [B, M], got dtype {sentence_mask.dtype}")
    if sentence_mask.shape != (batch, slots):
        raise ValueError(f"sentence_mask must have shape [B, M] = [{batch}, {slots}] to match sentence_features, got {tuple(sentence_mask.shape)}")
    if sentence_mask.device != device:
        raise ValueError(f"sentence_mask is on {sentence_mask.device} but sentence_features is on {device}")
    if sentence_mask.dtype != torch.bool:
        device_assert(((sentence_mask == 0) | (sentence_mask == 1)).all(), "sentence_mask must hold only 0 and 1 (or be bool)")
        sentence_mask = sentence_mask != 0
    device_assert(sentence_mask.any(dim=1).all(),
                  "every text needs at least one real sentence; some row of sentence_mask has none")
    return sentence_mask


def check_has_gaze(has_gaze: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A [B] bool flag tensor."""
    if not isinstance(has_gaze, torch.Tensor) or has_gaze.dtype != torch.bool:
        raise ValueError(f"has_gaze must be a bool tensor of shape [B], got {getattr(has_gaze, 'dtype', type(has_gaze).__name__)}")
    if has_gaze.shape != (batch,):
        raise ValueError(f"has_gaze must have shape [B] = [{batch}], got {tuple(has_gaze.shape)}")
    if has_gaze.device != device:
        raise ValueError(f"has_gaze is on {has_gaze.device} but the features are on {device}")
    return has_gaze
