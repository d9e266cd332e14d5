"""Function calling on the OpenAI endpoint (`tools`, `tool_choice`) for the base model: the request's
tools checked, shown to the model, turned into the reply's grammar, and the call parsed back.

The base model writes a call as
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>
(the Hermes / Qwen convention, which small chat models have seen most), decoded under a grammar whose
JSON part allows only the request's tools, each with its own parameters schema. Tool results sent
back (role "tool") become user messages wrapped in <tool_response> ... </tool_response>.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from sidecar.engine.tokenizer import ChatMessage
from sidecar.server.openai_json import HttpError, Message, checked_schema, content_format

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 64
TOOL_CHOICES = ("none", "auto", "required")
# A call exactly as json.dumps writes it: no whitespace for a small model to wander off in.
_CALL_JSON_FORM = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
# Free text in "auto" mode: anything that does not open a call (so a reply that starts with the opening
# is always a call, and the parse is never in doubt).
_AUTO_TEXT = r"TEXT: /(.|\n)+/ & ~/<tool_call>(.|\n)*/"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})


def tools(body: dict, check_schemas: bool = True) -> list[Tool] | None:
    """The body's `tools` (None when absent), shape-checked; `check_schemas`: each parameters schema must
    compile (a character's turn ignores them: its actions have their own)."""
    given = body.get("tools")
    if given is None:
        return None
    if not isinstance(given, list):
        raise HttpError(400, 'tools: a list of {"type": "function", "function": {"name": ..., "parameters": '
                             '{...}}}', param="tools")
    if len(given) > MAX_TOOLS:
        raise HttpError(400, f"tools: {len(given)} tools; the limit is {MAX_TOOLS}", param="tools")
    out: list[Tool] = []
    for i, entry in enumerate(given):
        where = f"tools[{i}]"
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("type", "function") != "function" or not isinstance(function,
                                                                                                         dict):
            raise HttpError(400, f'{where}: {{"type": "function", "function": {{"name": ..., ...}}}}', param=where)
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise HttpError(400, f"{where}.function.name: 1-64 letters, digits, _ or -", param=f"{where}.function.name")
        if any(t.name == name for t in out):
            raise HttpError(400, f"{where}.function.name: {name!r} is listed twice", param=f"{where}.function.name")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise HttpError(400, f"{where}.function.description: a string", param=f"{where}.function.description")
        parameters = function.get("parameters")
        param = f"{where}.function.parameters"
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise HttpError(400, f"{param}: a JSON schema of an object", param=param)
        elif check_schemas:
            checked_schema(parameters, param)
        out.append(Tool(name, description, parameters))
    return out


def tool_choice(body: dict, listed: list[Tool] | None) -> str:
    """"none", "auto", "required", or the name of the one tool the reply must call."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if listed else "none"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise HttpError(400, 'tool_choice: "none", "auto", "required" or {"type": "function", "function": '
                                 '{"name": ...}}', param="tool_choice")
        if not any(t.name == name for t in listed or ()):
            raise HttpError(400, f"tool_choice.function.name: {name[:64]!r} is not one of the request's tools",
                            param="tool_choice")
        return name
    if choice not in TOOL_CHOICES:
        raise HttpError(400, 'tool_choice: "none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}}', param="tool_choice")
    if choice == "required" and not listed:
        raise HttpError(400, 'tool_choice: "required" needs at least one tool in `tools`', param="tool_choice")
    return choice


@dataclass(frozen=True)
class ToolPlan:
    """How a base-model chat uses its tools: the system text that shows them, and the reply's grammar."""

    tools: tuple[Tool, ...]
    choice: str  # "auto", "required" or a tool's name
    grammar: str

    @property
    def auto(self) -> bool:
        return self.choice == "auto"

    def prompt(self) -> str:
        """The system text that tells the model its tools and how to call one."""
        listed = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                      ensure_ascii=False) for t in self.tools)
        how = ("When a function helps, call it instead of answering; otherwise answer in plain text."
               if self.auto else "Reply with a function call only.")
        return (f"You can call these functions:\n<tools>\n{listed}\n</tools>\n{how} To call a function, write "
                f'only:\n{TOOL_CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
                f"{TOOL_CALL_CLOSE}")


