"""DemoSettings: the knobs of ``egma-fast demo`` (apart from the demo itself, so that the CLI
can state their defaults in --help without importing the trainer)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["DemoSettings"]


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo; the defaults finish in a few minutes on a 2-core CPU."""

    #: Synthetic training / evaluation cases.
    train_samples: int = 6000
    eval_samples: int = 500
    #: Image side (px) and the towers: tiny random Swin + tiny random BERT by default.
    image_size: int = 64
    text_model: str = "tiny-bert"
    embed_dim: int = 64
    tiny_width: int = 64
    tiny_layers: int = 2
    #: Optimisation of each run.
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    #: Global CLIP term weight (trains z^I / z^T, which zero-shot classification uses).
    lambda_clip: float = 1.0
    seed: int = 0
    #: Also train the no-gaze baseline.
    baseline: bool = True
    #: Attention-map pictures to draw.
    attention_maps: int = 4
    samples_per_shard: int = 500
    #: Data-loading worker processes (the training process itself computes on one thread).
    num_workers: int = 1

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A smaller setting for the test suite (same code path, fewer cases and steps)."""
        return cls(train_samples=2400, eval_samples=200, steps=400, attention_maps=2, samples_per_shard=300)

    def replace(self, **changes: Any) -> "DemoSettings":
        return dataclasses.replace(self, **changes)
