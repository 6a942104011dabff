"""Default chest X-ray prompt sets for zero-shot classification (class name -> prompt templates).

Prompts are short radiology-report sentences, because the text tower was pretrained on report
sentences. The class order of a dict is the class index order used for labels; class names are
snake_case identifiers. :data:`DEFAULT_PROMPTS` follows the class order of egma_fast's data
(``egma_fast.data.synthetic.FINDING_CLASSES``); :func:`align_prompts` reorders any prompt set
to a dataset's class list.

Prompts travel with the data: a dataset may ship its own class prompts in its sizes.json
(``info.class_prompts``; the synthetic generator does), which ``"auto"`` picks
(:func:`resolve_prompts`, :class:`PromptSets`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egma_fast.data.shards import SIZES_FILE, read_sizes
from egma_fast.data.synthetic import SYNTHETIC_CLASS_PROMPTS

#: The five finding classes of egma_fast's default evaluation, in the order of its synthetic data.
DEFAULT_PROMPTS: dict[str, list[str]] = {
    "no_finding": [
        "no acute cardiopulmonary process.",
        "the lungs are clear.",
        "no focal consolidation, effusion or pneumothorax.",
        "normal heart size.",
        "normal chest radiograph.",
    ],
    "cardiomegaly": [
        "cardiomegaly.",
        "the heart is enlarged.",
        "the cardiac silhouette is enlarged.",
        "mild cardiomegaly is present.",
        "moderate enlargement of the cardiac silhouette.",
    ],
    "pleural_effusion": [
        "pleural effusion.",
        "there is a pleural effusion.",
        "small left pleural effusion.",
        "moderate right pleural effusion.",
        "blunting of the costophrenic angle consistent with effusion.",
    ],
    "opacity": [
        "airspace opacity.",
        "there is a focal consolidation.",
        "patchy opacity in the lung base.",
        "consolidation in the right lower lobe.",
        "opacity concerning for pneumonia.",
    ],
    "pneumothorax": [
        "pneumothorax.",
        "there is a pneumothorax.",
        "small apical pneumothorax.",
        "a large right pneumothorax is seen.",
        "visible pleural line with absent lung markings.",
    ],
}

#: CheXpert 5x200 classes (zero-shot accuracy / F1 in the paper).
CHEXPERT_5X200_PROMPTS: dict[str, list[str]] = {
    "atelectasis": [
        "atelectasis.",
        "subsegmental atelectasis at the lung bases.",
        "mild bibasilar atelectasis.",
        "linear atelectasis in the left lower lobe.",
    ],
    "cardiomegaly": DEFAULT_PROMPTS["cardiomegaly"][:4],
    "consolidation": [
        "consolidation.",
        "there is a focal consolidation.",
        "consolidation in the right lower lobe.",
        "patchy consolidation at the left base.",
    ],
    "edema": [
        "pulmonary edema.",
        "mild interstitial edema.",
        "moderate pulmonary edema.",
        "vascular congestion with interstitial edema.",
    ],
    "pleural_effusion": DEFAULT_PROMPTS["pleural_effusion"][:4],
}

#: RSNA pneumonia (2 classes).
RSNA_PROMPTS: dict[str, list[str]] = {
    "normal": DEFAULT_PROMPTS["no_finding"][:4],
    "pneumonia": [
        "pneumonia.",
        "findings consistent with pneumonia.",
        "focal opacity concerning for pneumonia.",
        "multifocal pneumonia.",
    ],
}

#: SIIM-ACR pneumothorax (2 classes).
SIIM_PROMPTS: dict[str, list[str]] = {
    "no_pneumothorax": [
        "no pneumothorax.",
        "there is no pneumothorax.",
        "no evidence of pneumothorax.",
        "the lungs are clear without pneumothorax.",
    ],
    "pneumothorax": DEFAULT_PROMPTS["pneumothorax"][:4],
}

PROMPT_SETS: dict[str, dict[str, list[str]]] = {
    "default": DEFAULT_PROMPTS,
    "chexpert5x200": CHEXPERT_5X200_PROMPTS,
    "rsna": RSNA_PROMPTS,
    "siim": SIIM_PROMPTS,
    #: egma_fast's synthetic data, in its report templates' words
    "synthetic": SYNTHETIC_CLASS_PROMPTS,
}


def get_prompts(name: str = "default") -> dict[str, list[str]]:
    """A copy of a named prompt set: "default", "chexpert5x200", "rsna", "siim" or "synthetic"."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {sorted(PROMPT_SETS)}, got {name!r}")
    return {cls: list(prompts) for cls, prompts in PROMPT_SETS[name].items()}