def tool_plan(body: dict) -> ToolPlan | None:
    """The body's tools and tool_choice for a base-model chat; None when no call can be made (no tools,
    or tool_choice "none"): then response_format / structured_outputs alone shape the reply."""
    listed = tools(body)
    choice = tool_choice(body, listed)
    if choice == "none" or not listed:
        return None
    kind, content = content_format(body)
    if kind == "grammar":
        raise HttpError(400, "structured_outputs: a grammar cannot be combined with tools (tool_choice "
                             '"none" aside); give a JSON schema instead', param="structured_outputs")
    callable_tools = tuple(t for t in listed if choice in ("auto", "required", t.name))
    one_of = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
               "required": ["name", "arguments"], "additionalProperties": False} for t in callable_tools]
    call_schema = {"anyOf": one_of, "x-guidance": _CALL_JSON_FORM}
    rules = [f"call: %json{json.dumps(call_schema, ensure_ascii=False)}"]
    wrapped = f"{json.dumps(TOOL_CALL_OPEN)} call {json.dumps(TOOL_CALL_CLOSE)}"
    if choice == "auto":
        if kind == "json":  # the answer that is not a call follows the response format
            rules.append(f"content: %json{json.dumps(content, ensure_ascii=False)}")
        else:
            rules += ["content: TEXT", _AUTO_TEXT]
        start = f"start: content | {wrapped}"
    else:  # the response format is moot: the whole reply is the call
        start = f"start: {wrapped}"
    return ToolPlan(tuple(listed), choice, "\n".join([start, *rules]) + "\n")


def parse_call(text: str) -> tuple[str, dict] | None:
    """(name, arguments) of a reply that is one whole tool call; None for anything else (a cut one too)."""
    if not (text.startswith(TOOL_CALL_OPEN) and text.endswith(TOOL_CALL_CLOSE)):
        return None
    try:
        call = json.loads(text[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)])
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(
            call.get("arguments"), dict):
        return None
    return call["name"], call["arguments"]


def render_call(name: str, arguments: dict) -> str:
    """An earlier call as the model writes it (an assistant message's tool_calls in the history)."""
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + TOOL_CALL_CLOSE


def tool_call(request_id: str, index: int, name: str, arguments_json: str) -> dict:
    """One entry of a reply's tool_calls (with the index a streamed delta carries; whole() drops it)."""
    return {"index": index, "id": f"call_{request_id}_{index}", "type": "function",
            "function": {"name": name, "arguments": arguments_json}}


def base_chat(messages: list[Message], plan: ToolPlan | None) -> list[ChatMessage]:
    """A base-model chat as the template gets it: earlier calls as the model writes them, tool results as
    user messages in <tool_response> (consecutive ones in one message: templates that need user and
    assistant to alternate accept it), and the tools in the system message (its end; a new one first)."""
    out: list[ChatMessage] = []
    previous_tool = False
    for m in messages:
        if m.role == "tool":
            response = f"<tool_response>\n{m.content}\n</tool_response>"
            if previous_tool:
                out[-1] = ChatMessage("user", f"{out[-1].content}\n{response}")
            else:
                out.append(ChatMessage("user", response))
        elif m.role == "assistant" and m.calls:
            out.append(ChatMessage("assistant", "\n".join([*([m.content] if m.content else []),
                                                            *(render_call(n, a) for n, a in m.calls)])))
        else:
            out.append(ChatMessage(m.role, m.content))
        previous_tool = m.role == "tool"
    if plan is not None:
        if out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{plan.prompt()}")
        else:
            out.insert(0, ChatMessage("system", plan.prompt()))
    return out
