"""Remote backend: the model runs on an OpenAI-compatible server elsewhere; the sidecar stays the
gRPC front (characters, prompts, sessions, limits) for the game. `npc serve --backend remote
--remote-url URL` serves the same contract as the in-process engine.

What stays ours, so replies mean the same on either side:
- the prompt: built and budgeted with OUR tokenizer (from --model, which must be the remote's
  model) and sent as a list of token ids to POST /v1/completions. Nothing is re-tokenized on
  the remote, so the prompt is exactly the in-process one and player text stays literal (a
  typed `<|im_end|>` can never become a control token);
- detokenizing and stop strings: when the remote streams token ids (`return_token_ids`, vLLM's
  name; our own endpoint sends them too) they go through our detokenizer and stop-string filter,
  as in the engine; otherwise its text chunks do. Stop strings are matched here (exact on text)
  and never sent; when one ends the reply, the HTTP response is closed, which stops the remote.
  When ours ends it at eos or max_tokens, where the remote ends too, the stream is read on (up
  to USAGE_WAIT_S) to the remote's usage chunk (`stream_options.include_usage`), so Finished
  reports its `prompt_tokens_details.cached_tokens`. Started cannot: the remote sends that count
  only after the reply's last token (vLLM too), so Started.cached_prompt_tokens stays 0.

Each character maps to a model name on the remote: its id when it has an adapter (override with
--remote-adapter ID=NAME), else the base model (--remote-model, default: the first model that
GET /v1/models lists). The remote serves its own copy of the adapters: with vLLM that is
`--enable-lora --lora-modules ID=PATH` (or runtime loading), named by character id; a
character's lora_scale and its adapter version are the remote's business there. Adapters are
still validated here, against the model --model names, so a broken one fails the same way.

Errors: HTTP 429 -> QueueFull (RESOURCE_EXHAUSTED); refused connections, timeouts, 5xx and a
stream cut short -> BackendUnavailable (UNAVAILABLE); 404 (no such model / adapter) and other
4xx -> an error event (FAILED_PRECONDITION, with the remote's message). Cancelling a request
closes its HTTP response. Emotion labels (`choices`) are scored with one request per candidate:
`echo: true, logprobs: 1, max_tokens: 0` on prompt + candidate, summing the candidate's
`token_logprobs`.

What was run, and what was not
------------------------------
Run here: against a second `npc serve --openai-listen` process (sidecar/server/openai_http.py)
on the same characters, tests/test_backend_remote.py: dialogue over the remote-backed gRPC
socket, greedy replies equal to the serving process's own, cancel stopping the remote, 429,
unreachable remote, emotion scoring.
Run here against a server we did not write: llama-cpp-python 0.3.36's (`python -m llama_cpp.server`,
the `peers` extra) on the same GGUF, 2026-12-06. It differs where this module depends on the remote:
- prompts: `prompt` must be text (or a list of texts); a list of token ids is refused with HTTP 500
  (a pydantic validation error). `connect()` now sends one 1-token request at start, so such a
  remote is named then, with its message (tests/test_backend_remote.py); nothing else was tried.
- echo log-probabilities (emotion scoring): returned, but one position late: for "Hello, my name is"
  the value given for " name" (-21.1) is what follows " name" (its top_logprobs list " is" at -0.01).
- adapters: one model (and at most one LoRA, `lora_path`, fixed at load) per model entry; several
  entries are several copies of the weights; no per-request adapter within one batch.
- no token ids in the stream (the text path would apply), and its grammar field is `grammar` (GBNF),
  not vLLM's `structured_outputs` (Lark), so replies would not be constrained.
Not run: vLLM, trtllm-serve, llama.cpp's own C++ llama-server (none can be installed here). What this
module assumes of them was read, not tried: vLLM's CompletionRequest (vllm/entrypoints/openai/
completion/protocol.py) takes `prompt` as a list of token ids, `echo` with `max_tokens: 0` as
scoring without generating (prompt logprobs = `logprobs`), `return_token_ids`, `top_k`,
`repetition_penalty`, `ignore_eos`, `stream_options.include_usage`; unknown fields are logged and
ignored, not refused (engine/protocol.py, OpenAIBaseModel extra="allow"); its model cards carry
`max_model_len`; it selects a LoRA adapter by `model` (docs.vllm.ai, features/lora).
llama.cpp's server README (tools/server) documents token-id prompts for /completion and says
/v1/completions takes the same options; it lists one model, does not select adapters by `model`
and, as far as read, streams no token ids (the text path then applies). trtllm-serve: not
checked beyond being OpenAI-compatible.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import aiohttp
import structlog

from sidecar.backends.live import Live, LiveRequests
from sidecar.backends.openai_wire import (
    RemoteRefused,
    ReplyEvents,
    candidate_logprobs,
    completion_body,
    refusal,
    sse_data,
)
from sidecar.config import EngineConfig, ModelConfig, RemoteConfig
from sidecar.engine.api import (
    AdapterRef,
    BackendUnavailable,
    Engine,
    EngineEvent,
    EngineStats,
    ModelInfo,
    QueueFull,
    RequestStream,
    SamplingParams,
    Timings,
)
from sidecar.engine.output import RequestOutput, engine_reason
from sidecar.engine.tokenizer import Tokenizer
from sidecar.errors import UserError

__all__ = ["RemoteEngine", "read_base"]

log = structlog.get_logger(__name__)

# The remote's usage chunk follows its last token at once; waiting for it, after ours ended a reply,
# delays Finished by that much at most (the bound matters only for a remote that stays silent).
USAGE_WAIT_S = 0.5


def read_base(path: Path, device: str = "cpu") -> ModelInfo:
    """Tokenizer and model shape from --model (a GGUF file is memory-mapped, a folder's weights are not
    read). The weights are the remote's, in a form it does not report."""
    path = Path(path)
    if path.is_dir():
        from sidecar.model.hf_folder import read_hf_metadata

        metadata = read_hf_metadata(path)
        return ModelInfo(path, "", device, Tokenizer(metadata), metadata.config)
    from sidecar.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    return ModelInfo(path, "", device, Tokenizer(checkpoint), checkpoint.config)


