"""The fused ops' argument types and what every backend derives from its arguments the same way.

* :class:`CrossMapParams`: the static options of ``cross_map``, one object from the loss down to
  the kernels. Where an op schema needs scalars (the C++ ops, the Triton custom ops),
  :meth:`CrossMapParams.op_args` and :data:`CrossMapParams.OP_SCHEMA` are the only place they are
  spelled out; csrc/ops.h's EGMA_CROSS_MAP_OPTION_* macros mirror them (a test compares the two).
* :class:`CrossMapTerms`: the per-sample outputs of ``cross_map``.
* :func:`text_zero_slots`: which texts have the authors' zero-scoring slot under ``pad_as_zero``
  (SPEC 2.1), decided on the device (no host sync).
* :func:`index_dtype`: the integer dtype of the saved winner indices.
* :func:`late_interaction_inputs` / :func:`cross_map_inputs`: the op boundary (egma_fast.ops):
  every check, with a ValueError naming the argument, and the canonical forms every backend
  receives, so that no backend checks or converts on its own.
* :func:`check_late_interaction_meta` / :func:`check_cross_map_meta`: the ops' shape contracts as
  ``torch._check`` calls, for the fake (meta) implementations of every backend's custom ops.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

__all__ = [
    "CrossMapParams",
    "CrossMapTerms",
    "check_cross_map_meta",
    "check_late_interaction_meta",
    "cross_map_inputs",
    "index_dtype",
    "late_interaction_inputs",
    "text_zero_slots",
]

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CrossMapParams:
    """Static options of the per-instance op ``cross_map`` (hashable: fast backends specialise on
    them). Built from a config by :func:`egma_fast.loss_terms.cross_map_params`."""

    omega: str = "topk"  # "topk" | "threshold" (SPEC 3.1)
    k_sentences: int = 1  # top-k over sentences (rows of A); clipped to m_k
    k_patches: int = 7  # top-k over patches (rows of T); clipped to n
    floor: float = 0.01  # threshold omega: + floor after thresholding
    single_sentence: str = "drop"  # m_k = 1: "drop" | "mse"
    gaze_threshold: float = 0.0  # GL = GS > gaze_threshold
    with_mlce: bool = True
    with_egm: bool = True
    #: EGM adds the gaze prior GS to its weights (SPEC 3.1 - 3.2). Off: EGM ignores gaze (MLCE
    #: still uses it); the caller then passes every sample the no-gaze-batch theta.
    egm_use_gaze: bool = True

    #: The options as the op schemas declare them, in :meth:`op_args` order.
    OP_SCHEMA: ClassVar[str] = (
        "bool threshold_omega, int k_sentences, int k_patches, float floor_value, bool single_mse, "
        "float gaze_threshold, bool with_mlce, bool with_egm, bool egm_use_gaze"
    )

    def __post_init__(self) -> None:
        if self.omega not in ("topk", "threshold"):
            raise ValueError(f"omega must be 'topk' or 'threshold', got {self.omega!r}")
        if self.single_sentence not in ("drop", "mse"):
            raise ValueError(f"single_sentence must be 'drop' or 'mse', got {self.single_sentence!r}")
        if self.k_sentences < 1 or self.k_patches < 1:
            raise ValueError(f"k_sentences and k_patches must be >= 1, got {self.k_sentences} and {self.k_patches}")

    def op_args(self) -> tuple[bool, int, int, float, bool, float, bool, bool, bool]:
        """The options as the scalars of :data:`OP_SCHEMA`, for a custom op call."""
        return (self.omega == "threshold", int(self.k_sentences), int(self.k_patches), float(self.floor),
                self.single_sentence == "mse", float(self.gaze_threshold), bool(self.with_mlce),
                bool(self.with_egm), bool(self.egm_use_gaze))

    @classmethod
    def from_op_args(cls, *args: bool | int | float) -> "CrossMapParams":
        """The inverse of :meth:`op_args` (inside a custom op, which receives the scalars)."""
        threshold, k_s, k_p, floor, mse, tau, with_mlce, with_egm, egm_use_gaze = args
        return cls("threshold" if threshold else "topk", k_s, k_p, floor, "mse" if mse else "drop", tau,
                   with_mlce, with_egm, egm_use_gaze)

    def replace(self, **changes: object) -> "CrossMapParams":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class CrossMapTerms(NamedTuple):
    """Per-sample outputs of ``cross_map``, each [B] (float32, float64 for float64 inputs)."""

    mlce_s2p: torch.Tensor  # fL^{S2P}_k (0 where use_gaze is False or with_mlce is off)
    mlce_p2s: torch.Tensor  # fL^{P2S}_k
    egm_image: torch.Tensor  # mL^I_k (0 where dropped / off)
    egm_text: torch.Tensor  # mL^T_k


def text_zero_slots(sent_mask: torch.Tensor, pad_as_zero: bool) -> torch.Tensor:
    """[Bt] bool: True for the texts whose image-side max is floored at 0.

    The authors pack each batch's sentences into zero vectors up to the longest report, m_max =
    max_l m_l: a text with m_l < m_max has a zero slot after its real sentences, a text with
    m_l = m_max has none, and the tensors' width M never matters. All False without
    ``pad_as_zero``. sent_mask [Bt, M] bool: pass the whole (global) batch's mask.
    """
    m = sent_mask.sum(dim=1)
    if not pad_as_zero or m.numel() == 0:
        return torch.zeros(m.shape, dtype=torch.bool, device=sent_mask.device)
    return m < m.max()


def index_dtype(count: int) -> torch.dtype:
    """The smallest integer dtype holding the indices 0..count-1 (csrc/ops.h index_dtype)."""
    if count <= 256:
        return torch.uint8
    if count <= 32768:
        return torch.int16
    return torch.int32


# ----------------------------------------------------------------------------------------------
# The op boundary: checks and canonical forms
# ----------------------------------------------------------------------------------------------
def _describe(x: object) -> str:
    return f"{x.dtype} tensor of shape {list(x.shape)} on {x.device}" if isinstance(x, Tensor) else type(x).__name__


def _check_features(name: str, x: object, layout: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a 3-D float16 / bfloat16 / float32 / float64 tensor {layout}, got {_describe(x)}")


def _check_tensor(name: str, x: object, shape: tuple[int, ...], device: torch.device, kind: str) -> None:
    """kind "bool": a bool tensor; "float": a floating tensor."""
    ok = isinstance(x, Tensor) and tuple(x.shape) == tuple(shape) and x.device == device and (
        x.dtype == torch.bool if kind == "bool" else x.dtype.is_floating_point)
    if not ok:
        raise ValueError(f"{name} must be a {kind} tensor of shape {list(shape)} on {device}, got {_describe(x)}")


def _one_dtype(P: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """P and S in the wider of their dtypes (a differentiable cast)."""
    dtype = torch.promote_types(P.dtype, S.dtype)
    return P.to(dtype), S.to(dtype)


def late_interaction_inputs(
    P: Tensor, S: Tensor, sent_mask: Tensor, patch_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Check late_interaction's arguments and return what every backend may assume: P [Bi, n, d]
    and S [Bt, M, d] floating, on one device, in one dtype (the wider), sharing d; sent_mask
    [Bt, M] and patch_mask [Bi, n] (or None: every patch valid) bool on that device."""
    _check_features("P", P, "[Bi, n, d]")
    _check_features("S", S, "[Bt, M, d]")
    if S.device != P.device or S.shape[2] != P.shape[2]:
        raise ValueError(f"P [Bi, n, d] and S [Bt, M, d] must share d and device, got {_describe(P)} and {_describe(S)}")
    _check_tensor("sent_mask", sent_mask, (S.shape[0], S.shape[1]), P.device, "bool")
    if patch_mask is not None:
        _check_tensor("patch_mask", patch_mask, (P.shape[0], P.shape[1]), P.device, "bool")
    P, S = _one_dtype(P, S)
    return P, S, sent_mask, patch_mask


