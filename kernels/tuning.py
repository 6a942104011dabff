"""Launch-config selection whose cost does not grow with the batch.

``triton.autotune`` times every candidate config on the real arguments of the first call with a new
key. For the late-interaction kernels that call does O(B^2) work, so tuning at B = 16384 ran each of
six configs for seconds, several times over (minutes before the first step). :class:`Tuner` times the
candidates once per key on a *bounded proxy* of the call instead (the launcher slices its inputs to at
most a few hundred images / a thousand texts, enough to fill the GPU), keeps the winner per key for
the life of the process, and launches the real problem with it. Keys hold what changes the best
config (device, n, M, d, dtype, constexpr modes), never the batch sizes.

Configs that fail to compile for the device (too much shared memory, too many registers) are
skipped; a key with no compilable config raises with the reasons.
"""
from __future__ import annotations

from typing import Callable, Hashable

import triton

__all__ = ["Tuner", "launch_options"]

#: Batch sizes of the proxy problems the launchers tune on (images, texts).
PROXY_IMAGES = 256
PROXY_TEXTS = 1024


def launch_options(config: triton.Config) -> dict:
    """The keyword arguments a kernel launch takes from a config: its constexprs and launch options."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


class Tuner:
    """Picks one config per key among ``configs`` by timing them with ``bench(config)``.

    ``bench`` must launch the kernel once on a bounded proxy problem with the given config; it runs
    a few times under ``timer`` (default ``triton.testing.do_bench``: the median of CUDA-event
    timings).
    """

    def __init__(self, name: str, configs: list[triton.Config], warmup_ms: int = 5, rep_ms: int = 20,
                 timer: Callable[[Callable[[], None]], float] | None = None) -> None:
        self.name = name
        self.configs = list(configs)
        self.timer = timer or (lambda fn: triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        self.chosen: dict[Hashable, triton.Config] = {}
        self.timings: dict[Hashable, list[tuple[str, float]]] = {}

    def pick(self, key: Hashable, bench: Callable[[triton.Config], None]) -> triton.Config:
        if key in self.chosen:
            return self.chosen[key]
        if len(self.configs) == 1:
            self.chosen[key] = self.configs[0]
            return self.configs[0]
        results: list[tuple[float, int]] = []
        timings: list[tuple[str, float]] = []
        failures: list[str] = []
        for index, config in enumerate(self.configs):
            try:
                ms = self.timer(lambda: bench(config))
            except Exception as exc:  # OutOfResources and compile errors: this config cannot run here
                failures.append(f"{config}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            results.append((ms, index))
            timings.append((str(config), ms))
        if not results:
            raise RuntimeError(f"{self.name}: no launch config compiles for {key}:\n  " + "\n  ".join(failures))
        best = self.configs[min(results)[1]]
        self.chosen[key] = best
        self.timings[key] = timings
        return best
