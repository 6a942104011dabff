"""The house rules of DESIGN.md that code can check: the oracle (egma_fast.reference) is not a
production dependency, so a backend-vs-reference test also checks the production glue."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Modules that may import the oracle: the oracle itself, and the "torch" backend, which is the
# oracle run as a backend and imports it lazily (when it first runs).
ORACLE_USERS = {"egma_fast/reference.py", "egma_fast/ops/torch_backend.py"}


def _imports_reference(tree: ast.AST) -> list[ast.AST]:
    """Import statements of egma_fast.reference (any spelling), at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "egma_fast.reference" for a in node.names):
            found.append(node)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "egma_fast.reference" or (
                node.module == "egma_fast" and any(a.name == "reference" for a in node.names)
            ) or (node.level > 0 and (node.module or "").endswith("reference")):
                found.append(node)
    return found


def test_no_production_module_imports_the_oracle() -> None:
    """AST scan of the package and the kernels: only the oracle's users import it, and the torch
    backend only inside its functions."""
    offenders = set()
    for path in sorted([*ROOT.joinpath("egma_fast").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        found = _imports_reference(tree)
        if not found:
            continue
        if rel in ORACLE_USERS:
            module_level = {id(n) for n in tree.body}
            assert rel == "egma_fast/reference.py" or not any(id(n) in module_level for n in found), \
                f"{rel} must import the oracle lazily, inside the functions that run it"
            continue
        offenders.add(rel)
    assert not offenders, f"production modules import egma_fast.reference: {sorted(offenders)}"


_RUN_LOSS = r"""
import sys, torch
import egma_fast, egma_fast.losses, egma_fast.loss_terms, egma_fast.config, egma_fast.validation
import egma_fast.distributed, egma_fast.ops, egma_fast.ops.arguments
from egma_fast import EGMALoss, ops
names = ops.available_backends()  # imports every backend module, the torch backend included
P = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1).requires_grad_()
S = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)
mask = torch.tensor([[True, True], [True, False], [True, True]])
for backend in [b for b in ("cpp", "triton") if b in names]:
    for preset in ("paper", "official"):
        out = EGMALoss(preset, backend=backend, lambda_egm=1.0)(P, S, mask, gaze_scores=torch.rand(3, 2, 4),
                                                                  has_gaze=torch.tensor([True, False, True]))
        out.total.backward()
        print("ran", backend, preset)
assert "egma_fast.reference" not in sys.modules, "the oracle was imported"
print("oracle not imported")
"""


def test_running_the_loss_never_imports_the_oracle() -> None:
    """In a fresh process: importing every production module (and every backend) and running the
    loss on the fused backends leaves egma_fast.reference unimported."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _RUN_LOSS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oracle not imported" in proc.stdout
    assert "ran " in proc.stdout  # at least one fused backend ran (the C++ extension or Triton)
