"""dialogue.jsonl -> training examples, rendered exactly as the sidecar renders a conversation.

Each line of `characters/<id>/dialogue.jsonl` is one short conversation:

    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "emotion": "gruff",
                   "actions": [{"name": "sell_item", "arguments": {"item": "iron sword"}}]}, ...],
     "world": {"time": "night"}, "player_name": "Aria",         # optional
     "entities": {"stock": ["iron sword", "hammer"]}, "allowed_actions": ["sell_item"],   # optional
     "facts": ["A shield costs 25 gold."]}                                   # optional

`facts`: what the prompt gives the character to answer from, in the block next to the player's
line (dialogue/prompt.py), for every exchange of the line; without it, each exchange gets what the
sidecar would retrieve (dialogue/retrieval.py: the character's knowledge and the lore in its scope).
Lines with facts that vary teach the adapter to answer from that block rather than from memory.

Roles alternate, starting with the player ("user") and ending with the NPC ("assistant"). The
text the model trains on is built by dialogue/prompt.build_messages, as at serving time: the
character's system prompt, style examples, the earlier exchanges of the line as history, and the
last player line; then the NPC's reply as the model writes it (dialogue/reply_format.py: its
emotion in brackets, the text, its action lines) and its end-of-turn token. Every NPC reply in the
line is supervised (its tokens get labels); everything else is context (label -100). A character
that declares emotions needs one on every NPC reply; actions must be valid against the character's
schema and the line's entities, as at serving time.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.dialogue.actions import Action, action_from_dict, check_action
from sidecar.dialogue.characters import Character
from sidecar.dialogue.lore import LORE_FOLDER, LoreLibrary
from sidecar.dialogue.prompt import build_messages, fact_tokens
from sidecar.dialogue.reply_format import ReplyFormat, render_reply, reply_format
from sidecar.dialogue.retrieval import FactRetriever, Grounding
from sidecar.dialogue.sessions import Turn
from sidecar.engine.tokenizer import ChatMessage, Tokenizer
from sidecar.errors import UserError

IGNORE = -100  # label of tokens without loss (PyTorch's cross-entropy ignore_index)
DIALOGUE_FILE = "dialogue.jsonl"


class DataError(UserError):
    """A problem in dialogue.jsonl; the message names the file and line."""


@dataclass(frozen=True)
class Reply:
    """One NPC reply of the data: its text, and the emotion and actions it is labelled with."""

    text: str
    emotion: str = ""
    actions: tuple[Action, ...] = ()


@dataclass(frozen=True)
class Conversation:
    line: int  # 1-based line number in dialogue.jsonl
    exchanges: tuple[tuple[str, str], ...]  # (player line, NPC reply text)
    world: dict[str, str]
    player_name: str
    replies: tuple[Reply, ...] = ()  # one per exchange: the reply with its labels
    entities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    allowed_actions: tuple[str, ...] | None = None
    facts: tuple[str, ...] | None = None  # None: retrieved per exchange, as at serving time
    digest: str = ""  # the line's content (line_digest): which side of a split it was on, wherever it moves

    def prompt(self, character: Character, exchange: int, retriever: FactRetriever) -> list[ChatMessage]:
        """The messages the sidecar would build for exchange `exchange` (0-based) after the ones before it."""
        history, player = self.history(character, exchange), self.exchanges[exchange][0]
        facts = self.facts if self.facts is not None else retriever.for_turn(character, history, player)
        return build_messages(character, history, player, self.world, self.player_name,
                              fmt=self.reply_format(character), facts=facts)

    def reply_format(self, character: Character) -> ReplyFormat:
        return reply_format(character.emotions, character.actions, self.entities, self.allowed_actions)

    def history(self, character: Character, exchanges: int) -> list[Turn]:
        """The first `exchanges` exchanges as the session turns the prompt shows."""
        return [Turn(character.id, player, reply.text, emotion=reply.emotion, actions=reply.actions)
                for (player, _), reply in zip(self.exchanges[:exchanges], self.replies, strict=False)]


@dataclass(frozen=True)
class Example:
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE where there is no loss
    # Positions of the replies' structured tokens: the emotion label, the action lines and the
    # end of turn (which decides "no more actions"); `npc train --label-weight` weighs their loss.
    structured: frozenset[int] = frozenset()
    # Positions of reply tokens that only the facts block brought into the prompt (a price, a name
    # copied from it: dialogue/prompt.fact_tokens); `npc train --fact-weight` weighs their loss.
    copied: frozenset[int] = frozenset()

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def read_dialogue(path: Path) -> list[Conversation]:
    if not path.is_file():
        raise DataError(f"{path}: not found (write one conversation per line; see characters/README.md)")
    conversations = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        conversations.append(_parse_line(path, number, raw))
    if not conversations:
        raise DataError(f"{path}: empty: no conversation to train on")
    return conversations


def _parse_line(path: Path, number: int, raw: str) -> Conversation:
    where = f"{path}:{number}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError(f'{where}: expected an object with a "messages" list')
    known = {"messages", "world", "player_name", "entities", "allowed_actions", "facts"}
    unknown = set(obj) - known
    if unknown:
        raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(known))}")
    messages = obj["messages"]
    if not messages:
        raise DataError(f"{where}: messages is empty")
    turns, replies = [], []
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        keys = {"role", "content"} | ({"emotion", "actions"} if expected == "assistant" else set())
        if not isinstance(m, dict) or not {"role", "content"} <= set(m) <= keys:
            extra = ' (an NPC reply may add "emotion" and "actions")' if expected == "assistant" else ""
            raise DataError(f'{where}: messages[{i}] must be {{"role": ..., "content": ...}}{extra}')
        if m["role"] != expected:
            raise DataError(f"{where}: messages[{i}].role is {m['role']!r}, expected {expected!r} "
                            "(the player and the NPC alternate, the player first)")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"{where}: messages[{i}].content must be non-empty text")
        turns.append(m["content"])
        if expected == "assistant":
            replies.append(_reply(where, i, m))
    if len(turns) % 2:
        raise DataError(f"{where}: the conversation ends with the player: it has no NPC reply to learn from")
    world = obj.get("world", {})
    if not isinstance(world, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in world.items()):
        raise DataError(f"{where}: world must map text to text")
    name = obj.get("player_name", "")
    if not isinstance(name, str):
        raise DataError(f"{where}: player_name must be text")
    entities = obj.get("entities", {})
    if not isinstance(entities, dict) or not all(isinstance(k, str) and isinstance(v, list)
                                                 and all(isinstance(x, str) for x in v) for k, v in entities.items()):
        raise DataError(f"{where}: entities must map list names to lists of text")
    allowed = obj.get("allowed_actions")
    if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed)):
        raise DataError(f"{where}: allowed_actions must be a list of action names")
    facts = obj.get("facts")
    if facts is not None and (not isinstance(facts, list) or not all(isinstance(f, str) and f.strip() for f in facts)):
        raise DataError(f"{where}: facts must be a list of non-empty texts")
    return Conversation(number, tuple(zip(turns[::2], turns[1::2], strict=True)), world, name, tuple(replies),
                        {k: tuple(v) for k, v in entities.items()}, tuple(allowed) if allowed is not None else None,
                        tuple(facts) if facts is not None else None, line_digest(obj))


def line_digest(obj: dict) -> str:
    """A conversation's identity that survives edits around it (lines inserted above move its number) and
    of its own layout (whitespace, key order)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _reply(where: str, i: int, m: dict) -> Reply:
    emotion = m.get("emotion", "")
    if not isinstance(emotion, str):
        raise DataError(f"{where}: messages[{i}].emotion must be text")
    raw_actions = m.get("actions") or []
    if not isinstance(raw_actions, list):
        raise DataError(f"{where}: messages[{i}].actions must be a list")
    try:
        actions = tuple(action_from_dict(a, f"messages[{i}].actions[{j}]") for j, a in enumerate(raw_actions))
    except UserError as e:
        raise DataError(f"{where}: {e}") from None
    return Reply(m["content"], emotion, actions)


