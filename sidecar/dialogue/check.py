"""`npc check`: validate every character folder (YAML, and adapters against the base model)."""

from __future__ import annotations

from pathlib import Path

from sidecar.dialogue.characters import CHARACTER_FILE, character_folders, load_character
from sidecar.errors import UserError


def check_characters(root: Path, model: Path | None = None, max_rank: int = 64) -> tuple[list[str], int]:
    """(problems, characters checked). With `model`, adapters are loaded and checked against its shapes.

    The folders checked are the ones the server would load (characters.character_folders).
    """
    if not root.is_dir():
        raise UserError(f"characters folder {root} not found")
    config = None
    if model is not None:
        from sidecar.model.checkpoint import load_checkpoint

        config = load_checkpoint(model).config
    try:
        folders = character_folders(root)
    except OSError as e:
        raise UserError(f"characters folder {root} cannot be listed ({e.strerror or e})") from None
    problems, count = [], 0
    for folder in folders.values():
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
