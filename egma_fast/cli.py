"""``egma-fast``: demo | prepare | train | eval | bench.

    egma-fast demo --out runs/demo                       # synthetic data -> train -> evaluate -> report
    egma-fast prepare --out data/synth --samples 20000   # synthetic shards (or --egd-cxr / --reflacx)
    egma-fast train --config configs/demo_cpu.yaml [--resume latest] [--set optim.lr=3e-4]
    torchrun --nproc_per_node 8 -m egma_fast.cli train --config configs/swin_tiny_bert_8gpu.yaml
    egma-fast eval --checkpoint runs/x/checkpoints/step_00001000 [--data data/eval]
    egma-fast bench --json results.json

Exit status: 0 on success, 2 for bad arguments or configs (a run folder that holds another run,
a model name that is not available locally), 1 when the work itself fails (unreadable data, a
damaged checkpoint), 143 when ``train`` was stopped by SIGTERM (after saving a checkpoint). Each
of these errors is one line naming what is wrong; README's "Troubleshooting" lists them.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from egma_fast.data.errors import DataError
from egma_fast.models.config import IMAGE_SIZE_RULE, image_size_problem
from egma_fast.models.hub import ModelNotFoundError
from egma_fast.train.config_types import ConfigError
from egma_fast.train.demo_settings import DemoSettings
from egma_fast.train.errors import CheckpointError, RunDirError

__all__ = ["build_parser", "main"]

#: Bad input: exit status 2. The work failed on its data: 1. Each prints one line.
_USAGE_ERRORS = (ConfigError, RunDirError, ModelNotFoundError, FileNotFoundError)
_WORK_ERRORS = (DataError, CheckpointError)

logger = logging.getLogger("egma_fast.cli")


class UsageError(Exception):
    """Bad arguments discovered after parsing (exit status 2, message names the argument)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _image_side(text: str) -> int:
    value = _positive_int(text)
    problem = image_size_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _demo_default(field: str) -> str:
    full, quick = getattr(DemoSettings(), field), getattr(DemoSettings.quick(), field)
    return f"(default: {full}" + (f"; with --quick: {quick})" if quick != full else ")")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each --help lists the defaults)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="egma-fast", formatter_class=fmt,
        description="EGMA (eye-gaze guided multi-modal alignment) pretraining: demo, data preparation, training, evaluation, benchmarks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="{demo,prepare,train,eval,bench}")
    sub.required = True

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="synthetic data -> train EGMA and a no-gaze baseline on CPU -> evaluate -> report")
    demo.add_argument("--out", default="runs/demo",
                      help="output folder (data, runs, report.md, report.json, attention maps); an earlier demo there is replaced")
    # the settings' own defaults (DemoSettings, or DemoSettings.quick() with --quick) apply
    # unless given: SUPPRESS keeps them out of args, the help states them
    keep = argparse.SUPPRESS
    demo.add_argument("--steps", type=_positive_int, default=keep,
                      help=f"optimizer steps per training run {_demo_default('steps')}")
    demo.add_argument("--batch-size", type=_positive_int, default=keep, help=f"samples per step {_demo_default('batch_size')}")
    demo.add_argument("--train-samples", type=_positive_int, default=keep,
                      help=f"synthetic training cases {_demo_default('train_samples')}")
    demo.add_argument("--eval-samples", type=_positive_int, default=keep,
                      help=f"synthetic evaluation cases, one finding each {_demo_default('eval_samples')}")
    demo.add_argument("--image-size", type=_image_side, default=keep,
                      help=f"image side in pixels: {IMAGE_SIZE_RULE} {_demo_default('image_size')}")
    demo.add_argument("--text-model", default=keep,
                      help=f"text tower: tiny-bert or minilm (the shipped all-MiniLM-L6-v2) {_demo_default('text_model')}")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and of both runs")
    demo.add_argument("--no-baseline", action="store_true", help="skip the no-gaze baseline run")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster setting (used by the test suite)")

    prep = sub.add_parser("prepare", formatter_class=fmt, help="write WebDataset shards + sizes.json (synthetic by default)")
    prep.add_argument("--out", required=True, help="output folder; gets train/ and eval/ (synthetic) or the shards")
    src = prep.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true", help="synthetic chest X-ray readings (default)")
    src.add_argument("--egd-cxr", metavar="ROOT", help="EGD-CXR folder (fixations.csv, master_sheet.csv, audio_segmentation_transcripts/)")
    src.add_argument("--reflacx", metavar="ROOT", help="REFLACX folder (metadata_phase_*.csv, main_data/)")
    prep.add_argument("--image-root", help="MIMIC-CXR(-JPG) folder the datasets' image paths are relative to")
    prep.add_argument("--classes", nargs="+", default=argparse.SUPPRESS,
                      help="label columns to use as classes (real datasets; default: the dataset's own)")
    prep.add_argument("--samples", type=_positive_int, default=20000, help="synthetic training cases")
    prep.add_argument("--eval-samples", type=_positive_int, default=1000, help="synthetic evaluation cases")
    prep.add_argument("--image-size", type=_positive_int, default=224,
                      help="synthetic: stored image side (the reader resizes to the model's; match model.image_size to save work)")
    prep.add_argument("--gaze-fraction", type=_fraction, default=0.8, help="synthetic: share of cases with gaze")
    prep.add_argument("--samples-per-shard", type=_positive_int, default=1000, help="samples per shard")
    prep.add_argument("--heatmap-max-side", type=_positive_int, default=64, help="stored heatmap grid side")
    prep.add_argument("--workers", type=int, default=0, help="processes generating samples (synthetic)")
    prep.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")

    train = sub.add_parser("train", formatter_class=fmt, help="train from a config file (launch with torchrun for several ranks)")
    train.add_argument("--config", required=True, help="training config (.yaml, .yml, .json or .toml)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", default=None,
                       help="'latest' (newest complete checkpoint; a fresh start when none) or a checkpoint folder")
    again.add_argument("--overwrite", action="store_true",
                       help="discard the run already in run_dir (its checkpoints, metrics, config.json) and start over")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")

    ev = sub.add_parser("eval", formatter_class=fmt, help="evaluate a checkpoint: zero-shot classification, retrieval, gaze pointing")
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder (step_XXXXXXXX) or a run's checkpoints/ folder (its newest)")
    ev.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: the one stored in the checkpoint)")
    ev.add_argument("--data", default=argparse.SUPPRESS, help="evaluation shards (default: the config's data.eval)")
    ev.add_argument("--out", default=argparse.SUPPRESS, help="write the metrics as JSON here (default: print only)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")

    bench = sub.add_parser("bench", formatter_class=fmt, help="run the benchmarks (pytest benchmarks/ --benchmark-only)")
    bench.add_argument("--json", default=argparse.SUPPRESS, help="write pytest-benchmark's JSON results here (default: none)")
    bench.add_argument("--dir", default=argparse.SUPPRESS, help="benchmarks folder (default: ./benchmarks, else the source tree's)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments after --")
    return parser


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from egma_fast.train.demo import run_demo  # noqa: PLC0415 (the trainer stack: only for this command)

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "train_samples", "eval_samples", "image_size",
                                           "text_model") if hasattr(args, k)}
    settings = settings.replace(seed=args.seed, baseline=not args.no_baseline, **given)
    report = run_demo(args.out, settings)
    print(report["summary"])
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.egd_cxr or args.reflacx:
        from egma_fast.data.shards import write_shards_from_records  # noqa: PLC0415 (only this command needs it)

        if args.egd_cxr:
            from egma_fast.gaze.egd_cxr import EGD_LABEL_COLUMNS, read_egd_cxr  # noqa: PLC0415 (only this command needs it)

            if not Path(args.egd_cxr).is_dir():
                raise UsageError(f"--egd-cxr {args.egd_cxr!r} is not a folder")
            records, read_report = read_egd_cxr(args.egd_cxr, image_root=args.image_root)
            classes = getattr(args, "classes", None) or list(EGD_LABEL_COLUMNS)
        else:
            from egma_fast.gaze.reflacx import read_reflacx  # noqa: PLC0415 (only this command needs it)

            if not Path(args.reflacx).is_dir():
                raise UsageError(f"--reflacx {args.reflacx!r} is not a folder")
            records, read_report = read_reflacx(args.reflacx, image_root=args.image_root)
            classes = getattr(args, "classes", None) or sorted({k for r in records for k in r.labels})
        result = write_shards_from_records(records, out, samples_per_shard=args.samples_per_shard,
                                           class_names=classes, heatmap_max_side=args.heatmap_max_side)
        skipped = dict(read_report.skipped)
        print(f"wrote {result['total']} samples in {len(result['shards'])} shard(s) to {out} "
              f"(classes {classes}); reader skipped {sum(skipped.values())} item(s) {skipped}, "
              f"sharding skipped {result['info'].get('skipped', {})}")
        return 0
    from egma_fast.data.synthetic import write_synthetic_shards  # noqa: PLC0415 (only this command needs it)

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    common = dict(seed=args.seed, samples_per_shard=args.samples_per_shard, image_size=args.image_size,
                  gaze_fraction=args.gaze_fraction, heatmap_max_side=args.heatmap_max_side, num_workers=args.workers)
    train = write_synthetic_shards(out / "train", args.samples, **common)
    # Evaluation cases come from another index range, each with a single finding (a clean class).
    ev = write_synthetic_shards(out / "eval", args.eval_samples, start=10_000_000, second_finding_prob=0.0, **common)
    print(f"wrote {train['total']} training samples to {out / 'train'} and {ev['total']} evaluation samples to {out / 'eval'}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from egma_fast.train.config import load_config  # noqa: PLC0415 (the trainer stack: only for this command)
    from egma_fast.train.trainer import Trainer  # noqa: PLC0415 (only this command needs it)

    config = load_config(args.config, args.overrides)
    if args.resume is not None and args.resume != "latest" and not Path(args.resume).is_dir():
        raise UsageError(f"--resume {args.resume!r}: use 'latest' or an existing checkpoint folder")
    trainer = Trainer(config, overwrite=args.overwrite)
    try:
        if args.resume is not None:
            trainer.resume(args.resume)
        summary = trainer.fit()
        if trainer.info.is_main:
            print(json.dumps({"step": summary["step"], "stopped": summary["stopped"],
                              "train_seconds": round(summary["train_seconds"], 2),
                              "last_train": summary["last_train"], "last_eval": summary["last_eval"]}, indent=1))
    finally:
        trainer.close()
    if summary["stopped"]:
        print(f"stopped by SIGTERM at step {summary['step']} with a checkpoint; continue with --resume latest",
              file=sys.stderr)
        return 143  # 128 + SIGTERM, so schedulers see the run as interrupted
    return 0


def _find_checkpoint(path: Path) -> Path:
    from egma_fast.train.checkpoint import META  # noqa: PLC0415 (DCP's import is heavy: only for eval)

    if (path / META).is_file():
        return path
    if path.is_dir():
        steps = sorted(p for p in path.iterdir() if p.name.startswith("step_") and (p / META).is_file())
        if steps:
            return steps[-1]
        if (path / "checkpoints").is_dir():
            return _find_checkpoint(path / "checkpoints")
    raise UsageError(f"--checkpoint {str(path)!r}: no complete checkpoint there (a step_XXXXXXXX folder with meta.json)")


def _cmd_eval(args: argparse.Namespace) -> int:
    from egma_fast.train.config import TrainConfig, apply_overrides, load_config  # noqa: PLC0415 (only for this command)
    from egma_fast.train.trainer import Trainer  # noqa: PLC0415 (only this command needs it)

    ckpt = _find_checkpoint(Path(args.checkpoint))
    if hasattr(args, "config"):
        data = load_config(args.config, args.overrides).to_dict()
    else:
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint file {ckpt / 'meta.json'} is damaged ({exc}); pass --config") from None
        if "config" not in meta:
            raise UsageError(f"{ckpt}/meta.json holds no config; pass --config")
        data = apply_overrides(meta["config"], args.overrides)
    if hasattr(args, "data"):
        data["data"]["eval"] = args.data
    if data["data"].get("eval") is None:
        raise ConfigError("no evaluation data: pass --data or set data.eval in the config")
    data["log"].update(tensorboard=False, jsonl=False, progress_bar=False)
    # Never write into the training run or the checkpoint: a scratch run folder, removed after.
    with tempfile.TemporaryDirectory(prefix="egma-eval-") as scratch:
        data["run_dir"] = scratch
        trainer = Trainer(TrainConfig.from_dict(data))
        try:
            trainer.resume(ckpt)
            result = trainer.evaluate(log=False)
        finally:
            trainer.close()
    if trainer.info.is_main:
        text = json.dumps({"checkpoint": str(ckpt), **result}, indent=1)
        print(text)
        if hasattr(args, "out"):
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if hasattr(args, "dir"):
        folder = Path(args.dir)
        if not folder.is_dir():
            raise UsageError(f"--dir {args.dir!r} is not a folder")
    else:
        folder = Path("benchmarks")
        if not folder.is_dir():
            folder = Path(__file__).resolve().parent.parent / "benchmarks"
        if not folder.is_dir():
            raise UsageError("no benchmarks/ folder here or in the source tree; pass --dir")
    cmd = [sys.executable, "-m", "pytest", str(folder), "--benchmark-only", "-q"]
    if hasattr(args, "json"):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--benchmark-json={args.json}")
    extra = list(args.pytest_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    cmd += extra
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


_COMMANDS = {"demo": _cmd_demo, "prepare": _cmd_prepare, "train": _cmd_train, "eval": _cmd_eval, "bench": _cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``egma-fast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and a usage message on bad arguments
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except (UsageError, *_USAGE_ERRORS) as exc:
        parser.exit(2, f"egma-fast {args.command}: error: {exc}\n")
    except _WORK_ERRORS as exc:
        parser.exit(1, f"egma-fast {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1  # pragma: no cover - parser.exit raises


if __name__ == "__main__":
    sys.exit(main())
