"""`npc serve --openai-listen`: the OpenAI-compatible HTTP endpoint over a real socket, on the embedded model."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from sidecar.client import NpcClient
from sidecar.config import RequestLimits, ServerConfig
from sidecar.dialogue.actions import Action
from sidecar.dialogue.characters import load_character
from sidecar.dialogue.turn import TurnAction, TurnDelta, TurnEmotion, TurnFinished, TurnStarted
from sidecar.engine.tokenizer import ChatMessage
from sidecar.errors import UserError
from sidecar.model.random_adapter import write_random_adapter
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.server.openai_http import ECHO_LOGPROB_TOKENS, HttpError, OpenAiEndpoint
from sidecar.server.requests import parse_talk
from tests.sidecar_process import REPO, SidecarProcess, copy_characters, write_character

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MESSAGES = [ChatMessage("system", "You are a blacksmith."), ChatMessage("user", "Can you fix my sword?")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    root = copy_characters(tmp_path_factory.mktemp("characters"), ("blacksmith",))
    folder = write_character(root, "ghost", "You are the ghost.", adapter="adapter")
    write_random_adapter(folder / "adapter", checkpoint.config, seed=1, rank=8, std=0.05)
    write_character(root, "broken", "x", generation="{temperature: hot}")
    write_character(root, "terse", "You are terse.", generation="{max_tokens: 2, max_tokens_limit: 3}")
    # One reply at a time and one waiting: the third is refused with 429.
    process = SidecarProcess(root, "--openai-listen", "127.0.0.1:0", "--auth-token", TOKEN,
                             "--max-batch", "1", "--max-waiting", "1")
    assert process.openai_address
    yield process
    assert process.stop() == 0, "".join(process.log[-20:])


def url(server, path: str) -> str:
    return f"http://{server.openai_address}{path}"


async def _post(server, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, path), json=body, headers=AUTH if headers is None else headers) as r:
            return r.status, await r.json(content_type=None)


async def _stream(server, path: str, body: dict) -> list:
    """The SSE payloads of a streamed request: dicts, and the final "[DONE]"."""
    out: list = []
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, path), json={**body, "stream": True}, headers=AUTH) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for raw in r.content:
                line = raw.strip()
                if line.startswith(b"data: "):
                    payload = line[6:]
                    out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def post(server, path, body, headers=None):
    return asyncio.run(_post(server, path, body, headers))


def test_models_lists_base_then_serving_characters(server):
    async def go():
        async with aiohttp.ClientSession() as session, session.get(url(server, "/v1/models"), headers=AUTH) as r:
            return r.status, await r.json()

    status, body = asyncio.run(go())
    assert status == 200 and body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == "base" and set(ids) == {"base", "blacksmith", "ghost", "terse"}  # "broken" never loaded
    assert all(m["max_model_len"] == 2048 for m in body["data"])


def test_completions_token_ids_stream_and_whole_agree(server, tokenizer):
    ids = tokenizer.encode_chat(MESSAGES)
    body = {"model": "blacksmith", "prompt": ids, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    post(server, "/v1/completions", body)  # warm: later runs find the prompt in the prefix cache, as this one does
    status, whole = post(server, "/v1/completions", body)
    assert status == 200 and whole["object"] == "text_completion"
    choice = whole["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    assert whole["usage"]["prompt_tokens"] == len(ids) and whole["usage"]["completion_tokens"] == len(
        choice["token_ids"]) <= 12
    assert tokenizer.decode(choice["token_ids"]) == choice["text"]

    events = asyncio.run(_stream(server, "/v1/completions", body))
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    # The warmed prompt's K/V came from the prefix cache: what --backend remote reports as cached_prompt_tokens.
    assert 0 < usage["usage"]["prompt_tokens_details"]["cached_tokens"] < len(ids)
    chunks = [e["choices"][0] for e in events[:-2]]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert [t for c in chunks for t in c["token_ids"]] == choice["token_ids"]
    assert [c["finish_reason"] for c in chunks][-1] == choice["finish_reason"]
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_string_prompt_and_chat_use_the_same_tokens(server, tokenizer):
    ids = tokenizer.encode_chat(MESSAGES)
    greedy = {"model": "base", "max_tokens": 10, "temperature": 0}
    post(server, "/v1/completions", {**greedy, "prompt": ids})  # warm the prefix cache (see above)
    _, by_ids = post(server, "/v1/completions", {**greedy, "prompt": ids})
    _, by_text = post(server, "/v1/completions", {**greedy, "prompt": [tokenizer.render_chat(MESSAGES)]})
    assert by_text["usage"]["prompt_tokens"] == len(ids) and by_text["choices"][0]["text"] == by_ids["choices"][0][
        "text"]
    messages = [{"role": m.role, "content": m.content} for m in MESSAGES]
    status, chat = post(server, "/v1/chat/completions", {**greedy, "messages": messages})
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": by_ids["choices"][0]["text"]}
    events = asyncio.run(_stream(server, "/v1/chat/completions", {**greedy, "messages": messages}))
    assert events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == chat["choices"][0][
        "message"]["content"]


def test_sampling_options(server, tokenizer):
    ids = tokenizer.encode_chat(MESSAGES)
    seeded = {"model": "base", "prompt": ids, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first, again = post(server, "/v1/completions", seeded)[1], post(server, "/v1/completions", seeded)[1]
    assert first["choices"][0]["text"] == again["choices"][0]["text"]  # same seed, run alone: same reply
    _, plain = post(server, "/v1/completions", {"model": "base", "prompt": ids, "max_tokens": 12, "temperature": 0})
    text = plain["choices"][0]["text"]
    stop = text.strip()[:3]
    _, stopped = post(server, "/v1/completions", {"model": "base", "prompt": ids, "max_tokens": 12, "temperature": 0,
                                                  "stop": stop})
    assert stopped["choices"][0]["text"] == text[:text.find(stop)] and stopped["choices"][0]["finish_reason"] == "stop"


def test_echo_scores_the_prompt_and_model_selects_the_adapter(server, tokenizer):
    ids = tokenizer.encode_chat(MESSAGES)
    _, greedy = post(server, "/v1/completions", {"model": "base", "prompt": ids, "max_tokens": 1, "temperature": 0,
                                                 "return_token_ids": True})
    best = greedy["choices"][0]["token_ids"][0]
    other = (best + 1000) % tokenizer.vocab_size

    def score(model: str, token: int) -> list:
        status, body = post(server, "/v1/completions", {"model": model, "prompt": ids + [token], "echo": True,
                                                        "logprobs": 1, "max_tokens": 0})
        assert status == 200, body
        values = body["choices"][0]["logprobs"]["token_logprobs"]
        assert len(values) == len(ids) + 1 and values[:-ECHO_LOGPROB_TOKENS] == [None] * (
            len(ids) + 1 - ECHO_LOGPROB_TOKENS)
        # Each value is one token's log-probability from one log-softmax: never above 0, on any CPU.
        assert all(v <= 0 for v in values[-ECHO_LOGPROB_TOKENS:]), values[-ECHO_LOGPROB_TOKENS:]
        return values

    score("base", best)  # puts the prompt's prefix in the prefix cache: both calls below compute alike
    base_best, base_other = score("base", best), score("base", other)
    assert base_best[-1] > base_other[-1]  # the greedy token is the likelier one
    # Same prefix, same computation (the last token is only a target): the same scores up to summation order.
    assert base_best[:-1] == pytest.approx(base_other[:-1], abs=1e-5)
    assert score("ghost", best)[-1] != pytest.approx(base_best[-1], abs=1e-4)  # the adapter changes the model


def test_a_characters_max_tokens_limit_caps_http_replies(server, tokenizer):
    """model=<character> gets that character's generation.max_tokens_limit, clamped as over gRPC."""
    ids = tokenizer.encode_chat(MESSAGES)
    for model, expected in (("terse", 3), ("base", 20)):
        status, body = post(server, "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 20,
                                                        "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == expected and body["choices"][0]["finish_reason"] == "length"


def test_http_and_grpc_share_the_range_and_stop_checks():
    """One implementation (server/requests.py), each edge's own names: `options.top_p` over gRPC,
    `top_p` (and param "top_p") over HTTP."""
    limits = RequestLimits()
    endpoint = OpenAiEndpoint(dialogue=None, config=ServerConfig(limits=limits))
    request = pb.TalkRequest(character_id="oracle", player_line="Hi")
    cases = [("temperature", 9.0), ("top_p", 0.0), ("repetition_penalty", 3.0), ("min_p", -0.5), ("stop", [""]),
             ("stop", ["x"] * 9), ("stop", ["y" * 65])]
    for name, value in cases:
        grpc_request = pb.TalkRequest()
        grpc_request.CopyFrom(request)
        if name == "stop":
            grpc_request.options.stop.extend(value)
        else:
            setattr(grpc_request.options, name, value)
        with pytest.raises(UserError) as grpc_error:
            parse_talk(grpc_request, limits)
        with pytest.raises(HttpError) as http_error:
            endpoint._sampling({name: value}, chat=False)
        assert str(grpc_error.value).startswith(f"options.{name}")
        assert http_error.value.message == str(grpc_error.value).removeprefix("options."), name
        assert (http_error.value.status, http_error.value.param) == (400, name)


BAD = [
    ({"prompt": "hi", "model": "nobody"}, 404, "model_not_found"),
    ({"prompt": "hi", "model": "broken"}, 400, "model_unavailable"),
    ({"prompt": []}, 400, None),
    ({"prompt": [1, 2, 10**9]}, 400, None),
    ({"prompt": "hi", "temperature": 9}, 400, None),
    ({"prompt": "hi", "top_p": 0}, 400, None),
    ({"prompt": "hi", "max_tokens": 10**6}, 400, None),
    ({"prompt": "hi", "n": 2}, 400, None),
    ({"prompt": "hi", "stop": [""]}, 400, None),
    ({"prompt": "hi", "seed": -1}, 400, None),
    ({"prompt": "hi", "echo": True, "max_tokens": 5}, 400, None),
    ({"prompt": "hi", "logprobs": 3}, 400, None),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[f"{s}-{sorted(b)[-1]}" for b, s, _ in BAD])
def test_errors_are_openai_shaped(server, body, status, code):
    got, reply = post(server, "/v1/completions", body)
    assert got == status, reply
    assert set(reply) == {"error"} and reply["error"]["message"] and reply["error"]["type"]
    if code:
        assert reply["error"]["code"] == code


def test_auth_paths_and_bad_json(server):
    async def go():
        async with aiohttp.ClientSession() as session:
            results = []
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                async with session.get(url(server, "/v1/models"), headers=headers) as r:
                    results.append((r.status, (await r.json())["error"]["type"]))
            async with session.post(url(server, "/v1/completions"), data=b"{not json", headers=AUTH) as r:
                results.append((r.status, (await r.json())["error"]["type"]))
            async with session.get(url(server, "/v1/nothing"), headers=AUTH) as r:
                results.append((r.status, (await r.json())["error"]["type"]))
            return results

    assert asyncio.run(go()) == [(401, "authentication_error")] * 3 + [(400, "invalid_request_error"),
                                                                         (404, "invalid_request_error")]
    status, reply = post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and "messages[0]" in reply["error"]["message"]


def test_queue_full_is_429_and_a_disconnect_cancels(server, tokenizer):
    """max_batch 1, max_waiting 1: two long replies fill the engine, the third gets 429; hanging up ends them."""
    ids = tokenizer.encode_chat(MESSAGES)
    long = {"model": "base", "prompt": ids, "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}

    async def go():
        async with NpcClient(server.address, auth_token=TOKEN) as client:
            session = aiohttp.ClientSession()
            held = [await session.post(url(server, "/v1/completions"), json=long, headers=AUTH)]
            await held[0].content.readline()  # the first one is generating, so the second waits
            held.append(await session.post(url(server, "/v1/completions"), json=long, headers=AUTH))
            assert [r.status for r in held] == [200, 200]
            deadline = time.time() + 10
            while (info := await client.server_info()).waiting_requests != 1 and time.time() < deadline:
                await asyncio.sleep(0.05)
            assert (info.active_sequences, info.waiting_requests) == (1, 1)
            status, refused = await _post(server, "/v1/completions", {**long, "stream": False})
            assert status == 429 and refused["error"]["code"] == "queue_full"
            for r in held:
                r.close()  # the client hangs up mid-reply
            await session.close()
            while ((info := await client.server_info()).active_sequences or info.waiting_requests) and (
                    time.time() < deadline):
                await asyncio.sleep(0.05)
            return info

    info = asyncio.run(go())
    assert info.active_sequences == 0 and info.waiting_requests == 0
    assert any(r.get("event") == "http reply cancelled by the client" for r in server.log_records())


def test_chat_with_a_character_is_that_characters_turn(server):
    """model=<character> on /v1/chat/completions runs the character's turn as gRPC Talk does: its persona
    and adapter, the messages as history, the emotion label; no server session is read or written."""
    line, earlier = "Can you fix my sword?", ("Hello there.", "Aye. What do you want?")
    greedy = {"temperature": 0, "max_tokens": 12}

    async def go():
        async with NpcClient(server.address, auth_token=TOKEN) as client:
            await client.import_session(pb.SessionState(format_version=1, session_id="http-chat", turns=[
                pb.Turn(character_id="blacksmith", player_line=earlier[0], npc_line=earlier[1])]))
            started, text, finished = await client.say("blacksmith", line, session_id="http-chat",
                                                       options=pb.GenerationOptions(**greedy))
            labels = {c.id: list(c.emotions) for c in await client.list_characters()}["blacksmith"]
            chat = [{"role": "user", "content": earlier[0]}, {"role": "assistant", "content": earlier[1]},
                    {"role": "user", "content": line}]
            status, body = await _post(server, "/v1/chat/completions", {"model": "blacksmith", "messages": chat,
                                                                         **greedy})
            _, situated = await _post(server, "/v1/chat/completions", {"model": "blacksmith", **greedy, "messages": [
                {"role": "system", "content": "It is raining hard."}, *chat]})
            streamed = await _stream(server, "/v1/chat/completions", {"model": "blacksmith", "messages": chat,
                                                                      **greedy})
            bad, refused = await _post(server, "/v1/chat/completions", {"model": "blacksmith", "messages": chat[:2]})
            turns = len((await client.export_session("http-chat")).turns)
            return started, text, finished, labels, status, body, situated, streamed, (bad, refused), turns

    started, text, finished, labels, status, body, situated, streamed, (bad, refused), turns = asyncio.run(go())
    assert started.history_turns == 1 and text
    assert status == 200 and body["object"] == "chat.completion", body
    choice = body["choices"][0]
    # The same prompt as Talk's (persona, knowledge, the earlier exchange, the line): the same token count.
    assert body["usage"]["prompt_tokens"] == started.prompt_tokens and choice["message"]["content"]
    assert choice["emotion"] in labels and finished.emotion in labels
    assert situated["usage"]["prompt_tokens"] > started.prompt_tokens  # the system message became the situation
    assert streamed[-1] == "[DONE]" and streamed[-2]["choices"][0]["emotion"] in labels
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1]) != ""
    assert bad == 400 and "messages" in refused["error"]["message"]  # the player's line must come last
    assert turns == 2  # the imported turn and Talk's own; HTTP wrote nothing


