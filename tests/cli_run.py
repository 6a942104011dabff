"""Run the real ``egma-fast`` console script in a subprocess (the user's view: exit status, what
is printed), and the tiny training config those runs share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def egma_fast_command() -> list[str]:
    """The installed console script next to this interpreter, else the same entry point via -m."""
    script = Path(sys.executable).parent / "egma-fast"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "egma_fast.cli"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **popen: Any) -> subprocess.CompletedProcess:
    """``egma-fast *args`` with this checkout first on the path; text output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(egma_fast_command() + [str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not log records or progress bars."""
    return [ln for ln in stderr.splitlines() if ln.strip() and " WARNING " not in ln and "\r" not in ln]


def tiny_config(path: Path, run_dir: Path, data: dict[str, Any], **sections: dict[str, Any]) -> Path:
    """Write a JSON training config of a 2-step tiny run (sections update the defaults)."""
    config = {
        "run_dir": str(run_dir),
        "data": {"batch_size": 4, "eval_batch_size": 5, "max_tokens": 16, "shuffle_buffer": 8, **data},
        "model": {"image_model": "tiny-swin", "image_size": 64, "embed_dim": 16, "tiny_width": 16},
        "optim": {"max_steps": 2, "warmup_steps": 1},
        "checkpoint": {"every": 1, "keep_last": 2},
        "eval": {"at_end": False},
        "log": {"every": 1, "progress_bar": False, "tensorboard": False},
        "dist": {"device": "cpu", "num_threads": 1},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path.write_text(json.dumps(config))
    return path
