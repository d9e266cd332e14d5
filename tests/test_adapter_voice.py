"""A character's adapter is its voice, over a real gRPC socket: `npc serve` answers the same lines for two
characters that differ only in the adapter, the replies differ, and each is what the model (with that adapter,
for the one that has it) generates when computed a second way: transformers + PEFT on the same prompt ids."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch
import yaml

from sidecar.client import NpcClient
from sidecar.dialogue.characters import load_character
from sidecar.dialogue.prompt import build_messages
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.training.data import character_retriever
from tests.rounding import reordered_fp32
from tests.sidecar_process import SidecarProcess, copy_characters

LINES = ("Can you fix my sword?", "Where can I find good iron?", "Who are you?")
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def characters(tmp_path_factory) -> Path:
    """The sample blacksmith with its trained PEFT adapter, and plainsmith: the same character.yaml without it."""
    root = copy_characters(tmp_path_factory.mktemp("characters"), ("blacksmith",))
    # Free text (no emotions, no actions: no grammar), so that the reference is a plain greedy generate();
    # constrained decoding has its own checks (tests/test_constrained.py).
    data = yaml.safe_load((root / "blacksmith" / "character.yaml").read_text())
    assert data["id"] == "blacksmith" and data["adapter"] == "adapter"
    free = {k: v for k, v in data.items() if k not in ("emotions", "actions")}
    (root / "blacksmith" / "character.yaml").write_text(yaml.safe_dump(free))
    plain = {k: v for k, v in free.items() if k != "adapter"}
    (root / "plainsmith").mkdir()
    (root / "plainsmith" / "character.yaml").write_text(yaml.safe_dump({**plain, "id": "plainsmith"}))
    return root


@pytest.fixture(scope="module")
def replies(characters) -> dict[tuple[str, str], tuple[pb.Started, str, pb.Finished]]:
    """(character, line) -> the server's greedy reply. fp32 weights, so that a second fp32 implementation can
    match it token for token; all six Talks at once, so rows with and without the adapter share decode steps.
    Plain decoding (--fact-contrast 0): decoding against the prompt without the facts has its own reference
    (tests/test_engine.py)."""
    server = SidecarProcess(characters, "--weights", "fp32", "--fact-contrast", "0")
    calls = [(cid, line) for cid in ("blacksmith", "plainsmith") for line in LINES]

    async def talk() -> list:
        async with NpcClient(server.address) as client:
            options = pb.GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0)
            return await asyncio.gather(*(client.say(cid, line, options=options) for cid, line in calls))

    try:
        out = dict(zip(calls, asyncio.run(talk()), strict=True))
    finally:
        code = server.stop()
    assert code == 0, "".join(server.log[-20:])
    return out


def _prompt(tokenizer, folder: Path, line: str) -> list[int]:
    """The prompt of a first turn (no history, world or player name), as the server builds it."""
    character = load_character(folder)
    facts = character_retriever(folder).facts(character, line)
    assert facts  # the blacksmith's knowledge reaches the prompt
    return tokenizer.encode_chat(build_messages(character, [], line, facts=facts))


def test_the_adapter_changes_the_replies(replies, characters, tokenizer):
    for line in LINES:
        # Same prompt ids (the character id is not in the prompt): only the adapter differs.
        assert _prompt(tokenizer, characters / "blacksmith", line) == \
            _prompt(tokenizer, characters / "plainsmith", line)
        assert replies["blacksmith", line][1] != replies["plainsmith", line][1], line


@pytest.mark.parametrize("cid", ["blacksmith", "plainsmith"])
def test_each_reply_is_what_transformers_and_peft_generate(replies, characters, tokenizer, hf_model, cid):
    from peft import PeftModel

    character = load_character(characters / cid)
    model = hf_model
    if character.adapter_path is not None:  # the same PEFT folder the server loaded, read by PEFT itself
        model = PeftModel.from_pretrained(copy.deepcopy(hf_model), character.adapter_path).eval()
    eos = set(tokenizer.eos_ids)
    for line in LINES:
        ids = _prompt(tokenizer, characters / cid, line)
        started, text, finished = replies[cid, line]
        assert started.prompt_tokens == len(ids)  # the server's prompt is this one
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(ids):].tolist()
        end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))  # the reply's text stops at eos
        # Token for token up to the first near tie: where the top two logits are closer than two fp32 computations
        # may drift apart (tests/rounding.py), the server's forward may pick the other one.
        top2 = [s[0].topk(2).values for s in out.scores]
        sure = next((t for t, (s, v) in enumerate(zip(out.scores, top2, strict=True))
                     if v[0] - v[1] <= reordered_fp32(hf_model.config.num_hidden_layers, s[0])), len(tokens))
        if sure > end or sure == len(tokens):  # every token sure, the end (eos or max_tokens) included
            assert text == tokenizer.decode(tokens[:end]), line
            assert finished.reason == (pb.FINISH_REASON_STOP if end < len(tokens) else pb.FINISH_REASON_LENGTH)
        else:
            assert sure >= 4, f"a near tie at token {sure}: too early to compare {line!r}"
            assert text.startswith(tokenizer.decode(tokens[:sure]).rstrip("\ufffd")), line
