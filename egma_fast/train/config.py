"""TrainConfig: everything a training run needs, as nested dataclasses loadable from YAML/JSON/TOML.

A config file mirrors the sections below (every key optional except ``data.train``)::

    # configs/demo_cpu.yaml
    run_dir: runs/demo
    data: {train: data/demo/train, eval: data/demo/eval, batch_size: 32}
    model: {image_model: tiny-swin, text_model: tiny-bert, image_size: 64, embed_dim: 64}
    loss: {preset: paper}
    optim: {lr: 1.0e-3, warmup_steps: 20, max_steps: 300}

Unknown keys are errors that name the key path (``optim.lrr``). :func:`apply_overrides` applies
``section.key=value`` strings (the CLI's ``--set``), values parsed as YAML/JSON scalars. Every
value is converted to its field's declared type (:mod:`egma_fast.train.config_types`), or the
error names the key and the type it expects.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from egma_fast.config import EGMAConfig
from egma_fast.data.options import LoaderOptions
from egma_fast.models.config import ModelConfig
from egma_fast.train.config_types import ConfigError, coerce_fields

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "LogConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
]


@dataclass
class DataConfig:
    """Where the shards are and how batches are formed."""

    #: Training shards: a folder holding sizes.json, a brace pattern, or a list of tar paths.
    train: Any = None
    #: Evaluation shards (zero-shot classification and retrieval); None disables evaluation.
    eval: Any = None
    #: Per-rank micro-batch size. One optimizer step sees batch_size * world_size * grad_accum samples.
    batch_size: int = 32
    #: Batches per rank in one data epoch (the reader draws shards with replacement); None: the
    #: dataset size from sizes.json divided by batch_size * world_size.
    epoch_batches: int | None = None
    #: Evaluation batch size (per rank).
    eval_batch_size: int = 64
    #: At most this many evaluation samples (None: all of them).
    eval_max_samples: int | None = None
    #: Sentences kept per report (M); longer reports are cut.
    max_sentences: int = 8
    #: Tokens kept per sentence (L), including [CLS]/[SEP].
    max_tokens: int = 32
    #: DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = 0
    #: Shuffle buffer of the streaming reader (samples); 0 disables shuffling.
    shuffle_buffer: int = 256
    #: Use the gaze heatmaps. False marks every sample gaze-free (has_gaze all False), the
    #: "no-gaze" baseline: together with loss.lambda_mlce = 0 it removes every gaze term.
    use_gaze: bool = True
    #: More reader options (fields of egma_fast.data.LoaderOptions, e.g. {channels: 1,
    #: prefetch_factor: 4}), set on top of what the fields above give.
    loader_kwargs: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    """The EGMA loss (egma_fast.losses.EGMALoss)."""

    #: EGMAConfig preset: "paper" (default) or "official".
    preset: str = "paper"
    #: Loss backend: "auto" (Triton/CUDA on GPU, the C++ extension or the reference on CPU),
    #: "torch", "triton", "cpp" or "cuda".
    backend: str = "auto"
    #: Overrides of EGMAConfig fields, e.g. {lambda_egm: 1.0, lambda_mlce: 0.0}.
    overrides: dict = field(default_factory=dict)

    def egma_config(self) -> EGMAConfig:
        """The resolved EGMAConfig (raises ConfigError naming loss.overrides on a bad field)."""
        overrides = coerce_fields(EGMAConfig, self.overrides, "loss.overrides.")
        try:
            return EGMAConfig.preset(self.preset, **overrides)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"loss: {exc}") from exc


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, gradient accumulation and clipping."""

    lr: float = 1e-4
    #: Decoupled weight decay; never applied to biases, norms, embeddings' 1-d params or the logit scale.
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    #: Optimizer steps of linear warm-up from 0 to lr.
    warmup_steps: int = 100
    #: Total optimizer steps of the run (the cosine reaches min_lr_ratio * lr here).
    max_steps: int = 1000
    #: Final learning rate as a fraction of lr.
    min_lr_ratio: float = 0.0
    #: Micro-batches accumulated per optimizer step.
    grad_accum: int = 1
    #: Clip the global gradient norm to this (None or 0: no clipping; the norm is still logged).
    grad_clip: float | None = 1.0
    #: Learning-rate multiplier for the log logit scale.
    logit_scale_lr_mult: float = 1.0


