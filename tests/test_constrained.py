"""Constrained decoding: the turn's grammar (dialogue/reply_format.py) and the engine's per-row masks
(engine/grammar.py), against a slow reference and with hypothesis-made schemas, entity lists and
adversarial "models" (random logits): every action that comes out is valid, by construction."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import llguidance
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import EngineConfig
from sidecar.dialogue.actions import MAX_ACTIONS_PER_REPLY, Action, ActionSpec, Argument, check_action
from sidecar.dialogue.reply_format import Emotion, Rejected, ReplyFormat, Text, render_reply, reply_format
from sidecar.engine.api import GrammarError, SamplingParams
from sidecar.engine.base_model import BaseModel
from sidecar.engine.grammar import Grammars
from sidecar.engine.llm_engine import LLMEngine
from sidecar.engine.tokenizer import ChatMessage
from tests.rounding import reordered_fp32

SELL = ActionSpec("sell_item", "Sell an item.", (Argument("item", "enum", values_from="stock"),
                                                  Argument("price", "integer", min=1, max=500)))
GATE = ActionSpec("open_gate", "Open the gate.")
NOTE = ActionSpec("leave_note", "Leave a note.", (Argument("text", "string", max_chars=20),
                                                   Argument("urgent", "boolean"),
                                                   Argument("ink", "enum", values=("red", "black"))))
EMOTIONS = ("gruff", "proud", "sad", "scornful")
STOCK = {"stock": ("iron sword", 'odd "quoted" axe', "helm")}


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, tokenizer.vocab_size)


def accepts(grammars: Grammars, fmt: ReplyFormat, tokenizer, raw: str) -> bool:
    """Whether the grammar takes `raw` (tokenized as the model would write it) and may end there."""
    matcher = grammars.matcher(fmt.grammar())
    return matcher.consume_tokens(tokenizer.encode_literal(raw)) and matcher.is_accepting()


def test_grammar_takes_what_training_renders_and_nothing_else(grammars, tokenizer):
    fmt = reply_format(EMOTIONS, (SELL, GATE, NOTE), STOCK, None)
    sell = Action("sell_item", (("item", 'odd "quoted" axe'), ("price", 40)))
    note = Action("leave_note", (("text", "café at dawn"), ("urgent", True), ("ink", "red")))
    reply = render_reply("Forty gold, lad.", "gruff", [sell, Action("open_gate"), note])
    assert accepts(grammars, fmt, tokenizer, reply)
    assert accepts(grammars, fmt, tokenizer, render_reply("Nothing for you.", "scornful"))
    for bad in (render_reply("Hi.", "angry"),  # not one of the character's emotions
                render_reply("Hi.", "gruff", [Action("sell_item", (("item", "dragon sword"), ("price", 40)))]),
                render_reply("Hi.", "gruff", [Action("sell_item", (("item", "helm"), ("price", 501)))]),
                render_reply("Hi.", "gruff", [Action("fly")]),
                render_reply("Hi.", "gruff", [Action("open_gate")] * (MAX_ACTIONS_PER_REPLY + 1)),
                render_reply("Hi.", "gruff", [Action("leave_note", (("text", "x" * 21), ("urgent", True),
                                                                    ("ink", "red")))]),
                "[gruff] ", "Hi there.", "[gruff] Two\nlines."):
        assert not accepts(grammars, fmt, tokenizer, bad), bad


def test_actions_need_their_entities_and_permission():
    assert [a.name for a in reply_format(EMOTIONS, (SELL, GATE), {}, None).actions] == ["open_gate"]  # no stock
    assert [a.name for a in reply_format(EMOTIONS, (SELL, GATE), STOCK, ["sell_item"]).actions] == ["sell_item"]
    assert reply_format(EMOTIONS, (SELL, GATE), STOCK, []).actions == ()
    assert reply_format((), (), STOCK, None).grammar() is None  # free text: no grammar at all


def test_text_budget_is_the_grammars(grammars, tokenizer):
    """max_tokens bounds the spoken text: the grammar ends the text after that many tokens."""
    fmt = ReplyFormat(EMOTIONS, (GATE,), {}, text_max_tokens=5)
    matcher = grammars.matcher(fmt.grammar())
    ids = tokenizer.encode_literal("[sad] one two three four five six seven")
    assert matcher.try_consume_tokens(ids) == len(tokenizer.encode_literal("[sad] one two three four five"))
    assert matcher.is_accepting()


def test_a_text_cut_at_its_budget_takes_no_action(grammars, tokenizer):
    """Where the grammar ends a line still going, the model must choose between an action and the end of the
    turn: an action chosen there says nothing about the player's line (a looping reply would sell the stock),
    so it is dropped and the reply reads as cut. The parser counts the text's tokens as the grammar does."""
    fmt = ReplyFormat(EMOTIONS, (GATE,), {}, text_max_tokens=5)
    matcher = grammars.matcher(fmt.grammar())
    ids = tokenizer.encode_literal("[sad] one two three four five six seven")
    taken = ids[:matcher.try_consume_tokens(ids)]  # the grammar stops the text after its 5 tokens
    forced_end = taken + tokenizer.encode_literal("\n@open_gate {}")
    assert matcher.consume_tokens(forced_end[len(taken):]) and matcher.is_accepting()  # the grammar allows it
    cut = fmt.parse_tokens(tokenizer.detokenizer(), forced_end)
    assert cut.text == "one two three four five" and cut.text_tokens == 5 and cut.text_cut
    assert cut.actions == []
    parser = fmt.parser()
    events = [part for token_id in forced_end for part in parser.push(tokenizer.decode([token_id]), tokens=1)]
    events += parser.finish("stop")
    assert isinstance(events[-1], Rejected) and "budget" in events[-1].problem
    roomy = replace(fmt, text_max_tokens=6).parse_tokens(tokenizer.detokenizer(), forced_end)
    assert not roomy.text_cut and roomy.actions == [Action("open_gate")]  # a line that ended by itself acts
    assert not fmt.parse(tokenizer.decode(forced_end)).text_cut  # text alone: the token count is unknown


