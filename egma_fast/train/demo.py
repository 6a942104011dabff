"""``egma-fast demo``: synthetic data -> train EGMA and a no-gaze baseline on CPU -> evaluate -> report.

Steps (all in ``out/``):

1. ``data/train`` and ``data/eval``: synthetic chest X-ray readings with informative gaze
   (egma_fast.data.synthetic), as WebDataset shards; evaluation cases have one finding each.
2. ``runs/egma``: the trainer (the same code path as ``egma-fast train``) with the ``paper``
   loss plus the global CLIP term (lambda_clip > 0, so that the global embeddings that zero-shot
   classification uses are trained too); evaluated before and after training.
3. ``runs/no_gaze``: the same run without gaze: lambda_mlce = 0 and every sample marked
   gaze-free (has_gaze all False), so EGM uses no gaze prior. Same data, same initial model.
4. ``attention/case_*.png``: for a few evaluation images, the radiologist's gaze heatmap of a
   finding sentence next to the patch-sentence similarity maps of both models, on one colour
   scale (:mod:`egma_fast.eval.attention_figure`).
5. ``report.md`` and ``report.json`` with every number, and a short printed summary.

Each step says what it does on stderr, and every data-writing, training and evaluation pass has
its own labelled progress bar. A demo run into a folder that holds an earlier demo replaces it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from egma_fast.data.synthetic import SYNTHETIC_CLASS_PROMPTS, write_synthetic_shards
from egma_fast.eval.attention_figure import save_attention_figure
from egma_fast.eval.attention_map import model_attention_map
from egma_fast.train.config import TrainConfig
from egma_fast.train.demo_settings import DemoSettings

__all__ = ["DemoSettings", "demo_config", "run_demo"]

#: The generator's normal-anatomy sentences, and which one each finding contradicts.
_NORMAL = {"heart": "The heart size is normal.", "lungs": "The lungs are clear.",
           "effusion": "No pleural effusion.", "pneumothorax": "No pneumothorax."}
_CONTRADICTS = {"cardiomegaly": "heart", "opacity": "lungs", "pleural_effusion": "effusion", "pneumothorax": "pneumothorax"}


def report_prompts() -> dict[str, list[str]]:
    """Zero-shot prompts written as short reports, the form the report embedding z^T was trained on.

    A class's prompt is each of its one-sentence prompts (egma_fast.data.synthetic's
    SYNTHETIC_CLASS_PROMPTS) followed by the normal-anatomy sentences the finding does not
    contradict; "no_finding" is the four normal sentences. One-sentence prompts are reported too
    (zs_sentence_*): a tiny text tower trained from scratch for a few minutes mostly learns
    reports, in which "pneumothorax" appears far more often in "No pneumothorax." than in a
    finding, so single-sentence prompts are a much noisier probe of the same model.
    """
    out = {}
    for name, prompts in SYNTHETIC_CLASS_PROMPTS.items():
        if name == "no_finding":
            out[name] = [" ".join(_NORMAL.values())]
        else:
            rest = " ".join(v for k, v in _NORMAL.items() if k != _CONTRADICTS[name])
            out[name] = [f"{p} {rest}" for p in prompts]
    return out


#: Progress-bar names of the two runs.
RUN_LABELS = {True: "EGMA", False: "no gaze"}

#: Words that identify the sentence describing each synthetic class (for the attention maps).
_CLASS_WORDS = {
    "cardiomegaly": ("heart", "cardiac", "cardiomegaly"),
    "pleural_effusion": ("effusion",),
    "opacity": ("opacity", "consolidation"),
    "pneumothorax": ("pneumothorax",),
}


def demo_config(settings: DemoSettings, data_dir: Path, run_dir: Path, gaze: bool) -> TrainConfig:
    """The training config of one demo run (EGMA when ``gaze``, else the no-gaze baseline)."""
    overrides: dict[str, Any] = {"lambda_clip": settings.lambda_clip}
    if not gaze:
        overrides["lambda_mlce"] = 0.0
    return TrainConfig.from_dict({
        "run_dir": str(run_dir),
        "seed": settings.seed,
        "data": {
            "train": str(data_dir / "train"), "eval": str(data_dir / "eval"),
            "batch_size": settings.batch_size, "eval_batch_size": 100, "max_sentences": 8, "max_tokens": 24,
            "shuffle_buffer": 256, "use_gaze": gaze, "num_workers": settings.num_workers,
        },
        "model": {
            "image_model": "tiny-swin", "text_model": settings.text_model, "image_size": settings.image_size,
            "embed_dim": settings.embed_dim, "tiny_width": settings.tiny_width, "tiny_layers": settings.tiny_layers,
            "tiny_heads": 2,
        },
        "loss": {"preset": "paper", "overrides": overrides},
        "optim": {
            "lr": settings.lr, "weight_decay": 0.05, "warmup_steps": max(1, settings.steps // 10),
            "max_steps": settings.steps, "min_lr_ratio": 0.05, "grad_clip": 1.0,
        },
        "checkpoint": {"every": 0, "at_end": True, "keep_last": 1},
        "eval": {"at_start": gaze, "at_end": True, "every": 0, "prompts": report_prompts(),
                 "extra_prompts": {"sentence": "synthetic"}, "fine_prompts": "synthetic", "reduction": "mean"},
        "log": {"every": 10, "progress_bar": True, "label": RUN_LABELS[gaze]},
        # One compute thread plus one data worker: both cores busy, no OpenMP spin-wait collapse.
        "dist": {"device": "cpu", "num_threads": 1},
    })


def _say(message: str) -> None:
    """One line on stderr between the progress bars."""
    tqdm.write(f"egma-fast demo: {message}", file=sys.stderr)


def _write_data(settings: DemoSettings, data_dir: Path) -> dict[str, Any]:
    common = dict(seed=settings.seed, image_size=settings.image_size, samples_per_shard=settings.samples_per_shard,
                  heatmap_max_side=32, progress=True)
    train = write_synthetic_shards(data_dir / "train", settings.train_samples, **common)
    ev = write_synthetic_shards(data_dir / "eval", settings.eval_samples, start=10_000_000,
                                second_finding_prob=0.0, **common)
    return {"train": train["total"], "eval": ev["total"], "classes": train["info"]["classes"]}


def _finding_sentence(sentences: list[str], class_name: str) -> int | None:
    words = _CLASS_WORDS.get(class_name)
    if not words:
        return None
    for j, s in enumerate(sentences):
        low = s.lower()
        if any(w in low for w in words) and not low.startswith("no ") and " normal" not in low and "no " not in low:
            return j
    return None


def _attention_pictures(trainers: dict[str, Any], out_dir: Path, count: int, classes: list[str]) -> list[dict[str, Any]]:
    """For ``count`` evaluation images with gaze on a finding sentence: image | gaze | each model's map."""
    first = next(iter(trainers.values()))
    picked = []
    for batch in first.eval_batches():
        for i in range(len(batch)):
            c = int(batch.class_index[i])
            if c <= 0 or not bool(batch.has_gaze[i]) or c >= len(classes):
                continue
            j = _finding_sentence(batch.sentences[i], classes[c])
            if j is None or float(batch.heatmaps[i, j].max()) <= 0:
                continue
            picked.append((batch.images[i], batch.sentences[i][j], batch.heatmaps[i, j], classes[c], batch.keys[i]))
            if len(picked) >= count:
                break
        if len(picked) >= count:
            break
    records = []
    for k, (image, sentence, heatmap, cls, key) in enumerate(picked):
        similarities = {name: model_attention_map(t.model, t.tokenizer, image, sentence).similarity
                        for name, t in trainers.items()}
        path = save_attention_figure(out_dir / f"case_{k}.png", image, heatmap, similarities, sentence, title=cls)
        records.append({"path": str(path), "key": key, "class": cls, "sentence": sentence})
    return records


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


