"""`npc train` / `npc eval` on a tiny run: data checks, a loadable PEFT folder, hot reload into a server."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidecar.client import NpcClient
from sidecar.dialogue.characters import load_character
from sidecar.errors import UserError
from sidecar.model.lora import LoraBatch, LoraSlots, load_peft_adapter
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.training.data import (
    IGNORE,
    DataError,
    Example,
    character_retriever,
    line_digest,
    read_dialogue,
    render,
)
from sidecar.training.evaluate import evaluate_character
from sidecar.training.train import (
    WIDTH_MULTIPLE,
    TrainConfig,
    _accumulate_gradients,
    _batch,
    _loss_sum,
    _micro_batches,
    _padded_width,
    _shared_prefix,
    recorded_sides,
    train_character,
)
from tests.rounding import reordered_fp32
from tests.sidecar_process import REPO, SidecarProcess

TINY = TrainConfig(rank=4, alpha=8, epochs=1, batch_size=2, max_steps=2, learning_rate=5e-3, held_out=0.25)


def _line(*turns: str, emotion: str = "gruff", actions: list | None = None, **extra) -> str:
    """A conversation; every NPC reply labelled `emotion` (the sample blacksmith declares emotions), the last
    one with `actions`."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": r, "content": t} | ({"emotion": emotion} if r == "assistant" else {})
                for r, t in zip(roles, turns, strict=False)]
    if actions is not None:
        messages[-1]["actions"] = actions
    return json.dumps({"messages": messages, **extra})


def _character(root: Path, lines: list[str]) -> Path:
    folder = root / "smith"
    shutil.copytree(REPO / "characters" / "blacksmith", folder, ignore=shutil.ignore_patterns(
        "adapter", "training", "dialogue.jsonl", "facts.jsonl"))  # (the fact score: tests/test_facts.py)
    yaml = (folder / "character.yaml").read_text().replace("id: blacksmith", "id: smith")
    (folder / "character.yaml").write_text("\n".join(x for x in yaml.splitlines() if not x.startswith("adapter:")))
    (folder / "dialogue.jsonl").write_text("\n".join(lines) + "\n")
    return folder


LINES = [_line("How much for a sword?", "Forty gold, lad. Good steel."),
         _line("Hello", "Hmph. Mind the anvil.", "Bye", "Off with you, then."),
         _line("Can you fix my axe?", "Five gold. Leave it on the bench."),
         _line("Nice beard.", "Ninety years of work, that. Don't touch it.", player_name="Aria"),
         _line("What is the internet?", "Never heard of it. Is it iron or stone?", world={"time": "night"})]
SOLD = _line("I'll take the axe.", "Good choice, lad.", emotion="proud",
             actions=[{"name": "sell_item", "arguments": {"item": "war axe"}}], entities={"stock": ["war axe", "helm"]})


