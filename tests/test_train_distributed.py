"""Two gloo ranks under FSDP2 train exactly like one process on the same global batch.

Both set-ups use the real Trainer (FSDP2 per transformer block + root, the distributed EGMA
loss, the replicated logit scale whose gradient is all-reduced, clipping, AdamW). The global
batch is the concatenation of the ranks' local batches.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from egma_fast.data.collate import Batch
from egma_fast.train.config import TrainConfig

WORLD = 2
GLOBAL_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from egma_fast.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("dist_data")
    write_synthetic_shards(root / "train", 32, seed=3, samples_per_shard=16, image_size=64, heatmap_max_side=16, progress=False)
    return root


def _config(data_dir, run_dir, **optim) -> TrainConfig:
    return TrainConfig.from_dict({
        "run_dir": str(run_dir),
        "seed": 11,
        "data": {"train": str(data_dir / "train"), "batch_size": GLOBAL_BATCH, "max_sentences": 6, "max_tokens": 16},
        "model": {"image_model": "tiny-swin", "text_model": "tiny-bert", "image_size": 64, "embed_dim": 16,
                  "tiny_width": 16, "tiny_layers": 1, "tiny_heads": 2},
        # lambda_egm and lambda_clip on: every part of the loss (and every projection) gets gradient.
        "loss": {"preset": "paper", "backend": "torch", "overrides": {"lambda_clip": 0.5}},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 10, "grad_clip": 0.5, **optim},
        "log": {"every": 1, "progress_bar": False, "tensorboard": False, "jsonl": False},
        "checkpoint": {"every": 0, "at_end": False},
        "dist": {"device": "cpu"},
    })


def _global_batches(data_dir, n: int) -> list[Batch]:
    from egma_fast.data.reader import make_loader
    from egma_fast.models import build_tokenizer

    loader = make_loader(data_dir / "train", build_tokenizer("tiny-bert"), batch_size=GLOBAL_BATCH, image_size=64,
                         heatmap_size=32, max_sentences=6, max_sentence_tokens=16, shuffle=False, rank=0, world_size=1)
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == n:
            break
    # Mix gaze and gaze-free samples, unevenly over the two ranks (3 + 1 and 2 + 2 ... of 8).
    for i in (1, 2, 6):
        batches[0].has_gaze[i] = False
        batches[0].heatmaps[i] = 0.0
    assert bool(batches[0].has_gaze.any()) and not bool(batches[0].has_gaze.all())
    return batches


def _slice(batch: Batch, rank: int, world: int) -> Batch:
    b = len(batch) // world
    sl = slice(rank * b, (rank + 1) * b)
    return Batch(
        images=batch.images[sl], sentence_input_ids=batch.sentence_input_ids[sl],
        sentence_attention_mask=batch.sentence_attention_mask[sl], sentence_mask=batch.sentence_mask[sl],
        heatmaps=batch.heatmaps[sl], has_gaze=batch.has_gaze[sl], labels=batch.labels[sl],
        class_index=batch.class_index[sl], keys=batch.keys[sl], sentences=batch.sentences[sl],
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _run(trainer, batches: list[Batch]) -> dict:
    """Loss and gradients of the first batch, then two optimizer steps; full (unsharded) tensors."""
    from egma_fast.train.distributed import all_reduce_replicated_grads

    out = trainer.forward_loss(batches[0])
    out.total.backward()
    all_reduce_replicated_grads(trainer.loss_params, trainer.info.world_size)
    loss = out.total.detach().clone()
    if trainer.info.world_size > 1:
        dist.all_reduce(loss)
        loss /= trainer.info.world_size
    grads = {n: _full(p.grad) for n, p in trainer.container.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    steps = [trainer.train_step([b]) for b in batches]
    params = {n: _full(p) for n, p in trainer.container.named_parameters()}
    return {"loss": float(loss), "grads": grads, "steps": [s["loss"] for s in steps],
            "grad_norms": [s["grad_norm"] for s in steps], "params": params, "fsdp": trainer.fsdp}


def _rank_main(rank: int, port: int, data_dir, run_dir, result_file) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from egma_fast.train.trainer import Trainer

        trainer = Trainer(_config(data_dir, run_dir))
        batches = [_slice(b, rank, WORLD) for b in _global_batches(data_dir, 2)]
        result = _run(trainer, batches)
        if rank == 0:  # a file, not a queue: shared-memory tensors die with the process
            torch.save(result, result_file)
        trainer.close()
    finally:
        dist.destroy_process_group()


def test_two_rank_fsdp_matches_one_process(shards, tmp_path):
    from egma_fast.train.trainer import Trainer

    single = Trainer(_config(shards, tmp_path / "one"))
    expected = _run(single, _global_batches(shards, 2))
    single.close()
    assert not expected["fsdp"]

    ctx = mp.get_context("spawn")
    port = _free_port()
    result_file = tmp_path / "rank0.pt"
    procs = [ctx.Process(target=_rank_main, args=(r, port, shards, tmp_path / "two", result_file)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    got = torch.load(result_file, weights_only=False)

    assert got["fsdp"], "two ranks must run under FSDP2"
    # The per-rank losses average to the global-batch loss.
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # Same gradients for every parameter, the replicated logit scale included.
    assert set(got["grads"]) == set(expected["grads"])
    assert "loss.logit_scale" in got["grads"]
    for name, g in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Two full optimizer steps (clipping, AdamW, schedule) give the same losses and parameters.
    assert got["steps"] == pytest.approx(expected["steps"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(expected["grad_norms"], rel=1e-4)
    for name, p in expected["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
