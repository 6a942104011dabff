"""Driving a model for evaluation: encode images from a DataLoader and texts from a tokenizer.

Only ``model.encode_image`` / ``model.encode_text`` / ``model.encode_patches`` /
``model.encode_sentences`` / ``model.encode_reports`` are called (see ``egma_fast.models.EGMAModel``). Under FSDP2 the
trainer registers them with ``register_fsdp_forward_methods`` so they go through the root
module's hooks; they issue collectives, so **every rank must call these functions**, with the
same texts and the same number of image batches (a ``DistributedSampler`` pads ranks to equal
length). Image embeddings and labels are gathered from all ranks (uneven sizes allowed), so every
rank returns the full set. Inputs are put in eval mode under ``torch.no_grad``; the model's
train/eval mode is restored afterwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from egma_fast.models.tokenizer import tokenize_reports

IMAGE_KEYS = ("images", "image", "pixel_values")
LABEL_KEYS = ("labels", "label", "targets")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that has ``encode_image``: the model itself (plain or FSDP2), or a DDP wrapper's ``.module``."""
    if hasattr(model, "encode_image"):
        return model
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "encode_image"):
        return inner
    raise ValueError(f"model must provide encode_image / encode_text (an EGMAModel), got {type(model).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's (local) parameters; CPU for a model without parameters."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """eval() + no_grad for the block, then the previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def split_batch(batch: Any, image_key: str | None = None, label_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a batch: a dict (keys images/image/pixel_values and labels/label/targets
    unless given) or a tuple/list (images, labels, ...)."""
    if isinstance(batch, dict):
        ikey = image_key or next((k for k in IMAGE_KEYS if k in batch), None)
        lkey = label_key or next((k for k in LABEL_KEYS if k in batch), None)
        if ikey not in batch or lkey not in batch:
            raise ValueError(
                f"batch dict must hold images under {image_key or IMAGE_KEYS} and labels under "
                f"{label_key or LABEL_KEYS}; it has keys {sorted(batch)}"
            )
        return batch[ikey], torch.as_tensor(batch[lkey])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise ValueError(f"batch must be a dict or an (images, labels) tuple, got {type(batch).__name__}")


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [N_r, ...] of every rank along dim 0 (rank order); identity without a process group.

    Ranks may hold different N_r. Collective: every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    x = x.contiguous()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)


def encode_image_loader(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    amp_dtype: torch.dtype | None = None,
    patches: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of ``loader`` (all ranks gathered).

    Returns:
        (embeddings [N, d] float32 on CPU, or [N, n, d] with ``patches=True``; labels [N] or
        [N, C] on CPU, as the loader gives them).
    """
    net = unwrap_model(model)
    dev = torch.device(device) if device is not None else model_device(net)
    method = net.encode_patches if patches else net.encode_image
    embs, labels = [], []
    with evaluating(net), _autocast(dev, amp_dtype):
        for batch in loader:
            images, y = split_batch(batch, image_key, label_key)
            embs.append(method(images.to(dev, non_blocking=True)).float())
            labels.append(y.to(dev))
    if not embs:
        raise ValueError("loader yielded no batches")
    emb = gather_across_ranks(torch.cat(embs))
    lab = gather_across_ranks(torch.cat(labels))
    return emb.cpu(), lab.cpu()


def encode_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    device: torch.device | str | None = None,
    max_length: int = 64,
    batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
    sentence_features: bool = False,
) -> torch.Tensor:
    """Encode one-sentence texts (prompts, retrieval queries): -> [N, d] float32 on CPU.

    ``sentence_features=False`` gives report embeddings z^T (``encode_text``); True gives the
    sentence features of S (``encode_sentences``). Every rank encodes the same texts.
    """
    from egma_fast.models.tokenizer import tokenize_texts  # noqa: PLC0415 (keeps eval import light)

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net = unwrap_model(model)
    dev = torch.device(device) if device is not None else model_device(net)
    method = net.encode_sentences if sentence_features else net.encode_text
    out = []
    with evaluating(net), _autocast(dev, amp_dtype):
        for start in range(0, len(texts), batch_size):
            ids, mask = tokenize_texts(tokenizer, list(texts[start:start + batch_size]), max_length=max_length)
            out.append(method(ids.to(dev), mask.to(dev)).float().cpu())
    if not out:
        raise ValueError("texts must not be empty")
    return torch.cat(out)


def encode_reports(
    model: nn.Module,
    tokenizer: Any,
    reports: Sequence[Sequence[str]],
    *,
    device: torch.device | str | None = None,
    max_sentences: int | None = None,
    max_length: int = 64,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Report embeddings z^T of sentence-split reports (as in training): -> [N, d] float32 on CPU.

    Every rank encodes the same reports (collective under FSDP2).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(reports) == 0:
        raise ValueError("reports must not be empty")
    net = unwrap_model(model)
    dev = torch.device(device) if device is not None else model_device(net)
    out = []
    with evaluating(net), _autocast(dev, amp_dtype):
        for start in range(0, len(reports), batch_size):
            batch = tokenize_reports(tokenizer, list(reports[start:start + batch_size]),
                                     max_sentences=max_sentences, max_length=max_length)
            out.append(net.encode_reports(**{k: v.to(dev) for k, v in batch.items()}).float().cpu())
    return torch.cat(out)