@pytest.mark.parametrize("content,problem", [
    ("", "empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: the conversation ends with the player"),
    (_line("a", "b") + "\n{not json\n", ":2: not valid JSON"),
    ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "content"),
    ('{"messages": [], "mood": 3}', "unknown key"),
])
def test_bad_dialogue_files(tmp_path, content, problem):
    path = tmp_path / "dialogue.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_dialogue(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_rendering_supervises_only_the_replies(tmp_path, tokenizer):
    folder = _character(tmp_path, [*LINES, SOLD])
    character = load_character(folder)
    retriever = character_retriever(folder)
    conv = read_dialogue(folder / "dialogue.jsonl")[1]  # two exchanges
    examples = render(tokenizer, character, conv, 4096, retriever)
    # The facts block before each player line changes the prompt under the first reply: one example each.
    assert len(examples) == 2
    learned = [t for e in examples for t in e.labels if t != -100]
    im_end = tokenizer.eos_ids[0]
    # The reply as the model writes it: its emotion first (dialogue/reply_format.py), then the text.
    assert tokenizer.decode(learned) == "[gruff] Hmph. Mind the anvil." + tokenizer.decode([im_end]) + \
        "[gruff] Off with you, then." + tokenizer.decode([im_end])
    second = tokenizer.decode(examples[1].input_ids)
    assert "Hmph. Mind the anvil." in second and "What you know that bears on this:" in second
    with pytest.raises(DataError, match="line 2: .* tokens; the limit is 200"):
        render(tokenizer, character, conv, 200, retriever)
    [sold] = render(tokenizer, character, read_dialogue(folder / "dialogue.jsonl")[5], 4096, retriever)
    assert tokenizer.decode([t for t in sold.labels if t != -100]) == \
        '[proud] Good choice, lad.\n@sell_item {"item": "war axe"}' + tokenizer.decode([im_end])
    assert "At hand:\n- stock: war axe, helm" in tokenizer.decode(sold.input_ids)  # the game's list, in the prompt
    # The structured tokens (label, action lines, end of turn) are marked for --label-weight.
    marked = "".join(tokenizer.decode([sold.input_ids[i]]) for i in sorted(sold.structured))
    assert marked == '[proud]\n@sell_item {"item": "war axe"}' + tokenizer.decode([im_end])
    assert all(sold.labels[i] != -100 for i in sold.structured)


@pytest.mark.parametrize("line, problem", [
    (_line("Hi", "Hmph.", emotion=""), "messages[1].emotion: must be one of the character's emotions"),
    (_line("Hi", "Hmph.", emotion="joyful"), "got 'joyful'"),
    (_line("Sword?", "Here.", actions=[{"name": "sell_item", "arguments": {"item": "dragon blade"}}],
           entities={"stock": ["helm"]}), "messages[1].actions[0]: sell_item.item: 'dragon blade' is not one of"),
    (_line("Sword?", "Here.", actions=[{"name": "sell_item", "arguments": {"item": "helm"}}]),
     "no action of the character can be taken"),  # no stock listed: sell_item is not available
    (_line("Fly!", "Whoosh.", actions=[{"name": "fly"}], entities={"stock": ["helm"]}), "has no action 'fly'"),
    (_line("Sword?", "Here.", actions=[{"name": "sell_item", "arguments": {"item": "helm"}}],
           entities={"stock": ["helm"]}, allowed_actions=[]), "no action of the character can be taken"),
])
def test_bad_labels_name_the_line_and_field(tmp_path, tokenizer, line, problem):
    folder = _character(tmp_path, [line])
    with pytest.raises(DataError, match="line 1: ") as e:
        render(tokenizer, load_character(folder), read_dialogue(folder / "dialogue.jsonl")[0], 4096,
               character_retriever(folder))
    assert problem in str(e.value)


def test_a_line_brings_its_own_facts(tmp_path, tokenizer):
    """`facts` in a line replace what would be retrieved: the adapter learns to answer from the block."""
    given = _line("Who shoes the horses?", "Old Hale, by the mill.", facts=["The farrier is Old Hale, by the mill."])
    folder = _character(tmp_path, [given, _line("Who shoes the horses?", "Ask around.")])
    character, retriever = load_character(folder), character_retriever(folder)
    own, retrieved = (tokenizer.decode(render(tokenizer, character, c, 4096, retriever)[0].input_ids)
                      for c in read_dialogue(folder / "dialogue.jsonl"))
    assert "What you know that bears on this:\n- The farrier is Old Hale, by the mill.\nuser\nWho shoes" in own
    assert "A sword costs" not in own  # the line's facts only
    block = retrieved.split("What you know that bears on this:\n")[1].split("\nuser\n")[0]
    assert "Old Hale" not in block and block.count("- ") >= 3  # what would be retrieved: the character's knowledge
    assert all(line[2:] in character.knowledge for line in block.splitlines())


