"""TalkRequest -> checked plain values. Every problem is an InvalidArgument whose message starts
with the field's path (proto npc.v1 documents the limits; config.RequestLimits sets them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.config import RequestLimits
from sidecar.dialogue.characters import ID_PATTERN, Generation
from sidecar.dialogue.sessions import check_session_id as check_stored_session_id
from sidecar.engine.sampler import SamplingParams
from sidecar.errors import UserError
from sidecar.pb.npc.v1 import dialogue_pb2 as pb


class InvalidArgument(UserError):
    """A request field out of its documented range (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class TalkInput:
    character_id: str
    session_id: str  # "" = a one-off line
    player_line: str
    world: dict[str, str]
    player_name: str
    max_tokens: int  # 0 = the character's default
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None
    stop: tuple[str, ...]


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
    if len(req.world) > limits.max_world_entries:
        raise InvalidArgument(f"world: {len(req.world)} entries; the limit is {limits.max_world_entries}")
    for key, value in req.world.items():
        if not key.strip():
            raise InvalidArgument("world: keys must not be empty")
        _max_len(f"world[{_show(key[:32])}] key", key, limits.max_world_key_chars)
        _max_len(f"world[{_show(key[:32])}]", value, limits.max_world_value_chars)

    o = req.options
    if not 0 <= o.max_tokens <= limits.max_tokens:
        raise InvalidArgument(f"options.max_tokens: must be 0 (character default) to {limits.max_tokens}, "
                              f"got {o.max_tokens}")
    temperature = _optional_float(o, "temperature", 0.0, 2.0, low_open=False)
    top_p = _optional_float(o, "top_p", 0.0, 1.0, low_open=True)
    penalty = _optional_float(o, "repetition_penalty", 0.0, 2.0, low_open=True)
    top_k = o.top_k if o.HasField("top_k") else None
    if top_k is not None and top_k < 0:
        raise InvalidArgument(f"options.top_k: must be >= 0 (0 = no limit), got {top_k}")
    if len(o.stop) > limits.max_stop_strings:
        raise InvalidArgument(f"options.stop: {len(o.stop)} strings; the limit is {limits.max_stop_strings}")
    for i, stop in enumerate(o.stop):
        if not stop:
            raise InvalidArgument(f"options.stop[{i}]: must not be empty")
        _max_len(f"options.stop[{i}]", stop, limits.max_stop_chars)
    return TalkInput(req.character_id, req.session_id, line, dict(req.world), req.player_name, o.max_tokens,
                     temperature, top_p, top_k, penalty, o.seed if o.HasField("seed") else None, tuple(o.stop))


def sampling_params(talk: TalkInput, defaults: Generation, limits: RequestLimits) -> SamplingParams:
    """The request's options over the character's `generation` section (its max_tokens_limit caps the reply)."""
    cap = min(limits.max_tokens, defaults.max_tokens_limit or limits.max_tokens)
    return SamplingParams(
        max_tokens=min(talk.max_tokens or defaults.max_tokens, cap),
        temperature=defaults.temperature if talk.temperature is None else talk.temperature,
        top_p=defaults.top_p if talk.top_p is None else talk.top_p,
        top_k=talk.top_k or 0,
        repetition_penalty=1.0 if talk.repetition_penalty is None else talk.repetition_penalty,
        stop=talk.stop,
        seed=talk.seed,
    )


def _optional_float(options: pb.GenerationOptions, name: str, low: float, high: float, low_open: bool) -> float | None:
    if not options.HasField(name):
        return None
    value = getattr(options, name)
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise InvalidArgument(f"options.{name}: must be {bound} and at most {high:g}, got {value}")
    return float(value)


def _max_len(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{field}: {len(value)} characters; the limit is {limit}")


def _show(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")
