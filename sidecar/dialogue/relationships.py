"""Relationships: named values per (session, character) that the game reads and sets, actions change, and
the prompt carries as a tier's line of text.

    # character.yaml
    relationships:
      trust:
        min: -100
        max: 100
        start: 0
        tiers:                       # each from its `from` up to the next one's
          - {from: -100, name: hostile, text: You distrust the player and keep your hammer close.}
          - {from: -30, name: wary, text: You are wary of the player.}
          - {from: 30, name: friendly, text: You like the player and give fair prices.}
    actions:
      - name: accept_gift
        effects: {trust: "+10"}        # an effect named after a relationship changes it (clamped to the range)

The values live in the session store (sessions.py), so they are exported, imported and journaled with the
turns; a session that never set one has the start value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_RELATIONSHIPS = 8
MAX_TIERS = 8
MAX_TIER_TEXT = 200
VALUE_LIMIT = 1_000_000  # |min|, |max|: room for any game's scale, and small enough for every client's int
EFFECT_PATTERN = re.compile(r"[+-][0-9]{1,7}")


@dataclass(frozen=True)
class Tier:
    start: int  # the value from which this tier holds (`from` in the file)
    name: str
    text: str


@dataclass(frozen=True)
class RelationshipSpec:
    name: str
    min: int
    max: int
    start: int
    tiers: tuple[Tier, ...]

    def tier(self, value: int) -> Tier:
        """The tier `value` falls in (the last whose start it reaches)."""
        current = self.tiers[0]
        for tier in self.tiers:
            if value >= tier.start:
                current = tier
        return current

    def clamp(self, value: int) -> int:
        return max(self.min, min(self.max, value))


@dataclass(frozen=True)
class RelationshipValue:
    """One relationship as a turn or the game sees it."""

    name: str
    value: int
    spec: RelationshipSpec

    @property
    def tier(self) -> Tier:
        return self.spec.tier(self.value)


def current_values(specs: Iterable[RelationshipSpec], stored: Mapping[str, int]) -> tuple[RelationshipValue, ...]:
    """Every declared relationship with its value: the stored one (clamped, in case the range changed since),
    else the start."""
    return tuple(RelationshipValue(s.name, s.clamp(stored[s.name]) if s.name in stored else s.start, s)
                 for s in specs)


def effect_changes(specs: Iterable[RelationshipSpec], effects: Iterable[tuple[str, str]]) -> dict[str, int]:
    """The relationship changes of one action's effects: {"trust": +10}; effects on other names are the game's."""
    names = {s.name for s in specs}
    return {key: int(value) for key, value in effects if key in names and EFFECT_PATTERN.fullmatch(value)}


def prompt_lines(values: Iterable[RelationshipValue]) -> list[str]:
    return [f"{v.name}: {v.tier.name} ({v.value}). {v.tier.text}" for v in values]
