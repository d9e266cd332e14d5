"""The torch engine from synchronous code (`npc generate`, `npc eval`): the same AsyncEngine the
server runs, on an event loop of its own, so a script's replies go through the one serving path
(batching, prefix cache, stop strings, timings) and read exactly like the server's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import EngineConfig, ModelConfig
from sidecar.engine.api import AdapterRef, EngineEvent, SamplingParams
from sidecar.engine.base_model import load_base_model
from sidecar.engine.engine import AsyncEngine


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    adapter: AdapterRef | None
    sampling: SamplingParams
    choices: Sequence[Sequence[int]] | None = None


class OfflineEngine:
    """Use as a context manager: the model loads on enter (on the engine's thread) and stops on exit."""

    def __init__(self, model: ModelConfig, config: EngineConfig | None = None, progress: bool = False):
        # A script submits all its requests at once: let them queue.
        self.model_config, self.config, self.progress = model, config or EngineConfig(max_waiting=4096), progress
        self._loop = asyncio.new_event_loop()
        self.engine: AsyncEngine | None = None

    def __enter__(self) -> OfflineEngine:
        loader = lambda: load_base_model(self.model_config, progress=self.progress)  # noqa: E731
        try:
            self.engine = self._loop.run_until_complete(asyncio.to_thread(AsyncEngine, loader, self.config))
        except BaseException:
            self._loop.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.engine is not None:
            self._loop.run_until_complete(self.engine.shutdown())
        self._loop.close()

    @property
    def tokenizer(self):
        return self.engine.model.tokenizer

    def load_adapter(self, name: str, path: Path, version: str = "1", scale: float = 1.0) -> AdapterRef:
        return self.engine.load_adapter(name, Path(path), version, scale)

    def stream(self, request: Request) -> Iterator[EngineEvent]:
        """One request's events as they come."""
        async def submit():
            return aiter(self.engine.submit(request.prompt, request.adapter, request.sampling,
                                            choices=request.choices))

        events = self._loop.run_until_complete(submit())
        while (event := self._loop.run_until_complete(anext(events, None))) is not None:
            yield event

    def run(self, requests: Sequence[Request]) -> list[EngineEvent]:
        """Every request's last event (finished or error), the requests submitted together (one batch)."""
        async def one(request: Request) -> EngineEvent:
            last = None
            async for event in self.engine.submit(request.prompt, request.adapter, request.sampling,
                                                  choices=request.choices):
                last = event
            return last

        async def all_of() -> list[EngineEvent]:
            return list(await asyncio.gather(*(one(r) for r in requests)))

        return self._loop.run_until_complete(all_of())
