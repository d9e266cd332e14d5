"""Inference backends other than the in-process torch engine (sidecar/engine): each declares the
`Engine` protocol of engine/api.py. The requests each admits and how its queue is counted are
engine/admission.py's, for every backend; their replies are cut into events by engine/output.py.

`create_engine` is the one place `npc serve` turns `--backend` into an engine. The heavy modules
(torch engine, TensorRT-LLM, the HTTP client) are imported only for the backend chosen.
"""

from __future__ import annotations

import asyncio
import sys

from sidecar.config import BACKENDS, EngineConfig, ModelConfig, RemoteConfig
from sidecar.engine.api import Engine
from sidecar.errors import UserError


async def create_engine(backend: str, model_config: ModelConfig, engine_config: EngineConfig,
                        remote: RemoteConfig | None = None) -> Engine:
    """The engine for `--backend`; raises UserError with the flag to fix when it cannot start."""
    if backend == "torch":
        from sidecar.engine.base_model import load_base_model
        from sidecar.engine.engine import AsyncEngine

        # The loader runs on the engine's own thread (see AsyncEngine: torch work stays on one thread).
        return await asyncio.to_thread(
            AsyncEngine, lambda: load_base_model(model_config, progress=sys.stderr.isatty()), engine_config)
    if backend == "tensorrt-llm":
        from sidecar.backends.tensorrt_llm import TensorRtLlmEngine

        # Built on the event loop's thread: TensorRT-LLM's async results belong to this loop.
        return TensorRtLlmEngine(model_config.path, engine_config)
    if backend == "remote":
        from sidecar.backends.remote import RemoteEngine

        if remote is None:
            raise UserError("--backend remote: needs --remote-url (the OpenAI-compatible server, e.g. http://HOST:8000)")
        return await RemoteEngine.connect(model_config, engine_config, remote)
    raise UserError(f"--backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