def cross_map_inputs(
    P: Tensor, S: Tensor, sent_mask: Tensor, GS: Tensor, use_gaze: Tensor, theta: Tensor, alpha: Tensor,
    params: CrossMapParams,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, CrossMapParams]:
    """Check cross_map's arguments and return what every backend may assume: the matched pairs P
    [B, n, d] and S [B, M, d] as in :func:`late_interaction_inputs`, sent_mask [B, M] and use_gaze [B]
    bool, GS [B, M, n] and theta [B] floating and detached (data: SPEC 3.1 gives them no gradient),
    alpha a one-element floating tensor, and params with k_patches clipped to n."""
    _check_features("P", P, "[B, n, d]")
    _check_features("S", S, "[B, M, d]")
    B, n, d = P.shape
    if S.device != P.device or S.shape[0] != B or S.shape[2] != d:
        raise ValueError(f"cross_map works on matched pairs: P [B, n, d] and S [B, M, d] must share B, d and device, "
                         f"got {_describe(P)} and {_describe(S)}")
    M = S.shape[1]
    _check_tensor("sent_mask", sent_mask, (B, M), P.device, "bool")
    _check_tensor("use_gaze", use_gaze, (B,), P.device, "bool")
    _check_tensor("GS", GS, (B, M, n), P.device, "float")
    _check_tensor("theta", theta, (B,), P.device, "float")
    if not isinstance(alpha, Tensor) or alpha.numel() != 1 or not alpha.dtype.is_floating_point or alpha.device != P.device:
        raise ValueError(f"alpha must be a one-element floating tensor on {P.device}, got {_describe(alpha)}")
    if not isinstance(params, CrossMapParams):
        raise ValueError(f"params must be a CrossMapParams, got {type(params).__name__}")
    P, S = _one_dtype(P, S)
    if params.k_patches > n:
        params = params.replace(k_patches=n)
    return P, S, sent_mask, GS.detach(), use_gaze, theta.detach(), alpha, params