def check_labels(character: Character, conv: Conversation) -> None:
    """The line's labels against the character, as serving would decode them; raises DataError."""
    where = f"line {conv.line}"
    fmt = conv.reply_format(character)
    for k, reply in enumerate(conv.replies):
        field_name = f"{where}: messages[{2 * k + 1}]"
        if character.emotions and reply.emotion not in character.emotions:
            got = f"got {reply.emotion!r}" if reply.emotion else "it has none"
            raise DataError(f"{field_name}.emotion: must be one of the character's emotions "
                            f"{list(character.emotions)} ({got})")
        if not character.emotions and reply.emotion:
            raise DataError(f"{field_name}.emotion: the character declares no emotions")
        for j, action in enumerate(reply.actions):
            problem = check_action(fmt.actions, action, fmt.entities) if fmt.actions else (
                f"no action of the character can be taken in this line (action {action.name!r})")
            if problem:
                raise DataError(f"{field_name}.actions[{j}]: {problem}")


def render(tokenizer: Tokenizer, character: Character, conv: Conversation, max_tokens: int,
           retriever: FactRetriever) -> list[Example]:
    """Token ids and labels of one conversation; every NPC reply (with its end-of-turn token) is supervised.

    Usually one example. The facts block sits before each player line and changes with it, so an
    exchange whose prompt does not extend the one before (new facts) starts an example of its own.
    """
    check_labels(character, conv)
    examples: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    structured: set[int] = set()
    copied: set[int] = set()
    for k in range(len(conv.exchanges)):
        messages = conv.prompt(character, k, retriever)
        labelled = conv.replies[k]
        npc = render_reply(labelled.text, labelled.emotion, labelled.actions)
        context = tokenizer.encode_chat(messages, add_generation_prompt=True)
        full = tokenizer.encode_chat([*messages, ChatMessage("assistant", npc)], add_generation_prompt=False)
        if full[: len(context)] != context:
            raise DataError(f"line {conv.line}: the chat template does not render the reply after its prompt; "
                            "this model's template cannot be trained on turn by turn")
        if ids and context[: len(ids)] != ids:
            examples.append(_example(conv.line, ids, labels, structured, copied, max_tokens))
            ids, labels, structured, copied = [], [], set(), set()
        reply = full[len(context):]
        # Learn the reply up to its end-of-turn token (where serving stops), not the template's
        # newline after it.
        eot = next((i for i, t in enumerate(reply) if t in tokenizer.eos_ids), len(reply) - 1)
        labels += [IGNORE] * (len(context) - len(ids)) + reply[: eot + 1] + [IGNORE] * (len(reply) - eot - 1)
        structured |= {len(context) + i for i in _structured_tokens(tokenizer, reply[:eot], npc, labelled)}
        structured.add(len(context) + eot)
        from_facts = fact_tokens(tokenizer, messages, context)
        copied |= {len(context) + i for i, t in enumerate(reply[:eot]) if t in from_facts} - structured
        ids = full
    examples.append(_example(conv.line, ids, labels, structured, copied, max_tokens))
    return examples


