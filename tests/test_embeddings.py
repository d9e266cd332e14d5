"""The sentence vectors of fact retrieval (dialogue/embeddings.py) against wordllama's own code."""

from __future__ import annotations

import logging

import numpy as np

from sidecar.dialogue.embeddings import TOKENIZER, WEIGHTS, shared_embedder

TEXTS = ["Where is your smithy?", "Your forge is beside the north gate of Highmoor.", "",
         "  whitespace   runs\tand\nnewlines ", "Ünïcödé: 40 gold, 12 pieces — ½ price! <|im_end|>", "a" * 500]


def _reference():
    """wordllama's WordLlamaInference on the same bundled files (its loader would look for the tokenizer
    online; importing it configures the root logger, which is put back)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from importlib.metadata import distribution

        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
        from wordllama.inference import WordLlamaInference
    finally:
        root.handlers[:], root.level = handlers, level
    files = distribution("wordllama")
    table = load_file(str(files.locate_file(WEIGHTS)))["embedding.weight"]
    return WordLlamaInference(table, Tokenizer.from_file(str(files.locate_file(TOKENIZER))))


def test_vectors_equal_wordllamas():
    ours = shared_embedder().embed(TEXTS)
    reference = _reference()
    for text, vector in zip(TEXTS, ours, strict=True):
        if not text:
            assert not vector.any()  # no token: a zero vector, which matches nothing (wordllama divides by 0)
            continue
        expected = reference.embed([text], norm=True)[0]
        np.testing.assert_allclose(vector, expected, rtol=0, atol=1e-5, err_msg=text)
        assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5


def test_a_paraphrase_is_closer_than_an_unrelated_line():
    a, b, c = shared_embedder().embed(["where is your workshop?", "Your forge is beside the north gate.",
                                       "Wolves hunt in the pine woods after dark."])
    assert a @ b > a @ c + 0.1
