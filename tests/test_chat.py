"""`npc chat` in a pseudo-terminal against a real `npc serve`, and `npc check`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.sidecar_process import SidecarProcess, copy_characters

NPC = str(Path(sys.executable).with_name("npc"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = copy_characters(tmp_path_factory.mktemp("characters"))
    proc = SidecarProcess(root)
    yield proc
    proc.stop()


def test_chat_streams_a_reply_in_a_terminal(server, tmp_path):
    child = pexpect.spawn(NPC, ["chat", "blacksmith", "--address", server.address], encoding="utf-8", timeout=60,
                          env={"NPC_CACHE_DIR": str(tmp_path), "TERM": "dumb", "PATH": "/usr/bin:/bin"},
                          dimensions=(40, 200))
    try:
        child.expect("talking to Brynja Emberforge")
        child.expect(r"you \(blacksmith\)> ")
        child.sendline("/seed 7")
        child.expect("seed 7")
        child.sendline("/entity stock=iron sword,helm")
        child.sendline("What does a sword cost?")
        child.expect("Brynja Emberforge: ")
        child.expect(r"you \(blacksmith\)> ")
        reply = child.before.strip()
        # The emotion comes before the line; an action, if the NPC takes one, after it and from the game's list.
        first, *actions = [line.strip() for line in reply.splitlines() if line.strip()]
        label = re.match(r"\[(\w+)\] \S", first)
        assert label and label[1] in ("gruff", "proud", "annoyed", "amused", "sad"), reply
        for action in actions:
            assert re.fullmatch(r'-> sell_item\(item="(iron sword|helm)"\)', action), reply
        child.sendline("/stats")
        child.expect(r"first token \d+ ms")
        child.sendline("/lore")  # what the prompt gave her to answer from: her knowledge, the sword's price first
        child.expect(r"  - A sword costs 40 gold; repairing one costs 5 gold\.")
        child.sendline("/memory")
        child.expect("the last prompt had no memories")
        child.sendline("/rel trust=40")
        child.expect(r"trust = 40 \(-100\.\.100\): friendly - You like this one")
        child.sendline("/rel trust-50")
        child.expect(r"trust = -10 \(-100\.\.100\): wary")
        child.sendline("/rel love=3")
        child.expect(r"!! INVALID_ARGUMENT: name: character 'blacksmith' has no relationship 'love'")
        child.sendline("/switch oracle")
        child.expect("talking to The Oracle of Vell")
        child.sendline(f"/export {tmp_path / 'session.json'}")
        child.expect("1 turn")
        child.sendline('/scene blacksmith oracle "Two old friends argue about the weather by the forge." 2')
        child.expect(r"-- scene scene-\w+: Brynja Emberforge, The Oracle of Vell")
        child.expect(r"Brynja Emberforge: \[(gruff|proud|annoyed|amused|sad)\] \S")
        child.expect(r"The Oracle of Vell: \[\w+\] \S")
        child.expect(r"-- the scene is over \(2 lines\)")
        child.sendline('/scene blacksmith "no one else"')
        child.expect("!! usage: /scene ID ID")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "What does a sword cost?" in (tmp_path / "session.json").read_text()


def test_chat_without_a_server_says_so():
    done = subprocess.run([NPC, "chat", "--address", "127.0.0.1:9"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "no sidecar is running at 127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr


def test_check_lists_each_problem(tmp_path):
    root = copy_characters(tmp_path / "characters", ("oracle",))
    ok = subprocess.run([NPC, "check", str(root)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (root / "bad").mkdir()
    (root / "bad" / "character.yaml").write_text("id: bad\nname: B\npersona: p\nmood: grumpy\n")
    (root / "worse").mkdir()
    (root / "worse" / "character.yaml").write_text("id: worse\nname: W\npersona: p\nadapter: ../../elsewhere\n")
    (root / "lore").mkdir()
    (root / "lore" / "world.yaml").write_text("places: [highmoor]\n")  # the oracle's whisperwood is not declared
    (root / "lore" / "town.yaml").write_text("scope: {places: [highmor]}\nentries: [The well is dry.]\n")
    bad = subprocess.run([NPC, "check", str(root)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert len(lines) == 4, lines
    assert "bad/character.yaml" in lines[0] and "mood" in lines[0]
    assert "oracle/character.yaml: places: 'whisperwood' is not declared in lore/world.yaml" in lines[1]
    assert "worse/character.yaml" in lines[2] and "adapter" in lines[2]
    assert "lore/town.yaml: scope.places: unknown place 'highmor'" in lines[3]


def test_python_client_example(server):
    done = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "clients" / "python" / "talk.py"),
                           "--address", server.address, "--max-tokens", "8", "oracle", "Hello"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "emotion" in done.stderr
    bad = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "clients" / "python" / "talk.py"),
                          "--address", server.address, "nobody", "Hello"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "error: NOT_FOUND" in bad.stderr


@pytest.mark.parametrize("lang,expected", [("python", "npc/v1/dialogue_pb2_grpc.py"),
                                           ("cpp", "npc/v1/dialogue.grpc.pb.h"), ("csharp", "Dialogue.cs")])
def test_stubs(tmp_path, lang, expected):
    done = subprocess.run([NPC, "stubs", "--lang", lang, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / expected).is_file() and expected in done.stdout
    if lang == "python":  # the standalone copy imports and holds the service
        imported = subprocess.run([sys.executable, "-c", "from npc.v1 import dialogue_pb2_grpc as g; "
                                   "print(g.NpcDialogueStub.__name__)"], cwd=tmp_path, capture_output=True, text=True)
        assert imported.stdout.strip() == "NpcDialogueStub", imported.stderr
