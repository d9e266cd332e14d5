"""Fuzzing the sidecar over a real gRPC socket with hypothesis.

Random and hostile TalkRequests, session calls and raw bytes go to one real `npc serve`. Every call
must end, within its deadline, with OK or a status of the contract in proto/npc/v1/dialogue.proto
(INVALID_ARGUMENT naming the field, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION), never INTERNAL,
UNKNOWN or a hang. Where the request is simple enough to judge here, the outcome is predicted
exactly: a request within the limits succeeds, one outside them names a field it broke. Afterwards
the server must be healthy, idle, and give the same greedy reply it gave before the fuzzing.

The examples are derandomized (the same every run) and not shrunk: the server keeps state
(sessions), so the first failing example, as it ran, is the one worth reading.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from sidecar.config import RequestLimits
from sidecar.dialogue.characters import load_character
from sidecar.dialogue.prompt import build_messages
from sidecar.dialogue.reply_format import reply_format
from sidecar.dialogue.retrieval import FactRetriever
from sidecar.engine.api import SamplingParams
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from tests.sidecar_process import SidecarProcess, copy_characters

DEADLINE_S = 20.0
LIMITS = RequestLimits()  # the server runs with the defaults
KNOWN = ("blacksmith", "oracle")
ID = re.compile(r"[a-z0-9_-]{1,64}")
MAX_SESSION_ID = 256
MAX_STORED_LINE = 20_000  # SessionState player_line / npc_line (proto)
GOOD_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION}
# Where an INVALID_ARGUMENT message may start: the path of a request field.
FIELD_PREFIXES = ("request:", "character_id:", "session_id:", "player_line:", "player_name:", "world",
                  "options.", "state", "entities", "allowed_actions")
METHODS = ("Talk", "ListCharacters", "ResetSession", "ExportSession", "ImportSession", "GetServerInfo")
REQUEST_TYPES = {"Talk": pb.TalkRequest, "ListCharacters": pb.ListCharactersRequest,
                 "ResetSession": pb.ResetSessionRequest, "ExportSession": pb.ExportSessionRequest,
                 "ImportSession": pb.ImportSessionRequest, "GetServerInfo": pb.GetServerInfoRequest}

FUZZ = settings(derandomize=True, database=None, deadline=None, phases=(Phase.explicit, Phase.generate),
                report_multiple_bugs=False, suppress_health_check=list(HealthCheck))


# --- the server ---------------------------------------------------------------------------------


@dataclass
class Fuzzed:
    server: SidecarProcess
    channel: grpc.Channel
    characters: dict  # id -> Character, as the server loaded it
    tokenizer: object
    context_tokens: int
    max_session_turns: int
    reference: dict[int, str]  # REFERENCE's reply by its cached prompt tokens (cold: 0, warm: most)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # hypothesis prints it with each failing example
        printer.text(f"Fuzzed(npc serve at {self.server.address})")


# Asked before and after the fuzzing, of a copy of the blacksmith that the fuzzing never talks to: the
# server computes in bf16, where a prompt prefix from the cache (rather than computed with the rest of
# the prompt) may flip a greedy near-tie, so the same reply is expected only with the same cache use.
REFERENCE = pb.TalkRequest(character_id="reference", player_line="Can you fix my sword?",
                           options=pb.GenerationOptions(max_tokens=12, temperature=0.0, seed=7))


def reference_reply(channel: grpc.Channel) -> tuple[int, str]:
    outcome = invoke(channel, "Talk", REFERENCE.SerializeToString())
    assert outcome.code == grpc.StatusCode.OK, f"{outcome.code.name}: {outcome.details}"
    events = [pb.TalkEvent.FromString(r) for r in outcome.replies]
    return events[0].started.cached_prompt_tokens, events[-1].finished.full_text


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tokenizer):
    root = copy_characters(tmp_path_factory.mktemp("characters"), KNOWN)
    shutil.copytree(root / "blacksmith", root / "reference")
    (root / "reference" / "character.yaml").write_text(
        (root / "blacksmith" / "character.yaml").read_text().replace("id: blacksmith", "id: reference", 1))
    # One torch thread: on a shared, busy machine, OpenMP threads that wait on each other's cores slow
    # a reply down 10-100x, past any deadline.
    server = SidecarProcess(root, "--max-waiting", "1000", env={"OMP_NUM_THREADS": "1"})
    channel = grpc.insecure_channel(server.address)
    try:
        info = pb.ServerInfo.FromString(invoke(channel, "GetServerInfo", b"").replies[0])
        reference = dict(reference_reply(channel) for _ in range(2))  # cold, then from the prefix cache
        yield Fuzzed(server, channel, {cid: load_character(root / cid) for cid in KNOWN}, tokenizer,
                     info.context_tokens, info.max_session_turns, reference)
    finally:
        channel.close()
        server.stop()


# --- calling it ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]  # serialized responses (stream events for Talk), as received


def invoke(channel: grpc.Channel, method: str, payload: bytes) -> Outcome:
    """One call with raw request bytes (no serializers: the bytes go out as they are)."""
    path = f"/npc.v1.NpcDialogue/{method}"
    replies: list[bytes] = []
    try:
        if method == "Talk":
            for reply in channel.unary_stream(path)(payload, timeout=DEADLINE_S):
                replies.append(reply)
        else:
            replies.append(channel.unary_unary(path)(payload, timeout=DEADLINE_S))
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", replies)
    return Outcome(grpc.StatusCode.OK, "", replies)


def check_contract(f: Fuzzed, outcome: Outcome) -> None:
    """What every call must satisfy, whatever was sent."""
    event(outcome.code.name)  # shown by --hypothesis-show-statistics
    if outcome.code not in GOOD_CODES:
        raise AssertionError(f"{outcome.code.name}: {outcome.details}\nserver log:\n{''.join(f.server.log[-10:])}")
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.details.startswith(FIELD_PREFIXES), f"message names no field: {outcome.details!r}"


# --- what a TalkRequest should get --------------------------------------------------------------


def talk_problems(req: pb.TalkRequest) -> list[str]:
    """The fields of `req` outside the documented limits, as the prefixes of their error messages."""
    o, found = req.options, []
    if not ID.fullmatch(req.character_id):
        found.append("character_id:")
    if len(req.session_id) > MAX_SESSION_ID:
        found.append("session_id:")
    if not req.player_line.strip() or len(req.player_line) > LIMITS.max_line_chars:
        found.append("player_line:")
    if len(req.player_name) > LIMITS.max_name_chars:
        found.append("player_name:")
    if len(req.world) > LIMITS.max_world_entries or any(
            not k.strip() or len(k) > LIMITS.max_world_key_chars or len(v) > LIMITS.max_world_value_chars
            for k, v in req.world.items()):
        found.append("world")
    if not 0 <= o.max_tokens <= LIMITS.max_tokens:
        found.append("options.max_tokens:")
    # Written so that NaN is out of range too.
    if o.HasField("temperature") and not 0 <= o.temperature <= 2:
        found.append("options.temperature:")
    if o.HasField("top_p") and not 0 < o.top_p <= 1:
        found.append("options.top_p:")
    if o.HasField("repetition_penalty") and not 0 < o.repetition_penalty <= 2:
        found.append("options.repetition_penalty:")
    if o.HasField("top_k") and o.top_k < 0:
        found.append("options.top_k:")
    if o.HasField("min_p") and not 0 <= o.min_p <= 1:
        found.append("options.min_p:")
    if len(o.stop) > LIMITS.max_stop_strings:
        found.append("options.stop:")
    elif any(not s or len(s) > LIMITS.max_stop_chars for s in o.stop):
        found.append("options.stop[")
    return found


def chatml_ids(tokenizer, messages) -> list[int]:
    """Prompt ids built by hand for a ChatML template: control tokens only where the template puts
    them, every message content literal (an independent reference for Tokenizer.encode_chat)."""
    start, end = (tokenizer.encode_raw_prompt(t)[-1] for t in ("<|im_start|>", "<|im_end|>"))
    ids = []
    for m in messages:
        ids += [start, *tokenizer.encode_literal(f"{m.role}\n{m.content}"), end, *tokenizer.encode_literal("\n")]
    return [*ids, start, *tokenizer.encode_literal("assistant\n")]


def reply_tokens(f: Fuzzed, req: pb.TalkRequest) -> int:
    """The engine's max_tokens for the reply: the text's budget, plus the emotion's and actions' room."""
    character = f.characters[req.character_id]
    text = SamplingParams(max_tokens=min(req.options.max_tokens or character.generation.max_tokens, LIMITS.max_tokens))
    fmt = reply_format(character.emotions, character.actions, {}, None)
    return fmt.sampling(text, LIMITS.max_tokens).max_tokens


RETRIEVER = FactRetriever()


def expected_prompt(f: Fuzzed, req: pb.TalkRequest, history=()) -> tuple[int, int] | None:
    """(prompt tokens, history turns) of a reply after `history`, or None when even the bare prompt
    cannot fit: the newest turns of this character that fit, then no style examples (prompt.fit_to_budget)."""
    character = f.characters[req.character_id]
    fmt = reply_format(character.emotions, character.actions, {}, None)  # a structured reply: its room too
    budget = f.context_tokens - reply_tokens(f, req)
    own = [t for t in history if t.character_id == character.id][-character.memory.max_turns:]
    # The facts and memories the server retrieves (the copied characters have no lore; tests/test_lore.py
    # checks what retrieval picks): the budget logic is what is predicted here.
    facts, memories = RETRIEVER.for_turn(character, history, req.player_line), \
        RETRIEVER.recall(character, history, req.player_line)

    def tokens(turns, examples: bool = True) -> int:
        messages = build_messages(character, turns, req.player_line, dict(req.world), req.player_name, examples,
                                  fmt, facts, memories)
        return len(chatml_ids(f.tokenizer, messages))

    for n in range(len(own), -1, -1):
        if (count := tokens(own[len(own) - n:])) <= budget:
            return count, n
    count = tokens((), examples=False)
    return (count, 0) if count <= budget else None


def check_talk(f: Fuzzed, req: pb.TalkRequest, outcome: Outcome, history=None) -> None:
    """`history`: the session's turns when known (none without a session_id), to predict the prompt exactly."""
    check_contract(f, outcome)
    if req.entities or req.HasField("allowed_actions"):
        return  # (random wire bytes only: the game's lists and allowed actions have tests of their own)
    problems = talk_problems(req)
    if problems:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, f"{problems} accepted: {outcome.code.name}"
        assert outcome.details.startswith(tuple(problems)), f"{outcome.details!r} names none of {problems}"
        assert not outcome.replies, "input errors come before Started"
        return
    if req.character_id not in KNOWN:
        assert outcome.code == grpc.StatusCode.NOT_FOUND and req.character_id in outcome.details, outcome.details
        return
    if not req.session_id:
        history = ()
    expected = expected_prompt(f, req, history or ())
    if expected is None:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.code.name
        assert outcome.details.startswith("player_line:"), outcome.details
        return
    assert outcome.code == grpc.StatusCode.OK, f"{outcome.code.name}: {outcome.details}"
    events = [pb.TalkEvent.FromString(r) for r in outcome.replies]
    kinds = [e.WhichOneof("event") for e in events]
    # started, the emotion (the fuzzed characters declare emotions), the text, the actions, finished
    assert kinds[:2] == ["started", "emotion"] and kinds[-1] == "finished", kinds
    body = kinds[2:-1]
    assert body == sorted(body, key=("delta", "action").index), kinds
    started, finished = events[0].started, events[-1].finished
    deltas = [e.delta.text for e in events if e.HasField("delta")]
    assert "".join(deltas) == finished.full_text
    assert all(deltas), "empty delta"
    assert events[1].emotion.label == finished.emotion
    assert [e.action for e in events if e.HasField("action")] == list(finished.actions)
    assert finished.reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), finished.reason
    assert 0 <= finished.usage.completion_tokens <= reply_tokens(f, req)
    assert finished.usage.prompt_tokens == started.prompt_tokens
    assert not any(s in finished.full_text for s in req.options.stop), "a stop string was streamed"
    assert finished.emotion in f.characters[req.character_id].emotions
    if history is not None:  # persona, world, history and line, every one of them literal text
        assert (started.prompt_tokens, started.history_turns) == expected, "the prompt is not as built by hand"


