"""An Engine that records the prompts Dialogue.talk submits and answers each with a fixed reply: for tests of what
the dialogue layer builds and does around a reply (prompts, sessions, relationships), without a model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

from sidecar.config import EngineConfig
from sidecar.engine.api import EngineEvent, RequestStream


@dataclass
class RecordingEngine:
    """Takes every prompt Dialogue.talk submits; streams `reply` (the model's raw text: label, line, action
    lines) as one delta and ends. `replies`, when given, are used in turn instead (then `reply` again)."""

    tokenizer: object
    reply: str = "[x] Hm."
    name: str = "recording"
    constrained_decoding: bool = True
    contrast_decoding: bool = True
    prompts: list = None
    replies: list = None

    def __post_init__(self):
        self.config = EngineConfig()
        self.model = SimpleNamespace(tokenizer=self.tokenizer)
        self.prompts = []
        self.background = []  # each request's Engine.submit(background=...)
        self.sampling = []  # each request's SamplingParams
        self.full = False  # what queue_full() says
        self.replies = list(self.replies or [])

    def queue_full(self) -> bool:
        return self.full

    def submit(self, prompt_ids, adapter, sampling, *, choices=None, timings=None, request_id=None, background=False):
        self.prompts.append(list(prompt_ids))
        self.background.append(background)
        self.sampling.append(sampling)
        queue: asyncio.Queue = asyncio.Queue()
        rid = f"r{len(self.prompts)}"
        queue.put_nowait(EngineEvent("started", rid, prompt_tokens=len(prompt_ids)))
        reply = self.replies.pop(0) if self.replies else self.reply
        ids = tuple(self.tokenizer.encode_literal(reply))
        queue.put_nowait(EngineEvent("delta", rid, text=reply, token_ids=ids))
        queue.put_nowait(EngineEvent("finished", rid, text=reply, token_ids=ids, finish_reason="stop"))
        return RequestStream(rid, queue, lambda _: None)