# --- function calling, response formats, a character's actions (issue 15) -------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add_numbers", "description": "Add two whole numbers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 100},
        "b": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Oslo today?"}]
# max_tokens bounds the test's time (a chat's default is the server's limit, 512).
CALLING = {"model": "base", "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
STOCK = {"stock": ["iron sword", "war axe", "shield"], "player_items": ["rusty dagger"]}


def matches(value, schema: dict) -> bool:
    """A small JSON-schema check: the keywords these tests' schemas use."""
    if "anyOf" in schema:
        return any(matches(value, s) for s in schema["anyOf"])
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return False
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
    elif kind in types and not isinstance(value, types[kind]):
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            return False
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if isinstance(value, list) and "items" in schema:
        return all(matches(v, schema["items"]) for v in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", ())):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(properties):
            return False
        return all(matches(v, properties[k]) for k, v in value.items() if k in properties)
    return True


def check_call(call: dict, allowed: dict) -> dict:
    """One entry of message.tool_calls: its shape, a tool of the request, arguments valid for that tool."""
    assert set(call) == {"id", "type", "function"} and call["type"] == "function", call
    assert call["id"].startswith("call_") and set(call["function"]) == {"name", "arguments"}
    assert call["function"]["name"] in allowed, call
    arguments = json.loads(call["function"]["arguments"])
    assert matches(arguments, allowed[call["function"]["name"]]), call
    return arguments


def without_ids(calls: list[dict]) -> list[dict]:
    """Calls as two requests can agree on them (each request numbers its own ids; a stream adds index)."""
    return [{k: v for k, v in call.items() if k not in ("id", "index")} for call in calls]


def test_schema_checker_sanity():
    """The checker above refuses what it should (so a passing test means something)."""
    assert matches({"city": "Oslo", "unit": "celsius"}, SCHEMAS["get_weather"])
    assert not matches({"city": "Oslo", "unit": "kelvin"}, SCHEMAS["get_weather"])
    assert not matches({"city": "Oslo"}, SCHEMAS["get_weather"])
    assert not matches({"a": 1, "b": 101}, SCHEMAS["add_numbers"])
    assert not matches({"a": 1, "b": 2, "c": 3}, SCHEMAS["add_numbers"])
    assert not matches({"a": True, "b": 2}, SCHEMAS["add_numbers"])


def test_tool_grammars_allow_exactly_the_calls(tokenizer):
    """The grammars tool_plan builds, run through llguidance offline: "required" is one call of a listed
    tool with valid arguments; a named choice, that tool only; "auto", text that does not open a call, or
    a call."""
    import llguidance

    from sidecar.server import openai_tools as ot

    lltok = llguidance.LLTokenizer(tokenizer.hf_json(), eos_token=list(tokenizer.eos_ids))

    def accepts(body: dict, text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, ot.tool_plan({"tools": TOOLS, **body}).grammar, log_level=0)
        return matcher.consume_tokens(tokenizer.encode_literal(text)) and matcher.is_accepting()

    weather = ot.render_call("get_weather", {"city": "Oslo", "unit": "celsius"})
    add = ot.render_call("add_numbers", {"a": 2, "b": 3})
    assert weather == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' \
                      "\n</tool_call>"
    assert ot.parse_call(weather) == ("get_weather", {"city": "Oslo", "unit": "celsius"})
    assert accepts({"tool_choice": "required"}, weather) and accepts({"tool_choice": "required"}, add)
    assert not accepts({"tool_choice": "required"}, "It is sunny.")
    assert not accepts({"tool_choice": "required"}, ot.render_call("get_weather", {"city": "Oslo", "unit": "K"}))
    assert not accepts({"tool_choice": "required"}, ot.render_call("add_numbers", {"a": 2, "b": 300}))
    named = {"tool_choice": {"type": "function", "function": {"name": "add_numbers"}}}
    assert accepts(named, add) and not accepts(named, weather)
    assert accepts({}, "It is sunny.\nTake a coat.") and accepts({}, weather) and accepts({}, "<b>hi</b>")
    assert not accepts({}, "<tool_call>\nIt is sunny.")
    assert ot.tool_plan({"tools": TOOLS, "tool_choice": "none"}) is None and ot.tool_plan({}) is None
    # "auto" with a response format: the answer that is not a call is JSON of that schema.
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    shaped = {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    assert accepts(shaped, '{"answer": "sunny"}') and accepts(shaped, weather) and not accepts(shaped, "sunny")


def test_auto_replies_split_into_text_or_one_call():
    """Under "auto", a reply that opens with <tool_call> is held back and sent as one call at the end;
    text streams as soon as it cannot be that opening; a call cut short comes back as text."""
    from sidecar.server.openai_http import _Part, _tool_parts

    async def run(pieces: list[str], reason: str = "stop") -> list:
        async def parts():
            for i, piece in enumerate(pieces):
                yield _Part(piece, (i,))
            yield _Part("".join(pieces), tuple(range(len(pieces))), True, reason)
        return [p async for p in _tool_parts(parts(), "req-1", auto=True)]

    call = ["<tool", "_call>\n", '{"name": "add_numbers", ', '"arguments": {"a": 1, "b": 2}}', "\n</tool_call>"]
    streamed, end = asyncio.run(run(call))
    expected = ({"index": 0, "id": "call_req-1_0", "type": "function",
                 "function": {"name": "add_numbers", "arguments": '{"a": 1, "b": 2}'}},)
    assert (streamed.text, streamed.token_ids, streamed.tool_calls) == ("", (0, 1, 2, 3, 4), expected)
    assert end.end and (end.text, end.reason, end.tool_calls) == ("", "tool_calls", expected)
    text = asyncio.run(run(["<", "b>", "bold", "</b>"]))
    assert [(p.text, p.token_ids) for p in text[:-1]] == [("<b>", (0, 1)), ("bold", (2,)), ("</b>", (3,))]
    assert text[-1].end and text[-1].text == "<b>bold</b>" and not text[-1].tool_calls
    cut = asyncio.run(run(call[:3], reason="length"))
    assert [p.text for p in cut] == ["".join(call[:3])] * 2 and cut[-1].reason == "length" and not cut[-1].tool_calls


def test_base_tool_choice_required_and_named_make_one_valid_call(server):
    status, body = post(server, "/v1/chat/completions", {**CALLING, "tool_choice": "required"})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    [call] = choice["message"]["tool_calls"]
    check_call(call, SCHEMAS)
    assert call["id"] == f"call_{body['id'].removeprefix('chatcmpl-')}_0"

    # Without max_tokens a chat reply is bounded by the server's limit, as OpenAI's is by the context
    # (16, the completions default, would cut the call in half).
    unbounded = {k: v for k, v in CALLING.items() if k != "max_tokens"}
    status, body = post(server, "/v1/chat/completions", {**unbounded, "tool_choice": "required"})
    assert status == 200 and body["choices"][0]["finish_reason"] == "tool_calls", body
    check_call(body["choices"][0]["message"]["tool_calls"][0], SCHEMAS)

    named = {"type": "function", "function": {"name": "add_numbers"}}
    status, body = post(server, "/v1/chat/completions", {**CALLING, "tool_choice": named, "messages": [
        {"role": "user", "content": "What is 2 plus 3?"}]})
    assert status == 200, body
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "add_numbers" and body["choices"][0]["finish_reason"] == "tool_calls"
    check_call(call, {"add_numbers": SCHEMAS["add_numbers"]})


def test_base_tool_choice_auto_and_none(server):
    plain = {k: v for k, v in CALLING.items() if k != "tools"}
    _, without = post(server, "/v1/chat/completions", plain)
    for body in (CALLING, {**CALLING, "tool_choice": "auto", "temperature": 1.0, "seed": 3}):
        status, reply = post(server, "/v1/chat/completions", body)
        assert status == 200, reply
        choice = reply["choices"][0]
        if "tool_calls" in choice["message"]:  # the model called...
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
            [call] = choice["message"]["tool_calls"]
            check_call(call, SCHEMAS)
        else:  # ...or answered
            assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
            assert not choice["message"]["content"].startswith("<tool_call>")
        # The tools are shown to the model in the system message.
        assert reply["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
    status, none = post(server, "/v1/chat/completions", {**CALLING, "tool_choice": "none"})
    assert status == 200 and "tool_calls" not in none["choices"][0]["message"], none
    assert none["choices"][0]["finish_reason"] in ("stop", "length")
    # "none": no tools in the prompt either, so the same reply as without them.
    assert none["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    assert none["choices"][0]["message"] == without["choices"][0]["message"]


def test_a_tool_call_round_trip(server):
    """The assistant's call and the tool's result go back as OpenAI clients send them."""
    status, first = post(server, "/v1/chat/completions", {**CALLING, "tool_choice": "required"})
    assert status == 200, first
    message = first["choices"][0]["message"]
    call = message["tool_calls"][0]
    history = [*ASK, message, {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "clear", "c": 12}'}]
    status, second = post(server, "/v1/chat/completions", {**CALLING, "messages": history})
    assert status == 200, second
    answer = second["choices"][0]["message"]
    assert isinstance(answer["content"], str) or check_call(answer["tool_calls"][0], SCHEMAS)
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]  # the call and its result


def test_response_format_json_schema(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    body = {"model": "base", "max_tokens": 60, "temperature": 0,
            "messages": [{"role": "user", "content": "Describe a person as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}
    status, reply = post(server, "/v1/chat/completions", body)
    assert status == 200, reply
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert matches(json.loads(choice["message"]["content"]), schema), choice
    # With tools ("auto"): a call, or an answer in that format.
    status, reply = post(server, "/v1/chat/completions", {**body, "tools": TOOLS})
    assert status == 200, reply
    message = reply["choices"][0]["message"]
    if "tool_calls" in message:
        check_call(message["tool_calls"][0], SCHEMAS)
    else:
        assert matches(json.loads(message["content"]), schema), message


def test_streamed_tool_calls(server):
    """A call streams as OpenAI streams one: a delta with tool_calls (index, id, type, function), then the
    last chunk's finish_reason "tool_calls"; the same call as the whole reply's (greedy)."""
    body = {**CALLING, "tool_choice": "required"}
    _, whole = post(server, "/v1/chat/completions", body)
    events = asyncio.run(_stream(server, "/v1/chat/completions", body))
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert chunks[0]["delta"]["role"] == "assistant"
    deltas = [c["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["delta"]]
    assert len(deltas) == 1 and deltas[0][0]["index"] == 0
    assert deltas[0][0]["id"] == f"call_{events[0]['id'].removeprefix('chatcmpl-')}_0"
    assert without_ids(deltas[0]) == without_ids(whole["choices"][0]["message"]["tool_calls"])
    assert not "".join(c["delta"].get("content") or "" for c in chunks)
    assert [c["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    # "auto": the same shape when it calls; otherwise content that adds up to the whole reply's.
    auto = {**CALLING, "tool_choice": "auto"}
    _, whole = post(server, "/v1/chat/completions", auto)
    chunks = [e["choices"][0] for e in asyncio.run(_stream(server, "/v1/chat/completions", auto))[:-1]]
    message = whole["choices"][0]["message"]
    streamed_calls = [call for c in chunks for call in c["delta"].get("tool_calls", ())]
    assert without_ids(streamed_calls) == without_ids(message.get("tool_calls", []))
    assert "".join(c["delta"].get("content") or "" for c in chunks) == (message["content"] or "")
    assert chunks[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]


def _character_calls(choice: dict, allowed: set[str]) -> list[dict]:
    """A character reply's tool_calls, checked against the blacksmith's actions and STOCK."""
    calls = choice["message"].get("tool_calls", [])
    assert (choice["finish_reason"] == "tool_calls") == bool(calls), choice
    schemas = {"sell_item": {"type": "object", "properties": {"item": {"enum": STOCK["stock"]}},
                             "required": ["item"], "additionalProperties": False},
               "repair_item": {"type": "object", "properties": {"item": {"enum": STOCK["player_items"]}},
                               "required": ["item"], "additionalProperties": False},
               "buy_item": {"type": "object", "properties": {
                   "item": {"enum": STOCK["player_items"]}, "price": {"type": "integer", "minimum": 1, "maximum": 100}},
                   "required": ["item", "price"], "additionalProperties": False}}
    for call in calls:
        check_call(call, {name: schemas[name] for name in allowed})
    return calls


def test_a_characters_actions_are_tool_calls(server):
    """model=<character> on the real model: `tools` picks which of its actions it may take, `entities` gives
    the game's lists; any actions come back as tool_calls (allowed ones, arguments from the entities), the
    emotion stays an extra field. (Whether it acts is the model's choice: the checked-in adapters were
    trained before actions, so they seldom do; test_character_tool_calls_shape scripts a turn that does.)"""
    line = [{"role": "user", "content": "I'll take the iron sword. Here are forty gold."}]
    sell = {"model": "blacksmith", "messages": line, "entities": STOCK, "max_tokens": 40, "temperature": 1.0,
            "tools": [{"type": "function", "function": {"name": "sell_item"}}]}
    labels = {"gruff", "proud", "annoyed", "amused", "sad"}
    for seed in range(3):
        status, reply = post(server, "/v1/chat/completions", {**sell, "seed": seed})
        assert status == 200, reply
        choice = reply["choices"][0]
        assert choice["message"]["content"] and choice["emotion"] in labels
        calls = _character_calls(choice, {"sell_item"})
        assert [c["id"] for c in calls] == [f"call_{reply['id'].removeprefix('chatcmpl-')}_{i}"
                                            for i in range(len(calls))]
    # Streamed: the text, then one delta per action (index counting up), then the last chunk; the same
    # reply as the whole one (same seed, run alone).
    events = asyncio.run(_stream(server, "/v1/chat/completions", {**sell, "seed": 0}))
    _, whole = post(server, "/v1/chat/completions", {**sell, "seed": 0})
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    streamed = [call for c in chunks for call in c["delta"].get("tool_calls", ())]
    assert [c["index"] for c in streamed] == list(range(len(streamed)))
    assert without_ids(streamed) == without_ids(whole["choices"][0]["message"].get("tool_calls", []))
    assert "".join(c["delta"].get("content") or "" for c in chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["emotion"] in labels and chunks[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    # tool_choice "none": the character takes no action.
    status, reply = post(server, "/v1/chat/completions", {**sell, "tool_choice": "none", "seed": 0})
    assert status == 200 and "tool_calls" not in reply["choices"][0]["message"], reply
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


class ScriptedDialogue:
    """Stands in for Dialogue behind OpenAiEndpoint: serves one character, records each TalkInput, and
    answers every turn with the same events (a reply that takes two actions)."""

    ACTIONS = (Action("sell_item", (("item", "iron sword"),)),
               Action("buy_item", (("item", "rusty dagger"), ("price", 3))))

    def __init__(self, character):
        self.character, self.accepting, self.talks = character, True, []

    def serving(self, character_id: str):
        return self.character, None

    async def talk(self, talk, arrival=None):
        self.talks.append(talk)
        yield TurnStarted("req-7", "v1", prompt_tokens=10, cached_prompt_tokens=0, history_turns=0)
        yield TurnEmotion("gruff")
        for piece in ("Forty gold, ", "lad."):
            yield TurnDelta(piece)
        for action in self.ACTIONS:
            yield TurnAction(action)
        yield TurnFinished("stop", "Forty gold, lad.", (1, 2, 3), 10, 3, 0, 1.0, 2.0, 3.0, "gruff", self.ACTIONS)


def test_character_tool_calls_shape():
    """A character turn's actions as OpenAI tool_calls, whole and streamed, and the TalkInput the request
    makes: entities, allowed actions from `tools` / `tool_choice`, the history's calls and emotions."""
    dialogue = ScriptedDialogue(load_character(REPO / "characters" / "blacksmith"))
    endpoint = OpenAiEndpoint(dialogue, ServerConfig())
    sell_and_buy = [{"type": "function", "function": {"name": "sell_item"}},
                    {"type": "function", "function": {"name": "buy_item", "parameters": {"ignored": True}}}]
    history = [{"role": "user", "content": "The sword."},
               {"role": "assistant", "content": "Forty.", "emotion": "gruff", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "sell_item",
                                                                     "arguments": '{"item": "iron sword"}'}}]},
               {"role": "user", "content": "And buy my dagger?", "name": "Ari"}]
    body = {"model": "blacksmith", "messages": history, "entities": STOCK, "tools": sell_and_buy}

    async def go():
        address = await endpoint.start("127.0.0.1:0")
        try:
            async with aiohttp.ClientSession() as session:
                async def call(extra: dict, stream: bool = False):
                    async with session.post(f"http://{address}/v1/chat/completions",
                                            json={**body, **extra, "stream": stream}) as r:
                        if not stream:
                            return await r.json()
                        return [json.loads(line[6:]) if line[6:].strip() != b"[DONE]" else "[DONE]"
                                async for line in r.content if line.startswith(b"data: ")]
                return (await call({}), await call({}, stream=True), await call({"tool_choice": "none"}),
                        await call({"tools": None}))
        finally:
            await endpoint.stop()

    whole, events, _, _ = asyncio.run(go())
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["emotion"] == "gruff"
    assert choice["message"] == {"role": "assistant", "content": "Forty gold, lad.", "tool_calls": [
        {"id": "call_req-7_0", "type": "function", "function": {"name": "sell_item",
                                                                "arguments": '{"item": "iron sword"}'}},
        {"id": "call_req-7_1", "type": "function", "function": {"name": "buy_item",
                                                                "arguments": '{"item": "rusty dagger", "price": 3}'}}]}
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": "Forty gold, "} and deltas[1] == {"content": "lad."}
    assert [d["tool_calls"] for d in deltas[2:4]] == [
        [{"index": i, **call}] for i, call in enumerate(choice["message"]["tool_calls"])]
    last = events[-2]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "tool_calls" and last["emotion"] == "gruff"

    talk, _, none, every = dialogue.talks
    assert talk.entities == {name: tuple(values) for name, values in STOCK.items()}
    assert (talk.allowed_actions, none.allowed_actions, every.allowed_actions) == (("sell_item", "buy_item"), (), None)
    assert talk.player_name == "Ari" and talk.player_line == "And buy my dagger?"
    [earlier] = talk.history
    assert (earlier.player_line, earlier.npc_line, earlier.emotion) == ("The sword.", "Forty.", "gruff")
    assert earlier.actions == (Action("sell_item", (("item", "iron sword"),)),)


def test_a_characters_history_keeps_its_actions(server):
    """An earlier reply's tool_calls and emotion go back into the prompt as the model wrote them."""
    earlier = {"role": "assistant", "content": "Forty gold, lad.", "emotion": "gruff", "tool_calls": [
        {"id": "call_x_0", "type": "function", "function": {"name": "sell_item",
                                                            "arguments": '{"item": "iron sword"}'}}]}
    base = {"model": "blacksmith", "entities": STOCK, "max_tokens": 8, "temperature": 0}
    turn = [{"role": "user", "content": "The sword, please."}, earlier, {"role": "user", "content": "Thanks!"}]
    status, with_call = post(server, "/v1/chat/completions", {**base, "messages": turn})
    assert status == 200, with_call
    plain = [*turn[:1], {"role": "assistant", "content": "Forty gold, lad."}, turn[2]]
    _, without = post(server, "/v1/chat/completions", {**base, "messages": plain})
    assert with_call["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


CHAT_BAD = [
    # (body over {"model": "base", "messages": ASK}, param)
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "no spaces"}}]}, "tools[1].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "when": {"type": "string", "format": "someday"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "structured_outputs": {"grammar": 'start: "x"'}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"entities": {"stock": ["x"]}}, "entities"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages[0]"),
    # A character's turn
    ({"model": "blacksmith", "tools": [{"type": "function", "function": {"name": "sell_item"}},
                                       {"type": "function", "function": {"name": "fly"}}]},
     "tools[1].function.name"),
    ({"model": "blacksmith", "tool_choice": "required"}, "tool_choice"),
    ({"model": "blacksmith", "entities": {"stock": "iron sword"}}, "entities"),
    ({"model": "blacksmith", "entities": {"Stock": ["iron sword"]}}, "entities"),
    ({"model": "blacksmith", "entities": {"stock": ["iron sword", "iron sword"]}}, "entities"),
    ({"model": "blacksmith", "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": "blacksmith", "messages": [{"role": "tool", "content": "x"}, *ASK]}, "messages[0]"),
    ({"model": "blacksmith", "messages": [{"role": "assistant", "content": "Hm.", "tool_calls": [
        {"type": "function", "function": {"name": "fly", "arguments": "{}"}}]}, *ASK]}, "messages[0]"),
]


@pytest.mark.parametrize("body,param", CHAT_BAD, ids=[p for _, p in CHAT_BAD])
def test_tools_and_formats_bad_input_is_400_naming_the_param(server, body, param):
    status, reply = post(server, "/v1/chat/completions", {"model": "base", "messages": ASK, "max_tokens": 4, **body})
    assert status == 400, reply
    assert reply["error"]["param"] == param, reply
    assert reply["error"]["message"].startswith(param), reply
