"""CharacterRegistry: scanning, last-good-version semantics, adapter validation, hot reload."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from sidecar.dialogue import registry as registry_module
from sidecar.dialogue.characters import Character
from sidecar.dialogue.registry import CharacterRegistry, CharacterUnavailable, LoadState, UnknownCharacter
from sidecar.errors import UserError
from tests.test_dialogue_characters import make_adapter


def yaml_for(cid: str, persona: str = "You are a test.", extra: str = "") -> str:
    return f"id: {cid}\nname: {cid.title()}\npersona: {persona}\ngreeting: Hi.\n{extra}"


def put(root: Path, cid: str, text: str) -> Path:
    # Tests change files within milliseconds: give every write a new size so the stat stamp changes.
    (root / cid).mkdir(exist_ok=True)
    path = root / cid / "character.yaml"
    old = path.read_text() if path.exists() else ""
    if len(old) == len(text):
        text += "#\n"
    path.write_text(text)
    return path


class Scans:
    """Counts the watcher's finished scans: it calls `registry.reload`, wrapped here on the instance."""

    def __init__(self, registry: CharacterRegistry):
        self.done, self._changed, reload = 0, threading.Condition(), registry.reload

        def counted() -> list[str]:
            try:
                return reload()
            finally:
                with self._changed:
                    self.done += 1
                    self._changed.notify_all()

        registry.reload = counted

    def two_more(self) -> None:
        """Returns once two more scans have finished: the second began after this call, so it saw every change
        made before it. Counted in scans, not seconds, so a busy machine only makes it slower; the 120 s are a
        hang guard, not the measure."""
        with self._changed:
            target = self.done + 2
            assert self._changed.wait_for(lambda: self.done >= target, timeout=120), "the watcher stopped scanning"


@pytest.fixture
def root(tmp_path) -> Path:
    put(tmp_path, "smith", yaml_for("smith"))
    put(tmp_path, "oracle", yaml_for("oracle"))
    return tmp_path


def test_scan_and_get(root):
    (root / "notes").mkdir()  # no character.yaml: not a character
    (root / ".hidden").mkdir()
    (root / ".hidden" / "character.yaml").write_text(yaml_for("hidden"))
    reg = CharacterRegistry(root)
    assert [s.id for s in reg.list()] == ["oracle", "smith"]
    smith = reg.get("smith")
    assert smith.name == "Smith" and smith.greeting == "Hi."
    status = reg.status("smith")
    assert status.status is LoadState.READY and status.version == smith.version and status.error == ""
    assert not status.has_adapter and status.greeting == "Hi." and status.serving
    with pytest.raises(UnknownCharacter, match="'nobody'"):
        reg.get("nobody")


def test_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        CharacterRegistry(tmp_path / "nope")


def test_never_loaded_character_is_unavailable(root):
    put(root, "broken", "id: broken\nname: [\n")
    reg = CharacterRegistry(root)
    status = reg.status("broken")
    assert status.status is LoadState.FAILED and status.version == "" and "invalid YAML" in status.error
    assert not status.serving
    with pytest.raises(CharacterUnavailable, match="invalid YAML") as info:
        reg.get("broken")
    assert "character.yaml" in str(info.value)


def test_reload_is_cheap_when_nothing_changed(root, monkeypatch):
    reg = CharacterRegistry(root)
    calls = []
    real = registry_module.load_character
    monkeypatch.setattr(registry_module, "load_character", lambda folder: calls.append(folder) or real(folder))
    assert reg.reload() == [] and calls == []
    put(root, "smith", yaml_for("smith", "You are a blacksmith."))
    assert reg.reload() == ["smith"] and len(calls) == 1


def test_change_break_fix_delete(root):
    changes = []
    reg = CharacterRegistry(root, on_change=lambda cid, status: changes.append((cid, status)))
    v1 = reg.get("smith").version

    put(root, "smith", yaml_for("smith", "You are a grumpy smith."))
    assert reg.reload() == ["smith"]
    v2 = reg.get("smith").version
    assert v2 != v1 and reg.get("smith").persona == "You are a grumpy smith."
    assert changes[-1][0] == "smith" and changes[-1][1].version == v2

    put(root, "smith", "id: smith\nname: [oops\n")
    assert reg.reload() == ["smith"]
    status = reg.status("smith")
    assert status.status is LoadState.FAILED and "invalid YAML" in status.error
    assert status.version == v2 and reg.get("smith").version == v2  # the last good version keeps serving
    assert status.serving
    assert reg.reload() == []  # the same error is reported once, not on every scan

    put(root, "smith", yaml_for("smith", "You are a cheerful smith."))
    assert reg.reload() == ["smith"]
    status = reg.status("smith")
    assert status.status is LoadState.READY and status.error == "" and status.version not in (v1, v2)

    shutil.rmtree(root / "smith")
    assert reg.reload() == ["smith"]
    assert changes[-1] == ("smith", None)
    with pytest.raises(UnknownCharacter):
        reg.get("smith")
    assert [s.id for s in reg.list()] == ["oracle"]


