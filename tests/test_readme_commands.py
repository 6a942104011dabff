"""The README's commands and the shipped configs agree; what they need is declared; what they
create is ignored by git."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _commands(tool: str) -> list[list[str]]:
    """Every `tool ...` command line in the README's code blocks (comments stripped)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", README, re.S)
    out = []
    for block in blocks:
        for line in block.splitlines():
            words = shlex.split(line.split("#", 1)[0])
            if words[:1] == [tool]:
                out.append(words)
    return out


def _option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_readme_prepare_example_matches_the_demo_config():
    config = yaml.safe_load((REPO / "configs" / "demo_cpu.yaml").read_text())
    train = Path(config["data"]["train"])
    prepares = [w for w in _commands("egma-fast") if w[1] == "prepare" and _option(w, "--out") == str(train.parent)]
    assert prepares, f"no README prepare command writes {train.parent}"
    for words in prepares:
        assert int(_option(words, "--image-size") or 224) == config["model"]["image_size"], words
    # the config's own header says the same command
    header = [ln for ln in (REPO / "configs" / "demo_cpu.yaml").read_text().splitlines() if "egma-fast prepare" in ln]
    assert any(f"--image-size {config['model']['image_size']}" in ln for ln in header), header


def _imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared_and_every_declared_one_used():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {_norm(re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0]) for r in requirements}
    dists = md.packages_distributions()
    ours = {"egma_fast", "kernels", "cli_run", "op_cases", "naive", "conftest"}
    # installed with (and pinned by) a declared package: dist -> the declared one
    transitive = {"huggingface-hub": "transformers", "tokenizers": "transformers"}
    # declared, used without an import statement of its own
    indirect = {"tensorboard": "torch.utils.tensorboard's SummaryWriter", "pytest": "the test runner",
                "pytest-benchmark": "the benchmark fixture"}
    package = _imports(REPO / "egma_fast") | _imports(REPO / "kernels")
    used = package | _imports(REPO / "tests") | _imports(REPO / "benchmarks")
    for name in sorted(package - set(sys.stdlib_module_names) - ours):
        for dist in map(_norm, dists.get(name, [name])):
            assert dist in declared or transitive.get(dist) in declared or dist == "torch", \
                f"egma_fast imports {name} ({dist}) but pyproject.toml does not declare it"
    imported_dists = {_norm(d) for name in used for d in dists.get(name, [name])}
    for dist in sorted(declared - set(indirect)):
        assert dist in imported_dists, f"pyproject.toml declares {dist}, which nothing imports"


def test_what_the_readme_commands_create_is_ignored_by_git():
    outputs = set()
    for words in _commands("egma-fast"):
        for option in ("--out",):
            if _option(words, option):
                outputs.add(_option(words, option))
    for config in (REPO / "configs").glob("*.yaml"):
        outputs.add(yaml.safe_load(config.read_text())["run_dir"])
    outputs |= set(re.findall(r'"(shards/[^"]+)"', README))  # the Python example's folders
    assert {"runs/demo", "data/synth", "runs/demo_cpu"} <= outputs, outputs
    for out in sorted(outputs):
        probe = f"{out}/x.json" if not out.endswith(".json") else out
        ok = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO).returncode == 0
        assert ok, f"{out} (made by a README command) is not ignored by .gitignore"
