"""Data faults: what a truncated shard lost is counted per shard against sizes.json (also across a
resume and in the trainer's metrics); missing, empty, malformed or unreadable data is one clear
line through the real CLI, with repeated warnings folded; one shard path is one path."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cli_run import error_lines, run_cli, tiny_config
from egma_fast.data.errors import DataError
from egma_fast.data.reader import make_loader
from egma_fast.data.shards import iter_shard_samples, read_sizes, shard_urls
from egma_fast.data.synthetic import write_synthetic_shards

KW = dict(image_size=32, heatmap_size=8, max_sentences=4, max_sentence_tokens=8)
PER_SHARD = 6


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, str, int]:
    """3 shards of 6 in a folder with sizes.json; the middle one cut in half. Returns the folder,
    the cut shard and how many of its samples survive intact."""
    root = tmp_path_factory.mktemp("damaged")
    write_synthetic_shards(root, 3 * PER_SHARD, seed=4, samples_per_shard=PER_SHARD, image_size=32,
                           heatmap_max_side=8, progress=False)
    cut = shard_urls(root)[1]
    data = Path(cut).read_bytes()
    Path(cut).write_bytes(data[: len(data) // 2])
    intact = len(list(iter_shard_samples(cut)))
    assert 0 < intact < PER_SHARD
    return root, cut, intact


def test_truncated_shard_counts_every_lost_sample_per_shard(damaged, caplog):
    root, cut, intact = damaged
    loader = make_loader(root, None, batch_size=4, shuffle=False, **KW)
    got = sum(len(b) for b in loader)
    stats = loader.skip_stats()
    assert got == 3 * PER_SHARD - (PER_SHARD - intact)
    # every sample sizes.json lists is either delivered or counted, and the loss is the cut shard's
    assert got + stats["count"] == read_sizes(root)["total"]
    assert set(stats["per_shard"]) == {cut}
    assert sum(stats["per_shard"][cut].values()) == PER_SHARD - intact
    assert loader.state_dict()["skipped"] == stats["per_shard"]
    # folded: one warning per (shard, kind of problem), however many samples it cost
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 3


def test_skip_counts_survive_a_resume_without_double_counting(damaged):
    root, cut, intact = damaged
    kw = dict(batch_size=2, shuffle=True, shuffle_buffer=4, seed=1, **KW)
    full = make_loader(root, None, **kw)
    list(full)
    expected = full.skip_stats()["per_shard"]
    assert sum(expected[cut].values()) == PER_SHARD - intact
    for cut_after in (1, 4, 6):  # before, inside and after the damaged shard's samples
        first = make_loader(root, None, **kw)
        it = iter(first)
        for _ in range(cut_after):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))
        del it
        resumed = make_loader(root, None, **kw)
        resumed.load_state_dict(state)
        list(resumed)
        assert resumed.skip_stats()["per_shard"] == expected, cut_after


def test_one_shard_path_is_one_path(damaged, caplog):
    root, _, _ = damaged
    first = shard_urls(root)[0]
    assert len(list(iter_shard_samples(first))) == PER_SHARD
    assert len(list(iter_shard_samples(Path(first)))) == PER_SHARD
    assert not caplog.records


def test_random_bytes_tar_is_one_error_with_one_warning(tmp_path, caplog):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    loader = make_loader([junk], None, batch_size=2, resampled=True, epoch_batches=2, **KW)
    with pytest.raises(DataError) as exc:
        list(loader)
    assert str(junk) in str(exc.value) and "\n" not in str(exc.value)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(junk) in warnings[0].getMessage()


def test_trainer_metrics_report_the_lost_samples_per_shard(damaged, tmp_path, caplog):
    from egma_fast.train.config import load_config
    from egma_fast.train.trainer import Trainer

    _, cut, intact = damaged
    lost_per_read = PER_SHARD - intact
    # the cut shard alone (its size comes from the sizes.json beside it), read again and again
    cfg = load_config(tiny_config(tmp_path / "cfg.json", tmp_path / "run", {"train": [cut], "epoch_batches": 2},
                                  model={"image_size": 32}, optim={"max_steps": 3},
                                  checkpoint={"every": 0, "at_end": False}))
    trainer = Trainer(cfg)
    trainer.fit()
    stats = trainer.train_loader().skip_stats()
    trainer.close()
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    # counted as of the last batch handed out (a read in progress has counted part of its loss)
    assert last["skipped_samples"] == stats["count"] >= lost_per_read
    assert last["skipped_by_shard"] == {cut: last["skipped_samples"]}
    assert sum(last["skipped_by_reason"].values()) == last["skipped_samples"]
    # the shard was read in several epochs: each kind of problem is still logged once
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and cut in r.getMessage()]
    assert warned and len(warned) == len(set(warned)) == len(last["skipped_by_reason"]) + 1  # + the tar error


def test_bad_data_folders_are_one_line_through_the_cli(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_sizes = tmp_path / "bad_sizes"
    bad_sizes.mkdir()
    (bad_sizes / "sizes.json").write_text('{"shards": {"shard-000000.tar": 4}, "total": ')
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "shard-000000.tar").write_bytes(np.random.default_rng(1).bytes(4000))
    cases = {
        "missing": (tmp_path / "nowhere", ["nowhere", "no such file or folder"]),
        "empty": (empty, [str(empty), "no shards"]),
        "malformed sizes.json": (bad_sizes, [str(bad_sizes / "sizes.json"), "not valid JSON"]),
        "random bytes": (junk, [str(junk / "shard-000000.tar"), "no readable sample"]),
    }
    for name, (folder, needles) in cases.items():
        cfg = tiny_config(tmp_path / f"{folder.name}.json", tmp_path / f"run_{folder.name}",
                          {"train": str(folder), "epoch_batches": 2})
        proc = run_cli("train", "--config", cfg)
        assert proc.returncode == 1, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "epoch_batches" not in proc.stderr, (name, proc.stderr[-2000:])
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("egma-fast train: error: "), (name, lines)
        for needle in needles:
            assert needle in lines[0], (name, needle, lines[0])
        warnings = [ln for ln in proc.stderr.splitlines() if " WARNING " in ln]
        assert len(warnings) <= 1, (name, warnings)