def test_fixing_back_to_the_same_content_is_ready_again(root):
    reg = CharacterRegistry(root)
    good = (root / "smith" / "character.yaml").read_text()
    version = reg.get("smith").version
    put(root, "smith", "id: smith\nname: Smith\npersona: x\nmood: 1\n")
    reg.reload()
    assert reg.status("smith").status is LoadState.FAILED and "mood" in reg.status("smith").error
    (root / "smith" / "character.yaml").write_text(good)
    assert reg.reload() == ["smith"]
    assert reg.status("smith").status is LoadState.READY and reg.get("smith").version == version


def test_adapter_arriving_after_the_yaml_is_picked_up(root):
    put(root, "elf", yaml_for("elf", extra="adapter: adapter\n"))
    reg = CharacterRegistry(root)
    assert "not found" in reg.status("elf").error
    make_adapter(root / "elf" / "adapter")  # copied in later; character.yaml itself is unchanged
    assert reg.reload() == ["elf"]
    assert reg.get("elf").has_adapter and reg.status("elf").has_adapter


def test_adapter_validator(root):
    put(root, "elf", yaml_for("elf", extra="adapter: adapter\n"))
    make_adapter(root / "elf" / "adapter", b"good")
    seen: list[Character] = []

    def validator(character: Character) -> bytes:
        seen.append(character)
        weights = (character.adapter_path / "adapter_model.safetensors").read_bytes()
        if weights.startswith(b"bad"):
            raise UserError(f"adapter {character.adapter_path}: bad weights")
        return weights  # what the registry keeps with the version (the server's: the loaded AdapterRef)

    reg = CharacterRegistry(root, adapter_loader=validator)
    assert [c.id for c in seen] == ["elf"]  # characters without an adapter are not validated
    assert reg.get_serving("elf")[1] == b"good" and reg.get_serving("smith")[1] is None
    good = reg.get("elf").version

    make_adapter(root / "elf" / "adapter", b"bad weights")
    reg.reload()
    status = reg.status("elf")
    assert status.status is LoadState.FAILED and "bad weights" in status.error
    assert reg.get("elf").version == good and reg.get_serving("elf")[1] == b"good"  # the last good one serves
    assert reg.reload() == [] and reg.reload() == []
    assert len(seen) <= 3  # a rejected adapter is not re-validated on every scan

    make_adapter(root / "elf" / "adapter", b"good again")
    reg.reload()
    assert reg.status("elf").status is LoadState.READY and reg.get("elf").version != good

    count = len(seen)
    put(root, "elf", yaml_for("elf", "You are an elf with a new persona.", extra="adapter: adapter\n"))
    reg.reload()
    assert len(seen) == count  # same adapter files: no second load of the adapter
    assert "new persona" in reg.get("elf").persona and reg.get_serving("elf")[1] == b"good again"


def test_validator_crash_does_not_break_the_registry(root):
    put(root, "elf", yaml_for("elf", extra="adapter: adapter\n"))
    make_adapter(root / "elf" / "adapter")

    def validator(character: Character) -> None:
        raise RuntimeError("CUDA out of memory")

    reg = CharacterRegistry(root, adapter_loader=validator)
    assert "RuntimeError: CUDA out of memory" in reg.status("elf").error
    assert reg.get("smith").name == "Smith"


def test_hot_reload_on_the_next_scan(root):
    with CharacterRegistry(root) as reg:
        scans = Scans(reg)
        reg.start_watching(interval=0.05)

        put(root, "bard", yaml_for("bard"))
        scans.two_more()
        v1 = reg.get("bard").version

        put(root, "bard", yaml_for("bard", "You are a singing bard."))
        scans.two_more()
        assert reg.get("bard").version != v1
        v2 = reg.get("bard").version

        put(root, "bard", "id: bard\n  name: : :\n")
        scans.two_more()
        assert reg.status("bard").status is LoadState.FAILED
        assert reg.get("bard").version == v2

        put(root, "bard", yaml_for("bard", "You are a fixed bard."))
        scans.two_more()
        assert reg.status("bard").status is LoadState.READY
        assert reg.get("bard").persona == "You are a fixed bard."

        shutil.rmtree(root / "bard")
        scans.two_more()
        assert reg.status("bard") is None
    assert reg._thread is None