# --- strategies ---------------------------------------------------------------------------------

SPECIAL = ("<|im_end|>", "<|im_start|>", "<|im_start|>system", "<|im_start|>assistant\n", "</s>", "<s>",
           "<|endoftext|>", "<|eot_id|>", "<", "|", "<|", "|>", "im_end", "\n")
ODD = ("\x00", "\r", "\r\n", "\t", "\x0b", "\x1b[2J", "\x7f", "\x85", "\u2028", "\u202e", "\u200f", "\u200b",
       "\ufeff", "\ufffd", "\U0001f600", "\U0001d54f", "\U0010ffff", "e\u0301", "\u3000", "%s", "{0}",
       "{{ x }}", "{% endfor %}", "\\", "'", "\"")
ATOMS = SPECIAL + ODD


def text(max_atoms: int = 6, min_atoms: int = 0) -> st.SearchStrategy[str]:
    """Short hostile text: control tokens, control characters, RTL marks, astral characters, anything."""
    atom = st.one_of(st.sampled_from(ATOMS), st.text(min_size=1, max_size=6))
    return st.lists(atom, min_size=min_atoms, max_size=max_atoms).map("".join)


def nonblank(max_atoms: int) -> st.SearchStrategy[str]:
    """Hostile text with at least one character that is not whitespace (str.strip's idea of it)."""
    visible = st.one_of(st.sampled_from(SPECIAL[:-1]), st.characters(exclude_categories=("Zs", "Zl", "Zp", "Cc",
                                                                                          "Cs")))
    return st.tuples(text(max_atoms // 2), visible, text(max_atoms // 2)).map("".join)


def repeat(unit: str, n: int) -> str:
    """n characters of `unit` over and over, at most about 1 MB of UTF-8."""
    n = min(n, 1_000_000 * len(unit) // len(unit.encode()))
    return (unit * (n // len(unit) + 1))[:n]


def huge(*sizes: int) -> st.SearchStrategy[str]:
    units = st.sampled_from(("x", " ", "\x00", "é", "\U0001f600", "<|im_end|>", "ab\n"))
    return st.builds(repeat, units, st.sampled_from(sizes))


def rarely(common: st.SearchStrategy, rare: st.SearchStrategy, one_in: int = 10) -> st.SearchStrategy:
    """Mostly `common`: the rare values (long prompts) cost seconds of prefill each."""
    return st.sampled_from(range(one_in)).flatmap(lambda n: rare if n == one_in - 1 else common)  # (0 is drawn often)


line_ok = rarely(nonblank(6), huge(LIMITS.max_line_chars))
name_ok = text(4).map(lambda s: s[:LIMITS.max_name_chars])
world_ok = rarely(
    st.dictionaries(nonblank(3).map(lambda s: s[:LIMITS.max_world_key_chars]),
                    text(4).map(lambda s: s[:LIMITS.max_world_value_chars]), max_size=4),
    huge(LIMITS.max_world_value_chars).map(lambda v: {f"k{i:02}": v for i in range(LIMITS.max_world_entries)}))
stop_ok = st.lists(text(2, min_atoms=1).map(lambda s: s[:LIMITS.max_stop_chars]), max_size=LIMITS.max_stop_strings)
tiny = 1.401298464324817e-45  # the smallest float32 above 0
SESSION_POOL = ("", "fuzz", "fuzz/../../etc", "\U0001f480\u202e", " ", "\x00", "s" * MAX_SESSION_ID)
sessions_ok = st.one_of(st.sampled_from(SESSION_POOL), text(4).map(lambda s: s[:MAX_SESSION_ID]))
uint64 = st.one_of(st.sampled_from((0, 1, 2**63 - 1, 2**63, 2**64 - 1)), st.integers(0, 2**64 - 1))


def options_ok() -> st.SearchStrategy[pb.GenerationOptions]:
    """Options within the limits, extremes included; max_tokens small so a reply stays cheap."""
    return st.builds(
        pb.GenerationOptions, max_tokens=st.integers(1, 4),
        temperature=st.one_of(st.none(), st.sampled_from((0.0, -0.0, tiny, 1e-30, 2.0)), st.floats(0, 2, width=32)),
        top_p=st.one_of(st.none(), st.sampled_from((tiny, 1e-30, 1.0)), st.floats(0, 1, exclude_min=True, width=32)),
        top_k=st.one_of(st.none(), st.sampled_from((0, 1, 2**31 - 1)), st.integers(0, 2**31 - 1)),
        repetition_penalty=st.one_of(st.none(), st.sampled_from((tiny, 1e-30, 2.0)),
                                     st.floats(0, 2, exclude_min=True, width=32)),
        min_p=st.one_of(st.none(), st.sampled_from((0.0, -0.0, tiny, 1.0)), st.floats(0, 1, width=32)),
        seed=st.one_of(st.none(), uint64), stop=stop_ok)


def talk_ok() -> st.SearchStrategy[pb.TalkRequest]:
    return st.builds(pb.TalkRequest, character_id=st.sampled_from(KNOWN), session_id=sessions_ok,
                     player_line=line_ok, world=world_ok, options=options_ok(), player_name=name_ok)


BAD_IDS = ("", "../x", "..", ".", "/etc/passwd", "a/b", "a\\b", "CON", "NUL", "Blacksmith", "blacksmith\n",
           " blacksmith", "blacksmith\x00", "\uff42lacksmith", "blacksm\u0456th", "x" * 65, "x" * 10_000)
UNKNOWN_IDS = ("con", "nul", "-", "_", "ghost", "a" * 64, "blacksmith-")
floats_bad = st.sampled_from((math.nan, math.inf, -math.inf, -1.0, -tiny, 3.4e38))
int32_min, int32_max = -2**31, 2**31 - 1
# (field, strategy of a bad value) for one field of an otherwise good request.
BAD_FIELDS = {
    "character_id": st.one_of(st.sampled_from(BAD_IDS), text(3).filter(lambda s: not ID.fullmatch(s)),
                              huge(65, 1_000_000)),
    "session_id": st.one_of(huge(MAX_SESSION_ID + 1, 10_000), st.builds(repeat, text(2, min_atoms=1),
                                                                        st.just(MAX_SESSION_ID + 1))),
    "player_line": st.one_of(st.sampled_from(("", " ", "\t\r\n", "\u3000\u2028\x85", "\x1c\x1d")),
                             huge(LIMITS.max_line_chars + 1, 100_000, 1_000_000)),
    "player_name": huge(LIMITS.max_name_chars + 1, 100_000),
    "world": st.one_of(
        st.integers(LIMITS.max_world_entries + 1, 5_000).map(lambda n: {f"k{i}": "v" for i in range(n)}),
        st.sampled_from(({"": "v"}, {" ": "v"}, {"\n\t": "v"})),
        huge(LIMITS.max_world_key_chars + 1, 10_000).map(lambda k: {k: "v"}),
        huge(LIMITS.max_world_value_chars + 1, 500_000).map(lambda v: {"k": v})),
    "max_tokens": st.one_of(st.sampled_from((-1, int32_min, LIMITS.max_tokens + 1, int32_max)),
                            st.integers(int32_min, -1), st.integers(LIMITS.max_tokens + 1, int32_max)),
    "temperature": st.one_of(floats_bad, st.floats(2, exclude_min=True, width=32), st.floats(max_value=-tiny,
                                                                                                width=32)),
    "top_p": st.one_of(floats_bad, st.sampled_from((0.0, -0.0)), st.floats(1, exclude_min=True, width=32)),
    "repetition_penalty": st.one_of(floats_bad, st.sampled_from((0.0, -0.0)),
                                    st.floats(2, exclude_min=True, width=32)),
    "top_k": st.one_of(st.sampled_from((-1, int32_min)), st.integers(int32_min, -1)),
    "min_p": st.one_of(floats_bad, st.floats(1, exclude_min=True, width=32)),
    "stop": st.one_of(st.integers(LIMITS.max_stop_strings + 1, 5_000).map(lambda n: ["x"] * n),
                      st.sampled_from(([""], ["a", ""])),
                      huge(LIMITS.max_stop_chars + 1, 100_000).map(lambda s: [s])),
}
OPTION_FIELDS = {"max_tokens", "temperature", "top_p", "repetition_penalty", "top_k", "min_p", "stop"}


@st.composite
def talk_one_bad_field(draw) -> pb.TalkRequest:
    req = draw(talk_ok())
    field = draw(st.sampled_from(sorted(BAD_FIELDS)))
    value = draw(BAD_FIELDS[field])
    target = req.options if field in OPTION_FIELDS else req
    if field in ("world", "stop"):
        target.ClearField(field)
        (target.world.update if field == "world" else target.stop.extend)(value)
    else:
        setattr(target, field, value)
    return req


def talk_hostile() -> st.SearchStrategy[pb.TalkRequest]:
    """Anything goes, field by field; valid requests still keep max_tokens small."""
    options = st.builds(
        pb.GenerationOptions,
        max_tokens=st.one_of(st.integers(1, 4), BAD_FIELDS["max_tokens"]),
        temperature=st.one_of(st.none(), st.floats(width=32)),
        top_p=st.one_of(st.none(), st.floats(width=32)),
        top_k=st.one_of(st.none(), st.integers(int32_min, int32_max)),
        repetition_penalty=st.one_of(st.none(), st.floats(width=32)),
        min_p=st.one_of(st.none(), st.floats(width=32)),
        seed=st.one_of(st.none(), uint64),
        stop=st.one_of(stop_ok, BAD_FIELDS["stop"], st.lists(text(2), max_size=10)))
    return st.builds(
        pb.TalkRequest,
        character_id=st.one_of(st.sampled_from(KNOWN + UNKNOWN_IDS + BAD_IDS), text(2)),
        session_id=st.one_of(sessions_ok, BAD_FIELDS["session_id"]),
        player_line=st.one_of(line_ok, text(), BAD_FIELDS["player_line"], huge(LIMITS.max_line_chars)),
        world=st.one_of(world_ok, BAD_FIELDS["world"], st.dictionaries(text(2), text(3), max_size=6)),
        options=options,
        player_name=st.one_of(name_ok, BAD_FIELDS["player_name"]))


# --- sessions -----------------------------------------------------------------------------------

stored_line = st.one_of(text(), huge(MAX_STORED_LINE))
turn_ok = st.builds(pb.Turn, character_id=st.sampled_from(KNOWN + UNKNOWN_IDS), player_line=stored_line,
                    npc_line=stored_line, player_name=name_ok,
                    character_version=st.one_of(st.just(""), text(2).map(lambda s: s[:64])))
small_turn = st.builds(pb.Turn, character_id=st.sampled_from(KNOWN + UNKNOWN_IDS), player_line=text(2),
                       npc_line=text(2))


def many_turns(n: int) -> list[pb.Turn]:
    return [pb.Turn(character_id=KNOWN[i % 2], player_line=f"line {i}", npc_line="Hm.") for i in range(n)]


session_ids = st.one_of(sessions_ok, BAD_FIELDS["session_id"])
state_ok = st.builds(
    pb.SessionState, format_version=st.just(1), session_id=sessions_ok.map(lambda s: s or "empty"),
    turns=st.one_of(st.lists(turn_ok, max_size=6), st.lists(small_turn, max_size=40),
                    st.sampled_from((1, 255, 256)).map(many_turns)),
    updated_unix_ms=st.one_of(st.sampled_from((0, 2**63 - 1)), st.integers(0, 2**63 - 1)))
bad_turn = st.one_of(
    st.builds(pb.Turn, character_id=st.sampled_from(BAD_IDS), player_line=text(2), npc_line=text(2)),
    st.builds(pb.Turn, character_id=st.sampled_from(KNOWN), player_line=huge(MAX_STORED_LINE + 1, 200_000)),
    st.builds(pb.Turn, character_id=st.sampled_from(KNOWN), npc_line=huge(MAX_STORED_LINE + 1, 200_000)),
    st.builds(pb.Turn, character_id=st.sampled_from(KNOWN), player_name=huge(LIMITS.max_name_chars + 1, 10_000)))


@st.composite
def states(draw) -> pb.SessionState:
    """A save as ExportSession could give, or one with a single thing wrong."""
    state = draw(state_ok)
    broken = draw(st.sampled_from((None,) * 4 + ("format_version", "session_id", "updated_unix_ms", "turns", "turn")))
    if broken == "format_version":
        state.format_version = draw(st.sampled_from((0, 2, -1, int32_min, int32_max)))
    elif broken == "session_id":
        state.session_id = draw(st.one_of(st.just(""), BAD_FIELDS["session_id"]))
    elif broken == "updated_unix_ms":
        state.updated_unix_ms = draw(st.sampled_from((-1, -2**63)))
    elif broken == "turns":
        state.ClearField("turns")
        state.turns.extend(many_turns(draw(st.sampled_from((257, 3_000)))))
    elif broken == "turn":
        state.turns.insert(draw(st.integers(0, len(state.turns))), draw(bad_turn))
    return state


def state_problems(state: pb.SessionState, max_turns: int) -> list[str]:
    found = []
    if state.format_version != 1:
        found.append("state.format_version")
    if not 1 <= len(state.session_id) <= MAX_SESSION_ID:
        found.append("state.session_id")
    if state.updated_unix_ms < 0:
        found.append("state.updated_unix_ms")
    if len(state.turns) > max_turns:
        found.append("state.turns:")
    for i, t in enumerate(state.turns):
        if (not ID.fullmatch(t.character_id) or len(t.player_line) > MAX_STORED_LINE
                or len(t.npc_line) > MAX_STORED_LINE or len(t.player_name) > LIMITS.max_name_chars):
            found.append(f"state.turns[{i}].")
    return found


# --- the tests ----------------------------------------------------------------------------------


def _talk(f: Fuzzed, req: pb.TalkRequest) -> None:
    check_talk(f, req, invoke(f.channel, "Talk", req.SerializeToString()))


@settings(FUZZ, max_examples=40)
@given(req=talk_ok())
def test_valid_talk_requests_succeed(fuzzed, req):
    """Within the limits, however odd the text and options: a whole reply, prompt text kept literal."""
    _talk(fuzzed, req)


@settings(FUZZ, max_examples=120)
@given(req=talk_one_bad_field())
def test_one_bad_field_is_named(fuzzed, req):
    _talk(fuzzed, req)


@settings(FUZZ, max_examples=120)
@given(req=talk_hostile())
def test_hostile_talk_requests(fuzzed, req):
    _talk(fuzzed, req)


@settings(FUZZ, max_examples=150)
@given(method=st.sampled_from(("ResetSession", "ExportSession", "ImportSession", "ImportSession")), sid=session_ids,
       cid=st.one_of(st.just(""), st.sampled_from(KNOWN + UNKNOWN_IDS + BAD_IDS)),
       state=st.one_of(states(), states(), states(), st.none()), overwrite=rarely(st.just(True), st.just(False), 4),
       then_talk=st.sampled_from(KNOWN + ("", "")))
def test_hostile_session_calls(fuzzed, method, sid, cid, state, overwrite, then_talk):
    """Reset / Export / Import with hostile ids and saves; an accepted save reads back as it was and
    the next Talk in that session works, whatever the history holds."""
    f = fuzzed
    if method == "ImportSession":
        req = pb.ImportSessionRequest(state=state, overwrite=overwrite)
    else:
        req = REQUEST_TYPES[method](session_id=sid, character_id=cid)
    outcome = invoke(f.channel, method, req.SerializeToString())
    check_contract(f, outcome)
    if method != "ImportSession":
        problems = (["session_id:"] if not 1 <= len(sid) <= MAX_SESSION_ID else []) + (
            ["character_id:"] if cid and not ID.fullmatch(cid) else [])
        if problems:
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.code.name
            assert outcome.details.startswith(tuple(problems)), outcome.details
        else:
            allowed = {grpc.StatusCode.OK} | ({grpc.StatusCode.NOT_FOUND} if method == "ExportSession" else set())
            assert outcome.code in allowed, f"{outcome.code.name}: {outcome.details}"
        return
    if state is None:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and outcome.details.startswith("state")
        return
    problems = state_problems(state, f.max_session_turns)
    if problems:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, f"{problems} accepted: {outcome.code.name}"
        assert outcome.details.startswith(tuple(problems)), f"{outcome.details!r} names none of {problems}"
        return
    if outcome.code == grpc.StatusCode.ALREADY_EXISTS and not overwrite:
        return
    assert outcome.code == grpc.StatusCode.OK, f"{outcome.code.name}: {outcome.details}"
    assert pb.ImportSessionResponse.FromString(outcome.replies[0]).turns == len(state.turns)
    exported = invoke(f.channel, "ExportSession",
                      pb.ExportSessionRequest(session_id=state.session_id).SerializeToString())
    assert exported.code == grpc.StatusCode.OK, exported.details
    assert list(pb.SessionState.FromString(exported.replies[0]).turns) == list(state.turns)
    if then_talk:  # the imported history reaches a prompt: it must still fit and stay literal
        event("talk after import")
        req = pb.TalkRequest(character_id=then_talk, session_id=state.session_id, player_line="Hello?",
                             options=pb.GenerationOptions(max_tokens=2, temperature=0.0))
        check_talk(f, req, invoke(f.channel, "Talk", req.SerializeToString()), history=state.turns)


def mutated(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[:cut])


HOSTILE_BYTES = (
    b"\x5b" * 5_000,  # unknown field 11, 5000 groups deep
    b"\x2a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # a length that overflows 64 bits
    b"\x2a\xff\xff\xff\xff\x07",  # options: 2 GB promised, none sent
    b"\x1a\x02\xed\xa0",  # player_line: a UTF-8-encoded surrogate (not valid UTF-8)
    b"\x2a\x02\x08" * 3,  # options cut inside a field
    b"\x22\x04\x0a\x00\x12\x00" * 1_000,  # a thousand empty world entries
    b"\x00", b"\xff" * 16,
)

GOOD_PAYLOADS = {
    "Talk": pb.TalkRequest(character_id="oracle", session_id="raw", player_line="Hello there",
                           world={"weather": "rain"}, options=pb.GenerationOptions(max_tokens=2, stop=["."])),
    "ListCharacters": pb.ListCharactersRequest(),
    "ResetSession": pb.ResetSessionRequest(session_id="raw", character_id="oracle"),
    "ExportSession": pb.ExportSessionRequest(session_id="raw", character_id="oracle"),
    "ImportSession": pb.ImportSessionRequest(state=pb.SessionState(
        format_version=1, session_id="raw", turns=[pb.Turn(character_id="oracle", player_line="a", npc_line="b")])),
    "GetServerInfo": pb.GetServerInfoRequest(),
}


@settings(FUZZ, max_examples=200)
@given(method=st.sampled_from(METHODS), data=st.data())
def test_raw_bytes(fuzzed, method, data):
    """Random and corrupted bytes as the request message: INVALID_ARGUMENT when they do not parse."""
    payload = data.draw(st.one_of(
        st.sampled_from(HOSTILE_BYTES), st.binary(max_size=64), st.binary(min_size=1, max_size=4096),
        st.builds(mutated, st.just(GOOD_PAYLOADS[method].SerializeToString()),
                  st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
                  st.integers(0, 10_000))), label="payload")
    try:
        parsed = REQUEST_TYPES[method].FromString(payload)
    except DecodeError:  # the server parses with the same library: it must refuse these bytes
        parsed = None
    if method == "Talk" and parsed is not None and not talk_problems(parsed) and parsed.character_id in KNOWN:
        assume(1 <= parsed.options.max_tokens <= 4)  # a valid request: keep the reply short
    outcome = invoke(fuzzed.channel, method, payload)
    check_contract(fuzzed, outcome)
    if parsed is None:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.code.name
        assert outcome.details.startswith("request: not a valid"), outcome.details
    elif method == "Talk":
        check_talk(fuzzed, parsed, outcome)


def test_server_unharmed_after_fuzzing(fuzzed):
    """Runs last (file order): serving, idle, the same greedy reply as before, and a clean log."""
    f = fuzzed
    health = health_pb2_grpc.HealthStub(f.channel)
    for service in ("", "npc.v1.NpcDialogue"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    deadline = time.time() + 5
    while True:
        info = pb.ServerInfo.FromString(invoke(f.channel, "GetServerInfo", b"").replies[0])
        if info.active_sequences == 0 and info.waiting_requests == 0 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert (info.active_sequences, info.waiting_requests) == (0, 0)
    assert info.max_tokens_limit == LIMITS.max_tokens
    for _ in range(2):  # as it came (the fuzzing may have pushed its prefix out of the cache), then cached
        cached, text = reference_reply(f.channel)
        assert text == f.reference.get(cached), f"reference reply changed ({cached} cached prompt tokens)"
    assert f.server.proc.poll() is None, "the server died"
    log = "".join(f.server.log)
    assert "Traceback" not in log and "INTERNAL" not in log, log[-3000:]
    # What a client sends is quoted in the log only in part: a 1 MB field must not become a 1 MB log line.
    longest = max(f.server.log, key=len)
    length = len(longest)
    assert length < 4096, f"a {length}-character log line: {longest[:300]}..."