def dataset_prompts(dataset: Any) -> dict[str, list[str]] | None:
    """The class prompts a dataset folder ships in its sizes.json (None: it ships none, or
    ``dataset`` is not a folder with a sizes.json)."""
    if not isinstance(dataset, (str, os.PathLike)) or not (Path(dataset) / SIZES_FILE).is_file():
        return None
    info = read_sizes(dataset).get("info", {})
    if isinstance(info.get("class_prompts"), Mapping):
        return _checked(info["class_prompts"], f"{Path(dataset) / SIZES_FILE}: info.class_prompts")
    if str(info.get("generator", "")).endswith("synthetic"):  # written before class_prompts were stored
        return get_prompts("synthetic")
    return None


def _checked(prompts: Mapping[str, Any], what: str) -> dict[str, list[str]]:
    out = {str(k): [str(p) for p in v] for k, v in prompts.items()}
    if not out or any(not v for v in out.values()):
        raise ValueError(f"{what} must map each class name to a non-empty list of prompts")
    return out


def resolve_prompts(spec: Any, dataset: Any = None) -> dict[str, list[str]]:
    """Class prompts from a spec: a mapping class -> prompts, a prompt-set name (see
    :func:`get_prompts`), or "auto": the prompts ``dataset`` ships (:func:`dataset_prompts`),
    else the "default" set."""
    if isinstance(spec, Mapping):
        return _checked(spec, "eval.prompts")
    if spec == "auto":
        return dataset_prompts(dataset) or get_prompts("default")
    try:
        return get_prompts(spec)
    except ValueError as exc:
        raise ValueError(f"eval.prompts: {exc} (or 'auto', or a mapping)") from exc


@dataclass(frozen=True)
class PromptSets:
    """Every prompt set of one zero-shot evaluation (class names in the class index order).

    classes: class -> prompts of global zero-shot (reported as zs_*).
    extra: more sets, name -> class -> prompts (each reported as zs_<name>_*).
    fine: one-sentence prompts of the fine-grained patch-sentence score (None: ``classes``).
    """

    classes: dict[str, list[str]]
    extra: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    fine: dict[str, list[str]] | None = None

    @classmethod
    def resolve(cls, prompts: Any, extra: Mapping[str, Any] | None = None, fine: Any = None,
                dataset: Any = None) -> "PromptSets":
        """Each spec through :func:`resolve_prompts` against the evaluation data ``dataset``."""
        return cls(
            classes=resolve_prompts(prompts, dataset),
            extra={name: resolve_prompts(spec, dataset) for name, spec in (extra or {}).items()},
            fine=None if fine is None else resolve_prompts(fine, dataset),
        )

    def all_sets(self) -> dict[str, dict[str, list[str]]]:
        """Label -> prompts of every set of global zero-shot ("" for the main one)."""
        return {"": self.classes, **self.extra}

    def fine_or_classes(self) -> dict[str, list[str]]:
        return self.fine if self.fine is not None else self.classes


def _norm_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def align_prompts(class_prompts: dict[str, list[str]], class_names: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Reorder ``class_prompts`` to ``class_names`` (a dataset's class index order).

    Names match ignoring case, underscores, hyphens and repeated spaces ("No Finding" ==
    "no_finding"). Returns a new dict keyed by ``class_names``.

    Raises:
        ValueError: a class in ``class_names`` has no prompts.
    """
    by_norm = {_norm_name(k): v for k, v in class_prompts.items()}
    missing = [c for c in class_names if _norm_name(c) not in by_norm]
    if missing:
        raise ValueError(f"class_prompts has no prompts for classes {missing}; it has {list(class_prompts)}")
    return {c: list(by_norm[_norm_name(c)]) for c in class_names}