def test_a_reply_marks_what_it_copies_from_its_facts(tmp_path, tokenizer):
    """Example.copied (`npc train --fact-weight`): the reply's tokens that only its facts block brought into
    the prompt: the name and the place copied from the fact; not a word the player or the persona said, not
    the emotion label, not a reply that copies nothing."""
    copying = _line("Who shoes the horses?", "Old Hale shoes them, down by the mill.",
                    facts=["The farrier is Old Hale, by the mill."])
    folder = _character(tmp_path, [copying, _line("Who shoes the horses?", "Ask around.",
                                                  facts=["The farrier is Old Hale, by the mill."])])
    character, retriever = load_character(folder), character_retriever(folder)
    first, second = (render(tokenizer, character, c, 4096, retriever)[0]
                     for c in read_dialogue(folder / "dialogue.jsonl"))
    pieces = [tokenizer.decode([first.input_ids[i]]) for i in sorted(first.copied)]
    assert {" Hale", " mill"} <= set(pieces)
    assert all(p in "The farrier is Old Hale, by the mill." for p in pieces)
    assert not {" shoes", " horses", "gruff"} & set(pieces)  # the player's words, the label
    assert all(first.labels[i] != IGNORE for i in first.copied) and not first.copied & first.structured
    assert second.copied == frozenset()


def test_bad_facts_field_names_the_line(tmp_path):
    path = tmp_path / "dialogue.jsonl"
    path.write_text(_line("Hi", "Hmph.", facts="the mine is closed") + "\n")
    with pytest.raises(DataError, match=r"dialogue.jsonl:1: facts must be a list of non-empty texts"):
        read_dialogue(path)


def test_bad_data_writes_nothing(tmp_path, model_path):
    folder = _character(tmp_path, [*LINES, '{"messages": [{"role": "user", "content": "dangling"}]}'])
    before = (folder / "character.yaml").read_text()
    with pytest.raises(DataError, match=":6:"):
        train_character(folder, model_path, TINY, progress=False)
    assert not (folder / "adapter").exists() and (folder / "character.yaml").read_text() == before


def test_tiny_training_run_is_served_by_hot_reload(tmp_path, model_path, checkpoint, models, tokenizer,
                                                    hf_model):
    from peft import PeftModel

    root = tmp_path / "characters"
    folder = _character(root, LINES)
    server = SidecarProcess(root)
    try:
        before = asyncio.run(_list(server.address))["smith"]
        assert not before.has_adapter
        result = train_character(folder, model_path, TINY, progress=False)

        # A standard PEFT folder: our loader (and so PEFT's format) reads it; its deltas are not zero.
        adapter = load_peft_adapter(result.adapter, checkpoint.config)
        assert adapter.rank == 4 and len(adapter.target_modules) == 7
        model = models("fp32")
        slots = LoraSlots(checkpoint.config, 1, torch.float32, rank=4)
        slots.load(0, adapter)
        ids = torch.tensor([tokenizer.encode_literal("Hello there, smith")])
        base = model.forward(ids, [0], [0], model.new_cache(1, 32))
        tuned = model.forward(ids, [0], [0], model.new_cache(1, 32), lora=LoraBatch(slots, [0], ids.shape[1]))
        assert (base - tuned).abs().max().item() > 1e-3
        assert "adapter: adapter" in (folder / "character.yaml").read_text()
        report = json.loads((folder / "training" / "report.json").read_text())
        assert len(report["train_loss"]) == 2 and len(report["held_out_lines"]) == 1
        assert (folder / "training" / "loss.png").stat().st_size > 1000

        # The running server picks it up: a new version, with an adapter, that talks.
        deadline = time.time() + 10
        while time.time() < deadline:
            now = asyncio.run(_list(server.address))["smith"]
            if now.has_adapter:
                break
            time.sleep(0.2)
        assert now.has_adapter and now.version != before.version and now.status == pb.CHARACTER_STATUS_READY
        started, text, finished = asyncio.run(_say(server.address))
        assert started.character_version == now.version and text and finished.emotion in now.emotions

        # Same seed, same data: the same adapter, byte for byte in its weights.
        first = load_file(result.adapter / "adapter_model.safetensors")
        train_character(folder, model_path, TINY, progress=False)
        second = load_file(result.adapter / "adapter_model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

        # npc eval's perplexities (fp32, so a second implementation can match them) against transformers + PEFT
        # on the same held-out tokens: with the adapter, and with it disabled.
        evaluation = evaluate_character(folder, model_path, weights="fp32", samples=1)
        assert evaluation.held_out_lines == 1 and evaluation.samples
        held = [c for c in read_dialogue(folder / "dialogue.jsonl") if c.line in report["held_out_lines"]]
        [example] = render(tokenizer, load_character(folder), held[0], 4096, character_retriever(folder))
        assert evaluation.reply_tokens == example.supervised
        peft = PeftModel.from_pretrained(copy.deepcopy(hf_model), result.adapter).eval()
        inputs = dict(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels]))
        with torch.no_grad():
            adapted = peft(**inputs)  # .loss: the mean NLL of the supervised tokens
            with peft.disable_adapter():
                bare = peft(**inputs)
        # fp32 on both sides: a token's NLL (logsumexp(z) - z_token) drifts by at most twice the logits' own drift
        # between two fp32 implementations (tests/rounding.py), and so does their mean.
        tolerance = 2 * reordered_fp32(checkpoint.config.num_layers, torch.cat([adapted.logits, bare.logits]))
        assert abs(math.log(evaluation.perplexity_adapter) - adapted.loss.item()) <= tolerance
        assert abs(math.log(evaluation.perplexity_base) - bare.loss.item()) <= tolerance
        # Far apart, so an eval that dropped the adapter (or used it for both) fails one of the two.
        assert abs(adapted.loss.item() - bare.loss.item()) > 2 * tolerance
    finally:
        server.stop()


