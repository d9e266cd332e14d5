"""Regenerates the Python code in sidecar/pb/ from the .proto files in proto/ (`make proto`).

`python -m sidecar.proto_gen` rewrites sidecar/pb/ in place; `--check` only reports whether the
checked-in files differ from what the .proto files give (the test suite runs the same check).

protoc's Python generator writes imports from the proto package path (`from npc.v1 import
dialogue_pb2`), which only works with the output folder itself on sys.path. We rewrite those
imports into relative ones (`from . import dialogue_pb2`), so the code imports as
`sidecar.pb.npc.v1` (or from wherever another output folder sits in a package), and the .proto
file names registered in the descriptor pool stay `npc/v1/dialogue.proto`, as every other
language's stubs and gRPC reflection see them.

The output also holds a byte copy of each .proto, so an installed sidecar (no repository
checkout) can still generate stubs for other languages: see `proto_root()`.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

REPO_PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PB_DIR = Path(__file__).resolve().parent / "pb"

INIT_TEXT = '"""Generated from the .proto files by sidecar/proto_gen.py (`make proto`); do not edit."""\n'
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", ".proto")


def proto_root() -> Path:
    """The include root holding npc/v1/dialogue.proto: the repository's proto/ folder in a
    checkout, else the copy shipped inside sidecar/pb/."""
    if (REPO_PROTO_ROOT / "npc").is_dir():
        return REPO_PROTO_ROOT
    return PB_DIR


def proto_files(root: Path) -> list[str]:
    """Every .proto under root, as slash-separated paths relative to it, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.proto"))


def run_protoc(root: Path, protos: list[str], out_args: list[str]) -> None:
    """grpcio-tools' bundled protoc (in a child process, so its errors can be reported)."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"-I{well_known}", *out_args, *protos]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr.strip()}")


def generate(out_dir: Path, root: Path | None = None) -> list[Path]:
    """Writes the Python messages (*_pb2.py), their stubs (*_pb2.pyi), the gRPC client and
    server code (*_pb2_grpc.py), __init__.py files and a copy of each .proto under out_dir.
    Returns the files written, sorted. Does not delete anything (see `write_in_place`)."""
    root = (root or proto_root()).resolve()
    protos = proto_files(root)
    if not protos:
        raise FileNotFoundError(f"{root}: no .proto files")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_protoc(root, protos, [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"])

    top_level = sorted({p.split("/")[0] for p in protos if "/" in p})
    written: set[Path] = set()
    for proto in protos:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = out_dir / (stem + suffix)
            package = stem.split("/")[:-1]
            text = path.read_text(encoding="utf-8")
            path.write_text(relative_imports(text, package, top_level), encoding="utf-8")
            written.add(path)
        copy = out_dir / proto
        if (root / proto).resolve() != copy.resolve():
            shutil.copyfile(root / proto, copy)
        written.add(copy)
        # Every folder from out_dir down to the module is a package.
        folder = copy.parent
        while True:
            init = folder / "__init__.py"
            init.write_text(INIT_TEXT, encoding="utf-8")
            written.add(init)
            if folder == out_dir:
                break
            folder = folder.parent
    return sorted(written)


def relative_imports(text: str, package: list[str], top_level: list[str]) -> str:
    """Rewrites `from npc.v1 import x_pb2` (any package under one of the top_level folders) in a
    module of `package` (e.g. ["npc", "v1"]) into the equivalent relative import."""
    if not top_level:
        return text
    pattern = re.compile(
        rf"^(?P<indent>[ \t]*)from (?P<target>(?:{'|'.join(map(re.escape, top_level))})(?:\.\w+)*) import ",
        re.MULTILINE,
    )

    def replace(match: re.Match[str]) -> str:
        target = match["target"].split(".")
        common = 0
        while common < min(len(target), len(package)) and target[common] == package[common]:
            common += 1
        dots = "." * (len(package) - common + 1)
        return f"{match['indent']}from {dots}{'.'.join(target[common:])} import "

    text = pattern.sub(replace, text)
    leftover = re.search(rf"^\s*import (?:{'|'.join(map(re.escape, top_level))})\b.*$", text, re.MULTILINE)
    if leftover:
        raise RuntimeError(f"generated code has an import proto_gen cannot rewrite: {leftover[0].strip()}")
    return text


def _generated_files(folder: Path) -> set[str]:
    """What generate() may have written under folder, relative, ignoring caches."""
    if not folder.is_dir():
        return set()
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.name == "__init__.py" or p.name.endswith(_GENERATED_SUFFIXES))
    }


def check(out_dir: Path = PB_DIR, root: Path | None = None) -> list[str]:
    """Regenerates into a temporary folder and compares with out_dir byte for byte. Returns one
    line per difference (missing, extra or changed file); empty when out_dir is up to date."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), root)
        fresh, current = _generated_files(Path(tmp)), _generated_files(Path(out_dir))
        problems = [f"missing: {out_dir}/{name}" for name in sorted(fresh - current)]
        problems += [f"not generated from any .proto: {out_dir}/{name}" for name in sorted(current - fresh)]
        problems += [
            f"differs: {out_dir}/{name}"
            for name in sorted(fresh & current)
            if not filecmp.cmp(Path(tmp) / name, Path(out_dir) / name, shallow=False)
        ]
    return problems


def write_in_place(out_dir: Path = PB_DIR, root: Path | None = None) -> list[Path]:
    """Regenerates out_dir and deletes generated files no .proto produces any more."""
    before = _generated_files(out_dir)
    written = generate(out_dir, root)
    keep = {p.relative_to(out_dir).as_posix() for p in written}
    for name in sorted(before - keep):
        (out_dir / name).unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.proto_gen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PB_DIR, help="output folder (default: sidecar/pb)")
    parser.add_argument("--proto", type=Path, default=None, help="include root of the .proto files (default: proto/)")
    parser.add_argument("--check", action="store_true", help="only report whether --out is up to date (exit 1 if not)")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out, args.proto)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated code is stale: run `make proto`", file=sys.stderr)
            return 1
        print(f"{args.out}: up to date")
        return 0
    written = write_in_place(args.out, args.proto)
    print(f"{args.out}: {len(written)} files from {args.proto or proto_root()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