@given(st.integers(1, 12), st.randoms(use_true_random=False))
@settings(max_examples=40, deadline=None)
def test_parser_reads_any_chunking(pieces, rnd):
    """However the stream is cut (a delta may hold several tokens, or half a label), the parts are the same."""
    fmt = reply_format(EMOTIONS, (SELL, GATE, NOTE), STOCK, None)
    actions = [Action("sell_item", (("item", "helm"), ("price", 7))), Action("open_gate")]
    raw = render_reply("Take it, lad.", "scornful", actions)
    cuts = sorted(rnd.sample(range(1, len(raw)), min(pieces, len(raw) - 1)))
    parser, parts = fmt.parser(), []
    for lo, hi in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        parts += parser.push(raw[lo:hi])
    parts += parser.finish("stop")
    assert parts[0] == Emotion("scornful") and [p for p in parts if isinstance(p, Action)] == actions
    assert "".join(p.text for p in parts if isinstance(p, Text)) == "Take it, lad." == parser.text


def test_emotion_comes_as_soon_as_the_label_is_certain():
    parser = reply_format(("gruff", "sad", "scornful"), (), {}, None).parser()
    assert parser.push("[g") == [Emotion("gruff")]  # only one label starts with "g"
    parser = reply_format(("gruff", "sad", "scornful"), (), {}, None).parser()
    assert parser.push("[s") == [] and parser.push("c") == [Emotion("scornful")]


def test_free_text_passes_through_whole():
    parser = reply_format((), (), {}, None).parser()
    assert parser.push("[gruff] two\nlines\n@x {}") == [Text("[gruff] two\nlines\n@x {}")]
    assert parser.finish("stop") == [] and parser.emotion == "" and parser.actions == []


def test_a_reply_cut_by_max_tokens_never_yields_half_an_action():
    fmt = reply_format(EMOTIONS, (SELL,), STOCK, None)
    parser = fmt.parser()
    parts = parser.push('[sad] Here.\n@sell_item {"item": "helm", "pri')
    parts += parser.finish("length")
    assert not [p for p in parts if isinstance(p, Action)] and isinstance(parts[-1], Rejected)
    assert parser.actions == []