def test_continuing_an_adapter_keeps_its_weights_shape_and_held_out_lines(tmp_path, model_path):
    """`npc train --continue adapter`: starts from the adapter's weights (at a learning rate too small to move
    them, the same adapter comes back), with its rank, alpha and targets whatever the flags say, and keeps the
    held-out lines of the training that wrote it, by content, so lines added since (above them too) never move
    one of those into training; the report keeps the earlier run's losses."""
    folder = _character(tmp_path, LINES)
    first = train_character(folder, model_path, TINY, progress=False)
    before = load_file(first.adapter / "adapter_model.safetensors")
    report0 = json.loads((folder / "training" / "report.json").read_text())
    held = report0["held_out_digests"]
    added = [_line(f"Got any {x}?", f"{x.title()}, aye. Cheap.") for x in ("nails", "tongs", "rope", "pitch")]
    # Two lines inserted at the top renumber every earlier line; two appended.
    (folder / "dialogue.jsonl").write_text("\n".join(added[:2] + LINES + added[2:]) + "\n")

    again = replace(TINY, rank=16, alpha=2.0, targets=("q_proj",), learning_rate=1e-12, continue_from="adapter")
    train_character(folder, model_path, again, progress=False)
    after = load_file(first.adapter / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(v.abs().max() > 0 for k, v in after.items() if "lora_B" in k)  # not a fresh adapter (B = 0)
    report = json.loads((folder / "training" / "report.json").read_text())
    assert (report["config"]["rank"], report["config"]["alpha"], len(report["config"]["targets"])) == (4, 8.0, 7)
    assert set(held) <= set(report["held_out_digests"]) and not set(held) & set(report["train_digests"])
    assert {n + 2 for n in report0["held_out_lines"]} <= set(report["held_out_lines"])  # the same lines, moved
    assert sorted(report["train_lines"] + report["held_out_lines"]) == list(range(1, len(LINES) + len(added) + 1))
    assert set(report["held_out_digests"]) - set(held) <= {line_digest(json.loads(a)) for a in added}
    assert [r["train_loss"] for r in report["earlier_runs"]] == [report0["train_loss"]]
    assert (folder / "training" / "loss.png").stat().st_size > 0

    with pytest.raises(UserError, match=r"--continue old: .*old/adapter_config.json not found"):
        train_character(folder, model_path, replace(TINY, continue_from="old"), progress=False)
    with pytest.raises(UserError, match="--continue must be a plain folder name"):
        replace(TINY, continue_from="../elsewhere")
    with pytest.raises(UserError, match="--fact-weight must be > 0"):
        replace(TINY, fact_weight=0.0)


def test_a_report_without_content_digests_is_read_by_line_number(tmp_path):
    """Reports written before content digests name lines by number: `--continue` and `npc eval` still find
    their sides; with digests, a line's content decides and an edited line is on neither side."""
    folder = _character(tmp_path, LINES)
    conversations = read_dialogue(folder / "dialogue.jsonl")
    old = {"train_lines": [1, 2], "held_out_lines": [3]}
    assert [[c.line for c in side] for side in recorded_sides(old, conversations)] == [[1, 2], [3]]
    new = {"train_digests": [conversations[0].digest], "held_out_digests": [conversations[2].digest],
           "train_lines": [9], "held_out_lines": [9]}
    assert [[c.line for c in side] for side in recorded_sides(new, conversations)] == [[1], [3]]
    edited = json.loads(LINES[2])
    edited["messages"][1]["content"] += " Edited."
    assert line_digest(edited) != conversations[2].digest
    assert line_digest(json.loads(json.dumps(json.loads(LINES[2]), indent=2))) == conversations[2].digest


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    """Random token ids; the second half of each row is "the reply" (supervised)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 64, (n,), generator=g).tolist()
        out.append(Example(i + 1, ids, [IGNORE] * (n - n // 2) + ids[n - n // 2:]))
    return out


def _tiny_lora_model():
    """A 2-layer Llama with LoRA on three projections, lora_B not zero (gradients reach lora_A as well)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _gradients(model, examples: list[Example], micro_tokens: int) -> tuple[float, dict[str, torch.Tensor]]:
    loss = _accumulate_gradients(model, examples, micro_tokens)
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss, out


def test_steps_reuse_a_few_bounded_shapes():
    """The memory fix (train.py's docstring): every forward is at most micro_tokens padded tokens (or one
    conversation), and widths come in multiples of WIDTH_MULTIPLE, so conversations of every length
    from 40 to 700 tokens make a handful of tensor shapes, not one per width (each new shape grew the
    process by ~15 MB of oneDNN / attention caches, and freed activations of odd sizes piled up)."""
    lengths = list(range(40, 700, 7))
    examples = _examples(lengths)
    order = list(examples)
    torch.manual_seed(0)
    shapes = set()
    for _ in range(3):
        order = [order[i] for i in torch.randperm(len(order)).tolist()]
        for i in range(0, len(order), 8):
            groups = _micro_batches(order[i:i + 8], 1024)
            assert sorted(e.line for g in groups for e in g) == sorted(e.line for e in order[i:i + 8])
            for group in groups:
                ids, mask, labels = _batch(group)
                longest = max(len(e.input_ids) for e in group)
                assert ids.shape[1] % WIDTH_MULTIPLE == 0 and longest <= ids.shape[1] < longest + WIDTH_MULTIPLE
                assert len(group) == 1 or ids.numel() <= 1024
                assert mask.sum().item() == sum(len(e.input_ids) for e in group)
                assert (labels != IGNORE).sum().item() == sum(e.supervised for e in group)
                shapes.add(tuple(ids.shape))
    assert len(shapes) <= 30, sorted(shapes)  # 95 different lengths


def test_micro_batches_give_the_full_batch_gradient():
    """Gradient accumulation over micro-batches = one backward of the whole batch's mean loss (what
    transformers computes), the loss comes back as a plain float, and the output head only sees
    row counts in multiples of WIDTH_MULTIPLE."""
    model = _tiny_lora_model()
    examples = _examples([37, 90, 64, 150, 21, 100, 75], seed=1)
    head_rows = []
    model.base_model.model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[0]))

    whole_loss, whole = _gradients(model, examples, 10_000)
    assert len(head_rows) == 1
    micro_loss, micro = _gradients(model, examples, 128)
    assert len(head_rows) > 3 and all(n % WIDTH_MULTIPLE == 0 for n in head_rows)
    assert isinstance(whole_loss, float) and isinstance(micro_loss, float)
    assert micro_loss == pytest.approx(whole_loss, rel=1e-3)
    for n in whole:
        assert torch.allclose(micro[n], whole[n], rtol=2e-2, atol=1e-4), n

    # transformers' own loss (float32, no padding tricks) over the same batch
    ids, mask, labels = _batch(examples)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert whole_loss == pytest.approx(reference, rel=2e-2)


