"""TensorRT-LLM backend: the base model and the characters' LoRA adapters served by NVIDIA's
TensorRT-LLM (its `LLM` API, default PyTorch backend) instead of our torch engine, behind the
`Engine` protocol (engine/api.py).

What stays ours, so replies mean the same on either backend:
- the tokenizer (read from the model folder): prompts are built, budgeted and passed as token
  ids, never text, so player text stays literal; TensorRT-LLM's own tokenizer is never loaded;
- detokenizing (never half a UTF-8 character) and stop strings (`StopStringFilter`, exact on
  text): TensorRT-LLM's `stop` matches token sequences, which misses a stop string that another
  tokenization of the same text spells differently, or that starts inside a token. When our
  filter ends a reply, the TensorRT-LLM request is aborted (at most a step of extra decoding);
- adapters: each validated adapter version is written to a private PEFT folder in the one form
  TensorRT-LLM's loader reads unambiguously (one rank, lora_alpha = r, the character's
  lora_scale folded into B), under an int id that is new for every (character, version, scale).

What was run, and what was not
-------------------------------
Run here (CPU only; tensorrt_llm not installed, no GPU): tests/test_backend_tensorrt_llm.py.
It covers LoraIds, sampling_kwargs, lora_config_kwargs, write_peft_snapshot (read back by our
own PEFT loader), continuation_logprobs, RequestOutput and stream_events on hand-made output
objects, read_model_folder, the missing-package / no-GPU errors, and TensorRtLlmEngine's request
flow (stream, stop string, cancel, choices, adapter error, queue limit, stats, shutdown) against
a fake `LLM` object shaped like the documented API.

Never run: anything that imports tensorrt_llm, on any GPU. What this module assumes of TensorRT-LLM is
read from its documentation and source (NVIDIA/TensorRT-LLM: tensorrt_llm/llmapi/llm.py,
sampling_params.py, executor/request.py, executor/result.py, executor/base_worker.py,
lora_manager.py, _torch/peft/lora/config.py, _torch/pyexecutor/_util.py; docs features/lora.html)
and is unverified, in particular: LoRA without `lora_dir` given explicit `lora_target_modules`;
`skip_tokenizer_init=True` with token-id prompts; greedy as `top_k=1`; `return_context_logits`
on the PyTorch backend, and which rows it returns under KV-cache block reuse; `abort()` ending a
streamed request with finish_reason "cancelled"; repetition_penalty on the PyTorch sampler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import random
import shutil
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog
import torch

from sidecar.backends.live import Live, LiveRequests
from sidecar.backends.trt_adapters import (
    AdapterSnapshots,
    LoraIds,
    lora_config_kwargs,
    write_peft_snapshot,
)
from sidecar.config import EngineConfig
from sidecar.engine.adapters import read_adapter
from sidecar.engine.api import (
    AdapterRef,
    Engine,
    EngineEvent,
    EngineStats,
    ModelInfo,
    RequestStream,
    SamplingParams,
    Timings,
)
from sidecar.engine.output import RequestOutput
from sidecar.engine.tokenizer import Tokenizer
from sidecar.errors import UserError
from sidecar.model.config import LlamaConfig
from sidecar.model.hf_folder import read_hf_metadata

__all__ = ["AdapterSnapshots", "LoraIds", "TensorRtLlmEngine", "choice_sampling_kwargs",
           "continuation_logprobs", "load_tensorrt_llm", "lora_config_kwargs", "read_model_folder", "sampling_kwargs",
           "stream_events", "write_peft_snapshot"]

log = structlog.get_logger(__name__)

NOT_INSTALLED = ("--backend tensorrt-llm: the tensorrt-llm package is not installed: pip install "
                 "'npc-sidecar[tensorrt]' (Linux/Windows with an NVIDIA GPU)")
NO_GPU = ("--backend tensorrt-llm: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
          "TensorRT-LLM needs an NVIDIA GPU with its CUDA driver (use the default torch backend otherwise)")


# --- loading ----------------------------------------------------------------------------------


def _package_installed() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def load_tensorrt_llm() -> SimpleNamespace:
    """The four TensorRT-LLM names this backend uses (LLM, SamplingParams, LoraConfig, LoRARequest).

    Raises UserError when the package is missing, no CUDA GPU is visible, or the import fails.
    """
    if not _package_installed():
        raise UserError(NOT_INSTALLED)
    if not torch.cuda.is_available():
        raise UserError(NO_GPU)
    try:
        trt = importlib.import_module("tensorrt_llm")
        request = importlib.import_module("tensorrt_llm.executor.request")
        lora_config = None
        # LoraConfig moved between releases; the documented import paths, newest first.
        for module in ("tensorrt_llm._torch.peft.lora.config", "tensorrt_llm.lora_helper", "tensorrt_llm.lora_manager"):
            try:
                lora_config = importlib.import_module(module).LoraConfig
                break
            except (ImportError, AttributeError):
                continue
        if lora_config is None:
            raise ImportError("LoraConfig not found in this tensorrt_llm release")
        return SimpleNamespace(LLM=trt.LLM, SamplingParams=trt.SamplingParams, LoraConfig=lora_config,
                               LoRARequest=request.LoRARequest)
    except Exception as e:  # a broken install (CUDA libraries, MPI) fails in many ways
        raise UserError(f"--backend tensorrt-llm: importing tensorrt_llm failed: {type(e).__name__}: {e}") from None


def read_model_folder(folder: Path) -> tuple[Tokenizer, LlamaConfig]:
    """Our tokenizer and the model's shape from a Hugging Face folder, without reading its weights.

    The eos ids follow load_hf_folder exactly (generation_config.json, config.json, then the
    tokenizer's eos token), so prompts and stops match the torch engine's for the same folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--backend tensorrt-llm: needs a Hugging Face model folder (config.json, *.safetensors, "
                        f"tokenizer.json); {folder} is not a folder (GGUF files are for the torch backend)")
    metadata = read_hf_metadata(folder)
    return Tokenizer(metadata), metadata.config


# --- pure parts -------------------------------------------------------------------------------


def sampling_kwargs(params: SamplingParams, max_tokens: int, eos_ids: Sequence[int],
                    rng: random.Random | None = None) -> dict[str, Any]:
    """Keyword arguments for tensorrt_llm.SamplingParams that sample what our Sampler samples.

    - greedy (temperature 0) is `top_k=1`: every TensorRT-LLM release reads top_k == 1 as greedy
      (newer ones also temperature == 0, but older ones document temperature > 0 only);
    - otherwise temperature, top_p and top_k are always explicit: with all three unset,
      TensorRT-LLM decodes greedily; top_k 0 means no limit there as here;
    - a request without a seed gets a fresh random one: TensorRT-LLM's default seed is 0 for
      every request, which would give identical "random" replies to identical prompts;
    - end_id is our first eos id, the others are stop_token_ids (TensorRT-LLM takes one end id);
      ignore_eos is passed through. Without any eos id, end_id is -1 (what TensorRT-LLM itself
      uses for ignore_eos): there must be one, since its tokenizer is never loaded;
    - stop strings are not passed (see the module docstring), nor is detokenizing wanted.
    """
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "end_id": eos_ids[0] if eos_ids else -1,
                              "detokenize": False}
    if params.ignore_eos:
        kwargs["ignore_eos"] = True
    elif len(eos_ids) > 1:
        kwargs["stop_token_ids"] = list(eos_ids[1:])
    if params.greedy:
        kwargs["top_k"] = 1
    else:
        seed = params.seed if params.seed is not None else (rng or random).getrandbits(63)
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed)
        if params.min_p:  # TensorRT-LLM's own min_p, as ours relative to the likeliest token
            kwargs["min_p"] = params.min_p
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    return kwargs