@dataclass
class CheckpointConfig:
    """DCP checkpoints in run_dir/checkpoints/step_XXXXXXXX (atomic: written to .tmp, then renamed)."""

    #: Save every this many optimizer steps (0: only at the end).
    every: int = 100
    #: Keep the newest k checkpoints (older ones are deleted after a successful save).
    keep_last: int = 3
    #: Also save after the last step.
    at_end: bool = True
    #: Folder (default: run_dir/checkpoints).
    dir: str | None = None


@dataclass
class EvalConfig:
    """Periodic zero-shot classification and retrieval on data.eval (all ranks take part)."""

    #: Evaluate every this many optimizer steps (0: only before/after training, as below).
    every: int = 0
    #: Evaluate before the first step.
    at_start: bool = False
    #: Evaluate after the last step.
    at_end: bool = True
    #: Class prompts: "auto" (the synthetic generator's prompts for synthetic eval shards, else
    #: "default"), a set of egma_fast.eval.prompts ("default", "chexpert5x200", "rsna", "siim"),
    #: "synthetic", or a mapping class name -> prompts. Class c of a sample is the c-th class.
    prompts: Any = "auto"
    #: More prompt sets for global zero-shot, name -> prompt spec (as ``prompts``); each is
    #: reported as zs_<name>_accuracy / _macro_f1 / _auroc.
    extra_prompts: dict = field(default_factory=dict)
    #: One-sentence prompts for the fine-grained (patch-sentence) zero-shot score; None: ``prompts``.
    fine_prompts: Any = None
    #: Prompt reduction per class: "max" (official) or "mean" (prompt ensembling).
    reduction: str = "mean"
    #: Retrieval P@K values (image -> report text and report text -> image on the eval set).
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    #: Run retrieval as well as zero-shot classification.
    retrieval: bool = True


@dataclass
class LogConfig:
    """Metrics: JSONL (run_dir/metrics.jsonl), TensorBoard (run_dir/tb), tqdm on rank 0."""

    #: Log training metrics every this many optimizer steps.
    every: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    #: Name of this run on its progress bars (None: the run folder's name).
    label: str | None = None


@dataclass
class DistConfig:
    """Process group, FSDP2 and precision."""

    #: "auto" (cuda if available, else cpu), "cpu" or "cuda".
    device: str = "auto"
    #: Process-group backend: "auto" (nccl on cuda, gloo on cpu), "gloo" or "nccl".
    backend: str = "auto"
    #: FSDP2 sharding: "auto" (whenever world_size > 1), "on" (also for one rank) or "off"
    #: (plain replication is not offered: more than one rank needs FSDP).
    fsdp: str = "auto"
    #: FSDP2 MixedPrecisionPolicy: "auto" (bf16 params/compute on cuda, fp32 on cpu), "bf16", "fp32".
    mixed_precision: str = "auto"
    #: Gradient reduction dtype under bf16: "fp32" (default, exact averaging) or "bf16".
    reduce_dtype: str = "fp32"
    #: Reshard block parameters after forward (saves memory, costs a second all-gather in backward).
    reshard_after_forward: bool = True
    #: CPU threads of this process (torch.set_num_threads); None keeps torch's default. On a
    #: small or shared CPU, 1 thread per process avoids OpenMP spin-wait collapse.
    num_threads: int | None = None
    #: Ask for deterministic kernels (torch.use_deterministic_algorithms(warn_only=True)).
    deterministic: bool = False


