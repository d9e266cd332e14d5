"""`npc check`: validate every character folder (YAML, and adapters against the base model)."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.dialogue.characters import CHARACTER_FILE, load_character
from sidecar.errors import UserError


def check_characters(root: Path, model: Path | None = None, max_rank: int = 64) -> tuple[list[str], int]:
    """(problems, characters checked). With `model`, adapters are loaded and checked against its shapes.

    The folders checked are the ones the server would load: not hidden, holding a character.yaml
    (here also one that is a broken link or not a regular file, so that it gets reported).
    """
    if not root.is_dir():
        raise UserError(f"characters folder {root} not found")
    config = None
    if model is not None:
        from sidecar.model.checkpoint import load_checkpoint

        config = load_checkpoint(model).config
    problems, count = [], 0
    for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".") and os.path.isdir(p)):
        if not os.path.lexists(folder / CHARACTER_FILE):
            continue
        count += 1
        try:
            character = load_character(folder)
            if config is not None and character.adapter_path is not None:
                from sidecar.model.lora import load_peft_adapter

                load_peft_adapter(character.adapter_path, config, max_rank, character.id, character.lora_scale)
        except UserError as e:
            problems.append(str(e))
        except Exception as e:  # a bug must not hide the other characters' problems behind a traceback
            problems.append(f"{folder / CHARACTER_FILE}: cannot be checked ({type(e).__name__}: {e})")
    return problems, count