def choice_sampling_kwargs(eos_ids: Sequence[int]) -> dict[str, Any]:
    """A scoring request: one throwaway greedy token, and the logits of every prompt position."""
    return {"max_tokens": 1, "end_id": eos_ids[0] if eos_ids else -1, "detokenize": False, "top_k": 1,
            "return_context_logits": True}


def continuation_logprobs(context_logits: Any, candidate: Sequence[int]) -> list[float]:
    """Each candidate token's log-probability (their sum is log p(candidate | prompt)) from the context
    logits of one request whose input was prompt + candidate[:-1]: the row of input position i
    predicts the token at i + 1, so the last len(candidate) rows predict the candidate's tokens.

    Only those last rows are used: with KV-cache block reuse, TensorRT-LLM returns logits only
    for the positions it computed, not for a reused prompt prefix (NVIDIA/Model-Optimizer#1577),
    and the last input positions are the ones computed. Fewer rows than that is an error.
    """
    logits = torch.as_tensor(context_logits)
    while logits.dim() > 2 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.dim() != 2 or logits.shape[0] < len(candidate):
        raise ValueError(f"context logits of shape {list(logits.shape)}; the candidate needs its last "
                         f"{len(candidate)} rows")
    rows = logits[logits.shape[0] - len(candidate):].float().cpu()  # only these rows leave the GPU
    logp = torch.log_softmax(rows, dim=-1)
    return logp.gather(1, torch.tensor(list(candidate))[:, None])[:, 0].tolist()


