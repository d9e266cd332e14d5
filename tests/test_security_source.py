"""Security defaults that live in the source: no code path can unpickle, run YAML tags, or shell out.

A static scan, so a later change that adds `torch.load` or `yaml.load(..., Loader=yaml.Loader)`
fails here before it reaches a player's PC.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from sidecar.config import ServerConfig
from sidecar.dialogue import yaml_file

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"
FORBIDDEN_CALLS = {  # dotted call -> why
    "torch.load": "unpickles",
    "pickle.load": "unpickles",
    "pickle.loads": "unpickles",
    "yaml.unsafe_load": "runs YAML tags",
    "yaml.full_load": "builds arbitrary objects",
    "eval": "runs text as code",
    "exec": "runs text as code",
    "os.system": "runs a shell",
}


def _sources() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "pb" not in p.relative_to(PACKAGE).parts]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_unsafe_calls():
    problems = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                problems.append(f"{path.name}:{node.lineno}: {name} ({FORBIDDEN_CALLS[name]})")
            keywords = {k.arg: k.value for k in node.keywords}
            for flag in ("shell", "trust_remote_code"):
                value = keywords.get(flag)
                if isinstance(value, ast.Constant) and value.value is True:
                    problems.append(f"{path.name}:{node.lineno}: {flag}=True")
            if name == "yaml.load" and _dotted(keywords.get("Loader", ast.Constant(None))) != "_Loader":
                problems.append(f"{path.name}:{node.lineno}: yaml.load without the safe _Loader")
    assert not problems, problems
    assert len(_sources()) > 40  # the scan did see the package


def test_the_yaml_loader_is_safe():
    assert issubclass(yaml_file._Loader, yaml.SafeLoader) or issubclass(yaml_file._Loader, yaml.CSafeLoader)


def test_loopback_by_default():
    assert ServerConfig().listen.startswith("127.0.0.1:") and ServerConfig().auth_token is None
