"""One run per run folder: training into a folder that holds a run needs --resume or --overwrite
(through the real CLI); a run killed with SIGKILL and resumed leaves one clean metrics series
(JSONL and TensorBoard), checked in process and with a real kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli_run import egma_fast_command, error_lines, run_cli, tiny_config
from egma_fast.train.config import load_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from egma_fast.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("rundir_data")
    write_synthetic_shards(root, 16, seed=7, samples_per_shard=8, image_size=32, heatmap_max_side=8, progress=False)
    return root


def _steps(run: Path, split: str = "train") -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_training_into_a_used_run_folder_needs_resume_or_overwrite(data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.json", run, {"train": str(data)}, model={"image_size": 32})
    assert run_cli("train", "--config", cfg).returncode == 0
    before = {p: p.read_bytes() for p in [run / "config.json", run / "metrics.jsonl", run / "checkpoints" / "latest"]}
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())

    again = run_cli("train", "--config", cfg, "--set", "optim.lr=5e-4")
    assert again.returncode == 2, again.stderr[-2000:]
    lines = error_lines(again.stderr)
    assert len(lines) == 1 and "already holds a run" in lines[0], lines
    assert str(run) in lines[0] and "--resume latest" in lines[0] and "--overwrite" in lines[0]
    assert {p: p.read_bytes() for p in before} == before  # nothing of the old run was touched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept

    fresh = run_cli("train", "--config", cfg, "--overwrite", "--set", "optim.max_steps=1")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert _steps(run) == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert json.loads((run / "config.json").read_text())["optim"]["max_steps"] == 1


def _tb_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resumed_run_after_a_kill_has_one_clean_metrics_series(data, tmp_path):
    from egma_fast.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(tiny_config(tmp_path / "cfg.json", run, {"train": str(data)}, model={"image_size": 32},
                                  optim={"max_steps": 7}, checkpoint={"every": 3}, log={"tensorboard": True}))
    killed = Trainer(cfg)
    for _ in range(5):  # checkpoint at 3, metrics for 4 and 5 written, then the process dies
        killed.train_step()
        if killed.step % 3 == 0:
            killed.save_checkpoint()
    killed.metrics.flush()  # what a kill leaves on disk: every line written so far (no close)
    assert _steps(run) == [1, 2, 3, 4, 5]

    resumed = Trainer(cfg)
    assert resumed.resume("latest") and resumed.step == 3
    resumed.fit()
    resumed.close()
    assert _steps(run) == [1, 2, 3, 4, 5, 6, 7]
    assert _tb_steps(run, "train/loss") == [1, 2, 3, 4, 5, 6, 7]


def test_kill_9_then_resume_latest_through_the_cli(data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.json", run, {"train": str(data)}, model={"image_size": 32},
                      optim={"max_steps": 10_000}, checkpoint={"every": 3, "keep_last": 2})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(egma_fast_command() + ["train", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait until steps after a checkpoint are on disk
            done = (run / "checkpoints" / "step_00000003" / "meta.json").is_file()
            if done and (run / "metrics.jsonl").is_file() and max(_steps(run), default=0) >= 4:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    last = max(_steps(run))
    resume = run_cli("train", "--config", cfg, "--resume", "latest", "--set", f"optim.max_steps={last + 2}")
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert _steps(run) == list(range(1, last + 3))
