"""The structured reply: what the model writes in one turn, the grammar that holds it to that, and the
parser that turns the stream back into an emotion, text and actions.

    [gruff] Forty gold, lad, and it's yours.
    @sell_item {"item": "iron sword", "price": 40}

The emotion (one of the character's labels, in brackets) comes first, so a game can animate the line
before it is spoken; then the spoken text on one line; then up to MAX_ACTIONS_PER_REPLY action lines,
each `@name` and its arguments as JSON. Adapters are trained on exactly this (training/data.py renders
it with `render_reply`), and the engine decodes under `ReplyFormat.grammar()`, built per turn from the
character's schema and the request's entities: an argument can only take a value the game listed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sidecar.dialogue.actions import MAX_ACTIONS_PER_REPLY, Action, ActionSpec, Entities, check_action
from sidecar.engine.api import SamplingParams

if TYPE_CHECKING:
    from sidecar.engine.tokenizer import Detokenizer


def render_reply(text: str, emotion: str = "", actions: Sequence[Action] = ()) -> str:
    """A reply as the model writes it (the text's line breaks become spaces: the text is one line)."""
    head = f"[{emotion}] " if emotion else ""
    return head + " ".join(text.split("\n")) + "".join(f"\n@{a.name} {a.arguments_json}" for a in actions)


@dataclass(frozen=True)
class ReplyFormat:
    """What one turn's reply may hold: the character's emotions and the actions it can take now."""

    emotions: tuple[str, ...] = ()
    actions: tuple[ActionSpec, ...] = ()  # allowed and available in this turn
    entities: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    text_max_tokens: int | None = None  # the spoken text's budget: the grammar ends the text there

    @property
    def structured(self) -> bool:
        return bool(self.emotions or self.actions)

    def grammar(self) -> str | None:
        """The Lark grammar (llguidance's dialect) of this turn's reply; None for free text."""
        if not self.structured:
            return None
        lines = ['start: ' + ("emotion " if self.emotions else "") + "text" + (" actions" if self.actions else "")]
        if self.emotions:
            labels = " | ".join(_literal(label) for label in self.emotions)
            lines.append(f'emotion: "[" ({labels}) "] "')
        budget = f"[max_tokens={self.text_max_tokens}]" if self.text_max_tokens else ""
        lines.append(f"text{budget}: TEXT")
        lines.append(r"TEXT: /[^\n]+/")
        if self.actions:
            lines.append(f'actions: ("\\n@" action){{0,{MAX_ACTIONS_PER_REPLY}}}')
            names = (f"{_literal(spec.name + ' ')} args{i}" for i, spec in enumerate(self.actions))
            lines.append("action: " + " | ".join(names))
            for i, spec in enumerate(self.actions):
                schema = {**spec.schema(self.entities),
                          "x-guidance": _JSON_FORM}
                lines.append(f"args{i}: %json{json.dumps(schema, ensure_ascii=False)}")
        return "\n".join(lines) + "\n"

    def parser(self) -> ReplyParser:
        return ReplyParser(self)

    def parse(self, raw: str, finish_reason: str = "stop") -> ReplyParser:
        """A whole decoded reply at once (a reply that ended with `finish_reason`), its token count unknown."""
        parser = ReplyParser(self)
        parser.push(raw)
        parser.finish(finish_reason)
        return parser

    def parse_tokens(self, detokenizer: Detokenizer, ids: Sequence[int], finish_reason: str = "stop") -> ReplyParser:
        """A whole decoded reply from its token ids, token by token as it streamed (so a text cut at its
        budget is known as cut)."""
        parser = ReplyParser(self)
        for token_id in ids:
            parser.push(detokenizer.push(token_id), tokens=1)
        parser.push(detokenizer.flush())
        parser.finish(finish_reason)
        return parser

    def sampling(self, base: SamplingParams, cap: int) -> SamplingParams:
        """`base` (whose max_tokens is the text's budget) constrained to this format: the grammar, and
        max_tokens raised by the emotion's and the actions' room, within `cap` (the server's limit)."""
        if not self.structured:
            return base
        fmt = replace(self, text_max_tokens=base.max_tokens)
        total = min(base.max_tokens + fmt.overhead_tokens(), max(cap, base.max_tokens))
        return replace(base, grammar=fmt.grammar(), max_tokens=total)

    def overhead_tokens(self) -> int:
        """Most tokens the emotion and the actions can take beside the text: the engine's max_tokens is the
        text's budget plus this, so the structured parts never eat into the line. Counted in UTF-8 bytes,
        a bound for any spelling (under the mask the model may spell a value in more tokens than the
        tokenizer would)."""
        head = max((len(f"[{label}] ".encode()) for label in self.emotions), default=0)
        per_action = max((len(f"\n@{spec.name} {json.dumps(_widest(spec, self.entities))}".encode())
                          + sum(4 * a.max_chars for a in spec.arguments if a.type == "string")
                          for spec in self.actions), default=0)
        return head + MAX_ACTIONS_PER_REPLY * per_action + 1  # + 1: the end of turn


def _widest(spec: ActionSpec, entities: Entities) -> dict:
    """Arguments with the values that take the most tokens (strings are counted apart, by max_chars)."""
    def widest(arg) -> object:
        if arg.type == "enum":
            return max(arg.choices(entities), key=len)
        if arg.type == "integer":
            return max((arg.min, arg.max), key=lambda v: len(str(v)))
        return "" if arg.type == "string" else False
    return {a.name: widest(a) for a in spec.arguments}


def reply_format(emotions: Sequence[str], actions: Sequence[ActionSpec], entities: Entities,
                 allowed: Sequence[str] | None) -> ReplyFormat:
    """A turn's format: the character's actions the request allows (None: all) whose enums have values."""
    usable = tuple(a for a in actions if (allowed is None or a.name in allowed) and a.available(entities))
    return ReplyFormat(tuple(emotions), usable, dict(entities))


# Arguments exactly as json.dumps writes them (", " and ": ", no other whitespace, any \\u escape).
_JSON_FORM = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False,
              "json_allow_general_unicode_escapes": True}


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class Emotion:
    label: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Rejected:
    """An action line that did not hold a valid action (a reply cut mid-line; never under the grammar)."""

    line: str
    problem: str


