"""Character + history + this turn -> chat messages, and the token budget that trims the history.

Layout of the messages, chosen for the engine's prefix cache (KV keyed by adapter + token prefix):

    system     persona, style guidance                 <- the same for every player and turn
               player name, world facts, entities      <- this turn only, always after the constant part
    user/assistant  style examples                     (constant per character too)
    user/assistant  history turns with this character, oldest first
    system     the facts that bear on this line        <- retrieval.py: knowledge + lore in scope,
               earlier exchanges that bear on it          and exchanges older than the window
    user       the player's line, verbatim

The facts sit next to the line they answer: a 135M model uses what is close to the question (and
the sample adapters are trained on that layout, with facts that vary, so that they copy from it
rather than from memory). Placed after the history, they also leave the persona + history prefix
of the previous turn's prompt intact for the prefix cache.

The constant part is stripped and followed by a blank line, so its tokens do not depend on what
follows it (byte-level BPE never merges across "text." + "\\n\\n"). Player text is never escaped:
Tokenizer.encode_chat keeps every message content literal, `<|im_end|>` included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.dialogue.characters import Character
from sidecar.dialogue.relationships import current_values, prompt_lines
from sidecar.dialogue.reply_format import ReplyFormat, render_reply
from sidecar.dialogue.sessions import Turn
from sidecar.engine.tokenizer import ChatMessage, Tokenizer
from sidecar.errors import UserError

STYLE_GUIDANCE = "Stay in character as {name}. Reply in one to three short sentences, in your own voice."


class PromptTooLong(UserError):
    """Even with no history, the prompt does not fit the token budget; the message says what takes the room."""


@dataclass(frozen=True)
class Prompt:
    """What goes to the engine, plus how much of the conversation made it in."""

    messages: tuple[ChatMessage, ...]
    token_ids: list[int]
    history_turns: int  # turns of history included
    dropped_turns: int  # turns within memory.max_turns left out to fit the budget
    style_examples: bool  # False when the examples were dropped to fit


def system_prefix(character: Character) -> str:
    """The part of the system message that is identical for every player and every turn."""
    parts = [character.persona]
    parts.append(STYLE_GUIDANCE.format(name=character.name))
    if character.emotions:
        parts.append(EMOTION_GUIDANCE + ", ".join(f"[{label}]" for label in character.emotions) + ".")
    if character.actions:
        parts.append(ACTION_GUIDANCE + "\n".join(
            f"@{a.name} " + "{" + ", ".join(f'"{arg.name}": {arg.describe()}' for arg in a.arguments) + "}"
            + f" - {a.description}" for a in character.actions))
    return "\n\n".join(p.strip() for p in parts)


FACTS_HEADING = "What you know that bears on this:"
MEMORY_HEADING = "What you remember from earlier that bears on this:"
EMOTION_GUIDANCE = "Begin each reply with how you feel, in brackets, one of: "
ACTION_GUIDANCE = "When you do something, add one line per action after your words, only as written here:\n"


def npc_message(character: Character, turn: Turn) -> str:
    """An earlier reply as the model wrote it: with its emotion and actions when the character has them."""
    return render_reply(turn.npc_line, turn.emotion if character.emotions else "",
                        turn.actions if character.actions else ())


def recent_turns(character: Character, history: Sequence[Turn]) -> list[Turn]:
    """The turns the prompt may carry: this character's, the last memory.max_turns of them.

    Turns with another character are left out: they are another NPC's words, not this one's.
    """
    own = [t for t in history if t.character_id == character.id]
    keep = character.memory.max_turns
    return own[-keep:] if keep else []


def build_messages(character: Character, history: Sequence[Turn], player_line: str,
                   world: Mapping[str, str] | None = None, player_name: str = "",
                   style_examples: bool = True, fmt: ReplyFormat | None = None,
                   facts: Sequence[str] = (), memories: Sequence[str] = (),
                   relationships: Sequence[str] | None = None) -> list[ChatMessage]:
    """All of `history` that belongs to this character (trim it first: recent_turns / fit_to_budget).
    `fmt`: this turn's entities and allowed actions (None: none listed, every action allowed).
    `facts`: what the character knows that bears on the line (FactRetriever.facts), best first;
    `memories`: exchanges that left the window and bear on it (FactRetriever.recall);
    `relationships`: where the character stands with the player (relationships.prompt_lines; None: the
    start values, as in a new session)."""
    system = system_prefix(character)
    situation = []
    if player_name.strip():
        situation.append(f"You are talking to {_one_line(player_name)}.")
    if world:
        situation.append("Right now:\n" + "\n".join(f"- {_one_line(k)}: {_one_line(v)}"
                                                    for k, v in sorted(world.items())))
    if relationships is None:
        relationships = prompt_lines(current_values(character.relationships, {}))
    if relationships:
        situation.append("How you stand with the player:\n" + "\n".join(f"- {_one_line(r)}" for r in relationships))
    if fmt is not None and fmt.entities:
        situation.append("At hand:\n" + "\n".join(f"- {name}: {', '.join(values)}"
                                                    for name, values in sorted(fmt.entities.items())))
    if fmt is not None and character.actions:
        unavailable = [a.name for a in character.actions if a not in fmt.actions]
        if unavailable:
            situation.append("You cannot do now: " + ", ".join(unavailable) + ".")
    if situation:
        system += "\n\n" + "\n".join(situation)
    messages = [ChatMessage("system", system)]
    if style_examples:
        for ex in character.style_examples:
            messages += [ChatMessage("user", ex.player), ChatMessage("assistant", ex.npc)]
    for turn in history:
        if turn.character_id == character.id:
            messages += [ChatMessage("user", turn.player_line), ChatMessage("assistant", npc_message(character, turn))]
    grounding = [f"{heading}\n" + "\n".join(f"- {_one_line(x)}" for x in items)
                 for heading, items in ((FACTS_HEADING, facts), (MEMORY_HEADING, memories)) if items]
    if grounding:
        messages.append(ChatMessage("system", "\n\n".join(grounding)))
    messages.append(ChatMessage("user", player_line))
    return messages


def fit_to_budget(tokenizer: Tokenizer, character: Character, history: Sequence[Turn], player_line: str,
                  world: Mapping[str, str] | None = None, player_name: str = "", *,
                  max_prompt_tokens: int, fmt: ReplyFormat | None = None, facts: Sequence[str] = (),
                  memories: Sequence[str] = (), relationships: Sequence[str] | None = None) -> Prompt:
    """The longest recent history that fits `max_prompt_tokens`: oldest turns leave first, then the
    style examples; persona, the facts, world facts and the player's line always stay.

    Pass max_prompt_tokens = the engine's context length minus the reply's max_tokens.
    Raises PromptTooLong when even the bare prompt does not fit.
    """
    turns = recent_turns(character, history)

    def attempt(n: int, examples: bool = True) -> Prompt:
        kept = turns[len(turns) - n:] if n else []
        messages = build_messages(character, kept, player_line, world, player_name, examples, fmt, facts, memories,
                                  relationships)
        return Prompt(tuple(messages), tokenizer.encode_chat(messages), n, len(turns) - n, examples)

    best = attempt(len(turns))
    if len(best.token_ids) <= max_prompt_tokens:
        return best  # the usual case: one encode
    bare = attempt(0)
    if len(bare.token_ids) > max_prompt_tokens:
        bare = attempt(0, examples=False)
        if len(bare.token_ids) > max_prompt_tokens:
            raise PromptTooLong(_too_long(tokenizer, character, player_line, len(bare.token_ids), max_prompt_tokens))
        return bare
    lo, hi = 0, len(turns) - 1  # attempt(lo) fits, attempt(len(turns)) does not; token counts grow with n
    best = bare
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = attempt(mid)
        if len(candidate.token_ids) <= max_prompt_tokens:
            lo, best = mid, candidate
        else:
            hi = mid - 1
    return best


def _too_long(tokenizer: Tokenizer, character: Character, player_line: str, need: int, budget: int) -> str:
    persona = len(tokenizer.encode_literal(system_prefix(character)))
    line = len(tokenizer.encode_literal(player_line))
    return (f"player_line: the prompt needs {need} tokens but the budget is {budget} "
            f"(player_line: {line} tokens; character {character.id!r} persona: {persona}; "
            "the rest is the facts, world facts and the chat template)")


def _one_line(text: str) -> str:
    """Names and world facts sit inside the system message: a newline there could pose as a new section."""
    return " ".join(str(text).split())
