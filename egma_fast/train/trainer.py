"""The EGMA trainer: data -> EGMAModel (FSDP2) -> distributed EGMALoss -> AdamW, with DCP checkpoints.

    trainer = Trainer(load_config("configs/demo_cpu.yaml"))
    trainer.resume("latest")          # optional: continue a killed run
    summary = trainer.fit()
    trainer.close()

One optimizer step = ``optim.grad_accum`` micro-batches of ``data.batch_size`` samples per rank.
Each micro-batch's contrastive terms see the micro-batch of every rank (the loss gathers features
with gradient); the per-rank losses average to the global micro-batch loss, and FSDP averages
gradients over ranks, so N ranks train exactly like one process on the concatenated batch.

The loss module (it owns the log logit scale, a shape-[1] parameter) is replicated, not sharded:
kept in fp32, its gradient averaged over ranks before the step (see
:mod:`egma_fast.train.distributed`); the optimizer and the checkpoints hold it under
``loss.logit_scale``.

The run folder belongs to one run (:mod:`egma_fast.train.run_dir`): the first write into it
(the first step, evaluation or checkpoint) refuses a folder that holds another run unless this
one resumes it or was built with ``overwrite=True``. A resumed run's metrics continue as one
series from its checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from egma_fast import loss_terms
from egma_fast.data.errors import DataError
from egma_fast.data.options import LoaderOptions
from egma_fast.data.reader import GazeLoader, make_loader
from egma_fast.data.shards import SIZES_FILE, read_sizes
from egma_fast.eval.prompts import PromptSets
from egma_fast.losses import EGMALoss, EGMALossOutput
from egma_fast.models import EGMAModel, build_tokenizer
from egma_fast.train.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from egma_fast.train.config import TrainConfig
from egma_fast.train.distributed import (
    DistInfo,
    all_reduce_replicated_grads,
    barrier,
    clip_grad_norm,
    param_dtype,
    setup_distributed,
    shutdown_distributed,
    use_fsdp,
    wrap_fsdp,
)
from egma_fast.train.errors import CheckpointError
from egma_fast.train.evaluate import EvalSettings, evaluate_model
from egma_fast.train.metrics import (
    MetricsLogger,
    Timer,
    nvtx_range,
    peak_memory_bytes,
    reset_peak_memory,
    sum_over_ranks,
)
from egma_fast.train.optim import build_optimizer, build_scheduler, parameters_of
from egma_fast.train.run_dir import CONFIG_FILE, clear_run, describe_run, refusal

logger = logging.getLogger("egma_fast.train")

__all__ = ["LOSS_PARTS", "Trainer", "seed_everything"]

#: The loss parts summed over micro-batches and ranks and logged: metric name -> EGMALossOutput field.
LOSS_PARTS = {"loss": "total", "loss_c": "loss_c", "loss_mlce": "loss_mlce", "loss_egm": "loss_egm", "loss_clip": "loss_clip"}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the loop (see the module docstring).

    Args:
        config: the run's configuration.
        info: where this process runs (default: :func:`setup_distributed` from the environment).
        overwrite: discard an earlier run found in ``config.run_dir`` (its checkpoints, metrics
            and config.json) instead of refusing to train there.
    """

    def __init__(self, config: TrainConfig, info: DistInfo | None = None, *, overwrite: bool = False) -> None:
        config.validate()
        self.config = config
        self.overwrite = overwrite
        self._owns_dist = info is None
        self.info = info if info is not None else setup_distributed(config.dist)
        self.device = self.info.device
        if config.dist.num_threads is not None:
            torch.set_num_threads(config.dist.num_threads)
        if config.dist.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # Identical initialisation on every rank: FSDP2 keeps each rank's slice of the same model.
        seed_everything(config.seed)
        self.model = EGMAModel(config.model).to(self.device)
        self.egma_config = config.loss.egma_config()
        self.loss_fn = EGMALoss(self.egma_config, backend=config.loss.backend, distributed="auto").to(self.device)
        self.fsdp = use_fsdp(config.dist, self.info)
        pdtype = param_dtype(config.dist, self.device)
        if self.fsdp:
            wrap_fsdp(self.model, config.dist, self.device)
            self.autocast_dtype = None  # the MixedPrecisionPolicy casts
        else:
            self.autocast_dtype = pdtype if pdtype != torch.float32 else None
        # One module tree for state dicts: "model.*" (FSDP-sharded) and "loss.logit_scale" (replicated).
        self.container = nn.ModuleDict({"model": self.model, "loss": self.loss_fn})
        self.optimizer = build_optimizer(self.model, self.loss_fn, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim)
        self.params = parameters_of([self.model, self.loss_fn])
        self.loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        self.tokenizer = build_tokenizer(config.model)
        self.grid = self.model.image_tower.grid_size()
        self.heatmap_size = self.grid * 8

        self.run_dir = Path(config.run_dir)
        self.label = config.log.label or self.run_dir.name
        ckpt_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else self.run_dir / "checkpoints"
        self.checkpoints = CheckpointManager(ckpt_dir, self.info, keep_last=config.checkpoint.keep_last)
        # Opened on the first write into run_dir (see _open_run), once resume() has had its say.
        self.metrics: MetricsLogger | None = None
        self._resumed = False
        # This rank's own RNG streams (augmentations, dropout) differ per rank.
        seed_everything(config.seed + 1_000_003 * self.info.rank)

        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, float]] = []
        self._loader: GazeLoader | None = None
        self._iter = None
        self._pending_data_state: dict[str, Any] | None = None
        self._last_saved = -1
        self._last_eval = -1
        self._prompts: PromptSets | None = None
        self._timer = Timer(sync_cuda=self.device.type == "cuda")
        self._nvtx = self.device.type == "cuda"
        self._sigterm = False
        self._nonfinite: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # the run folder
    # ------------------------------------------------------------------------------------------
    def _open_run(self) -> None:
        """Claim run_dir on the first write: refuse (or, with overwrite, clear) another run's
        files, then open the metric files, dropping records after a resumed checkpoint."""
        if self.metrics is not None:
            return
        found = None
        if not self._resumed and self.info.is_main:
            found = describe_run(self.run_dir, self.checkpoints)
            if found is not None and self.overwrite:
                logger.warning("--overwrite: discarding the earlier run in %s (%s)", self.run_dir, found)
                clear_run(self.run_dir, self.checkpoints)
                found = None
        if self.info.world_size > 1:  # every rank stops, or none
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        barrier()
        if found is not None:
            raise refusal(self.run_dir, found)
        cfg = self.config
        self.metrics = MetricsLogger(self.run_dir, enabled=self.info.is_main, jsonl=cfg.log.jsonl,
                                     tensorboard=cfg.log.tensorboard, resume_step=self.step if self._resumed else None)
        if self.info.is_main:
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))

    # ------------------------------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------------------------------
    def _loader_options(self) -> LoaderOptions:
        """The reader options of this run (the training and evaluation loaders differ from here
        only in how they stream)."""
        d = self.config.data
        return LoaderOptions(
            batch_size=d.batch_size, num_workers=d.num_workers, image_size=self.config.model.image_size,
            heatmap_size=self.heatmap_size, max_sentences=d.max_sentences, max_sentence_tokens=d.max_tokens,
            # Static shapes: M = max_sentences on every batch and rank (the same sentence slots
            # everywhere; the distributed loss gathers [b, M, d] sentence features).
            pad_sentences_to=d.max_sentences, shuffle=d.shuffle_buffer > 0, shuffle_buffer=d.shuffle_buffer,
            seed=self.config.seed, pin_memory=self.device.type == "cuda",
        ).replace(**d.loader_kwargs)

    def epoch_batches(self) -> int:
        """Batches per rank per data epoch: data.epoch_batches, or dataset size / global batch."""
        d = self.config.data
        if d.epoch_batches is not None:
            return d.epoch_batches
        source = d.train
        if not isinstance(source, (str, Path)) or not (Path(source) / SIZES_FILE).is_file():
            if isinstance(source, (str, Path)) and not Path(source).exists():
                raise DataError(f"data.train={str(source)!r}: no such file or folder")
            raise DataError(f"data.train={source!r} has no sizes.json, so its size (the epoch length) is unknown; "
                            "set data.epoch_batches, or point data.train at a folder egma-fast prepare wrote")
        total = int(read_sizes(source)["total"])
        return max(1, total // (d.batch_size * self.info.world_size))

    def train_loader(self) -> GazeLoader:
        """The rank's endless, resumable training loader (resampled shards, full batches only)."""
        if self._loader is None:
            d = self.config.data
            if d.train is None:
                raise DataError("data.train is not set: name the training shards (a folder with sizes.json, a pattern or a list)")
            options = self._loader_options().replace(
                resampled=True, epoch_batches=self.epoch_batches(), drop_last=True,
                rank=self.info.rank, world_size=self.info.world_size)
            self._loader = make_loader(d.train, self.tokenizer, options)
            if self._pending_data_state is not None:
                self._loader.load_state_dict(self._pending_data_state)
                self._pending_data_state = None
        return self._loader

    def eval_batches(self) -> GazeLoader:
        """The whole evaluation set, in order, identical on every rank (see train.evaluate)."""
        d = self.config.data
        options = self._loader_options().replace(
            batch_size=d.eval_batch_size, num_workers=0, shuffle=False, shuffle_buffer=0, seed=0, resampled=False,
            epoch_batches=None, rank=0, world_size=1, drop_last=False)
        return make_loader(d.eval, self.tokenizer, options)

    def _next_batch(self):
        loader = self.train_loader()
        if self._iter is None:
            self._iter = iter(loader)
        try:
            return next(self._iter)
        except StopIteration:  # end of a data epoch: the loader moved on to the next one
            self._iter = iter(loader)
            return next(self._iter)

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _has_gaze(self, batch) -> torch.Tensor:
        """has_gaze [B] as the loss sees it: all False in the no-gaze baseline (data.use_gaze=false)."""
        return batch.has_gaze if self.config.data.use_gaze else torch.zeros_like(batch.has_gaze)

    def forward_loss(self, batch) -> EGMALossOutput:
        """Model forward and the EGMA loss of one (rank-local) batch already on the device."""
        with nvtx_range("forward", self._nvtx), self._timer("forward"), self._autocast():
            out = self.model(batch.images, batch.sentence_input_ids, batch.sentence_attention_mask, batch.sentence_mask)
        with nvtx_range("loss", self._nvtx), self._timer("loss"):
            glob = self.egma_config.lambda_clip > 0
            return self.loss_fn(
                out.patch_features,
                out.sentence_features,
                out.sentence_mask,
                gaze_heatmaps=batch.heatmaps if self.config.data.use_gaze else None,
                has_gaze=self._has_gaze(batch),
                image_embeddings=out.image_embeddings if glob else None,
                text_embeddings=out.text_embeddings if glob else None,
            )

    def train_step(self, batches: Sequence[Any] | None = None) -> dict[str, Any] | None:
        """One optimizer step over ``grad_accum`` micro-batches (from the loader unless given).

        Returns the logged metrics on logging steps (every ``log.every`` and the last step; the
        same on every rank), else None.
        """
        cfg = self.config
        accum = cfg.optim.grad_accum
        if batches is not None and len(batches) != accum:
            raise ValueError(f"train_step got {len(batches)} micro-batches, optim.grad_accum is {accum}")
        self._open_run()
        self.model.train()
        # Only logging steps synchronise with the GPU (timers, loss values); the others run ahead.
        is_log = (self.step + 1) % cfg.log.every == 0 or self.step + 1 == cfg.optim.max_steps
        self._timer.sync_cuda = self.device.type == "cuda" and is_log
        reset_peak_memory(self.device)
        start = time.perf_counter()
        # On the device (read only at logging steps): loss parts and gaze samples, by name.
        sums = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in [*LOSS_PARTS, "gaze_samples"]}
        n_samples = 0
        for i in range(accum):
            with nvtx_range("data", self._nvtx), self._timer("data"):
                batch = batches[i] if batches is not None else self._next_batch()
                batch = batch.to(self.device, non_blocking=True)
            if self.fsdp:
                # Reduce-scatter gradients only on the last micro-batch.
                self.model.set_requires_gradient_sync(i == accum - 1)
            out = self.forward_loss(batch)
            with nvtx_range("backward", self._nvtx), self._timer("backward"):
                (out.total / accum).backward()
            for name, attr in LOSS_PARTS.items():
                sums[name] += getattr(out, attr).detach().double()
            sums["gaze_samples"] += self._has_gaze(batch).sum()
            n_samples += len(batch)

        with nvtx_range("optimizer", self._nvtx), self._timer("optimizer"):
            all_reduce_replicated_grads(self.loss_params, self.info.world_size)
            grad_norm = clip_grad_norm(self.params, cfg.optim.grad_clip)  # a tensor: no sync here
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._scaled_logit_scale()  # "inplace" preset: the authors clamp the stored value after the step
        self.step += 1
        bad = ~torch.isfinite(grad_norm)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        step_time = time.perf_counter() - start
        times = self._timer.pop()
        if not is_log:
            return None
        self._check_finite()
        totals = sum_over_ranks({**sums, "samples": n_samples, "micro_batches": accum, "step_s": step_time,
                                 "data_wait_s": times.get("data", 0.0), "skipped": self._skip_count()},
                                self.device, self.info.world_size)
        return self._log_step(totals, float(grad_norm), times)

    def _check_finite(self) -> None:
        """Raise if a gradient norm since the last check was NaN/Inf (checked at logging steps and
        before every checkpoint, so a diverged model is never saved)."""
        if self._nonfinite is not None and bool(self._nonfinite):
            raise FloatingPointError(
                f"a gradient norm was NaN or Inf between the last check and step {self.step}; the model "
                "diverged (lower optim.lr, keep optim.grad_clip, or resume from the last checkpoint)"
            )
        self._nonfinite = None

    def _skip_count(self) -> int:
        return self._loader.skip_stats()["count"] if self._loader is not None else 0

    def _skips_by_shard(self) -> dict[str, dict[str, int]]:
        """Samples lost per shard and reason, over every rank (a collective when distributed)."""
        mine = self._loader.skip_stats()["per_shard"] if self._loader is not None else {}
        if self.info.world_size == 1:
            return mine
        every: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(every, mine)
        out: dict[str, dict[str, int]] = {}
        for per_shard in every:
            for shard, reasons in per_shard.items():
                for reason, n in reasons.items():
                    out.setdefault(shard, {})[reason] = out.get(shard, {}).get(reason, 0) + n
        return out

    def _log_step(self, totals: dict[str, float], grad_norm: float, times: dict[str, float]) -> dict[str, Any]:
        """The step's metrics from the rank-summed ``totals`` (named sums); logged and returned."""
        world = self.info.world_size
        samples = totals["samples"]
        step_s = totals["step_s"] / world  # mean step time over ranks
        metrics: dict[str, Any] = {name: totals[name] / totals["micro_batches"] for name in LOSS_PARTS}
        metrics.update(
            step=self.step,
            lr=float(self.scheduler.get_last_lr()[0]),
            logit_scale=self.alpha(),
            grad_norm=grad_norm,
            samples=samples,
            gaze_fraction=totals["gaze_samples"] / max(samples, 1.0),
            step_time_s=step_s,
            samples_per_s=samples / max(step_s, 1e-9),
            data_wait_s=totals["data_wait_s"] / world,
            forward_s=times.get("forward", 0.0),
            loss_s=times.get("loss", 0.0),
            backward_s=times.get("backward", 0.0),
            optimizer_s=times.get("optimizer", 0.0),
            peak_memory_mb=peak_memory_bytes(self.device) / 2**20,
            skipped_samples=totals["skipped"],
        )
        if totals["skipped"] > 0:  # what was lost, where (JSONL only: TensorBoard takes numbers)
            by_shard = self._skips_by_shard()
            metrics["skipped_by_shard"] = {shard: sum(r.values()) for shard, r in sorted(by_shard.items())}
            by_reason: dict[str, int] = {}
            for reasons in by_shard.values():
                for reason, n in reasons.items():
                    by_reason[reason] = by_reason.get(reason, 0) + n
            metrics["skipped_by_reason"] = by_reason
        self.history.append(metrics)
        self.metrics.log(self.step, metrics, split="train")
        return metrics

    # ------------------------------------------------------------------------------------------
    # evaluation, checkpoints, the loop
    # ------------------------------------------------------------------------------------------
    def _scaled_logit_scale(self) -> torch.Tensor:
        """alpha (0-d, on the device) by the loss's own function: t clamped as the loss clamps it
        (with logit_scale_clamp="inplace" that clamps the stored parameter, as the authors do)."""
        with torch.no_grad():
            return loss_terms.logit_scale_to_alpha(self.loss_fn.logit_scale.detach(), self.egma_config)

    def alpha(self) -> float:
        """The current logit scale alpha = exp(t), t clamped as the loss clamps it."""
        return float(self._scaled_logit_scale())

    def prompts(self) -> PromptSets:
        """The prompt sets of zero-shot evaluation (eval.prompts / extra_prompts / fine_prompts,
        "auto" resolved against data.eval)."""
        if self._prompts is None:
            e = self.config.eval
            self._prompts = PromptSets.resolve(e.prompts, e.extra_prompts, e.fine_prompts, self.config.data.eval)
        return self._prompts

    def _eval_progress(self, batches):
        """``batches`` with a progress bar on rank 0 (when log.progress_bar)."""
        d = self.config.data
        total = None
        if isinstance(d.eval, (str, Path)) and (Path(d.eval) / SIZES_FILE).is_file():
            n = int(read_sizes(d.eval)["total"])
            total = math.ceil(min(n, d.eval_max_samples or n) / d.eval_batch_size)
        show = self.info.is_main and self.config.log.progress_bar
        return tqdm(batches, total=total, desc=f"eval {self.label}", unit="batch", leave=False, disable=not show,
                    dynamic_ncols=True)

    def evaluate(self, log: bool = True) -> dict[str, float]:
        """Zero-shot, retrieval and gaze pointing on data.eval; every rank must call it."""
        cfg = self.config
        if cfg.data.eval is None:
            raise DataError("data.eval is not set: name the evaluation shards to evaluate")
        if log:
            self._open_run()
        settings = EvalSettings(
            reduction=cfg.eval.reduction, ks=tuple(cfg.eval.retrieval_ks), retrieval=cfg.eval.retrieval,
            gaze_pool=self.egma_config.gaze_pool, max_length=cfg.data.max_tokens, max_samples=cfg.data.eval_max_samples,
            logit_scale=self.alpha(), autocast_dtype=self.autocast_dtype)
        with nvtx_range("eval", self._nvtx):
            result = evaluate_model(self.model, self.tokenizer, self._eval_progress(self.eval_batches()), self.prompts(),
                                    settings, self.info)
        result["step"] = self.step
        self._last_eval = self.step
        self.eval_history.append(result)
        if log:
            self.metrics.log(self.step, result, split="eval")
        return result

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (every rank must call it)."""
        self._check_finite()
        self._open_run()
        rank_state = {"rng": capture_rng_state(), "data": self._loader.state_dict() if self._loader is not None else None}
        meta = {"config": self.config.to_dict(), "last_metrics": self.history[-1] if self.history else None}
        with nvtx_range("checkpoint", self._nvtx):
            path = self.checkpoints.save(self.step, self.container, self.optimizer, self.scheduler, rank_state, meta)
        self._last_saved = self.step
        return path

    def resume(self, spec: str | Path = "latest") -> bool:
        """Restore from a checkpoint ("latest" or a folder); False when "latest" finds none.

        Restores model, optimizer, scheduler, step, this rank's RNG states and data position.
        With "latest", a damaged checkpoint (a file empty, truncated or not what it should be)
        is reported and the one before it is used. Call before :meth:`fit` (and before the
        first batch is drawn).

        Raises:
            CheckpointError: the named checkpoint, or every one with "latest", is damaged.
        """
        if self._iter is not None:
            raise RuntimeError("resume() must be called before training starts drawing batches")
        self._resumed = True  # also when there is nothing yet: the run continues in its folder
        candidates = self.checkpoints.candidates(spec)
        if not candidates:
            if self.info.is_main:
                logger.warning("no checkpoint under %s: starting from step 0", self.checkpoints.root)
            return False
        damaged = []
        for path in candidates:
            try:
                step, rank_state = self.checkpoints.load(path, self.container, self.optimizer, self.scheduler)
                break
            except CheckpointError as exc:
                damaged.append(str(exc))
                if self.info.is_main and path != candidates[-1]:
                    logger.warning("%s; falling back to the checkpoint before it", exc)
        else:
            more = f" (and {len(damaged) - 1} older one(s))" if len(damaged) > 1 else ""
            raise CheckpointError(damaged[0] + more)
        self.step = step
        self._last_saved = step
        if rank_state is not None:
            restore_rng_state(rank_state["rng"])
            self._pending_data_state = rank_state.get("data")
            if self._loader is not None and self._pending_data_state is not None:
                self._loader.load_state_dict(self._pending_data_state)
                self._pending_data_state = None
        if self.info.is_main:
            logger.info("resumed from %s at step %d", path, step)
        return True

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM (all ranks agree: one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self._sigterm else 0.0], device=self.device)
        if self.info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    @contextlib.contextmanager
    def _catch_sigterm(self):
        """Turn SIGTERM (preemption, scheduler time limit) into a checkpoint-and-stop request."""
        self._sigterm = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):  # noqa: ARG001
            self._sigterm = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def fit(self) -> dict[str, Any]:
        """Train until optim.max_steps, evaluating and checkpointing as configured; returns a summary.

        SIGTERM makes every rank stop after the current step and save a checkpoint (checked every
        step in one process, every ``log.every`` steps with several ranks, where it costs a
        collective); the summary then has ``"stopped": True``.
        """
        cfg = self.config
        total = cfg.optim.max_steps
        self._open_run()
        if cfg.eval.at_start and self.step == 0 and cfg.data.eval is not None:
            self.evaluate()
        bar = tqdm(total=total, initial=self.step, disable=not (self.info.is_main and cfg.log.progress_bar),
                   desc=f"train {self.label}", unit="step", dynamic_ncols=True)
        start, start_step = time.perf_counter(), self.step
        stopped = False
        with self._catch_sigterm():
            try:
                while self.step < total:
                    logged = self.train_step()
                    bar.update(1)
                    if logged is not None:
                        bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['lr']:.2e}",
                                        sps=f"{logged['samples_per_s']:.0f}")
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and cfg.data.eval is not None:
                        self.evaluate()
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self.save_checkpoint()
                    check = self.info.world_size == 1 or self.step % cfg.log.every == 0
                    if check and self.step < total and self._stop_requested():
                        stopped = True
                        if self._last_saved != self.step:
                            self.save_checkpoint()
                        if self.info.is_main:
                            logger.warning("SIGTERM: stopped at step %d with a checkpoint; continue with --resume latest", self.step)
                        break
            finally:
                bar.close()
        if not stopped:
            if cfg.checkpoint.at_end and self._last_saved != self.step:
                self.save_checkpoint()
            if cfg.eval.at_end and cfg.data.eval is not None and self._last_eval != self.step:
                self.evaluate()
        self.metrics.flush()
        return {
            "step": self.step,
            "stopped": stopped,
            "train_seconds": time.perf_counter() - start,
            "steps_run": self.step - start_step,
            "last_train": self.history[-1] if self.history else None,
            "last_eval": self.eval_history[-1] if self.eval_history else None,
        }

    def close(self) -> None:
        """Close the metric files and, if this trainer started it, the process group."""
        if self.metrics is not None:
            self.metrics.close()
        if self._owns_dist:
            shutdown_distributed(self.info)
