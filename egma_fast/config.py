"""EGMAConfig: every option of shared/SPEC.md, with the presets ``paper`` and ``official``.

``paper`` (the default) is the method as the NeurIPS 2024 paper writes it; ``official`` is the
arithmetic of the authors' released code (MoMarky/EGMA, ``SPARC_FILIP_PartGaze_Model``). Every
difference between the two is a named field, so any mix can be configured::

    EGMAConfig.preset("official", lambda_egm=1.0)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

GazePool = Literal["area_max", "bilinear_antialias"]
Omega = Literal["topk", "threshold"]
SingleSentence = Literal["drop", "mse"]
LogitScaleClamp = Literal["clamp", "inplace"]

#: ln(100): the largest allowed log logit scale (alpha <= 100), as in CLIP and the authors' code.
LOGIT_SCALE_MAX = 4.6052


@dataclass(frozen=True)
class EGMAConfig:
    """All options of the EGMA loss. Field names follow SPEC.md; defaults are the ``paper`` preset."""

    preset_name: str = "paper"

    # --- SPEC 2.1 / 2.2: late interaction and the fine-grained contrastive term -------------
    #: The authors' zero-vector packing: a text with fewer sentences than the batch's longest
    #: (m_l < m_max, over the global batch) has one slot scoring exactly 0 in the image-side max;
    #: the tensors' width M never matters. False: padding never counts.
    pad_as_zero: bool = False
    #: Text-side CE normalises over images (FILIP, the paper). False: softmax over texts for each
    #: image, as the authors' code does.
    t2i_over_images: bool = True

    # --- SPEC 2.3 / 2.4: gaze matrices and MLCE ---------------------------------------------
    #: How a sentence heatmap is pooled onto the sqrt(n) x sqrt(n) patch grid.
    gaze_pool: GazePool = "area_max"
    #: GL = 1[GS > tau].
    gaze_threshold: float = 0.0
    #: Weights (w_s2p, w_p2s) of the sentence-to-patch and patch-to-sentence MLCE terms.
    mlce_weights: tuple[float, float] = (0.5, 0.5)
    lambda_mlce: float = 1.0

    # --- SPEC 3: EGM cross-modal mapping ----------------------------------------------------
    #: EGM adds the gaze prior GS to its weights (SPEC 3.1 - 3.2; the paper). False (the authors'
    #: released code, whose forward() calls the gaze-free EGM): EGM uses no gaze and every sample
    #: takes the no-gaze-batch regime (theta and weights), while MLCE still uses the gaze.
    egm_use_gaze: bool = True
    #: Row sparsifier omega: top-k binarisation (paper) or min-max threshold (official).
    egm_omega: Omega = "topk"
    #: k for rows over sentences (each patch keeps its k best sentences).
    egm_topk_sentences: int = 1
    #: k for rows over patches; None means ceil(n / 7).
    egm_topk_patches: int | None = None
    #: Threshold theta of the official omega, per regime (SPEC 3.1).
    egm_theta_no_gaze_batch: float = 2.0 / 7.0
    egm_theta_gaze: float = 3.0 / 7.0
    egm_theta_mixed_no_gaze: float = 1.0 / 7.0
    #: Constant added to every thresholded weight before row-L1 (official omega).
    egm_floor: float = 0.01
    #: (w_I, w_T): weights of the image-side and text-side in-instance CLIP terms.
    egm_weights: tuple[float, float] = (0.5, 0.5)
    #: (w_I, w_T) for samples without gaze in a batch that has some gaze (official: 0.5 / 0.5).
    egm_weights_mixed_no_gaze: tuple[float, float] = (0.5, 0.5)
    #: m_k = 1 texts: "drop" both EGM terms (paper) or use ||Cross_S - S||^2 for the text term
    #: and 0 for the image term (official).
    egm_single_sentence: SingleSentence = "drop"

    # --- SPEC 4: total ------------------------------------------------------------------------
    lambda_clip: float = 0.0
    lambda_egm: float = 1.0

    # --- logit scale (SPEC 1) -----------------------------------------------------------------
    logit_scale_init: float = math.log(1.0 / 0.07)
    logit_scale_max: float = LOGIT_SCALE_MAX
    #: "clamp": alpha = exp(clamp(t, 0, max)), gradient masked outside the range (paper).
    #: "inplace": clamp the stored parameter in place, then alpha = exp(t) with unmasked gradient
    #: (the authors' code).
    logit_scale_clamp: LogitScaleClamp = "clamp"

    # --- memory -------------------------------------------------------------------------------
    #: Late interaction (fused backends) keeps B x B x (n + M) winner indices for its backward (1
    #: byte each for n, M < 256: 68 MB at B = 1024, n = 49), so the backward is two GEMMs. True keeps
    #: B x B x M and recomputes the image-side winners in the backward instead (slower). Values
    #: and gradients are the same either way.
    low_memory: bool = False

    # --- input checking -------------------------------------------------------------------------
    #: Check every input and the log logit scale for NaN/Inf (one fused min/max pass per tensor,
    #: asserted on the device: no host sync). The other value checks (mask values, gaze in
    #: [0, 1], a real sentence per text) always run, on the device too.
    check_finite: bool = True

    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.gaze_pool not in ("area_max", "bilinear_antialias"):
            raise ValueError(f"gaze_pool must be 'area_max' or 'bilinear_antialias', got {self.gaze_pool!r}")
        if self.egm_omega not in ("topk", "threshold"):
            raise ValueError(f"egm_omega must be 'topk' or 'threshold', got {self.egm_omega!r}")
        if self.egm_single_sentence not in ("drop", "mse"):
            raise ValueError(f"egm_single_sentence must be 'drop' or 'mse', got {self.egm_single_sentence!r}")
        if self.logit_scale_clamp not in ("clamp", "inplace"):
            raise ValueError(f"logit_scale_clamp must be 'clamp' or 'inplace', got {self.logit_scale_clamp!r}")
        if self.egm_topk_sentences < 1:
            raise ValueError(f"egm_topk_sentences must be >= 1, got {self.egm_topk_sentences}")
        if self.egm_topk_patches is not None and self.egm_topk_patches < 1:
            raise ValueError(f"egm_topk_patches must be >= 1 or None, got {self.egm_topk_patches}")
        for name in ("mlce_weights", "egm_weights", "egm_weights_mixed_no_gaze"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"{name} must be a pair of floats, got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        for name in ("lambda_mlce", "lambda_egm", "lambda_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str = "paper", **overrides: Any) -> "EGMAConfig":
        """The named preset ("paper" or "official"), with keyword overrides of any field."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown EGMAConfig option(s) {sorted(unknown)}; known: {sorted(fields)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides: Any) -> "EGMAConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **overrides)

    def topk_patches(self, n: int) -> int:
        """k for rows over patches, clipped to the row length n."""
        k = self.egm_topk_patches if self.egm_topk_patches is not None else math.ceil(n / 7)
        return max(1, min(k, n))


PRESETS: dict[str, EGMAConfig] = {
    "paper": EGMAConfig(),
    "official": EGMAConfig(
        preset_name="official",
        pad_as_zero=True,
        t2i_over_images=False,
        gaze_pool="bilinear_antialias",
        mlce_weights=(0.8, 0.2),
        egm_omega="threshold",
        egm_weights=(0.7, 0.3),
        egm_weights_mixed_no_gaze=(0.5, 0.5),
        egm_single_sentence="mse",
        egm_use_gaze=False,
        lambda_clip=0.0,
        lambda_egm=0.0,
        logit_scale_clamp="inplace",
    ),
}


def resolve_config(config: "EGMAConfig | str | None", **overrides: Any) -> EGMAConfig:
    """Accept a config, a preset name or None (paper), plus overrides."""
    if config is None:
        config = "paper"
    if isinstance(config, str):
        return EGMAConfig.preset(config, **overrides)
    if not isinstance(config, EGMAConfig):
        raise ValueError(f"config must be an EGMAConfig or a preset name, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config
