"""`npc check`: validate every character folder (YAML, and adapters against the base model) and the lore
folder (characters/lore: each file, and the factions and places characters name against world.yaml)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sidecar.dialogue.characters import CHARACTER_FILE, Character, character_folders, load_character
from sidecar.dialogue.lore import LORE_FOLDER, WORLD_FILE, LoreError, World, read_lore_file, read_world
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
    world, lore_problems = _check_lore(root / LORE_FOLDER)
    for folder in folders.values():
        count += 1
        try:
            character = load_character(folder)
            if world is not None:  # a faction or place world.yaml does not declare is a typo: no lore reaches it
                problems += [f"{character.source}: {kind}: {name!r} is not declared in {LORE_FOLDER}/{WORLD_FILE}"
                             for kind in ("factions", "places") for name in sorted(getattr(character, kind))
                             if name not in getattr(world, kind)]
            if load_adapter is not None and character.adapter_path is not None:
                load_adapter(character)
        except UserError as e:
            problems.append(str(e))
        except Exception as e:  # a bug must not hide the other characters' problems behind a traceback
            problems.append(f"{folder / CHARACTER_FILE}: cannot be checked ({type(e).__name__}: {e})")
    return problems + lore_problems, count


def _check_lore(folder: Path) -> tuple[World | None, list[str]]:
    """(the declared world, or None without a world.yaml; each lore file's problem)."""
    if not folder.is_dir():
        return None, []
    try:
        world = read_world(folder / WORLD_FILE)
    except LoreError as e:
        return None, [str(e)]
    problems = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name in (WORLD_FILE, CHARACTER_FILE) or path.name.startswith("."):
            continue
        try:
            read_lore_file(path, world)
        except LoreError as e:
            problems.append(str(e))
    return (world if (folder / WORLD_FILE).is_file() else None), problems
