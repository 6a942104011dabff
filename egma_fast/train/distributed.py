"""Process group, device and FSDP2 wrapping for the trainer.

Launch: ``torchrun --nproc_per_node N -m egma_fast.cli train --config FILE``. torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT); :func:`setup_distributed` reads them and starts a
process group (nccl on GPU, gloo on CPU). Without those variables it runs one process with no
process group at all.

FSDP2: ``fully_shard`` on every block of ``model.transformer_blocks()``, then on the model (its
root group holds the embeddings, norms and projections), with a MixedPrecisionPolicy (bf16
params/compute with fp32 gradient reduction on GPU, fp32 on CPU).

The loss module (its log logit scale) is **not** sharded: it is replicated on every rank, kept in
fp32 whatever the model's precision, and its gradient is averaged across ranks by
:func:`all_reduce_replicated_grads` before the optimizer step (the same average FSDP applies to
the sharded parameters), so every rank holds the same logit scale.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from egma_fast.models import register_fsdp_forward_methods
from egma_fast.train.config import DistConfig

__all__ = [
    "DistInfo",
    "all_reduce_replicated_grads",
    "barrier",
    "clip_grad_norm",
    "setup_distributed",
    "shutdown_distributed",
    "wrap_fsdp",
]


@dataclass
class DistInfo:
    """Where this process runs.

    rank / world_size / local_rank: torchrun's values ((0, 1, 0) for a single process).
    device: the torch device this rank computes on.
    initialized_here: whether setup_distributed created the process group (and so destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, draws the progress bar and finalises checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group with more than one rank is active."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def setup_distributed(config: DistConfig | None = None) -> DistInfo:
    """Pick the device and, under torchrun (WORLD_SIZE set), start the process group.

    An already-initialised process group (e.g. from a test harness) is reused as it is.
    """
    config = config or DistConfig()
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("dist.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1) if want_cuda else rank)
        created = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        created = False
        if world > 1 or "RANK" in os.environ:
            backend = config.backend
            if backend == "auto":
                backend = "nccl" if want_cuda else "gloo"
            if backend == "nccl" and not want_cuda:
                raise RuntimeError("dist.backend='nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
            if want_cuda:
                torch.cuda.set_device(local_rank)
            kwargs = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
            rank, world = dist.get_rank(), dist.get_world_size()
            created = True
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, initialized_here=created)


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if setup_distributed created it."""
    if info.initialized_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """dist.barrier() when a process group is active, else nothing."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def use_fsdp(config: DistConfig, info: DistInfo) -> bool:
    """Whether to shard: dist.fsdp "on", or "auto" with more than one rank."""
    if config.fsdp == "off":
        if info.world_size > 1:
            raise ValueError("dist.fsdp='off' with more than one rank: the trainer shards with FSDP2; use 'auto' or 'on'")
        return False
    if config.fsdp == "on":
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("dist.fsdp='on' needs a process group: launch with torchrun")
        return True
    return info.world_size > 1


def param_dtype(config: DistConfig, device: torch.device) -> torch.dtype:
    """The compute/parameter dtype of the mixed-precision policy."""
    if config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def wrap_fsdp(model: nn.Module, config: DistConfig, device: torch.device) -> nn.Module:
    """Apply FSDP2 in place: every transformer block, then the model itself; returns the model.

    The model must provide ``transformer_blocks()`` (EGMAModel does). Its ``encode_*`` methods
    are registered as FSDP forward methods, so evaluation can call them (on every rank).
    """
    pdtype = param_dtype(config, device)
    rdtype = torch.bfloat16 if (pdtype == torch.bfloat16 and config.reduce_dtype == "bf16") else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=pdtype, reduce_dtype=rdtype, output_dtype=None, cast_forward_inputs=True)
    blocks = model.transformer_blocks()
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
    # The root's parameters are needed right away in backward; keeping them unsharded is the FSDP2 default.
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_methods(model)
    return model


def all_reduce_replicated_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of replicated (non-FSDP) parameters over ranks, in place.

    Each rank's loss is its share of the global loss (the per-rank losses average to it), so the
    average of the per-rank gradients is the global gradient, as for the FSDP parameters.
    """
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) != len([p for p in params if p.requires_grad]):
        # A rank without a gradient would deadlock the others in all_reduce; fill zeros instead.
        for p in params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of all gradients (sharded DTensor and replicated alike); clip to max_norm.

    Sharded gradients contribute their local shard's squared norm, summed over ranks; replicated
    gradients (already identical on every rank) count once. Returns the norm before clipping as
    a 0-d float64 tensor, without a host sync (so the GPU is not stalled every step). Every rank
    must call it (it all-reduces when any gradient is sharded).
    """
    sharded: list[torch.Tensor] = []
    replicated: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        (sharded if _is_dtensor(g) else replicated).append(g.to_local() if _is_dtensor(g) else g)
    device = (sharded or replicated or [torch.zeros(())])[0].device

    def sq(tensors: list[torch.Tensor]) -> torch.Tensor:
        # float64 so that the rank order of the sum does not matter at fp32 tolerance
        total = torch.zeros((), dtype=torch.float64, device=device)
        for t in tensors:
            total = total + t.detach().double().pow(2).sum()
        return total

    sharded_sq = sq(sharded)
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM)
    total = (sharded_sq + sq(replicated)).sqrt()
    if max_norm is not None and max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in sharded + replicated:
            g.mul_(coef.to(g.dtype))
    return total
