"""Prompts travel with the data: "auto" takes the prompts a dataset's sizes.json ships, named sets
include the synthetic data's, and PromptSets resolves every set of an evaluation at once."""
from __future__ import annotations

import json

import pytest

from egma_fast.data.synthetic import SYNTHETIC_CLASS_PROMPTS, write_synthetic_shards
from egma_fast.eval.prompts import DEFAULT_PROMPTS, PromptSets, get_prompts, resolve_prompts


def test_auto_takes_the_prompts_the_data_ships(tmp_path):
    write_synthetic_shards(tmp_path / "synth", 4, seed=0, samples_per_shard=4, image_size=32, heatmap_max_side=8,
                           progress=False)
    assert json.loads((tmp_path / "synth" / "sizes.json").read_text())["info"]["class_prompts"] == SYNTHETIC_CLASS_PROMPTS
    assert resolve_prompts("auto", tmp_path / "synth") == SYNTHETIC_CLASS_PROMPTS
    own = {"normal": ["no finding."], "nodule": ["a lung nodule."]}
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "sizes.json").write_text(json.dumps({"shards": {}, "total": 0, "info": {"class_prompts": own}}))
    assert resolve_prompts("auto", tmp_path / "real") == own
    assert resolve_prompts("auto", None) == DEFAULT_PROMPTS
    assert resolve_prompts("auto", [str(tmp_path / "x.tar")]) == DEFAULT_PROMPTS
    assert get_prompts("synthetic") == SYNTHETIC_CLASS_PROMPTS


def test_prompt_specs_and_sets():
    sets = PromptSets.resolve({"a": ["x"], "b": ["y", "z"]}, extra={"named": "rsna"}, fine=None)
    assert sets.classes == {"a": ["x"], "b": ["y", "z"]} and sets.fine_or_classes() == sets.classes
    assert sets.all_sets() == {"": sets.classes, "named": get_prompts("rsna")}
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_prompts({"a": []})
    with pytest.raises(ValueError, match="eval.prompts: prompt set must be one of"):
        resolve_prompts("nonsense")