def _example(line: int, ids: list[int], labels: list[int], structured: set[int], copied: set[int],
             max_tokens: int) -> Example:
    if len(ids) > max_tokens:
        raise DataError(f"line {line}: the rendered conversation is {len(ids)} tokens; the limit is "
                        f"{max_tokens} (shorten it or split it into several lines)")
    return Example(line, ids, labels, frozenset(structured), frozenset(copied))


def _structured_tokens(tokenizer: Tokenizer, reply: list[int], npc: str, labelled: Reply) -> list[int]:
    """Which of `reply`'s tokens (the rendered `npc` string) spell its emotion label or action lines."""
    label_end = len(f"[{labelled.emotion}]") if labelled.emotion else 0
    actions_start = npc.index("\n@") if labelled.actions else len(npc)
    detok, out, start = tokenizer.detokenizer(), [], 0
    for i, token in enumerate(reply):
        end = start + len(detok.push(token))
        if start < label_end or end > actions_start:
            out.append(i)
        start = end
    return out


def character_retriever(folder: Path, grounding: Grounding | None = None) -> FactRetriever:
    """What retrieves a character's facts when the sidecar serves `folder`'s characters folder."""
    return FactRetriever(LoreLibrary(Path(folder).parent / LORE_FOLDER), grounding or Grounding())


def split(conversations: list[Conversation], held_out: float, seed: int) -> tuple[list[Conversation],
                                                                                   list[Conversation]]:
    """(train, held out): a seeded shuffle, so `npc eval` finds the same held-out lines again."""
    if not 0 <= held_out < 1:
        raise UserError(f"--held-out must be in [0, 1), got {held_out}")
    order = list(conversations)
    random.Random(seed).shuffle(order)
    n_held = round(len(order) * held_out)
    if held_out > 0 and n_held == 0 and len(order) > 1:
        n_held = 1
    held = sorted(order[:n_held], key=lambda c: c.line)
    train = sorted(order[n_held:], key=lambda c: c.line)
    if not train:
        raise DataError("no conversation left to train on after the held-out split")
    return train, held