# --- the engine -------------------------------------------------------------------------------


class RemoteEngine(Engine):
    """The Engine protocol over an OpenAI-compatible server: one asyncio task per request, on the
    server's event loop. From `config`: max_batch and max_waiting bound the requests in flight
    (beyond them, QueueFull here, before the remote is asked), max_seq_len the prompt budget
    (lowered to the remote's max_model_len when it reports one)."""

    name = "remote"
    constrained_decoding = True  # the grammar goes to the remote (openai_wire.completion_body)
    contrast_decoding = False  # no OpenAI field for a second prompt: SamplingParams.contrast is refused (live.py)

    def __init__(self, model: ModelInfo, config: EngineConfig, remote: RemoteConfig, session: aiohttp.ClientSession,
                 base_model: str, listed: tuple[str, ...]):
        self.model, self.config, self.remote, self.session = model, config, remote, session
        self.base_model, self.listed = base_model, listed
        self.adapter_names = dict(remote.adapter_names)
        self._url = remote.base_url + "/v1/completions"
        self._in_flight = LiveRequests(config, "remote")

    @classmethod
    async def connect(cls, model_config: ModelConfig, config: EngineConfig, remote: RemoteConfig) -> RemoteEngine:
        """Reads our tokenizer, then asks the remote which models it serves; UserError if that fails."""
        base = await asyncio.to_thread(read_base, model_config.path, model_config.device)
        headers = {"Authorization": f"Bearer {remote.api_key}"} if remote.api_key else {}
        session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=0),  # our own queue limit bounds connections
            timeout=aiohttp.ClientTimeout(total=None, connect=remote.connect_timeout_s,
                                          sock_read=remote.read_timeout_s))
        try:
            cards = await _list_models(session, remote)
            names = tuple(str(card.get("id")) for card in cards)
            if remote.model is not None and remote.model not in names:
                raise UserError(f"--remote-model {remote.model!r}: {remote.base_url} does not serve it; it lists "
                                f"{', '.join(names[:20])}")
            base_model = remote.model or names[0]
            card = cards[names.index(base_model)]
            limit = card.get("max_model_len")
            if isinstance(limit, int) and 1 < limit < config.max_seq_len:
                config = replace(config, max_seq_len=limit)  # prompts are budgeted to what the remote holds
            await _check_token_prompts(session, remote, base_model, base.tokenizer.encode_literal("Hi"))
        except BaseException:
            await session.close()
            raise
        log.info("remote backend", url=remote.base_url, base_model=base_model, models=list(names[:20]),
                 tokenizer=str(base.path), context_tokens=config.max_seq_len)
        return cls(base, config, remote, session, base_model, names)

    def model_for(self, adapter: AdapterRef | None) -> str:
        return self.base_model if adapter is None else self.adapter_names.get(adapter.name, adapter.name)

    def missing_adapters(self, names: Sequence[str]) -> list[str]:
        """Remote model names, for these characters' adapters, that the remote did not list at start."""
        return [name for name in (self.adapter_names.get(c, c) for c in names) if name not in self.listed]

    # --- requests -----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path, version: str, scale: float = 1.0) -> AdapterRef:
        """Validated here against --model's shape, so a broken adapter fails as on the torch backend; the
        remote serves its own copy under the character's name (the module docstring)."""
        from sidecar.engine.adapters import read_adapter  # torch, only when a character has an adapter

        return read_adapter(self.model.shape, self.config.max_rank, name, path, version, scale)

    def submit(self, prompt_ids: Sequence[int], adapter: AdapterRef | None, sampling: SamplingParams, *,
               request_id: str | None = None, choices: Sequence[Sequence[int]] | None = None,
               timings: Timings | None = None, background: bool = False) -> RequestStream:
        """Queues a request; raises QueueFull or UserError as AsyncEngine.submit does (engine/admission.py).
        The stream may also raise QueueFull / BackendUnavailable: the remote's own refusals come later."""
        model = self.model_for(adapter)
        return self._in_flight.submit(
            prompt_ids, choices, sampling, request_id, timings, self.config.max_seq_len,
            self.model.shape.vocab_size,
            generate=lambda live, prompt, max_tokens: self._generate(live, prompt, model, sampling, max_tokens),
            score=lambda live, prompt, candidates: self._score(live, prompt, model, candidates), constrained=True)

    def cancel(self, request_id: str) -> bool:
        return self._in_flight.cancel(request_id)

    def queue_full(self) -> bool:
        """Whether a reply submitted now would be refused before the remote is asked (submit() decides)."""
        return self._in_flight.queue_full()

    async def _generate(self, live: Live, prompt: list[int], model: str, sampling: SamplingParams,
                        max_tokens: int) -> None:
        reply = ReplyEvents(live.request_id, len(prompt), sampling, max_tokens, self.model.tokenizer, live.timings)
        response: aiohttp.ClientResponse | None = None
        complete = False  # the body was read to its end: the connection can be reused
        finished: EngineEvent | None = None  # held back until the remote's usage is read (or not coming)
        try:
            response = await self.session.post(self._url, json=completion_body(prompt, model, sampling, max_tokens))
            if response.status != 200:
                raise await refusal(response, model)
            live.emit(reply.started())
            chunks = sse_data(response.content)
            async for data in chunks:
                finished = _emit_all_but_finished(live, reply.chunk(data))
                if finished is None and reply.reported is not None and reply.remote_usage:  # the remote's last chunk
                    finished = _emit_all_but_finished(live, reply.finish(engine_reason(reply.reported)))
                if finished is not None:
                    break  # ended by ours (stop string, eos, max_tokens) or by the remote
            else:  # [DONE], or the end of the body, without a usage chunk
                complete = True
                if reply.reported is None:
                    raise BackendUnavailable("the remote ended the reply without a finish reason")
                finished = _emit_all_but_finished(live, reply.finish(engine_reason(reply.reported)))
            if not complete and reply.remote_ends_too:
                complete = await _read_usage(chunks, reply)
            if finished is not None:
                live.emit(reply.counted(finished))
        except asyncio.CancelledError:  # the client left, or the shutdown's grace period is over
            for event in [reply.counted(finished)] if finished is not None else reply.finish("cancelled"):
                live.emit(event)  # a reply whose text had ended keeps its reason
        except (QueueFull, BackendUnavailable) as e:
            live.fail(e)
        except RemoteRefused as e:
            live.emit(reply.error(str(e)))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            live.fail(self._unreachable(e))
        except Exception as e:
            log.warning("remote request failed", request_id=live.request_id, error=f"{type(e).__name__}: {e}")
            live.emit(reply.error(f"remote backend: {type(e).__name__}: {e}", internal=True))
        finally:
            if response is not None:
                # Closing a response that is still streaming drops the connection: the remote
                # sees the client leave and stops the sequence (our own endpoint cancels it).
                if complete:
                    response.release()
                else:
                    response.close()

    async def _score(self, live: Live, prompt: list[int], model: str, choices: list[list[int]]) -> None:
        async def one(candidate: list[int]) -> list[float]:
            body = {"model": model, "prompt": prompt + candidate, "max_tokens": 0, "echo": True, "logprobs": 1,
                    "temperature": 0.0}
            async with self.session.post(self._url, json=body) as r:
                if r.status != 200:
                    raise await refusal(r, model)
                return candidate_logprobs(await r.json(content_type=None), len(prompt), candidate)

        out = RequestOutput(live.request_id, len(prompt), SamplingParams(max_tokens=1), 1,
                            self.model.tokenizer.detokenizer(), (), live.timings)
        try:
            scores = await asyncio.gather(*(one(c) for c in choices))
            live.emit(out.started())
            live.emit(out.choice(scores))
        except asyncio.CancelledError:
            for event in out.cancel():
                live.emit(event)
        except (QueueFull, BackendUnavailable) as e:
            live.fail(e)
        except RemoteRefused as e:
            live.emit(out.error(str(e)))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            live.fail(self._unreachable(e))

    def _unreachable(self, e: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"the remote model server at {self.remote.base_url} is unreachable or stopped "
                                  f"answering ({type(e).__name__}: {e})")

    # --- control ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Replies in flight beyond max_batch count as waiting; adapters and caches are the remote's."""
        return EngineStats(**self._in_flight.counts())

    async def shutdown(self, cancel_running: bool = True) -> None:
        await self._in_flight.shutdown(cancel_running)
        await self.session.close()


