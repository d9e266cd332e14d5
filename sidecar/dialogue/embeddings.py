"""Sentence vectors for retrieval: the static word embeddings that ship inside the `wordllama` package.

BM25 matches words; a player asks "where is your smithy?" of a blacksmith whose file says "forge".
WordLlama's l2_supercat table (256 numbers per token of a 32,000-token vocabulary, trained for
semantic similarity; MIT) is in its wheel, so it needs no model hub. A text's vector is the mean of
its tokens' rows, normalised, as wordllama computes it; cosine = dot product. Chosen by measurement
(docs/design-notes.md, "Grounding").

The package's files are read directly: importing `wordllama` configures the root logger, and its
loader looks for the bundled tokenizer under a folder name the wheel does not use, then tries the
network.
"""

from __future__ import annotations

import threading
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from sidecar.errors import UserError

PACKAGE = "wordllama"
WEIGHTS = "wordllama/weights/l2_supercat_256.safetensors"
TOKENIZER = "wordllama/tokenizers/l2_supercat_tokenizer_config.json"


class Embedder:
    """Texts -> unit vectors (float32, one row per text; an empty text gives a zero row)."""

    def __init__(self, table: np.ndarray, tokenizer: Tokenizer):
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.tokenizer = tokenizer
        self.dim = self.table.shape[1]

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, encoding in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = [i for i in encoding.ids if 0 <= i < len(self.table)]
            if ids:
                vector = self.table[ids].mean(axis=0)
                norm = float(np.linalg.norm(vector))
                if norm > 0:
                    out[row] = vector / norm
        return out


_shared: Embedder | None = None
_lock = threading.Lock()


def shared_embedder() -> Embedder:
    """The process's one embedder (32 MB), loaded on first use."""
    global _shared
    with _lock:
        if _shared is None:
            try:
                files = distribution(PACKAGE)
            except PackageNotFoundError:
                raise UserError(f"the {PACKAGE!r} package is not installed: run `make setup` "
                                "(it carries the embeddings that fact retrieval uses)") from None
            table = load_file(str(files.locate_file(WEIGHTS)))["embedding.weight"]
            tokenizer = Tokenizer.from_file(str(files.locate_file(TOKENIZER)))
            tokenizer.no_padding()
            tokenizer.no_truncation()
            _shared = Embedder(table, tokenizer)
        return _shared
