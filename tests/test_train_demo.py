"""`egma-fast demo --quick`: the real demo code path (data, EGMA run, no-gaze run, evaluation,
attention maps, report) in a reduced setting; zero-shot accuracy must clearly beat chance."""
from __future__ import annotations

import json
from pathlib import Path

from egma_fast.cli import main

CHANCE = 1.0 / 5.0


def test_baseline_config_removes_every_gaze_term(tmp_path):
    from egma_fast.train.demo import DemoSettings, demo_config

    egma = demo_config(DemoSettings.quick(), tmp_path, tmp_path / "a", gaze=True)
    base = demo_config(DemoSettings.quick(), tmp_path, tmp_path / "b", gaze=False)
    assert egma.data.use_gaze and egma.loss.egma_config().lambda_mlce == 1.0
    assert not base.data.use_gaze and base.loss.egma_config().lambda_mlce == 0.0
    # Everything else is the same run.
    a, b = egma.to_dict(), base.to_dict()
    assert (a["log"]["label"], b["log"]["label"]) == ("EGMA", "no gaze")  # the two progress bars differ
    for d in (a, b):
        d.pop("run_dir"), d["data"].pop("use_gaze"), d["loss"]["overrides"].pop("lambda_mlce", None)
        d["eval"].pop("at_start"), d["log"].pop("label")
    assert a == b


def test_quick_demo_beats_chance_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    # The baseline run is the same code path with demo_config(gaze=False) (checked above); it is
    # left out here to keep the suite short.
    assert main(["demo", "--quick", "--no-baseline", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot accuracy before" in printed and "report.md" in printed

    report = json.loads((out / "report.json").read_text())
    before, egma = report["before"], report["egma"]["eval"]
    assert egma["n_classified"] == report["data"]["eval"]
    # Zero-shot classification of the trained EGMA model beats chance by a clear margin...
    assert egma["zs_accuracy"] >= CHANCE + 0.15, egma
    # ...and training helped: retrieval far above the untrained model.
    assert egma["t2i_p@1"] >= before["t2i_p@1"] + 0.2, (before, egma)
    assert report["egma"]["last_train"]["loss_mlce"] > 0.0
    assert "no_gaze" not in report

    md = (out / "report.md").read_text()
    assert "| zero-shot accuracy" in md
    pictures = report["attention_maps"]
    assert pictures, "no attention map was drawn"
    for pic in pictures:
        png = Path(pic["path"])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pic["path"].split("/")[-1] in md
    assert (out / "runs" / "egma" / "metrics.jsonl").is_file()
    assert (out / "runs" / "egma" / "checkpoints" / "latest").is_file()
