"""The layering docs/architecture.md describes, checked on the source: what each layer may import, and
which modules load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"

# Layer -> the sidecar modules its files may import (a prefix allows what is under it).
ALLOWED = {
    "model": ("sidecar.model", "sidecar.errors"),
    "engine": ("sidecar.engine", "sidecar.model", "sidecar.config", "sidecar.errors"),
    "backends": ("sidecar.backends", "sidecar.engine", "sidecar.model", "sidecar.config", "sidecar.errors"),
    "dialogue": ("sidecar.dialogue", "sidecar.engine.api", "sidecar.engine.tokenizer", "sidecar.model.adapter_files",
                 "sidecar.config", "sidecar.errors"),
    "server": ("sidecar.server", "sidecar.dialogue", "sidecar.engine.api", "sidecar.engine.tokenizer",
               "sidecar.backends", "sidecar.config", "sidecar.errors", "sidecar.pb"),
}
# Only the composition root chooses a backend.
BACKEND_USERS = {"sidecar/server/app.py"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n == "sidecar" or n.startswith("sidecar.")]


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_it_may(layer):
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        for name in _imports(path):
            if not _allowed(name, ALLOWED[layer]):
                wrong.append(f"{relative} imports {name}")
            elif layer == "server" and name.startswith("sidecar.backends") and relative not in BACKEND_USERS:
                wrong.append(f"{relative} imports {name} (only app.py picks a backend)")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_never_imports_the_benchmarks():
    """`npc bench` is reached through the CLI only: what runs on a player's PC never loads it (nor matplotlib)."""
    runtime = [p for layer in ALLOWED for p in (PACKAGE / layer).rglob("*.py")]
    wrong = [f"{p.relative_to(PACKAGE.parent)} imports {n}" for p in runtime for n in _imports(p)
             if n.startswith("sidecar.bench")]
    assert not wrong, wrong


@pytest.mark.parametrize("module", ["sidecar.engine.api", "sidecar.engine.output", "sidecar.backends.remote",
                                    "sidecar.dialogue.turn"])
def test_modules_that_load_without_torch(module):
    """The engine's interface and the remote backend need no torch: a sidecar in front of a model server
    elsewhere does not load it to import them."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