# --- the engine: per-row masks in a shared batch -------------------------------------------------------------

@pytest.fixture(scope="module")
def base(models, tokenizer, model_path) -> BaseModel:
    return BaseModel(model_path, models("fp32"), tokenizer)


def _prompt(tokenizer, line: str) -> list[int]:
    system = ("You are Brynja, a gruff blacksmith. Begin each reply with how you feel, in brackets: [gruff], [proud], "
              "[sad] or [scornful]. To sell, add a line: @sell_item {\"item\": ..., \"price\": ...}")
    return tokenizer.encode_chat([ChatMessage("system", system), ChatMessage("user", line)])


def _slow_constrained_greedy(model, tokenizer, grammar: str, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: every step a fresh fp32 forward of the whole sequence, the grammar's allowed tokens read
    one by one from llguidance's byte-per-token bias, argmax over those."""
    lltok = llguidance.LLTokenizer(tokenizer.hf_json(), eos_token=list(tokenizer.eos_ids))
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    forced = matcher.compute_ff_tokens()
    assert matcher.consume_tokens(forced)
    ids, out = [*prompt, *forced], list(forced)
    while len(out) < max_tokens:
        cache = model.new_cache(rows=1, max_len=len(ids) + 1)
        logits = model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=cache)[0].float()
        allowed = torch.tensor(list(matcher.compute_logit_bias()), dtype=torch.int32) > 0
        masked = torch.full_like(logits, float("-inf"))
        masked[: len(allowed)][allowed] = logits[: len(allowed)][allowed]
        token = int(masked.argmax())
        top2 = masked.topk(2).values
        if top2[0] - top2[1] <= reordered_fp32(model.config.num_layers, logits):
            return out + [-1]  # a near tie: the batched run may take either; compare up to here
        if token in tokenizer.eos_ids:
            return out
        assert matcher.consume_token(token)
        ids.append(token)
        out.append(token)
    return out


def test_constrained_and_free_rows_share_a_batch(base, tokenizer):
    """Two constrained rows (different entity lists) and two free rows decode together: each constrained row
    is what the slow masked reference picks, each free row what it gives alone, unconstrained."""
    lines = ["I'll buy the iron sword.", "Hello there!", "Sell me your best helm.", "Nice weather."]
    grammars = [reply_format(EMOTIONS, (SELL,), {"stock": ("iron sword", "helm")}, None),
                None, reply_format(EMOTIONS, (SELL,), {"stock": ("helm",)}, None), None]
    engine = LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0))
    events = [[] for _ in lines]
    for i, (line, fmt) in enumerate(zip(lines, grammars, strict=True)):
        params = SamplingParams(max_tokens=24, grammar=fmt.grammar() if fmt else None)
        engine.add(engine.make_sequence(_prompt(tokenizer, line), None, params, events[i].append))
    while engine.has_work():
        engine.step()
    for i, (line, fmt) in enumerate(zip(lines, grammars, strict=True)):
        assert events[i][-1].kind == "finished", events[i][-1]
        got = list(events[i][-1].token_ids)
        if fmt is None:
            alone = LLMEngine(base, EngineConfig(max_batch=1, prefix_cache_mb=0))
            solo: list = []
            alone.add(alone.make_sequence(_prompt(tokenizer, line), None, SamplingParams(max_tokens=24), solo.append))
            while alone.has_work():
                alone.step()
            assert got == list(solo[-1].token_ids), line
            continue
        reference = _slow_constrained_greedy(base.model, tokenizer, fmt.grammar(), _prompt(tokenizer, line), 24)
        if reference and reference[-1] == -1:
            assert got[:len(reference) - 1] == reference[:-1], line
        else:
            assert got == reference, line
        assert events[i][-1].text.startswith("[") and fmt.parser().push(events[i][-1].text)[0].__class__ is Emotion