# ----------------------------------------------------------------------------------------------
# Shape contracts for the fake (meta) implementations: torch._check raises a clear error while
# tracing (torch.compile, opcheck) instead of producing wrongly shaped outputs.
# ----------------------------------------------------------------------------------------------
def _check_shape(name: str, x: torch.Tensor, shape: tuple) -> None:
    torch._check(tuple(x.shape) == tuple(shape), lambda: f"{name} must have shape {list(shape)}, got {list(x.shape)}")


def check_late_interaction_meta(P: torch.Tensor, S: torch.Tensor, sent_mask: torch.Tensor,
                                patch_mask: torch.Tensor | None, zero_slot: torch.Tensor) -> tuple[int, int, int, int]:
    """late_interaction's inputs: P [Bi, n, d], S [Bt, M, d], sent_mask [Bt, M], patch_mask [Bi, n]
    or None, zero_slot [Bt]. Returns (Bi, Bt, n, M)."""
    torch._check(P.dim() == 3 and S.dim() == 3, lambda: f"P and S must be 3-D, got {list(P.shape)} and {list(S.shape)}")
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    torch._check(S.shape[2] == d, lambda: f"P [Bi, n, d] and S [Bt, M, d] must share d, got {d} and {S.shape[2]}")
    _check_shape("sent_mask", sent_mask, (Bt, M))
    if patch_mask is not None:
        _check_shape("patch_mask", patch_mask, (Bi, n))
    _check_shape("zero_slot", zero_slot, (Bt,))
    return Bi, Bt, n, M


def check_cross_map_meta(P: torch.Tensor, S: torch.Tensor, sent_mask: torch.Tensor, GS: torch.Tensor,
                         use_gaze: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[int, int, int]:
    """cross_map's inputs: P [B, n, d], S [B, M, d], sent_mask [B, M], GS [B, M, n], use_gaze [B],
    theta [B], alpha one element. Returns (B, n, M)."""
    torch._check(P.dim() == 3 and S.dim() == 3, lambda: f"P and S must be 3-D, got {list(P.shape)} and {list(S.shape)}")
    B, n, d = P.shape
    M = S.shape[1]
    torch._check(S.shape[0] == B and S.shape[2] == d,
                 lambda: f"cross_map works on matched pairs: P {list(P.shape)} and S {list(S.shape)} must share B and d")
    _check_shape("sent_mask", sent_mask, (B, M))
    _check_shape("GS", GS, (B, M, n))
    _check_shape("use_gaze", use_gaze, (B,))
    _check_shape("theta", theta, (B,))
    torch._check(alpha.numel() == 1, lambda: f"alpha must have one element, got shape {list(alpha.shape)}")
    return B, n, M
