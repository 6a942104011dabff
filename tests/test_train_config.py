"""TrainConfig loading (YAML / JSON / TOML, overrides, errors), the LR schedule, gradient clipping,
and the checkpoint manager's atomicity rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from egma_fast.train.config import ConfigError, TrainConfig, apply_overrides, load_config
from egma_fast.train.optim import WarmupCosine

REPO = Path(__file__).resolve().parent.parent


def test_yaml_json_toml_give_the_same_config(tmp_path):
    yaml_text = """
run_dir: runs/x
data: {train: data/train, batch_size: 8}
model: {image_model: tiny-vit, image_size: 64, embed_dim: 16}
loss: {preset: official, overrides: {lambda_egm: 1.0}}
optim: {lr: 3.0e-4, betas: [0.9, 0.95], max_steps: 50}
eval: {retrieval_ks: [1, 5]}
"""
    (tmp_path / "c.yaml").write_text(yaml_text)
    a = load_config(tmp_path / "c.yaml")
    (tmp_path / "c.json").write_text(json.dumps(a.to_dict()))
    b = load_config(tmp_path / "c.json")
    toml_text = """
run_dir = "runs/x"
[data]
train = "data/train"
batch_size = 8
[model]
image_model = "tiny-vit"
image_size = 64
embed_dim = 16
[loss]
preset = "official"
overrides = { lambda_egm = 1.0 }
[optim]
lr = 3.0e-4
betas = [0.9, 0.95]
max_steps = 50
[eval]
retrieval_ks = [1, 5]
"""
    (tmp_path / "c.toml").write_text(toml_text)
    c = load_config(tmp_path / "c.toml")
    assert a == b == c
    assert a.optim.betas == (0.9, 0.95) and a.model.image_model == "tiny-vit"
    assert a.loss.egma_config().lambda_egm == 1.0 and a.loss.egma_config().preset_name == "official"


def test_overrides_and_errors_name_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {train: d}\noptim: {max_steps: 5}\n")
    cfg = load_config(tmp_path / "c.yaml", ["optim.lr=0.01", "data.use_gaze=false", "loss.overrides.lambda_mlce=0"])
    assert cfg.optim.lr == 0.01 and cfg.data.use_gaze is False and cfg.loss.egma_config().lambda_mlce == 0.0

    (tmp_path / "bad.yaml").write_text("optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"optim\.max_steps must be a positive int"):
        TrainConfig.from_dict({"optim": {"max_steps": 0}})
    with pytest.raises(ConfigError, match=r"dist\.fsdp must be one of"):
        TrainConfig.from_dict({"dist": {"fsdp": "maybe"}})
    with pytest.raises(ConfigError, match="lambda_mlce"):
        TrainConfig.from_dict({"loss": {"overrides": {"lambda_mlce": -1}}})
    with pytest.raises(ConfigError, match="unknown EGMAConfig option"):
        TrainConfig.from_dict({"loss": {"overrides": {"lambda_typo": 1}}})
    with pytest.raises(ConfigError, match=r"model: ModelConfig\.tiny_width"):
        TrainConfig.from_dict({"model": {"tiny_width": 30, "tiny_heads": 4}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="unsupported config format"):
        load_config(tmp_path / "c.ini")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["nonsense"])


@pytest.mark.parametrize("override, path, value", [
    ("optim.lr=3e-4", ("optim", "lr"), 3e-4),             # YAML reads 3e-4 as a string
    ("optim.max_steps=1e3", ("optim", "max_steps"), 1000),
    ("data.use_gaze=off", ("data", "use_gaze"), False),
    ("data.epoch_batches=null", ("data", "epoch_batches"), None),
    ("optim.betas=[0.9, 0.95]", ("optim", "betas"), (0.9, 0.95)),
    ("eval.retrieval_ks=[1, '5']", ("eval", "retrieval_ks"), (1, 5)),
    ("run_dir=2024", ("run_dir",), "2024"),
])
def test_values_convert_to_their_fields_type(override, path, value):
    cfg = TrainConfig.from_dict(apply_overrides({}, [override]))
    got = cfg
    for key in path:
        got = getattr(got, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
    ("data.use_gaze=maybe", "data.use_gaze: expected true or false, got 'maybe'"),
    ("optim.max_steps=2.5", "optim.max_steps: expected an integer, got 2.5"),
    ("optim.grad_clip=[1]", "optim.grad_clip: expected a number or null, got [1]"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("eval.retrieval_ks=[1, x]", "eval.retrieval_ks[1]: expected an integer, got 'x'"),
    ("model.image_size=big", "model.image_size: expected an integer, got 'big'"),
    ("loss.overrides.lambda_egm=lots", "loss.overrides.lambda_egm: expected a number, got 'lots'"),
    ("loss.overrides.egm_omega=sometimes", "loss.overrides.egm_omega: expected one of ['topk', 'threshold']"),
    ("data.loader_kwargs={channel: 1}", "unknown data.loader_kwargs key(s) ['channel']"),
])
def test_wrong_types_name_the_key_and_the_type(override, message):
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict(apply_overrides({}, [override]))
    assert message in str(exc.value)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.train is not None
    assert cfg.to_dict() == TrainConfig.from_dict(cfg.to_dict()).to_dict()


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [round(f(s), 6) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_clip_grad_norm_single_process():
    from egma_fast.train.distributed import clip_grad_norm

    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([4.0])
    norm = float(clip_grad_norm([a, b], max_norm=1.0))
    assert norm == pytest.approx(5.0)
    total = math.sqrt(float(a.grad.pow(2).sum() + b.grad.pow(2).sum()))
    assert total == pytest.approx(1.0, rel=1e-5)
    assert float(clip_grad_norm([a, b], max_norm=None)) == pytest.approx(total)


def test_checkpoint_latest_ignores_incomplete_folders(tmp_path):
    from egma_fast.train.checkpoint import CheckpointManager
    from egma_fast.train.distributed import DistInfo

    mgr = CheckpointManager(tmp_path, DistInfo(0, 1, 0, torch.device("cpu")), keep_last=2)
    assert mgr.latest() is None
    for step in (2, 5):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "meta.json").write_text("{}")
    (tmp_path / "step_00000009").mkdir()  # renamed but no meta.json: not complete
    (tmp_path / "step_00000011.tmp").mkdir()  # killed mid-save
    (tmp_path / "latest").write_text("step_00000002\n")  # stale pointer
    assert mgr.latest() == tmp_path / "step_00000005"
    assert mgr.resolve("latest") == tmp_path / "step_00000005"
    with pytest.raises(FileNotFoundError):
        mgr.resolve(tmp_path / "step_00000009")
