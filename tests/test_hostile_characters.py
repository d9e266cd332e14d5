"""Hostile character folders: each is refused with an error naming the file and the field or tensor,
the other characters keep serving, nothing is executed or unpickled, and nothing outside
`characters/` is read (checked with an audit hook on every `open`).

The policy under test (characters/README.md, "Security"):
- character.yaml: at most 1 MB (refused on its size, never read), UTF-8, safe YAML only: no tags
  that build objects, no aliases, no duplicate keys, nesting at most 16 deep;
- symbolic links are followed only while they stay inside: a character folder inside the
  characters folder, character.yaml and the adapter's files inside the character folder;
- adapters: safetensors only (a pickle is never opened), float tensors of the base model's shapes,
  finite weights, 1 <= rank <= max_rank and as adapter_config.json declares it, a config of at
  most 1 MB whose pattern keys are plain module names (never evaluated as regular expressions).

The cases the older tests cover (test_dialogue_characters, test_dialogue_registry, test_adapters)
are not repeated here; these go through the registry with the server's real adapter validator.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from structlog.testing import capture_logs

from sidecar.dialogue.characters import ADAPTER_FILE_LIMITS, CharacterError, load_character
from sidecar.dialogue.check import check_characters
from sidecar.dialogue.registry import CharacterRegistry, CharacterUnavailable, LoadState
from sidecar.dialogue.yaml_file import MAX_FILE_BYTES
from sidecar.engine.adapters import read_adapter
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.config import LlamaConfig
from sidecar.model.lora import AdapterError, load_peft_adapter
from sidecar.model.random_adapter import write_random_adapter
from tests.tiny import tiny_spm_gguf

MAX_RANK = 8  # the validator's max_rank here; the adapters below have rank 4
RANK = 4
HUGE = 50 << 20  # a 50 MB file (sparse: it costs no disk)
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def character_yaml(cid: str, extra: str = "") -> str:
    return f"id: {cid}\nname: {cid.title()}\npersona: You are {cid}.\n{extra}"


def with_adapter(cid: str) -> str:
    return character_yaml(cid, "adapter: adapter\n")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, LlamaConfig]:
    """The one-layer GGUF of tests/tiny.py and its config, as `npc serve --model` would see it."""
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    tiny_spm_gguf(path)
    return path, load_checkpoint(path).config


@pytest.fixture
def config(model) -> LlamaConfig:
    return model[1]


@pytest.fixture
def root(tmp_path, config) -> Path:
    """characters/ with one good character whose adapter is valid: it must keep serving throughout."""
    root = (tmp_path / "characters").resolve()
    root.mkdir()
    put(root, "smith", with_adapter("smith"))
    write_random_adapter(root / "smith" / "adapter", config, seed=1, rank=RANK)
    return root


def put(root: Path, cid: str, text: str | bytes) -> Path:
    home = root / cid
    home.mkdir(exist_ok=True)
    path = home / "character.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return home


def sparse_file(path: Path, size: int = HUGE) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def bytes_read() -> int | None:
    """Bytes this process has read so far, from any file (Linux's /proc/self/io `rchar`); None elsewhere."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in lines if line.startswith("rchar:"))


def readable_bytes(root: Path) -> int:
    """The most a scan of `root` may read: each file within its size limit twice (hashed for the version, then
    parsed), plus 64 KiB for anything else (/proc/self/io itself); a file over its limit is never read."""
    limits = {"character.yaml": MAX_FILE_BYTES, **ADAPTER_FILE_LIMITS}
    sizes = {path: path.stat().st_size for path in root.rglob("*") if path.is_file()}
    return 2 * sum(size for path, size in sizes.items() if size <= limits.get(path.name, -1)) + (64 << 10)


def serve(root: Path, config: LlamaConfig) -> tuple[CharacterRegistry, list[dict]]:
    """A registry whose adapter validator is the server's (sidecar/server/app.py); and what it logged."""
    def validator(c):
        return read_adapter(config, MAX_RANK, c.id, c.adapter_path, c.adapter_version, c.lora_scale)

    with capture_logs() as logs:
        registry = CharacterRegistry(root, adapter_loader=validator)
    return registry, logs


def assert_refused(registry: CharacterRegistry, logs: list[dict], cid: str, *words: str) -> str:
    status = registry.status(cid)
    assert status is not None and status.status is LoadState.FAILED and not status.serving, status
    for word in words:
        assert word in status.error, status.error
    with pytest.raises(CharacterUnavailable):
        registry.get(cid)
    assert_others_serve(registry, logs)
    return status.error


def assert_others_serve(registry: CharacterRegistry, logs: list[dict]) -> None:
    assert registry.status("smith").status is LoadState.READY and registry.get("smith").has_adapter
    # A user mistake is a one-line warning: never an exception logged with its traceback.
    crashes = [entry for entry in logs if entry.get("exc_info") or entry["log_level"] in ("error", "critical")]
    assert crashes == []


def plant_pickle(path: Path, marker: Path) -> None:
    """A pickle that creates `marker` when unpickled (proved on a decoy in test_pickles_are_never_opened)."""
    path.write_bytes(pickle.dumps(_Payload(marker)))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# --- character.yaml -------------------------------------------------------------------------------

BASE = character_yaml("evil")


DEEP = "generation:\n" + "".join("  " * i + f"  l{i}:\n" for i in range(20)) + "  " * 21 + "x: 1\n"
MAX_TOKENS = "generation.max_tokens"
# name -> (character.yaml, the field named, words of the error)
BAD_YAML = {
    # malformed
    "tabs": ("id: evil\nname: Evil\ngeneration:\n\tmax_tokens: 5\npersona: x\n", None,
             ["line 4 column 1", "not tabs"]),
    "binary-garbage": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), None, ["not UTF-8 text"]),
    "nul-byte": (b"id: evil\nname: Ev\x00il\npersona: x\n", None, ["character #x0000 at line 2", "not allowed"]),
    "only-a-comment": ("# only a comment\n", None, ["the file is empty"]),
    "not-a-mapping": ("just a sentence\n", None, ["must be a mapping of fields", "'just a sentence'"]),
    "two-documents": (BASE + "---\nid: other\n", None, ["expected a single document"]),
    "bad-indent": ("id: evil\nname: Evil\npersona: x\n  more: y\n", None, ["invalid YAML", "line 4"]),
    # objects, aliases, duplicates, nesting
    "python-object-apply": (BASE + "greeting: !!python/object/apply:os.system ['touch {marker}']\n", None,
                            ["invalid YAML", "python/object"]),
    "python-name": (BASE + "greeting: !!python/name:os.system\n", None, ["invalid YAML", "python/name"]),
    "custom-tag": (BASE + "knowledge: !include /etc/passwd\n", None, ["invalid YAML", "'!include'"]),
    "merge-alias": ("base: &b {temperature: 0.1}\n" + BASE + "generation:\n  <<: *b\n", "generation.<<",
                    ["aliases"]),
    "duplicate-nested-key": (BASE + "style_examples:\n  - {player: a, player: b, npc: c}\n",
                             "style_examples[0].player", ["twice"]),
    "deep-mapping": (BASE + DEEP, "generation." + ".".join(f"l{i}" for i in range(15)), ["nested deeper than 16"]),
    # a wrong type for every kind of field
    "id-list": ("id: [evil]\nname: Evil\npersona: x\n", "id", ["must be a string, got a list"]),
    "id-number": ("id: 7\nname: Evil\npersona: x\n", "id", ["must be a string, got 7 (put it in quotes)"]),
    "id-path": ("id: ../../etc\nname: Evil\npersona: x\n", "id", ["must match"]),
    "name-mapping": ("id: evil\nname: {first: E}\npersona: x\n", "name", ["must be a string, got a mapping"]),
    "persona-number": ("id: evil\nname: Evil\npersona: 3.5\n", "persona", ["got 3.5 (put it in quotes)"]),
    "persona-too-long": ("id: evil\nname: Evil\npersona: " + "x" * 20_001 + "\n", "persona",
                         ["20001 characters long"]),
    "greeting-bool": (BASE + "greeting: true\n", "greeting", ["got True"]),
    "greeting-bad-date": (BASE + "greeting: 2024-02-30\n", "greeting",
                          ["cannot read the value '2024-02-30'", "day is out of range"]),
    "greeting-binary": (BASE + "greeting: !!binary aGk=\n", "greeting", ["must be a string, got b'hi'"]),
    "knowledge-mapping": (BASE + "knowledge: {a: b}\n", "knowledge", ["must be a list"]),
    "knowledge-300": (BASE + "knowledge: [" + ", ".join(["fact"] * 300) + "]\n", "knowledge",
                      ["300 entries; the limit is 256"]),
    "emotions-text": (BASE + "emotions: calm\n", "emotions", ["must be a list"]),
    "emotions-null": (BASE + "emotions: [calm, null]\n", "emotions[1]", ["non-empty string, got None"]),
    "style-example-text": (BASE + "style_examples: [hello]\n", "style_examples[0]", ["must be a mapping", "'hello'"]),
    "style-examples-mapping": (BASE + "style_examples: {player: a, npc: b}\n", "style_examples", ["must be a list"]),
    "style-example-list": (BASE + "style_examples:\n  - {player: [a], npc: b}\n", "style_examples[0].player",
                           ["got a list"]),
    "generation-list": (BASE + "generation: [1, 2]\n", "generation", ["must be a mapping"]),
    "memory-number": (BASE + "memory: 5\n", "memory", ["must be a mapping"]),
    "max-tokens-text": (BASE + "generation: {max_tokens: '80'}\n", MAX_TOKENS, ["whole number", "got '80'"]),
    "max-tokens-float": (BASE + "generation: {max_tokens: 80.0}\n", MAX_TOKENS, ["whole number", "got 80.0"]),
    "max-tokens-huge": (BASE + "generation: {max_tokens: 99999999999999999999999}\n", MAX_TOKENS, ["whole number"]),
    "max-tokens-20000-bits": (BASE + "generation: {max_tokens: 0x" + "f" * 5000 + "}\n", MAX_TOKENS,
                              ["a number of 20000 bits"]),
    "max-tokens-5000-digits": (BASE + "generation: {max_tokens: " + "9" * 5000 + "}\n", MAX_TOKENS,
                               ["cannot read the value"]),
    "max-turns-inf": (BASE + "memory: {max_turns: .inf}\n", "memory.max_turns", ["whole number", "got inf"]),
    "temperature-nan": (BASE + "generation: {temperature: .nan}\n", "generation.temperature", ["got nan"]),
    "temperature-bool": (BASE + "generation: {temperature: false}\n", "generation.temperature", ["got False"]),
    "temperature-list": (BASE + "generation: {temperature: [0.5]}\n", "generation.temperature", ["got a list"]),
    "top-p-minus-inf": (BASE + "generation: {top_p: -.inf}\n", "generation.top_p", ["got -inf"]),
    "lora-scale-nan": (BASE + "adapter: adapter\nlora_scale: .nan\n", "lora_scale", ["got nan"]),
    "lora-scale-text": (BASE + "adapter: adapter\nlora_scale: '1.0'\n", "lora_scale", ["got '1.0'"]),
    "adapter-list": (BASE + "adapter: [adapter]\n", "adapter", ["must be a string"]),
    "adapter-nul": (BASE + 'adapter: "ada\\0pter"\n', "adapter", ["control characters"]),
    "adapter-too-long": (BASE + "adapter: " + "a" * 300 + "\n", "adapter", ["not found"]),
    "key-not-text": (BASE + "1: one\n", "1", ["unknown field"]),
}


