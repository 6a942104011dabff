"""What a new user meets, through the real `egma-fast` entry point: config values with the wrong
type name the key, an unknown model name is one line and downloads nothing, one image-size rule
in --help and in the error, every --help lists its defaults, and the demo says what it is doing
(labelled bars, no DCP noise)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_run import error_lines, run_cli, tiny_config
from egma_fast.models.config import IMAGE_SIZE_RULE


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    from egma_fast.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("cli_errors")
    write_synthetic_shards(root / "data", 8, seed=1, samples_per_shard=8, image_size=32, heatmap_max_side=8, progress=False)
    return tiny_config(root / "cfg.json", root / "run", {"train": str(root / "data")}, model={"image_size": 32},
                       optim={"max_steps": 1})


def _one_error(proc, *needles: str, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("override, needles", [
    ("optim.lr=abc", ["optim.lr", "expected a number", "'abc'"]),
    ("data.use_gaze=maybe", ["data.use_gaze", "expected true or false", "'maybe'"]),
    ("optim.max_steps=2.5", ["optim.max_steps", "expected an integer"]),
])
def test_set_value_of_the_wrong_type_names_the_key(config, override, needles):
    _one_error(run_cli("train", "--config", config, "--set", override), *needles)


def test_unknown_model_name_is_one_line_and_downloads_nothing(config):
    line = _one_error(run_cli("train", "--config", config, "--set", "model.text_model=nobody/no-such-model"),
                      "model.text_model", "nobody/no-such-model")
    assert "neither a local folder nor in the local" in line and "nothing is downloaded" in line


def test_one_image_size_rule_in_help_and_errors(tmp_path):
    help_text = run_cli("demo", "--help").stdout
    flat = " ".join(help_text.split())
    assert IMAGE_SIZE_RULE in flat and "(default: 64" in flat
    small = ["--steps", "1", "--train-samples", "8", "--eval-samples", "8", "--no-baseline", "--out", str(tmp_path)]
    for side in ("50", "40", "176"):  # 40 = 2 x 20 and 176 = 11 x 16 used to be accepted by one rule or another
        proc = run_cli("demo", "--image-size", side, *small)
        assert proc.returncode == 2, (side, proc.stderr[-1500:])
        assert "--image-size" in proc.stderr and IMAGE_SIZE_RULE in proc.stderr, proc.stderr[-1500:]
        assert not (tmp_path / "data").exists()  # refused before any work


def test_every_help_lists_its_defaults():
    for command, default in (("prepare", "(default: 20000)"), ("train", "(default: None)"), ("demo", "(default: runs/demo)")):
        out = " ".join(run_cli(command, "--help").stdout.split())
        assert default in out, (command, out)


def test_demo_says_what_it_does_with_labelled_bars_and_no_dcp_noise(tmp_path):
    proc = run_cli("demo", "--steps", "2", "--train-samples", "32", "--eval-samples", "16", "--image-size", "32",
                   "--batch-size", "8", "--out", tmp_path / "demo", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for needle in ("[1/5] writing", "writing train", "writing eval", "[2/5] training EGMA", "train EGMA", "eval EGMA",
                   "[3/5] training no gaze", "train no gaze", "eval no gaze", "[4/5] drawing", "[5/5] writing"):
        assert needle in err, needle
    assert "torch.distributed is disabled" not in err
    assert "report.md" in proc.stdout