def test_a_shared_prefix_runs_once_and_gives_the_same_loss_and_gradients():
    """Rows that start alike (the persona block of every conversation) share one pass over their common
    prefix; the loss is still transformers' loss over the whole rows and the gradients equal those of
    running every row on its own, while the model sees each prefix token once per group."""
    model = _tiny_lora_model()
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 64, (100,), generator=g).tolist()
    examples = []
    for i, n in enumerate([30, 75, 52, 64]):
        rest = torch.randint(0, 64, (n,), generator=g).tolist()
        examples.append(Example(i + 1, prefix + rest, [IGNORE] * (100 + n // 3) + rest[n // 3:]))
    assert _shared_prefix(examples) == 96  # 100 common tokens, rounded down to WIDTH_MULTIPLE
    seen = []
    model.base_model.model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))

    shared_loss, shared = _gradients(model, examples, 10_000)
    assert sum(seen) == 96 + 4 * 96  # the prefix once, then each row's rest padded to 96
    seen.clear()
    alone_loss, alone = _gradients(model, examples, 1)  # one row per group: nothing shared
    assert sum(seen) == sum(_padded_width(len(e.input_ids)) for e in examples)
    assert shared_loss == pytest.approx(alone_loss, rel=1e-2)
    for n in shared:
        assert torch.allclose(shared[n], alone[n], rtol=3e-2, atol=2e-4), n
    # --label-weight: the structured tokens' loss counts that many times, the rest once
    marked = [replace(e, structured=frozenset(range(len(e.labels) - 5, len(e.labels)))) for e in examples]
    with torch.no_grad():
        plain_sum = _loss_sum(model, marked)
        weighted_sum = _loss_sum(model, marked, 3.0)
        marked_sum = _loss_sum(model, [replace(e, labels=[t if i in e.structured else IGNORE
                                                           for i, t in enumerate(e.labels)]) for e in marked])
    assert weighted_sum.item() == pytest.approx(plain_sum.item() + 2 * marked_sum.item(), rel=1e-4)
    # --fact-weight: so does the loss of the tokens copied from the facts (a token both marked counts as structured)
    copied = [replace(e, copied=frozenset(range(len(e.labels) - 9, len(e.labels) - 3))) for e in marked]
    with torch.no_grad():
        both_sum = _loss_sum(model, copied, 3.0, 5.0)
        copied_sum = _loss_sum(model, [replace(e, labels=[t if i in e.copied - e.structured else IGNORE
                                                           for i, t in enumerate(e.labels)]) for e in copied])
    assert copied_sum.item() > 0
    assert both_sum.item() == pytest.approx(plain_sum.item() + 2 * marked_sum.item() + 4 * copied_sum.item(),
                                            rel=1e-4)

    full = [e.input_ids for e in examples]
    width = max(map(len, full))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in full])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in full])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in examples])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert shared_loss == pytest.approx(reference, rel=2e-2)


async def _list(address: str) -> dict[str, pb.Character]:
    async with NpcClient(address) as client:
        return {c.id: c for c in await client.list_characters()}


async def _say(address: str):
    async with NpcClient(address) as client:
        return await client.say("smith", "Got any swords?", options=pb.GenerationOptions(max_tokens=8))
