"""A character's turn from an OpenAI chat body (POST /v1/chat/completions with model = a character id):
the last message is the player's line, earlier user / assistant messages the history (an assistant
message's `emotion` and `tool_calls` are what that reply felt and did), system messages the situation;
`tools` / `tool_choice` say which of the character's actions are allowed now, `entities` what exists."""

from __future__ import annotations

from sidecar.config import RequestLimits
from sidecar.dialogue.actions import Action, action_from_dict
from sidecar.dialogue.characters import Character
from sidecar.dialogue.sessions import Turn
from sidecar.dialogue.turn import TalkInput
from sidecar.errors import UserError
from sidecar.server import openai_json as oj
from sidecar.server import openai_tools as ot
from sidecar.server.openai_json import HttpError
from sidecar.server.requests import check_stops

WORLD_KEY = "situation"  # the world fact a chat's system messages become


def talk_input(body: dict, name: str, character: Character, chat: list[oj.Message],
               limits: RequestLimits) -> TalkInput:
    """The TalkInput of a character's turn from a chat body; raises HttpError naming the field."""
    if chat[-1].role != "user" or not chat[-1].content.strip():
        raise HttpError(400, "messages: with a character, the last message is the player's line (role user, "
                             "not empty)", param="messages")
    if body.get("ignore_eos"):
        raise HttpError(400, "ignore_eos: not for a character's turn", param="ignore_eos")
    oj.check_common(body)
    if oj.content_format(body)[0] != "text":
        field_name = "structured_outputs" if body.get("structured_outputs") is not None else "response_format"
        raise HttpError(400, f"{field_name}: a character's reply has its own format (emotion, text, actions); "
                             'only model "base" takes one', param=field_name)
    allowed = allowed_actions(body, character)
    entities = oj.entities(body)
    history, line, situation = [], "", []
    for i, m in enumerate(chat[:-1]):
        if m.role == "system":
            situation.append(" ".join(m.content.split()))
        elif m.role == "user":
            line = f"{line}\n{m.content}" if line else m.content
        elif m.role == "assistant":
            emotion = m.emotion if m.emotion in character.emotions else ""  # a label since dropped: none
            history.append(Turn(name, line, m.content, emotion=emotion,
                                actions=history_actions(character, m, i)))
            line = ""
        else:
            raise HttpError(400, f"messages[{i}]: role tool is only for model \"base\"; a character's actions "
                                 "come back as its assistant message's tool_calls", param=f"messages[{i}]")
    player = chat[-1].name or ""
    world = {WORLD_KEY: " ".join(situation)} if situation else {}
    for field_name, value, limit in (("messages[-1].content", chat[-1].content, limits.max_line_chars),
                                     ("messages[-1].name", player, limits.max_name_chars),
                                     ("system messages", world.get(WORLD_KEY, ""),
                                      limits.max_world_value_chars)):
        if len(value) > limit:
            raise HttpError(400, f"{field_name}: {len(value)} characters; the limit is {limit}", param="messages")
    with oj.as_http_error():
        top_k = oj.whole(body, "top_k", None, -1, 1_000_000, " (no limit)")
        return TalkInput(name, "", chat[-1].content, world, player,
                         max_tokens=oj.whole(body, oj.max_tokens_field(body, True), 0, 1, limits.max_tokens),
                         temperature=oj.number(body, "temperature", None), top_p=oj.number(body, "top_p", None),
                         top_k=top_k if top_k and top_k > 0 else None,
                         repetition_penalty=oj.number(body, "repetition_penalty", None),
                         min_p=oj.number(body, "min_p", None),
                         seed=oj.whole(body, "seed", None, 0, 2**63 - 1),
                         stop=check_stops("stop", oj.stop_list(body), limits), history=tuple(history),
                         entities=entities, allowed_actions=allowed)


def allowed_actions(body: dict, character: Character) -> tuple[str, ...] | None:
    """A character turn's allowed actions from `tools` (by function name; the character's own schema sets
    the arguments) and `tool_choice`: None = every action of the character."""
    listed = ot.tools(body, check_schemas=False)
    choice = ot.tool_choice(body, listed) if body.get("tool_choice") is not None else "auto"
    if choice == "none":
        return ()
    if choice != "auto":
        raise HttpError(400, 'tool_choice: "none" or "auto" with a character: it decides whether it acts',
                        param="tool_choice")
    if listed is None:
        return None
    known = {a.name for a in character.actions}
    for i, tool in enumerate(listed):
        if tool.name not in known:
            have = ", ".join(sorted(known)) or "none"
            raise HttpError(400, f"tools[{i}].function.name: character {character.id!r} has no action "
                                 f"{tool.name!r} (its actions: {have})", param=f"tools[{i}].function.name")
    return tuple(t.name for t in listed)


def history_actions(character: Character, message: oj.Message, i: int) -> tuple[Action, ...]:
    """An earlier assistant message's tool_calls as the character's actions (its prompt shows them)."""
    actions = []
    for j, (name, arguments) in enumerate(message.calls):
        spec = next((a for a in character.actions if a.name == name), None)
        where = f"messages[{i}].tool_calls[{j}]"
        if spec is None:
            raise HttpError(400, f"{where}.function.name: character {character.id!r} has no action {name[:40]!r}",
                            param=f"messages[{i}]")
        try:
            action = action_from_dict({"name": name, "arguments": arguments}, f"{where}.function")
        except UserError as e:
            raise HttpError(400, str(e), param=f"messages[{i}]") from None
        order = [a.name for a in spec.arguments]
        actions.append(Action(name, tuple(sorted(action.arguments, key=lambda kv: order.index(kv[0])
                                                 if kv[0] in order else len(order)))))
    return tuple(actions)