_ROWS = [
    ("zs_accuracy", "zero-shot accuracy, report prompts (5 classes, chance 0.200)"),
    ("zs_macro_f1", "zero-shot macro-F1, report prompts"),
    ("zs_auroc", "zero-shot macro AUROC (softmax over classes), report prompts"),
    ("zs_sentence_accuracy", "zero-shot accuracy, one-sentence prompts"),
    ("zs_sentence_auroc", "zero-shot macro AUROC, one-sentence prompts"),
    ("zs_fine_accuracy", "fine-grained (patch-sentence) zero-shot accuracy, one-sentence prompts"),
    ("i2t_p@1", "retrieval image->report P@1"),
    ("i2t_p@5", "retrieval image->report P@5"),
    ("t2i_p@1", "retrieval report->image P@1"),
    ("t2i_p@5", "retrieval report->image P@5"),
    ("gaze_pointing", "gaze pointing (best patch inside the gaze region)"),
    ("gaze_pointing_chance", "gaze pointing by chance"),
]


def _markdown(report: dict[str, Any]) -> str:
    cols = ["before training", "EGMA"] + (["no gaze"] if report.get("no_gaze") else [])
    lines = [
        "# egma-fast demo report",
        "",
        f"Synthetic chest X-ray readings: {report['data']['train']} training and {report['data']['eval']} evaluation cases "
        f"({report['settings']['image_size']} px, classes {', '.join(report['data']['classes'])}).",
        f"Each run: {report['settings']['steps']} steps of {report['settings']['batch_size']} samples on CPU "
        f"(tiny Swin + {report['settings']['text_model']}), paper preset, lambda_clip={report['settings']['lambda_clip']}. "
        "The no-gaze run sets lambda_mlce = 0 and marks every sample gaze-free; both start from the same model.",
        "Zero-shot classification scores cos(z^I, z^T) against class prompts written as short reports (the finding "
        "sentence plus the normal sentences it does not contradict), the form z^T is trained on; one-sentence prompts "
        "and the fine-grained patch-sentence score are listed too. Retrieval ranks the evaluation reports for each image "
        "and vice versa (relevant = same class). Gaze pointing: share of report sentences (of samples with gaze) whose most similar patch lies "
        "where the radiologist's gaze heatmap is at least half its maximum.",
        "",
        "| metric | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    runs = [report["before"], report["egma"]["eval"]] + ([report["no_gaze"]["eval"]] if report.get("no_gaze") else [])
    for key, label in _ROWS:
        if any(key in r for r in runs):
            lines.append(f"| {label} | " + " | ".join(_fmt(r.get(key, "")) for r in runs) + " |")
    lines += ["", "| run | train seconds | final loss | final loss_c | final loss_mlce | final loss_egm | final loss_clip | logit scale |",
              "|---|---|---|---|---|---|---|---|"]
    for name in ("egma", "no_gaze"):
        r = report.get(name)
        if not r:
            continue
        t = r["last_train"] or {}
        lines.append(f"| {name} | {r['train_seconds']:.1f} | " + " | ".join(
            _fmt(t.get(k, "")) for k in ("loss", "loss_c", "loss_mlce", "loss_egm", "loss_clip", "logit_scale")) + " |")
    if report.get("attention_maps"):
        lines += ["", "## Attention maps", "",
                  "Each picture: the image, the radiologist's (simulated) gaze heatmap for one finding sentence, "
                  "and the patch-sentence cosine similarity of each trained model for the same sentence, on one "
                  "colour scale shared by the models (see the colour bars). The patient's left is on the image's right.", ""]
        for a in report["attention_maps"]:
            rel = Path(a["path"]).relative_to(Path(report["out"]))
            lines += [f"**{a['class']}**: \"{a['sentence']}\"", "", f"![{a['class']}]({rel.as_posix()})", ""]
    lines += ["", f"Total wall time: {report['wall_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _summary(report: dict[str, Any]) -> str:
    b, e = report["before"], report["egma"]["eval"]
    parts = [f"egma-fast demo ({report['wall_seconds']:.0f} s): zero-shot accuracy before {b['zs_accuracy']:.3f} -> EGMA {e['zs_accuracy']:.3f}"]
    if report.get("no_gaze"):
        parts.append(f"no-gaze {report['no_gaze']['eval']['zs_accuracy']:.3f}")
    parts.append("(chance 0.200)")
    line2 = (f"retrieval report->image P@1: before {b.get('t2i_p@1', float('nan')):.3f}, EGMA {e.get('t2i_p@1', float('nan')):.3f}"
             + (f", no-gaze {report['no_gaze']['eval'].get('t2i_p@1', float('nan')):.3f}" if report.get("no_gaze") else ""))
    line3 = (f"gaze pointing: before {b.get('gaze_pointing', float('nan')):.3f}, EGMA {e.get('gaze_pointing', float('nan')):.3f}"
             + (f", no-gaze {report['no_gaze']['eval'].get('gaze_pointing', float('nan')):.3f}" if report.get("no_gaze") else "")
             + f" (chance {e.get('gaze_pointing_chance', float('nan')):.3f})")
    return "\n".join([", ".join(parts), line2, line3, f"report: {Path(report['out']) / 'report.md'}"])


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole demo into ``out`` (an earlier demo there is replaced); returns the report
    dict (also written as report.json). Says each step on stderr."""
    from egma_fast.train.trainer import Trainer  # noqa: PLC0415 (the trainer imports DCP: only when a demo runs)

    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_dir = out / "data"
    runs = 2 if settings.baseline else 1
    total = 3 + runs
    _say(f"[1/{total}] writing {settings.train_samples} training and {settings.eval_samples} evaluation cases "
         f"({settings.image_size} px) to {data_dir}")
    t0 = time.perf_counter()
    data = _write_data(settings, data_dir)
    data["seconds"] = time.perf_counter() - t0
    report: dict[str, Any] = {"out": str(out), "settings": dataclasses.asdict(settings), "data": data}

    trainers: dict[str, Trainer] = {}
    for n, gaze in enumerate([True, False][:runs], start=2):
        label = RUN_LABELS[gaze]
        _say(f"[{n}/{total}] training {label}: {settings.steps} steps of {settings.batch_size} samples"
             + (", evaluated before and after" if gaze else ", evaluated after"))
        trainer = Trainer(demo_config(settings, data_dir, out / "runs" / ("egma" if gaze else "no_gaze"), gaze=gaze),
                          overwrite=True)
        summary = trainer.fit()
        if gaze:
            report["before"] = trainer.eval_history[0]
        report["egma" if gaze else "no_gaze"] = {"eval": trainer.eval_history[-1], "train_seconds": summary["train_seconds"],
                                                 "last_train": summary["last_train"]}
        trainers[label] = trainer
    _say(f"[{total - 1}/{total}] drawing {settings.attention_maps} attention map(s) to {out / 'attention'}")
    report["attention_maps"] = (
        _attention_pictures(trainers, out / "attention", settings.attention_maps, data["classes"])
        if settings.attention_maps > 0 else []
    )
    for trainer in trainers.values():
        trainer.close()
    _say(f"[{total}/{total}] writing {out / 'report.md'} and report.json")
    report["wall_seconds"] = time.perf_counter() - start
    report["summary"] = _summary(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(_markdown(report))
    return report
