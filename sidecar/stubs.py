"""`npc stubs --lang cpp|csharp|python --out DIR`: client code generated from proto/npc/v1/dialogue.proto
with the standard tools, for game projects that keep their own copy.

- python: grpcio-tools (messages, .pyi, gRPC stubs), with package-relative imports;
- cpp: the system `protoc` --cpp_out plus `grpc_cpp_plugin` (Debian: protobuf-compiler,
  protobuf-compiler-grpc; link with libgrpc++-dev);
- csharp: the system `protoc` --csharp_out (messages). grpc's C# service generator is not
  packaged for Debian; the service client is in clients/csharp/Generated/DialogueGrpc.cs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from sidecar.errors import UserError
from sidecar.proto_gen import generate, proto_files, proto_root

LANGUAGES = ("cpp", "csharp", "python")


def generate_stubs(lang: str, out: Path) -> list[Path]:
    if lang not in LANGUAGES:
        raise UserError(f"--lang: choose one of {', '.join(LANGUAGES)}, got {lang!r}")
    out.mkdir(parents=True, exist_ok=True)
    if lang == "python":
        return generate(out)
    root = proto_root()
    protos = proto_files(root)
    protoc = shutil.which("protoc")
    if protoc is None:
        raise UserError("protoc not found: install Debian's protobuf-compiler (make system-deps does)")
    args = [protoc, f"--proto_path={root}"]
    if lang == "cpp":
        plugin = shutil.which("grpc_cpp_plugin")
        if plugin is None:
            raise UserError("grpc_cpp_plugin not found: install Debian's protobuf-compiler-grpc")
        args += [f"--cpp_out={out}", f"--grpc_out={out}", f"--plugin=protoc-gen-grpc={plugin}"]
    else:
        args += [f"--csharp_out={out}"]
    done = subprocess.run([*args, *protos], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"protoc failed: {done.stderr.strip()}")
    return sorted(p for p in out.rglob("*") if p.is_file())
