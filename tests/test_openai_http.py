"""`npc serve --openai-listen`: the OpenAI-compatible HTTP endpoint over a real socket, on the embedded model."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from sidecar.client import NpcClient
from sidecar.config import RequestLimits, ServerConfig
from sidecar.engine.tokenizer import ChatMessage
from sidecar.errors import UserError
from sidecar.model.random_adapter import write_random_adapter
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.server.openai_http import ECHO_LOGPROB_TOKENS, HttpError, OpenAiEndpoint
from sidecar.server.requests import parse_talk
from tests.sidecar_process import SidecarProcess, copy_characters, write_character

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
    cases = [("temperature", 9.0), ("top_p", 0.0), ("repetition_penalty", 3.0), ("stop", [""]),
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