@dataclass
class TrainConfig:
    """A whole training run. Every section has defaults; only data.train is required to train."""

    #: Output folder: metrics.jsonl, tb/, checkpoints/, config.json.
    run_dir: str = "runs/egma"
    #: Base seed (model init, data order, RNG streams; rank r uses seed + r for its own streams).
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig.tiny())
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges; raises ConfigError naming the field."""
        def positive(path: str, value: Any, allow_zero: bool = False) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                raise ConfigError(f"{path} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}")

        positive("data.batch_size", self.data.batch_size)
        positive("data.eval_batch_size", self.data.eval_batch_size)
        positive("data.max_sentences", self.data.max_sentences)
        if self.data.epoch_batches is not None:
            positive("data.epoch_batches", self.data.epoch_batches)
        positive("data.num_workers", self.data.num_workers, allow_zero=True)
        positive("data.shuffle_buffer", self.data.shuffle_buffer, allow_zero=True)
        unknown = sorted(set(self.data.loader_kwargs) - {f.name for f in dataclasses.fields(LoaderOptions)})
        if unknown:
            raise ConfigError(f"unknown data.loader_kwargs key(s) {unknown}; known: "
                              f"{sorted(f.name for f in dataclasses.fields(LoaderOptions))}")
        if self.data.max_tokens < 2:
            raise ConfigError(f"data.max_tokens must be >= 2 (room for [CLS] and [SEP]), got {self.data.max_tokens!r}")
        positive("optim.max_steps", self.optim.max_steps)
        positive("optim.warmup_steps", self.optim.warmup_steps, allow_zero=True)
        positive("optim.grad_accum", self.optim.grad_accum)
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr!r}")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio!r}")
        if self.optim.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.optim.weight_decay!r}")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must be a pair, got {self.optim.betas!r}")
        if self.optim.grad_clip is not None and self.optim.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 or null, got {self.optim.grad_clip!r}")
        positive("checkpoint.every", self.checkpoint.every, allow_zero=True)
        positive("checkpoint.keep_last", self.checkpoint.keep_last)
        positive("eval.every", self.eval.every, allow_zero=True)
        if self.dist.num_threads is not None:
            positive("dist.num_threads", self.dist.num_threads)
        positive("log.every", self.log.every)
        if self.eval.reduction not in ("max", "mean"):
            raise ConfigError(f"eval.reduction must be 'max' or 'mean', got {self.eval.reduction!r}")
        choices = {
            "dist.device": (self.dist.device, ("auto", "cpu", "cuda")),
            "dist.backend": (self.dist.backend, ("auto", "gloo", "nccl")),
            "dist.fsdp": (self.dist.fsdp, ("auto", "on", "off")),
            "dist.mixed_precision": (self.dist.mixed_precision, ("auto", "bf16", "fp32")),
            "dist.reduce_dtype": (self.dist.reduce_dtype, ("fp32", "bf16")),
            "loss.backend": (self.loss.backend, ("auto", "torch", "triton", "cpp", "cuda")),
        }
        for path, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{path} must be one of {allowed}, got {value!r}")
        self.loss.egma_config()  # validates preset and overrides

    # --- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from nested dicts; unknown keys raise ConfigError naming the key path."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a training config must be a mapping of sections, got {type(data).__name__}")
        return _build(cls, data, "")

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]} in {where}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _SECTIONS.get((cls, name))
        if sub is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {type(value).__name__}")
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    kwargs = coerce_fields(cls, {k: v for k, v in kwargs.items() if (cls, k) not in _SECTIONS}, prefix) | {
        k: v for k, v in kwargs.items() if (cls, k) in _SECTIONS}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


_SECTIONS: dict[tuple[type, str], type] = {
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "model"): ModelConfig,
    (TrainConfig, "loss"): LossConfig,
    (TrainConfig, "optim"): OptimConfig,
    (TrainConfig, "checkpoint"): CheckpointConfig,
    (TrainConfig, "eval"): EvalConfig,
    (TrainConfig, "log"): LogConfig,
    (TrainConfig, "dist"): DistConfig,
}


def _parse_text(text: str, suffix: str, source: str) -> Any:
    suffix = suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            import tomllib  # noqa: PLC0415 (3.11+)

            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text) or {}
    except ConfigError:
        raise
    except Exception as exc:  # json/toml/yaml each raise their own error types
        raise ConfigError(f"{source}: cannot parse ({type(exc).__name__}: {exc})") from exc
    raise ConfigError(f"{source}: unsupported config format {suffix!r}; use .yaml, .yml, .json or .toml")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TrainConfig from a .yaml/.yml, .json or .toml file, then apply ``key=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    data = _parse_text(p.read_text(), p.suffix, str(p))
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:  # e.g. "a: b: c": keep the text; the field's type decides
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` set (value parsed as a YAML scalar/list)."""
    out = json.loads(json.dumps(_to_plain(data)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = _parse_value(raw)
    return out
