"""The runtime package without the `bench` extra: matplotlib is not installed on players' PCs.

A fresh interpreter (so this test process keeps its own modules) blocks matplotlib the way a missing
package fails (`sys.modules["matplotlib"] = None` makes every `import matplotlib` raise
ModuleNotFoundError), then imports the package, asks `npc bench` to run and writes a training report.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.sidecar_process import REPO

SCRIPT = r"""
import contextlib, importlib, io, json, pkgutil, sys
from pathlib import Path

sys.modules["matplotlib"] = None
import sidecar, sidecar.cli, sidecar.server.app, sidecar.training.train as train

# Every module of the package imports; one that needs an absent optional package (a peer, TensorRT-LLM)
# may fail, but never for matplotlib: its imports must all sit inside the plotting functions.
needs_matplotlib = []
for module in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
    if module.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(module.name)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "matplotlib":
            needs_matplotlib.append(module.name)

bench_err = io.StringIO()
with contextlib.redirect_stderr(bench_err):
    bench_code = sidecar.cli.main(["bench", "--scenario", "decode", "--out", sys.argv[1] + "/bench"])

folder = Path(sys.argv[1]) / "character"
(folder / "training").mkdir(parents=True)
(folder / "training" / "loss.png").write_bytes(b"an older run's curve")
train_err = io.StringIO()
with contextlib.redirect_stderr(train_err):
    report = train._write_report(folder, "guard", Path("model.gguf"), train.TrainConfig(), [], [], [2.0, 1.5],
                                 [(2, 1.7)], 1.0)
print(json.dumps({"needs_matplotlib": needs_matplotlib, "bench_code": bench_code, "bench_err": bench_err.getvalue(),
                  "bench_out": Path(sys.argv[1], "bench").exists(), "train_err": train_err.getvalue(),
                  "report": json.loads(report.read_text())["train_loss"],
                  "png_left": (folder / "training" / "loss.png").exists()}))
"""


def test_runtime_package_and_cli_without_matplotlib(tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["needs_matplotlib"] == []

    # npc bench refuses before measuring anything, in one line that says how to get the extra.
    assert out["bench_code"] == 2 and not out["bench_out"]
    lines = out["bench_err"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("npc bench: error: matplotlib is not installed"), lines
    assert "pip install 'npc-sidecar[bench]'" in lines[0] and "make bench" in lines[0]

    # npc train still writes its report; only the PNG is skipped (and an older one removed), said in one line.
    assert out["report"] == [2.0, 1.5] and not out["png_left"]
    lines = out["train_err"].splitlines()
    assert len(lines) == 1 and "loss-curve PNG skipped" in lines[0] and "npc-sidecar[bench]" in lines[0], lines
