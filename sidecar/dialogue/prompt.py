"""Character + history + this turn -> chat messages, and the token budget that trims the history.

Layout of the messages, chosen for the engine's prefix cache (KV keyed by adapter + token prefix):

    system     persona, style guidance                 <- the same for every player and turn
               player name, world facts, entities      <- this turn only, always after the constant part
    user/assistant  style examples                     (constant per character too)
    user/assistant  history turns with this character, oldest first
    system     the facts that bear on this line        <- retrieval.py: knowledge + lore in scope,
               earlier exchanges that bear on it          and exchanges older than the window
    user       the player's line, verbatim

A scene line (dialogue/scene.py) has the same constant part, then the scene's situation and cast;
the speaker's own earlier lines are assistant messages, the others' lines since it last spoke one
user message ("Name: line", one per line).

The facts sit next to the line they answer: a 135M model uses what is close to the question (and
the sample adapters are trained on that layout, with facts that vary, so that they copy from it
rather than from memory). Placed after the history, they also leave the persona + history prefix
of the previous turn's prompt intact for the prefix cache.

The constant part is stripped and followed by a blank line, so its tokens do not depend on what
follows it (byte-level BPE never merges across "text." + "\\n\\n"). Player text is never escaped:
Tokenizer.encode_chat keeps every message content literal, `<|im_end|>` included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from sidecar.dialogue.characters import Character
from sidecar.dialogue.relationships import current_values, prompt_lines
from sidecar.dialogue.reply_format import ReplyFormat, render_reply
from sidecar.dialogue.sessions import Turn
from sidecar.engine.api import Contrast, SamplingParams
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
SCENE_OPENING = "(The scene begins. You speak first.)"


def npc_message(character: Character, turn: Turn) -> str:
    """An earlier reply as the model wrote it: with its emotion and actions when the character has them."""
    return render_reply(turn.npc_line, turn.emotion if character.emotions else "",
                        turn.actions if character.actions else ())


def recent_turns(character: Character, history: Sequence[Turn]) -> list[Turn]:
    """The turns the prompt may carry: this character's with the player, the last memory.max_turns of them.

    Turns with another character are left out: they are another NPC's words, not this one's; so are
    scene lines (they come back as memories).
    """
    own = [t for t in history if t.character_id == character.id and not t.scene_id]
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
    lead = [f"You are talking to {_one_line(player_name)}."] if player_name.strip() else []
    if relationships is None:
        relationships = prompt_lines(current_values(character.relationships, {}))
    standing = ["How you stand with the player:\n" + "\n".join(f"- {_one_line(r)}" for r in relationships)
                ] if relationships else []
    messages = _opening(character, lead, world, standing, fmt, style_examples)
    for turn in history:
        if turn.character_id == character.id and not turn.scene_id:
            messages += [ChatMessage("user", turn.player_line), ChatMessage("assistant", npc_message(character, turn))]
    return messages + _grounding(facts, memories) + [ChatMessage("user", player_line)]


def build_scene_messages(character: Character, names: Mapping[str, str], situation: str, lines: Sequence[Turn],
                         world: Mapping[str, str] | None = None, style_examples: bool = True,
                         fmt: ReplyFormat | None = None, facts: Sequence[str] = (),
                         memories: Sequence[str] = (), player_line: str = "",
                         player_name: str = "") -> list[ChatMessage]:
    """The prompt of `character`'s next line in a scene: `names` maps the cast's ids to their names, `lines`
    are the scene's lines so far (trim them first: fit_scene_to_budget); a line with a player_line is the
    player stepping in, and `player_line` makes this one an answer to the player."""
    others = [_one_line(n) for cid, n in names.items() if cid != character.id]
    cast = ", ".join(others[:-1]) + " and " + others[-1] if len(others) > 1 else others[0]
    scene = [f"You are in a scene with {cast}; the player is not part of it. {_one_line(situation)}"]
    messages = _opening(character, scene, world, [], fmt, style_examples)
    heard: list[str] = []  # the others' lines since this character last spoke
    for line in lines:
        if line.player_line:
            heard.append(f"{_one_line(line.player_name) or 'The player'}: {line.player_line}")
        if line.character_id == character.id:
            messages += [ChatMessage("user", "\n".join(heard) or SCENE_OPENING),
                         ChatMessage("assistant", npc_message(character, line))]
            heard = []
        else:
            heard.append(f"{_one_line(names.get(line.character_id, line.character_id))}: {line.npc_line}")
    if player_line:
        heard.append(f"{_one_line(player_name) or 'The player'}: {player_line}")
    return messages + _grounding(facts, memories) + [ChatMessage("user", "\n".join(heard) or SCENE_OPENING)]


def _opening(character: Character, lead: list[str], world: Mapping[str, str] | None, standing: list[str],
             fmt: ReplyFormat | None, style_examples: bool) -> list[ChatMessage]:
    """The system message (the constant part, then this turn's: who is there, world facts, standing,
    the game's lists, unavailable actions) and the style examples."""
    situation = list(lead)
    if world:
        situation.append("Right now:\n" + "\n".join(f"- {_one_line(k)}: {_one_line(v)}"
                                                    for k, v in sorted(world.items())))
    situation += standing
    if fmt is not None and fmt.entities:
        situation.append("At hand:\n" + "\n".join(f"- {name}: {', '.join(values)}"
                                                    for name, values in sorted(fmt.entities.items())))
    if fmt is not None and character.actions:
        unavailable = [a.name for a in character.actions if a not in fmt.actions]
        if unavailable:
            situation.append("You cannot do now: " + ", ".join(unavailable) + ".")
    system = system_prefix(character)
    if situation:
        system += "\n\n" + "\n".join(situation)
    messages = [ChatMessage("system", system)]
    if style_examples:
        for ex in character.style_examples:
            messages += [ChatMessage("user", ex.player), ChatMessage("assistant", ex.npc)]
    return messages


def _grounding(facts: Sequence[str], memories: Sequence[str]) -> list[ChatMessage]:
    blocks = [f"{heading}\n" + "\n".join(f"- {_one_line(x)}" for x in items)
              for heading, items in ((FACTS_HEADING, facts), (MEMORY_HEADING, memories)) if items]
    return [ChatMessage("system", "\n\n".join(blocks))] if blocks else []


def grounded_sampling(tokenizer: Tokenizer, messages: Sequence[ChatMessage], token_ids: Sequence[int],
                      sampling: SamplingParams, boost: float = 0.0, contrast: float = 0.0) -> SamplingParams:
    """`sampling` for a prompt whose facts block should weigh more than the adapter's habits: its facts'
    own tokens raised by `boost` (fact_tokens), and/or each token decoded against the prompt without the
    facts with weight `contrast` (engine.api.Contrast). Unchanged when the prompt carries no facts or
    both are 0 (npc serve --fact-boost / --fact-contrast; docs/design-notes.md, "Grounding")."""
    if _plain(messages) == list(messages):
        return sampling
    if boost:
        sampling = replace(sampling, logit_bias=tuple((t, boost) for t in sorted(
            fact_tokens(tokenizer, messages, token_ids))))
    if contrast:
        without = [m for m in (_without_facts(m) for m in messages) if m is not None]
        sampling = replace(sampling, contrast=Contrast(tuple(tokenizer.encode_chat(without)), contrast))
    return sampling


def fact_tokens(tokenizer: Tokenizer, messages: Sequence[ChatMessage], token_ids: Sequence[int]) -> frozenset[int]:
    """The tokens only the facts block brings into the prompt `token_ids` (of `messages`): a price, a
    name, a place. Those of the same prompt with the block's heading but none of its lines are taken
    away, control tokens too.

    Given the right fact first, the small model still answers from habit about half the time; raising
    these tokens (`npc serve --fact-boost`) makes copying from the block likelier, and mixing facts up
    too; `npc train --fact-weight` weighs a reply's loss on them.
    """
    plain = _plain(messages)
    if plain == list(messages):
        return frozenset()
    return frozenset(set(token_ids) - set(tokenizer.encode_chat(plain)) - set(tokenizer.special_ids))


def _plain(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """`messages` with the facts block's heading but none of its lines."""
    return [replace(m, content=FACTS_HEADING) if _is_grounding(m) else m for m in messages]


def _is_grounding(message: ChatMessage) -> bool:
    """The facts block's message (a player's line that starts with its heading is still the player's)."""
    return message.role == "system" and message.content.startswith(FACTS_HEADING)


def _without_facts(message: ChatMessage) -> ChatMessage | None:
    """The grounding message less its facts (memories stay); None when nothing is left."""
    if not _is_grounding(message):
        return message
    rest = message.content.split("\n\n" + MEMORY_HEADING, 1)
    return replace(message, content=MEMORY_HEADING + rest[1]) if len(rest) == 2 else None


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

    def build(kept: Sequence[Turn], examples: bool) -> list[ChatMessage]:
        return build_messages(character, kept, player_line, world, player_name, examples, fmt, facts, memories,
                              relationships)

    return _longest_fitting(tokenizer, character, turns, build, max_prompt_tokens, player_line, "player_line")


def fit_scene_to_budget(tokenizer: Tokenizer, character: Character, names: Mapping[str, str], situation: str,
                        lines: Sequence[Turn], world: Mapping[str, str] | None = None, *, max_prompt_tokens: int,
                        fmt: ReplyFormat | None = None, facts: Sequence[str] = (), memories: Sequence[str] = (),
                        player_line: str = "", player_name: str = "") -> Prompt:
    """The scene's most recent lines that fit, as fit_to_budget does for a player's turn."""

    def build(kept: Sequence[Turn], examples: bool) -> list[ChatMessage]:
        return build_scene_messages(character, names, situation, kept, world, examples, fmt, facts, memories,
                                    player_line, player_name)

    return _longest_fitting(tokenizer, character, lines, build, max_prompt_tokens, situation, "situation")


def _longest_fitting(tokenizer: Tokenizer, character: Character, turns: Sequence[Turn],
                     build: Callable[[Sequence[Turn], bool], list[ChatMessage]], max_prompt_tokens: int,
                     line: str, line_field: str) -> Prompt:
    def attempt(n: int, examples: bool = True) -> Prompt:
        messages = build(turns[len(turns) - n:] if n else [], examples)
        return Prompt(tuple(messages), tokenizer.encode_chat(messages), n, len(turns) - n, examples)

    best = attempt(len(turns))
    if len(best.token_ids) <= max_prompt_tokens:
        return best  # the usual case: one encode
    bare = attempt(0)
    if len(bare.token_ids) > max_prompt_tokens:
        bare = attempt(0, examples=False)
        if len(bare.token_ids) > max_prompt_tokens:
            raise PromptTooLong(_too_long(tokenizer, character, line, line_field, len(bare.token_ids),
                                          max_prompt_tokens))
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


def _too_long(tokenizer: Tokenizer, character: Character, line: str, line_field: str, need: int, budget: int) -> str:
    persona = len(tokenizer.encode_literal(system_prefix(character)))
    tokens = len(tokenizer.encode_literal(line))
    return (f"{line_field}: the prompt needs {need} tokens but the budget is {budget} "
            f"({line_field}: {tokens} tokens; character {character.id!r} persona: {persona}; "
            "the rest is the facts, world facts and the chat template)")


def _one_line(text: str) -> str:
    """Names and world facts sit inside the system message: a newline there could pose as a new section."""
    return " ".join(str(text).split())