@pytest.mark.parametrize("name", list(BAD_YAML))
def test_bad_character_yaml_is_refused_and_the_others_serve(root, config, tmp_path, name):
    text, field, words = BAD_YAML[name]
    marker = tmp_path / "PWNED"
    put(root, "evil", text.replace("{marker}", str(marker)) if isinstance(text, str) else text)
    registry, logs = serve(root, config)
    error = assert_refused(registry, logs, "evil", str(root / "evil" / "character.yaml"), *words)
    if field:
        assert f"character.yaml: {field}: " in error
    assert not marker.exists()


def test_a_bom_is_fine(root, config):
    put(root, "evil", b"\xef\xbb\xbf" + character_yaml("evil").encode())
    registry, logs = serve(root, config)
    assert registry.get("evil").name == "Evil"
    assert_others_serve(registry, logs)


def test_huge_character_yaml_is_refused_on_its_size(root, config):
    home = put(root, "evil", "")
    sparse_file(home / "character.yaml")
    before = bytes_read()
    registry, logs = serve(root, config)
    # "file is N bytes" comes from the size check before reading ("over the limit" would be after a read)
    assert_refused(registry, logs, "evil", f"character.yaml: file is {HUGE} bytes; the limit is 1048576")
    # Bytes, not seconds: what the scan read is within what smith's files allow (a read of the huge file stopped
    # at the limit would add 1 MiB).
    if before is not None:
        assert bytes_read() - before <= readable_bytes(root)


