"""Test helpers around a real `npc serve` process (sidecar.bench.server_process) and character folders."""

from __future__ import annotations

import shutil
from pathlib import Path

from sidecar.bench.server_process import SidecarProcess

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "SidecarProcess", "copy_characters", "write_character"]


def copy_characters(dest: Path, ids: tuple[str, ...] = ("blacksmith", "oracle")) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        shutil.copytree(REPO / "characters" / cid, dest / cid)
    return dest


def write_character(root: Path, cid: str, persona: str, adapter: str | None = None, **extra: str) -> Path:
    folder = root / cid
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"id: {cid}", f"name: {cid.title()}", f"persona: {persona!r}"]
    if adapter:
        lines.append(f"adapter: {adapter}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    (folder / "character.yaml").write_text("\n".join(lines) + "\n")
    return folder
