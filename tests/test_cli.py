"""egma-fast command line: argument errors, prepare, train + resume, eval, bench."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import tiny_config
from egma_fast.cli import main

REPO = Path(__file__).resolve().parent.parent


def _fails(capsys, argv, *needles, code=2):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code, exc.value.code
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def test_argument_errors_are_clear(capsys, tmp_path):
    _fails(capsys, [], "required", "demo,prepare,train,eval,bench")
    _fails(capsys, ["fly"], "invalid choice", "'fly'")
    _fails(capsys, ["train"], "--config")
    _fails(capsys, ["train", "--config", str(tmp_path / "none.yaml")], "egma-fast train: error", "does not exist")
    _fails(capsys, ["demo", "--steps", "0"], "--steps", "positive integer")
    _fails(capsys, ["demo", "--batch-size", "many"], "--batch-size", "'many'")
    _fails(capsys, ["prepare"], "--out")
    _fails(capsys, ["prepare", "--out", str(tmp_path), "--egd-cxr", "a", "--reflacx", "b"], "not allowed with")
    _fails(capsys, ["prepare", "--out", str(tmp_path), "--gaze-fraction", "2"], "--gaze-fraction", "[0, 1]")
    _fails(capsys, ["prepare", "--out", str(tmp_path), "--egd-cxr", str(tmp_path / "missing")], "--egd-cxr", "not a folder")
    _fails(capsys, ["eval", "--checkpoint", str(tmp_path)], "--checkpoint", "no complete checkpoint")
    (tmp_path / "bad.yaml").write_text("data: {train: x}\noptim: {lrr: 1}\n")
    _fails(capsys, ["train", "--config", str(tmp_path / "bad.yaml")], "optim.lrr")
    (tmp_path / "ok.yaml").write_text("data: {train: x}\n")
    _fails(capsys, ["train", "--config", str(tmp_path / "ok.yaml"), "--set", "optim.max_steps=-3"], "optim.max_steps")
    _fails(capsys, ["train", "--config", str(tmp_path / "ok.yaml"), "--resume", str(tmp_path / "nope")], "--resume")


def test_prepare_train_resume_eval(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["prepare", "--out", str(data), "--samples", "24", "--eval-samples", "10", "--image-size", "64",
                 "--samples-per-shard", "8", "--heatmap-max-side", "16"]) == 0
    sizes = json.loads((data / "train" / "sizes.json").read_text())
    assert sizes["total"] == 24 and len(sizes["shards"]) == 3
    assert json.loads((data / "eval" / "sizes.json").read_text())["total"] == 10
    assert "wrote 24 training samples" in capsys.readouterr().out

    run = tmp_path / "run"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"""
run_dir = "{run}"
[data]
train = "{data / 'train'}"
eval = "{data / 'eval'}"
batch_size = 4
eval_batch_size = 5
max_tokens = 16
[model]
image_model = "tiny-swin"
image_size = 64
embed_dim = 16
tiny_width = 16
[optim]
max_steps = 2
warmup_steps = 1
[checkpoint]
every = 1
keep_last = 1
[eval]
at_end = false
[log]
every = 1
progress_bar = false
tensorboard = false
[dist]
num_threads = 1
""")
    assert main(["train", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["train", "--config", str(cfg), "--resume", "latest", "--set", "optim.max_steps=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 3
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the resumed run continued at step 3, not from scratch
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]

    result = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--out", str(result)]) == 0
    metrics = json.loads(result.read_text())
    assert metrics["checkpoint"].endswith("step_00000003") and metrics["step"] == 3
    assert metrics["n_samples"] == 10 and 0.0 <= metrics["zs_accuracy"] <= 1.0
    assert not (run / "checkpoints" / "step_00000003" / "config.json").exists()  # eval writes nothing there


def test_bench_runs_pytest_benchmark_and_writes_json(tmp_path):
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "bench_tiny.py").write_text("def test_tiny(benchmark):\n    benchmark(sum, range(10))\n")
    (bench_dir / "conftest.py").write_text("")
    out = tmp_path / "results" / "bench.json"
    code = subprocess.call([sys.executable, "-m", "egma_fast.cli", "bench", "--dir", str(bench_dir), "--json", str(out),
                            "--", "-o", "python_files=bench_*.py", "-p", "no:cacheprovider"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert code == 0
    assert json.loads(out.read_text())["benchmarks"][0]["name"] == "test_tiny"


def test_bench_without_benchmarks_folder_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import egma_fast.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "pkg" / "cli.py"))
    _fails(capsys, ["bench"], "no benchmarks/ folder")
    _fails(capsys, ["bench", "--dir", str(tmp_path / "absent")], "--dir", "not a folder")


def test_torchrun_two_ranks_train_and_resume(tmp_path):
    """The launcher path: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; two gloo ranks shard with FSDP2,
    write one DCP checkpoint together and resume from it."""
    from egma_fast.data.synthetic import write_synthetic_shards

    data = tmp_path / "data"
    write_synthetic_shards(data, 16, seed=9, samples_per_shard=4, image_size=64, heatmap_max_side=16, progress=False)
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.json", run, {"train": str(data), "batch_size": 2},
                      model={"image_model": "tiny-vit"}, checkpoint={"every": 2, "keep_last": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "egma_fast.cli", "train", "--config", str(cfg)]
    for extra in ([], ["--resume", "latest", "--set", "optim.max_steps=3", "--set", "checkpoint.every=3"]):
        proc = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["samples"] == 4 for r in records)  # 2 ranks x 2 samples per step
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000003" / "dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000003").glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
