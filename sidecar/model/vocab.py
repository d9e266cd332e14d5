"""How a checkpoint describes its tokenizer (the two sources the Tokenizer reads). No torch: a process
that only tokenizes (the remote backend) need not load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GgufVocab:
    """A tokenizer described by GGUF metadata (`tokenizer.ggml.*`)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    pre: str  # pre-tokenizer name, e.g. "smollm", "llama-bpe", "default"
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool


@dataclass(frozen=True)
class HfTokenizerFiles:
    """A tokenizer from a Hugging Face folder (tokenizer.json)."""

    tokenizer_json: Path
    bos_token: str | None
    eos_tokens: tuple[str, ...]
    add_bos: bool
