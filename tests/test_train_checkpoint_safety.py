"""Checkpoints from anyone else: nothing in them runs as code on --resume / eval --checkpoint; a
damaged file is named in one line, and resuming "latest" falls back to the checkpoint before it."""
from __future__ import annotations

import builtins
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from cli_run import tiny_config
from egma_fast.train.config import load_config


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 4-step run with checkpoints at steps 2 and 4; returns (config path, run folder)."""
    from egma_fast.data.synthetic import write_synthetic_shards
    from egma_fast.train.trainer import Trainer

    root = tmp_path_factory.mktemp("safety")
    write_synthetic_shards(root / "data", 16, seed=3, samples_per_shard=8, image_size=32, heatmap_max_side=8,
                           progress=False)
    cfg = tiny_config(root / "cfg.json", root / "run", {"train": str(root / "data")}, model={"image_size": 32},
                      optim={"max_steps": 4}, checkpoint={"every": 2, "keep_last": 3})
    trainer = Trainer(load_config(cfg))
    trainer.fit()
    trainer.close()
    return cfg, root / "run"


def _copy(trained, tmp_path) -> tuple[object, Path]:
    """A private copy of the run (to tamper with) and a config pointing at it."""
    cfg, run = trained
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    config = load_config(cfg, [f"run_dir={mine}"])
    return config, mine / "checkpoints"


def _trainer_state(ckpt: Path) -> Path:
    """The trainer-state file of a checkpoint (step, scheduler, world size)."""
    return next(p for p in sorted(ckpt.iterdir()) if p.name.startswith("trainer."))


def _resume(config, spec):
    from egma_fast.train.trainer import Trainer

    trainer = Trainer(config)
    try:
        trainer.resume(spec)
        return trainer.step
    finally:
        trainer.close()


@pytest.mark.parametrize("target", ["rank state", "trainer state", "dcp metadata"])
def test_planted_pickle_payload_does_not_run(trained, tmp_path, target):
    config, ckpts = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    newest = ckpts / "step_00000004"
    if target == "rank state":
        victim = newest / "rank_00000.pt"
        torch.save({"rng": Payload(marker), "data": None}, victim)
    elif target == "trainer state":
        victim = newest / "trainer.pt"  # the pickled trainer state some versions wrote and read
        torch.save({"step": 4, "scheduler": Payload(marker), "world_size": 1}, victim)
    else:
        victim = newest / "dcp" / ".metadata"
        victim.write_bytes(pickle.dumps(Payload(marker)))
    try:
        _resume(config, newest)
    except Exception as exc:  # refusing is fine, as long as it says which file
        assert str(victim) in str(exc) or str(newest) in str(exc), exc
    assert not marker.exists(), "a pickle payload in the checkpoint ran"


def test_non_tensor_values_in_dcp_load_without_running_code(tmp_path):
    from egma_fast.train.dcp_io import DCPReadError, load_dcp, save_dcp

    marker = tmp_path / "pwned"
    save_dcp({"w": torch.ones(2), "note": Payload(marker)}, tmp_path / "dcp")
    state = {"w": torch.zeros(2), "note": None}
    with pytest.raises(DCPReadError, match="Unsupported global"):
        load_dcp(state, tmp_path / "dcp")
    assert not marker.exists()
    save_dcp({"w": torch.ones(2), "note": "adamw", "lr": 0.1}, tmp_path / "ok")  # plain data loads
    state = {"w": torch.zeros(2), "note": None, "lr": None}
    load_dcp(state, tmp_path / "ok")
    assert state["note"] == "adamw" and state["lr"] == 0.1 and state["w"].sum() == 2


@pytest.mark.parametrize("damage", ["empty trainer state", "truncated trainer state", "truncated rank state"])
def test_damaged_newest_checkpoint_falls_back_when_resuming_latest(trained, tmp_path, caplog, damage):
    config, ckpts = _copy(trained, tmp_path)
    newest = ckpts / "step_00000004"
    victim = _trainer_state(newest) if "trainer" in damage else newest / "rank_00000.pt"
    data = victim.read_bytes()
    victim.write_bytes(b"" if damage.startswith("empty") else data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="egma_fast.train"):
        assert _resume(config, "latest") == 2
    assert str(victim) in caplog.text and "falling back" in caplog.text
    # named explicitly, the damaged checkpoint is an error that names the file, in one line
    from egma_fast.train.errors import CheckpointError

    with pytest.raises(CheckpointError) as exc:
        _resume(config, newest)
    assert str(victim) in str(exc.value) and "\n" not in str(exc.value)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(trained, tmp_path):
    from egma_fast.train.errors import CheckpointError

    config, ckpts = _copy(trained, tmp_path)
    for step in ("step_00000002", "step_00000004"):
        _trainer_state(ckpts / step).write_bytes(b"")
    with pytest.raises(CheckpointError, match="trainer"):
        _resume(config, "latest")
