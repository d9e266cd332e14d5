"""TalkRequest -> checked plain values. Every problem is an InvalidArgument whose message starts
with the field's path (proto npc.v1 documents the limits; config.RequestLimits sets them).

The range, stop-string and reply-length rules are also the OpenAI endpoint's (server/openai_http.py):
both edges call the same checks, each passing its own name for the field."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sidecar.config import RequestLimits
from sidecar.dialogue.characters import ID_PATTERN
from sidecar.dialogue.scene import SceneInput
from sidecar.dialogue.sessions import check_session_id as check_stored_session_id
from sidecar.dialogue.turn import TalkInput
from sidecar.errors import UserError
from sidecar.pb.npc.v1 import dialogue_pb2 as pb

# Sampling options both edges take: name -> (low, high, low excluded). Temperature 0 is greedy.
SAMPLING_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, False), "top_p": (0.0, 1.0, True), "repetition_penalty": (0.0, 2.0, True),
    "min_p": (0.0, 1.0, False)}


class InvalidArgument(UserError):
    """A request field out of its documented range (gRPC INVALID_ARGUMENT, HTTP 400). `param` is the
    field as the edge names it (an OpenAI error's "param"); None where the message alone says it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_character_id(value: str, field: str = "character_id", required: bool = True) -> None:
    if not value and not required:
        return
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(f"{field}: must be 1-64 characters from [a-z0-9_-], got {_show(value)}")


def check_session_id(value: str, required: bool = True) -> None:
    """The session store's own check; empty is allowed where the id is optional (a one-off Talk)."""
    if value or required:
        check_stored_session_id(value)


def parse_talk(req: pb.TalkRequest, limits: RequestLimits) -> TalkInput:
    check_character_id(req.character_id)
    check_session_id(req.session_id, required=False)
    line = req.player_line
    if not line.strip():
        raise InvalidArgument("player_line: required (not empty, not only whitespace)")
    _max_len("player_line", line, limits.max_line_chars)
    _max_len("player_name", req.player_name, limits.max_name_chars)
    _check_world(req.world, limits)
    # Entity lists and allowed action names are checked by the turn (dialogue/actions.py), which knows
    # the character and the model's control tokens (sizes first, before any value is looked at).
    allowed = tuple(req.allowed_actions.names) if req.HasField("allowed_actions") else None
    return TalkInput(req.character_id, req.session_id, line, dict(req.world), req.player_name,
                     **_generation(req.options, limits), entities=_entities(req.entities), allowed_actions=allowed)


def parse_scene(req: pb.SceneRequest, limits: RequestLimits) -> SceneInput:
    """Sizes and formats; the cast, the line budget and the actions are checked by dialogue/scene.py."""
    if len(req.character_ids) > limits.max_scene_characters:
        raise InvalidArgument(f"character_ids: {len(req.character_ids)} ids; the limit is "
                              f"{limits.max_scene_characters}")
    for i, cid in enumerate(req.character_ids):
        check_character_id(cid, f"character_ids[{i}]")
    check_session_id(req.session_id, required=False)
    _max_len("situation", req.situation, limits.max_line_chars)
    _check_world(req.world, limits)
    return SceneInput(tuple(req.character_ids), req.situation, req.session_id, dict(req.world), req.max_lines,
                      _entities(req.entities), tuple(req.allowed_actions.names), **_generation(req.options, limits))


def _entities(entities) -> dict[str, tuple[str, ...]]:
    """The game's lists (map<string, Values>) as the dialogue layer takes them."""
    return {name: tuple(values.values) for name, values in entities.items()}


def _check_world(world: dict[str, str], limits: RequestLimits) -> None:
    if len(world) > limits.max_world_entries:
        raise InvalidArgument(f"world: {len(world)} entries; the limit is {limits.max_world_entries}")
    for key, value in world.items():
        if not key.strip():
            raise InvalidArgument("world: keys must not be empty")
        _max_len(f"world[{_show(key[:32])}] key", key, limits.max_world_key_chars)
        _max_len(f"world[{_show(key[:32])}]", value, limits.max_world_value_chars)


def _generation(o: pb.GenerationOptions, limits: RequestLimits) -> dict:
    """GenerationOptions as TalkInput's (and SceneInput's) fields."""
    check_whole_number("options.max_tokens", o.max_tokens, 0, limits.max_tokens, " (the character's default)")
    top_k = check_whole_number("options.top_k", o.top_k, 0, 2**31 - 1, " (no limit)") if o.HasField("top_k") else None
    return {"max_tokens": o.max_tokens, "temperature": _sampling_option(o, "temperature"),
            "top_p": _sampling_option(o, "top_p"), "top_k": top_k,
            "repetition_penalty": _sampling_option(o, "repetition_penalty"), "min_p": _sampling_option(o, "min_p"),
            "seed": o.seed if o.HasField("seed") else None, "stop": check_stops("options.stop", list(o.stop), limits)}


def check_sampling_number(field: str, name: str, value: object) -> float:
    """`value` within SAMPLING_RANGES[name]; the message starts with `field`, the edge's own name for it."""
    low, high, low_open = SAMPLING_RANGES[name]
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise InvalidArgument(f"{field}: must be {bound} and at most {high:g}, got {value!r}", field)
    return float(value)


def check_whole_number(field: str, value: object, low: int, high: int, low_means: str = "") -> int:
    """An int (not a bool: JSON true is no count) from low to high; `low_means` explains the low end."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{field}: must be a whole number from {low}{low_means} to {high}, got {value!r}",
                              field)
    return value


def check_stops(field: str, stops: Sequence[object], limits: RequestLimits) -> tuple[str, ...]:
    """At most max_stop_strings stop strings, each a non-empty string of at most max_stop_chars."""
    if len(stops) > limits.max_stop_strings:
        raise InvalidArgument(f"{field}: {len(stops)} strings; the limit is {limits.max_stop_strings}", field)
    checked: list[str] = []
    for i, stop in enumerate(stops):
        if not isinstance(stop, str):
            raise InvalidArgument(f"{field}[{i}]: must be a string, got {type(stop).__name__}", field)
        if not stop:
            raise InvalidArgument(f"{field}[{i}]: must not be empty", field)
        _max_len(f"{field}[{i}]", stop, limits.max_stop_chars, param=field)
        checked.append(stop)
    return tuple(checked)


def _sampling_option(options: pb.GenerationOptions, name: str) -> float | None:
    """A checked GenerationOptions number, or None when unset (the character's default applies)."""
    return check_sampling_number(f"options.{name}", name, getattr(options, name)) if options.HasField(name) else None


def _max_len(field: str, value: str, limit: int, param: str | None = None) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{field}: {len(value)} characters; the limit is {limit}", param)


def _show(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")