def test_bad_grammar_is_refused_at_submit(base):
    engine = LLMEngine(base, EngineConfig(max_batch=2))
    with pytest.raises(GrammarError, match="grammar:"):
        engine.make_sequence([1, 2, 3], None, SamplingParams(grammar="start: undefined_rule\n"), lambda e: None)


# --- adversarial "models": hypothesis-made schemas, entity lists and random logits -----------------------------

_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
# What check_entities lets through: no control characters, line breaks or unassigned code points.
_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn", "Zl", "Zp")), min_size=1,
                  max_size=12).filter(lambda v: v.strip())


@st.composite
def _argument(draw, name: str) -> Argument:
    kind = draw(st.sampled_from(("enum", "enum_from", "integer", "string", "boolean")))
    if kind == "enum":
        return Argument(name, "enum", values=tuple(draw(st.lists(_values, min_size=1, max_size=5, unique=True))))
    if kind == "enum_from":
        return Argument(name, "enum", values_from=draw(st.sampled_from(("stock", "places", "absent"))))
    if kind == "integer":
        low = draw(st.integers(-1000, 1000))
        return Argument(name, "integer", min=low, max=low + draw(st.integers(0, 2000)))
    return Argument(name, kind, max_chars=draw(st.integers(1, 16))) if kind == "string" else Argument(name, kind)


@st.composite
def _turn(draw):
    specs = []
    for name in draw(st.lists(_names, min_size=1, max_size=4, unique=True)):
        arg_names = draw(st.lists(_names, max_size=3, unique=True))
        specs.append(ActionSpec(name, "Do it.", tuple(draw(_argument(a)) for a in arg_names)))
    entities = {k: tuple(draw(st.lists(_values, min_size=0, max_size=4, unique=True))) for k in ("stock", "places")}
    allowed = draw(st.none() | st.lists(st.sampled_from([s.name for s in specs]), unique=True))
    emotions = tuple(draw(st.lists(_names, max_size=4, unique=True)))
    return reply_format(emotions, specs, entities, allowed), tuple(specs), allowed


@given(_turn(), st.integers(0, 2**32 - 1))
@settings(max_examples=260, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_emitted_action_is_valid(grammars, tokenizer, turn, seed):
    """Four replies per example (over 1000 in all), each drawn from random logits pushed toward the
    grammar's structure tokens, through the engine's own mask path: what the parser yields is always valid
    against the schema, the request's entities and its allowed actions; a reply cut short yields no half
    action."""
    fmt, specs, allowed = turn
    grammar = fmt.grammar() or "start: /[^\\n]+/\n"
    rnd = random.Random(seed)
    structure = tokenizer.encode_literal('\n@{}": ,') + list(tokenizer.eos_ids)
    for _ in range(4):
        matcher = grammars.matcher(grammar)
        forced = matcher.compute_ff_tokens()
        assert matcher.consume_tokens(forced)
        out, max_tokens = list(forced), rnd.choice((12, 40, 120))
        reason = "length"
        while len(out) < max_tokens:
            logits = torch.randn(1, grammars.logits_width, generator=torch.Generator().manual_seed(rnd.getrandbits(32)))
            logits[0, structure] += rnd.uniform(0, 12)  # an adversary that keeps trying to open actions and stop
            bitmask = grammars.start_masks([matcher]).result()
            token = int(grammars.apply(logits, bitmask)[0].argmax())
            if token in tokenizer.eos_ids:
                assert matcher.is_accepting()
                reason = "stop"
                break
            assert matcher.consume_token(token), matcher.get_error()
            out.append(token)
        parser = fmt.parser()
        parts = parser.push(tokenizer.decode(out)) + parser.finish(reason)
        for action in (p for p in parts if isinstance(p, Action)):
            assert check_action(specs, action, fmt.entities, allowed) is None, action
            spec = next(s for s in specs if s.name == action.name)
            for arg, (_, value) in zip(spec.arguments, action.arguments, strict=True):
                if arg.values_from:
                    assert value in fmt.entities[arg.values_from]  # only what the game listed
        if reason == "stop" and fmt.emotions:
            assert parser.emotion in fmt.emotions
        json.dumps([p.to_dict() for p in parts if isinstance(p, Action)])