def _emit_all_but_finished(live: Live, events: list[EngineEvent]) -> EngineEvent | None:
    """Emits a chunk's events, except the finished one, which it returns: it waits for the remote's usage."""
    finished = None
    for event in events:
        if event.kind == "finished":
            finished = event
        else:
            live.emit(event)
    return finished


async def _read_usage(chunks: AsyncIterator[dict], reply: ReplyEvents) -> bool:
    """Reads on, after ours ended a reply where the remote ends it too, to the remote's usage chunk (its
    cached_tokens), for at most USAGE_WAIT_S; gives up as soon as the remote goes on generating. True when
    the body was read to its end."""
    try:
        async with asyncio.timeout(USAGE_WAIT_S):
            async for data in chunks:
                reply.chunk(data)
                if reply.outran:
                    return False
            return True
    except (TimeoutError, RuntimeError, BackendUnavailable, aiohttp.ClientError, OSError):
        return False  # the reply itself is complete: only the count is missing


async def _check_token_prompts(session: aiohttp.ClientSession, remote: RemoteConfig, model: str,
                               prompt: list[int]) -> None:
    """One token generated from a prompt of token ids, at start: a remote that takes only text
    (llama-cpp-python's server answers 500 with a validation error) is named then, not at every turn."""
    url = remote.base_url + "/v1/completions"
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    try:
        async with session.post(url, json=body) as r:
            if r.status in (200, 429):
                return  # it takes token ids (429: busy, and alive)
            problem = await refusal(r, model)
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise UserError(f"--remote-url: POST {url} failed ({type(e).__name__}: {e})") from None
    raise UserError(f"--remote-url: {url} failed a one-token request whose prompt is token ids ({problem}). The "
                    "remote backend sends token ids so that the prompt is exactly the sidecar's and player text "
                    "stays literal: serve the model with vLLM, llama.cpp's llama-server or `npc serve "
                    "--openai-listen`")


async def _list_models(session: aiohttp.ClientSession, remote: RemoteConfig) -> list[dict]:
    url = remote.base_url + "/v1/models"
    try:
        async with session.get(url) as r:
            if r.status in (401, 403):
                raise UserError(f"--remote-api-key: {url} refused it (HTTP {r.status})")
            if r.status != 200:
                raise UserError(f"--remote-url: GET {url} answered HTTP {r.status}; is it an OpenAI-compatible server?")
            data = await r.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
        raise UserError(f"--remote-url: cannot reach {url} ({type(e).__name__}: {e})") from None
    cards = data.get("data") if isinstance(data, dict) else None
    if not isinstance(cards, list) or not cards or not all(isinstance(c, dict) and c.get("id") for c in cards):
        raise UserError(f"--remote-url: GET {url} listed no models")
    return cards
