"""The layout rules ARCHITECTURE.md states, checked on the source: dependency direction
(finetune → pretrain → data_shards; the engine imports no stage and no data code; the models no engine), no
import cycle between the project's modules, and no function longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_shards", "pretrain", "finetune")
# the bottom layer every package may import: where bytes live (local paths and URLs); it imports no project module
BOTTOM = ("data_shards.storage",)


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Modules (and names) `path` imports absolutely; relative imports stay inside the package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import mod` names pkg.mod
    return out


@pytest.mark.parametrize(
    ("where", "forbidden"),
    [
        ("data_shards", ("pretrain", "finetune")),
        ("pretrain", ("finetune",)),
        (
            "pretrain/engine",
            ("data_shards", "pretrain.models", "pretrain.task", "pretrain.config", "pretrain.data"),
        ),
        (
            "pretrain/models",
            ("data_shards", "mlflow", "deepspeed", "pretrain.engine", "pretrain.task", "pretrain.config"),
        ),
    ],
)
def test_dependency_direction(where: str, forbidden: tuple[str, ...]) -> None:
    bad = [
        f"{p.relative_to(REPO)} imports {m}"
        for p in sorted((REPO / where).rglob("*.py"))
        for m in _imports(p)
        if any(m == f or m.startswith(f + ".") for f in forbidden)
        and not any(m == b or m.startswith(b + ".") for b in BOTTOM)
    ]
    assert not bad, "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports, anywhere in the file (lazy and TYPE_CHECKING imports
    included: a cycle hidden in a function is still a cycle); a package's own `__init__` is not an edge."""
    mods = {}
    for package in PACKAGES:
        for path in _modules(package):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        here = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        here.split(".")[: len(here.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            for name in names:
                while name not in mods and "." in name:
                    name = name.rpartition(".")[0]
                if name in mods and name != m and not m.startswith(name + "."):
                    graph[m].add(name)
    return graph


def test_the_bottom_layer_imports_no_project_module() -> None:
    for module in BOTTOM:
        path = REPO / (module.replace(".", "/") + ".py")
        assert not {m for m in _imports(path) if m.split(".")[0] in PACKAGES}, f"{module} imports the project"


def test_no_import_cycles() -> None:
    graph = _module_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return False

    cycles = sorted({" ↔ ".join(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(cycles)


# finetune/ by job, lowest first: a module imports finetune modules of its own layer or below, never above
# (ARCHITECTURE.md, "finetune/ by job"). A new module must be placed here.
FINETUNE_LAYERS: dict[str, tuple[str, ...]] = {
    "definitions": (
        "config", "heads", "temporal", "peft_methods", "augment", "registry",
        "continual.config", "continual.strategies", "continual.memory", "continual.metrics", "continual.regularize",
    ),
    "artifacts": ("init", "model_dir", "export", "onnx_export"),
    "inference": ("predict", "evaluate", "reports", "embed"),
    "lifecycle": ("mlflow_model", "pyfunc_entry", "capture", "serve"),
    "training": ("task", "continual.task", "continual.run"),
    "tune": ("tune.space", "tune.trial", "tune.report", "tune.study"),
    "update": (
        "update.config", "update.catalog", "update.gate", "update.lock", "update.promote", "update.train",
        "update.round",
    ),
    "cli": ("cli", "__main__"),
}  # fmt: skip


def test_finetune_layers() -> None:
    level = {f"finetune.{m}": i for i, mods in enumerate(FINETUNE_LAYERS.values()) for m in mods}
    names = list(FINETUNE_LAYERS)
    graph = {m: deps for m, deps in _module_graph().items() if m.startswith("finetune.")}
    unplaced = sorted(set(graph) - set(level) - {"finetune.continual", "finetune.update", "finetune.tune"})
    assert not unplaced, f"finetune modules without a layer in FINETUNE_LAYERS: {unplaced}"
    upward = [
        f"{m} ({names[level[m]]}) imports {d} ({names[level[d]]})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if d in level and m in level and level[d] > level[m]
    ]
    assert not upward, "\n".join(upward)


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for package in PACKAGES:
        for path in _modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > 80:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


@pytest.mark.parametrize(
    "script",
    sorted(
        str(p.relative_to(REPO))
        for pattern in ("launch/*.sh", "launch/*.sbatch", "tests/*.sh", "tests/gpu/*.sh")
        for p in REPO.glob(pattern)
    ),
)
def test_shell_scripts_parse_and_are_executable(script: str) -> None:
    """`bash -n` on the shell scripts users run (the SLURM script and the GPU check run nowhere here)."""
    import os
    import subprocess

    r = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(REPO / script, os.X_OK), f"chmod +x {script}"