ReplyPart = Emotion | Text | Action | Rejected


class ReplyParser:
    """The reply's raw text stream in, its parts out: the emotion as soon as the label is certain (often
    from its first token), text as it comes, each action when its line is complete."""

    def __init__(self, fmt: ReplyFormat):
        self.fmt = fmt
        self.phase = "emotion" if fmt.emotions else "text"
        self.emotion = ""
        self.text = ""  # the spoken text so far
        self.actions: list[Action] = []
        self.text_tokens = 0  # tokens behind the spoken text (as the caller counts them)
        self._head = ""  # emotion phase: raw text so far
        self._line = ""  # actions phase: the action line being written

    @property
    def text_cut(self) -> bool:
        """The grammar ended the text at its budget: the line was cut, as max_tokens cuts it."""
        budget = self.fmt.text_max_tokens
        return bool(budget) and self.text_tokens >= budget

    def push(self, piece: str, tokens: int = 0) -> list[ReplyPart]:
        """`piece`: the next decoded text; `tokens`: how many tokens it came from (counted while it is text)."""
        parts: list[ReplyPart] = []
        if not self.fmt.structured:  # free text: line breaks and all
            self.text += piece
            return [Text(piece)] if piece else []
        if self.phase == "emotion":
            piece = self._emotion(piece, parts)
        if self.phase == "text" and piece:
            spoken, newline, piece = piece.partition("\n")
            if spoken:
                self.text += spoken
                self.text_tokens += tokens
                parts.append(Text(spoken))
            if newline:
                self.phase = "actions"
        if self.phase == "actions" and piece:
            self._line += piece
            *complete, self._line = self._line.split("\n")
            parts += [self._action(line) for line in complete]
        return parts

    def finish(self, reason: str) -> list[ReplyPart]:
        """The last action line counts only when the model ended the reply itself ("stop" by eos): a
        reply cut by max_tokens never yields half an action."""
        line, self._line = self._line, ""
        if self.phase == "actions" and line:
            return [self._action(line)] if reason == "stop" else [Rejected(line, f"cut off ({reason})")]
        return []

    def _emotion(self, piece: str, parts: list[ReplyPart]) -> str:
        self._head += piece
        heads = {label: f"[{label}] " for label in self.fmt.emotions}
        fits = [label for label, head in heads.items() if head.startswith(self._head) or self._head.startswith(head)]
        if not self.emotion and len(fits) == 1:
            self.emotion = fits[0]
            parts.append(Emotion(self.emotion))
        if self.emotion and self._head.startswith(heads[self.emotion]):
            self.phase = "text"
            return self._head[len(heads[self.emotion]):]
        if not fits:  # not the format (a backend without a grammar): the whole thing is text
            self.phase = "text"
            return self._head
        return ""

    def _action(self, line: str) -> Action | Rejected:
        name, _, raw = line.removeprefix("@").partition(" ")
        if not line.startswith("@"):
            return Rejected(line, "not an action line")
        if self.text_cut:
            # The grammar ended a line still going, so the model had to choose between an action and the
            # end of turn: whatever it chose says nothing about what the player asked for.
            return Rejected(line, "the text was cut at its budget")
        try:
            given = json.loads(raw)
        except json.JSONDecodeError:
            return Rejected(line, "arguments are not JSON")
        spec = next((s for s in self.fmt.actions if s.name == name), None)
        if not isinstance(given, dict) or spec is None:
            return Rejected(line, f"no action {name!r} in this turn" if spec is None else "arguments are not an object")
        order = [a.name for a in spec.arguments]
        action = Action(name, tuple(sorted(given.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                                           else len(order))))
        problem = check_action(self.fmt.actions, action, self.fmt.entities)
        if problem:
            return Rejected(line, problem)
        self.actions.append(action)
        return action
