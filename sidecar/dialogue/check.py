"""`npc check`: validate every character folder (YAML, and adapters against the base model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sidecar.dialogue.characters import CHARACTER_FILE, Character, character_folders, load_character
from sidecar.errors import UserError


def check_characters(root: Path, load_adapter: Callable[[Character], object] | None = None) -> tuple[list[str], int]:
    """(problems, characters checked). With `load_adapter` (the engine's, as the server validates),
    adapters are read and checked against the base model.

    The folders checked are the ones the server would load (characters.character_folders).
    """
    if not root.is_dir():
        raise UserError(f"characters folder {root} not found")
    try:
        folders = character_folders(root)
    except OSError as e:
        raise UserError(f"characters folder {root} cannot be listed ({e.strerror or e})") from None
    problems, count = [], 0
    for folder in folders.values():
        count += 1
        try:
            character = load_character(folder)
            if load_adapter is not None and character.adapter_path is not None:
                load_adapter(character)
        except UserError as e:
            problems.append(str(e))
        except Exception as e:  # a bug must not hide the other characters' problems behind a traceback
            problems.append(f"{folder / CHARACTER_FILE}: cannot be checked ({type(e).__name__}: {e})")
    return problems, count