async def stream_events(outputs: AsyncIterable[Any], events: RequestOutput) -> AsyncIterator[EngineEvent]:
    """Events from a streamed TensorRT-LLM request (`async for` over what generate_async returns;
    each item has `.outputs[0].token_ids`, every id so far, and `.finish_reason`) until the reply has finished."""
    async for output in outputs:
        completion = output.outputs[0]
        for event in events.update(completion.token_ids, completion.finish_reason):
            yield event
        if events.finished:
            return
    for event in events.cancel():  # the stream ended without a final output
        yield event


# --- the engine -------------------------------------------------------------------------------


class TensorRtLlmEngine(Engine):
    """The Engine protocol over tensorrt_llm.LLM. Everything runs on the caller's event loop:
    one asyncio task per request drives TensorRT-LLM's async result (which needs that loop).

    From `config` (EngineConfig): max_batch, max_seq_len, max_resident_adapters (adapters on the
    GPU), max_rank and max_waiting are used; prefill_chunk and the prefix cache sizes are
    TensorRT-LLM's own business (its KV-cache block reuse). `llm_kwargs` go to tensorrt_llm.LLM
    as they are (e.g. kv_cache_config); `api` replaces the tensorrt_llm names (tests).
    """

    name = "tensorrt-llm"  # ServerInfo.backend
    constrained_decoding = False  # SamplingParams.grammar is refused (backends/live.py)
    contrast_decoding = False  # SamplingParams.contrast is refused (backends/live.py)

    def __init__(self, model_path: Path, config: EngineConfig | None = None, *, max_cpu_loras: int | None = None,
                 llm_kwargs: dict[str, Any] | None = None, api: Any = None):
        self.config = config or EngineConfig()
        self._api = api or load_tensorrt_llm()
        model_path = Path(model_path)
        tokenizer, model_config = read_model_folder(model_path)
        # weights "auto": TensorRT-LLM's dtype, the folder's torch_dtype
        self.model = ModelInfo(model_path, "auto", "cuda", tokenizer, model_config)
        self.max_len = min(self.config.max_seq_len, model_config.max_position)
        self.config = dataclasses.replace(self.config, max_seq_len=self.max_len)
        cpu_loras = max_cpu_loras or 2 * self.config.max_resident_adapters
        lora_kwargs = lora_config_kwargs(self.config.max_rank, self.config.max_resident_adapters, cpu_loras)
        self._snapshot_root = Path(tempfile.mkdtemp(prefix="npc-trtllm-adapters-"))
        self.snapshots = AdapterSnapshots(self._snapshot_root)
        self.lora_ids = LoraIds(max(cpu_loras, 16), on_forget=self.snapshots.forget)
        self._in_flight = LiveRequests(self.config, "trt")
        self._rng = random.Random()
        try:
            self.llm = self._api.LLM(model=str(model_path), skip_tokenizer_init=True,
                                      max_batch_size=self.config.max_batch, max_seq_len=self.max_len,
                                      lora_config=self._api.LoraConfig(**lora_kwargs), **(llm_kwargs or {}))
        except Exception:
            shutil.rmtree(self._snapshot_root, ignore_errors=True)
            raise

    # --- requests -----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path, version: str, scale: float = 1.0) -> AdapterRef:
        return read_adapter(self.model.shape, self.config.max_rank, name, path, version, scale)

    def missing_adapters(self, names: Sequence[str]) -> list[str]:
        return []  # adapters come with each request (LoRARequest)

    def submit(self, prompt_ids: Sequence[int], adapter: AdapterRef | None, sampling: SamplingParams, *,
               request_id: str | None = None, choices: Sequence[Sequence[int]] | None = None,
               timings: Timings | None = None, background: bool = False) -> RequestStream:
        """Queues a request; raises QueueFull or UserError as AsyncEngine.submit does (engine/admission.py).

        With `choices`, nothing is generated: each candidate continuation is scored from the
        context logits of prompt + candidate, and the request finishes (reason "choice").
        """
        return self._in_flight.submit(
            prompt_ids, choices, sampling, request_id, timings, self.max_len, self.model.shape.vocab_size,
            generate=lambda live, prompt, max_tokens: self._generate(live, prompt, adapter, sampling, max_tokens),
            score=lambda live, prompt, candidates: self._score(live, prompt, adapter, candidates))

    def cancel(self, request_id: str) -> bool:
        """Cancels a request; its stream ends with finish_reason "cancelled" at once."""
        return self._in_flight.cancel(request_id)

    def queue_full(self) -> bool:
        """Whether a reply submitted now would be refused for a full queue (submit() decides)."""
        return self._in_flight.queue_full()

    async def _generate(self, live: Live, prompt: list[int], adapter: AdapterRef | None, sampling: SamplingParams,
                        max_tokens: int) -> None:
        tok = self.model.tokenizer
        events = RequestOutput(live.request_id, len(prompt), sampling, max_tokens, tok.detokenizer(), tok.eos_ids,
                               live.timings)
        results: list[Any] = []
        with self._ending(live, events, results):
            lora = await self._lora_request(live, adapter)
            params = self._api.SamplingParams(**sampling_kwargs(sampling, max_tokens, tok.eos_ids, self._rng))
            results.append(self.llm.generate_async(prompt, sampling_params=params, lora_request=lora, streaming=True))
            live.emit(events.started())
            async for event in stream_events(results[0], events):
                live.emit(event)

    async def _score(self, live: Live, prompt: list[int], adapter: AdapterRef | None,
                     choices: list[list[int]]) -> None:
        events = RequestOutput(live.request_id, len(prompt), SamplingParams(max_tokens=1), 1,
                               self.model.tokenizer.detokenizer(), (), live.timings)
        results: list[Any] = []
        with self._ending(live, events, results):
            lora = await self._lora_request(live, adapter)
            for candidate in choices:  # one request each: prompt + candidate[:-1] holds every row needed
                params = self._api.SamplingParams(**choice_sampling_kwargs(self.model.tokenizer.eos_ids))
                results.append(self.llm.generate_async(prompt + candidate[:-1], sampling_params=params,
                                                        lora_request=lora))
            live.emit(events.started())
            scores = []
            for candidate, result in zip(choices, results, strict=True):
                await result.aresult()
                scores.append(continuation_logprobs(result.context_logits, candidate))
            live.emit(events.choice(scores))

    @contextlib.contextmanager
    def _ending(self, live: Live, events: RequestOutput, results: list[Any]) -> Iterator[None]:
        """How _generate and _score end: a cancel finishes the stream as cancelled (with the text so far),
        a failure with an error event, and either way the TensorRT-LLM requests in `results` are aborted."""
        try:
            yield
        except asyncio.CancelledError:  # cancel(): the stream ends here; the task itself ends normally
            for event in events.cancel():
                live.emit(event)
        except Exception as e:
            self._fail(live, e, events)
        finally:
            self._abort(results)

    async def _lora_request(self, live: Live, ref: AdapterRef | None) -> Any:
        args = self.lora_ids.request_args(ref)
        if args is None:
            return None
        name, lora_id, _ = args
        self.lora_ids.pin(lora_id)
        live.on_end.append(functools.partial(self.lora_ids.unpin, lora_id))
        folder = await asyncio.to_thread(self.snapshots.folder, lora_id, ref)
        return self._api.LoRARequest(name, lora_id, str(folder))

    def _fail(self, live: Live, e: Exception, events: RequestOutput) -> None:
        log.exception("tensorrt-llm request failed", request_id=live.request_id)
        live.emit(events.error(f"internal error in the tensorrt-llm backend ({type(e).__name__}: {e})", internal=True))

    @staticmethod
    def _abort(results: Sequence[Any]) -> None:
        """Stops TensorRT-LLM requests still running (our stop string, a cancel, an error)."""
        for result in results:
            if not result.finished:
                try:
                    result.abort()
                except Exception:  # e.g. the executor is already shut down
                    log.warning("aborting a tensorrt-llm request failed", exc_info=True)

    # --- control ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Requests in flight beyond max_batch count as waiting (TensorRT-LLM queues them itself);
        resident_adapters are the adapter versions with an id (on the GPU, in host memory or known)."""
        return EngineStats(**self._in_flight.counts(), resident_adapters=tuple(self.lora_ids.resident()))

    async def shutdown(self, cancel_running: bool = True) -> None:
        """Ends live requests (cancelled, or finished within 5 s), then shuts TensorRT-LLM down."""
        await self._in_flight.shutdown(cancel_running)
        try:
            await asyncio.to_thread(self.llm.shutdown)
        finally:
            shutil.rmtree(self._snapshot_root, ignore_errors=True)