def test_a_fifo_is_refused_without_hanging(root):
    home = root / "evil"
    home.mkdir()
    os.mkfifo(home / "character.yaml")  # opening a FIFO to read blocks until a writer comes
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: _catch(outcome, load_character, home), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "load_character hangs on a FIFO"
    assert isinstance(outcome[0], CharacterError) and "not a regular file" in str(outcome[0])


def _catch(into: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:
        into.append(e)


# --- nothing outside characters/ is read ------------------------------------------------------------

_opened: list[str] | None = None  # while recording: the real path of every file opened
_audit_installed = False  # an audit hook cannot be removed: it is installed once, and idle between tests


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


@pytest.fixture
def opened():
    """The real paths of the files opened while the test runs (the adapter loader opens files with Python's
    open and parses the bytes, so the audit hook sees every one)."""
    global _opened, _audit_installed
    if not _audit_installed:
        sys.addaudithook(_audit)
        _audit_installed = True
    _opened = []
    yield _opened
    _opened = None


def outside_world(tmp_path: Path, config: LlamaConfig) -> Path:
    """Beside characters/: a secret, and a complete character and adapter that would load if followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the password is swordfish\n")
    write_random_adapter(outside / "adapter", config, seed=2, rank=RANK)
    for cid in ("yamllink", "dirlink"):
        put(outside, cid, character_yaml(cid))
    return outside


def test_nothing_outside_the_characters_folder_is_read(root, config, tmp_path, model, opened):
    outside = outside_world(tmp_path, config)
    put(root, "yamllink", "").joinpath("character.yaml").unlink()
    os.symlink(outside / "yamllink" / "character.yaml", root / "yamllink" / "character.yaml")
    os.symlink(outside / "dirlink", root / "dirlink")  # a whole character folder linked in from outside
    put(root, "adapterlink", with_adapter("adapterlink"))
    os.symlink(outside / "adapter", root / "adapterlink" / "adapter")
    for cid, name in (("weightslink", "adapter_model.safetensors"), ("configlink", "adapter_config.json")):
        home = put(root, cid, with_adapter(cid))
        (home / "adapter").mkdir()
        os.symlink(outside / "adapter" / name, home / "adapter" / name)
        other = ({"adapter_config.json", "adapter_model.safetensors"} - {name}).pop()
        (home / "adapter" / other).write_bytes((outside / "adapter" / other).read_bytes())
    put(root, "dotdot", character_yaml("dotdot", "adapter: ../../outside/adapter\n"))
    put(root, "absolute", character_yaml("absolute", f"adapter: {outside / 'adapter'}\n"))
    put(root, "sibling", character_yaml("sibling", "adapter: ../smith/adapter\n"))  # inside characters/, not its own
    home = put(root, "loop", with_adapter("loop"))
    os.symlink(home / "adapter", home / "adapter")
    home = put(root, "secretlink", with_adapter("secretlink"))
    (home / "adapter").mkdir()
    os.symlink(outside / "secret.txt", home / "adapter" / "adapter_config.json")

    opened.clear()  # what the test wrote above does not count
    registry, logs = serve(root, config)
    expected = {
        "yamllink": "outside the character folder", "dirlink": "outside the characters folder",
        "adapterlink": "leads through a symbolic link outside the character folder",
        "weightslink": "adapter/adapter_model.safetensors is a link outside the character folder",
        "configlink": "adapter/adapter_config.json is a link outside the character folder",
        "dotdot": "leads outside the character folder", "absolute": "must be a folder relative",
        "sibling": "leads outside the character folder", "loop": "not found",
        "secretlink": "adapter/adapter_config.json is a link outside the character folder",
    }
    for cid, words in expected.items():
        assert_refused(registry, logs, cid, str(root / cid / "character.yaml"), words)
    registry.reload()
    problems, count = check_characters(
        root, lambda c: read_adapter(config, MAX_RANK, c.id, c.adapter_path, c.version, c.lora_scale))
    assert count == 11 and len(problems) == 10

    mine = [p for p in opened if Path(p).is_relative_to(tmp_path.resolve())]
    assert str(root / "smith" / "adapter" / "adapter_model.safetensors") in mine  # the hook sees what is read
    assert [p for p in mine if not Path(p).is_relative_to(root)] == []


def test_pickles_are_never_opened(root, config, tmp_path, opened):
    decoy = tmp_path / "decoy"
    plant_pickle(tmp_path / "payload.pkl", decoy)
    pickle.loads((tmp_path / "payload.pkl").read_bytes())
    assert decoy.exists()  # the payload is live: unpickling it runs code

    marker = tmp_path / "PWNED"
    for cid, files in (("binonly", ["adapter_model.bin"]), ("ptonly", ["adapter.pt"]),
                       ("beside", ["adapter_model.bin", "adapter_model.safetensors"])):
        home = put(root, cid, with_adapter(cid))
        write_random_adapter(home / "adapter", config, seed=3, rank=RANK)
        if "adapter_model.safetensors" not in files:
            (home / "adapter" / "adapter_model.safetensors").unlink()
        for name in files:
            if name != "adapter_model.safetensors":
                plant_pickle(home / "adapter" / name, marker)

    opened.clear()  # (writing the pickles opened them)
    registry, logs = serve(root, config)
    for cid in ("binonly", "ptonly"):
        assert_refused(registry, logs, cid, "pickled weights (adapter_model.bin) are refused")
    # Beside a safetensors file, a pickle is ignored (as PEFT does): the safetensors file is what loads.
    assert registry.status("beside").status is LoadState.READY
    assert not marker.exists()
    assert [p for p in opened if p.endswith((".bin", ".pt"))] == []


# --- adapters -----------------------------------------------------------------------------------------


def edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def edit_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def set_rank(tensors: dict, rank: int) -> None:
    for key, value in list(tensors.items()):
        tensors[key] = torch.randn(rank, value.shape[1]) if ".lora_A." in key else torch.randn(value.shape[0], rank)


# How to break a valid rank-4 adapter folder: each returns a function of the folder.
def config_with(**fields):
    return lambda folder: edit_config(folder, **fields)


def weights_with(change):
    return lambda folder: edit_weights(folder, change)


def write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def truncate(name: str, size: int):
    return lambda folder: os.truncate(folder / name, size)


def grow(name: str, size: int):
    return lambda folder: sparse_file(folder / name, size)


CONFIG = "adapter_config.json: "
WEIGHTS = "adapter_model.safetensors: "
CANNOT_READ = "cannot read adapter_model.safetensors"
# name -> (how to break the folder, words of the error)
BROKEN_ADAPTERS = {
    "r-100000": (config_with(r=100000), [CONFIG + "r: rank 100000 is above max_rank 8"]),
    "r-0": (config_with(r=0), [CONFIG + "r: must be a whole number of at least 1, got 0"]),
    "r-minus-1": (config_with(r=-1), [CONFIG + "r: must be a whole number of at least 1, got -1"]),
    "r-eight": (config_with(r="eight"), [CONFIG + "r: ", "got 'eight'"]),
    "r-true": (config_with(r=True), [CONFIG + "r: ", "got True"]),
    "r-null": (config_with(r=None), [CONFIG + "r: ", "got None"]),
    "r-above-max": (config_with(r=16), [CONFIG + "r: rank 16 is above max_rank 8"]),
    "r-not-the-tensors": (config_with(r=8), [WEIGHTS, "the tensors have rank 4, adapter_config.json says 8"]),
    "rank-above-max": (weights_with(lambda t: set_rank(t, 16)), [WEIGHTS, "rank 16 is above max_rank 8"]),
    "alpha-nan": (write("adapter_config.json", b'{"r": 4, "lora_alpha": NaN}'),
                  [CONFIG + "lora_alpha: must be a finite number, got nan"]),
    "alpha-string": (config_with(lora_alpha="16"), [CONFIG + "lora_alpha: ", "got '16'"]),
    "alpha-overflow": (config_with(lora_alpha=1e300), [WEIGHTS, "scales the weights past the float range"]),
    "rslora-string": (config_with(use_rslora="false"), [CONFIG + "use_rslora: must be true or false"]),
    "regex-bomb": (config_with(alpha_pattern={"(.*)*X": 8}),  # minutes per module, were it a regex
                   [CONFIG + "alpha_pattern: key '(.*)*X'", "not a regular expression"]),
    "alpha-pattern-list": (config_with(alpha_pattern=["q_proj"]), [CONFIG + "alpha_pattern: must be"]),
    "rank-pattern-zero": (config_with(rank_pattern={"q_proj": 0}), [CONFIG + "rank_pattern.q_proj: "]),
    "unknown-target": (config_with(target_modules=["q_proj", "lm_head"]),
                       [CONFIG + "target_modules: 'lm_head' is not a module we support"]),
    "targets-number": (config_with(target_modules=5), [CONFIG + "target_modules: must be a list"]),
    "config-list": (write("adapter_config.json", b"[4]"), ["adapter_config.json must hold a JSON object"]),
    "config-empty": (write("adapter_config.json", b""), ["adapter_config.json is not valid JSON"]),
    "config-not-utf8": (write("adapter_config.json", b'{"r": "\xff"}'), ["adapter_config.json is not valid JSON"]),
    "config-deep": (write("adapter_config.json", b"[" * 100_000 + b"]" * 100_000),
                    ["adapter_config.json is not valid JSON"]),
    "config-big-number": (write("adapter_config.json", b'{"r": ' + b"9" * 5000 + b"}"),
                          ["adapter_config.json is not valid JSON"]),
    "config-huge": (grow("adapter_config.json", HUGE),
                    [f"adapter: adapter/adapter_config.json is {HUGE} bytes; the limit is 1048576"]),
    "weights-empty": (write("adapter_model.safetensors", b""), [CANNOT_READ, "too small"]),
    "weights-huge-header": (write("adapter_model.safetensors", (1 << 60).to_bytes(8, "little") + b"{}"),
                            [CANNOT_READ, "header too large"]),
    "weights-garbage": (write("adapter_model.safetensors", bytes(range(256)) * 16), [CANNOT_READ]),
    "weights-truncated": (truncate("adapter_model.safetensors", 2000), [CANNOT_READ]),
    "weights-too-big": (grow("adapter_model.safetensors", HUGE),
                        [f"adapter_model.safetensors is {HUGE} bytes, more than a rank-8 adapter of this model"]),
    "weights-enormous": (grow("adapter_model.safetensors", 3 << 30),
                         [f"adapter: adapter/adapter_model.safetensors is {3 << 30} bytes; the limit is"]),
    "wrong-shape": (weights_with(lambda t: t.update({A_KEY: torch.zeros(RANK, 63)})),
                    [WEIGHTS + "layer 0 q_proj: lora_A has shape [4, 63]", "do not match the base model"]),
    "three-dims": (weights_with(lambda t: t.update({B_KEY: torch.zeros(64, RANK, 1)})),
                   [WEIGHTS + "layer 0 q_proj: lora_B has shape [64, 4, 1]"]),
    "ranks-differ": (weights_with(lambda t: t.update({B_KEY: torch.zeros(64, 2)})),
                     [WEIGHTS + "layer 0 q_proj: shapes A [4, 64] / B [64, 2] do not match"]),
    "nan": (weights_with(lambda t: t[B_KEY].__setitem__((0, 0), float("nan"))),
            [WEIGHTS + "layer 0 q_proj: weights contain NaN or inf"]),
    "inf": (weights_with(lambda t: t[A_KEY].__setitem__((1, 1), float("-inf"))),
            [WEIGHTS + "layer 0 q_proj: weights contain NaN or inf"]),
    "int-tensors": (weights_with(lambda t: t.update({A_KEY: t[A_KEY].to(torch.int32)})),
                    [WEIGHTS + f"tensor {A_KEY!r} holds I32 values"]),
    "bool-tensors": (weights_with(lambda t: t.update({B_KEY: t[B_KEY] > 0})), [WEIGHTS, "holds BOOL values"]),
    "unknown-module": (weights_with(lambda t: t.update({A_KEY.replace("q_proj", "rotary_proj"): t[A_KEY].clone()})),
                       [WEIGHTS + "target module 'rotary_proj' is not in the model"]),
    "wrong-parent": (weights_with(lambda t: t.update({A_KEY.replace("self_attn", "mlp"): t.pop(A_KEY)})),
                     [WEIGHTS, "q_proj is not under mlp"]),
    "missing-lora-b": (weights_with(lambda t: t.pop(B_KEY)),
                       [WEIGHTS + "layer 0 q_proj: lora_A and lora_B must both be present"]),
    "extra-key": (weights_with(lambda t: t.update({"lm_head.weight": torch.zeros(4, 64)})),
                  [WEIGHTS + "tensor 'lm_head.weight' is not a LoRA A/B weight"]),
    "two-lora-a": (weights_with(lambda t: t.update({A_KEY.replace("lora_A", "lora_A.default"): t[A_KEY].clone()})),
                   [WEIGHTS + "layer 0 q_proj: two lora_A tensors"]),
    "no-lora-tensors": (lambda folder: save_file({}, folder / "adapter_model.safetensors"),
                        ["adapter_model.safetensors holds no LoRA weights"]),
}


@pytest.mark.parametrize("name", list(BROKEN_ADAPTERS))
def test_broken_adapter_is_refused_and_the_others_serve(root, config, name):
    breaks, words = BROKEN_ADAPTERS[name]
    home = put(root, "evil", with_adapter("evil"))
    write_random_adapter(home / "adapter", config, seed=4, rank=RANK)
    breaks(home / "adapter")
    cpu, before = time.process_time(), bytes_read()
    registry, logs = serve(root, config)
    # Work, not wall time (which a loaded machine stretches): the regex bomb would take CPU-minutes per module,
    # a file over its limit (up to 3 GB) must not be read; refusing takes milliseconds of CPU.
    assert time.process_time() - cpu < 10
    if before is not None:
        assert bytes_read() - before <= readable_bytes(root)
    error = assert_refused(registry, logs, "evil", *words)
    assert str(home) in error  # the file named is this character's


def test_a_broken_adapter_keeps_the_last_good_version(root, config):
    home = put(root, "evil", with_adapter("evil"))
    write_random_adapter(home / "adapter", config, seed=5, rank=RANK)
    registry, logs = serve(root, config)
    good = registry.get("evil")
    assert registry.status("evil").status is LoadState.READY and good.has_adapter

    (home / "adapter" / "adapter_model.safetensors").write_bytes(b"\0garbage" * 1000)
    with capture_logs() as more_logs:
        assert registry.reload() == ["evil"]
    status = registry.status("evil")
    assert status.status is LoadState.FAILED and status.serving
    assert "cannot read adapter_model.safetensors" in status.error and str(home / "adapter") in status.error
    assert status.version == good.version and registry.get("evil") is good  # the last good version serves on
    assert_others_serve(registry, logs + more_logs)

    write_random_adapter(home / "adapter", config, seed=6, rank=RANK)
    registry.reload()
    assert registry.status("evil").status is LoadState.READY and registry.get("evil").version != good.version


def test_load_peft_adapter_refuses_a_huge_config_unread(config, tmp_path):
    folder = write_random_adapter(tmp_path / "adapter", config, seed=7, rank=RANK)
    sparse_file(folder / "adapter_config.json")
    with pytest.raises(AdapterError, match=f"adapter_config.json is {HUGE} bytes; the limit is 1048576"):
        load_peft_adapter(folder, config, MAX_RANK)


# --- npc check ------------------------------------------------------------------------------------------


def test_npc_check_lists_each_problem(root, config, model, tmp_path):
    put(root, "badyaml", "id: badyaml\nname: [\n")
    home = put(root, "badadapter", with_adapter("badadapter"))
    write_random_adapter(home / "adapter", config, seed=8, rank=RANK)
    edit_config(home / "adapter", r=100000)
    home = put(root, "linked", "")
    (home / "character.yaml").unlink()
    (tmp_path / "elsewhere.yaml").write_text(character_yaml("linked"))
    os.symlink(tmp_path / "elsewhere.yaml", home / "character.yaml")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "character.yaml")

    npc = Path(sys.executable).with_name("npc")
    done = subprocess.run([str(npc), "check", str(root), "--model", str(model[0])], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4, lines
    assert f"{root}/badadapter/adapter: adapter_config.json: r: rank 100000 is above max_rank" in lines[0]
    assert f"{root}/badyaml/character.yaml: invalid YAML" in lines[1]
    assert f"{root}/fifo/character.yaml: not a regular file" in lines[2]
    assert f"{root}/linked/character.yaml: is a symbolic link to" in lines[3]
    assert "5 character(s) checked, 4 problem(s)" in done.stderr
