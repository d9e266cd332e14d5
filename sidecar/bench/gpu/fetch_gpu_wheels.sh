#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU machine (Python 3.12, x86-64, no network) lacks, so a
# device run can carry them (`carry: [".whl"]`) and sidecar/bench/gpu/gpu_check.sh can install them into /tmp/site.
#
# What that machine already has: torch, transformers, peft, safetensors, tokenizers, numpy, pyyaml,
# tqdm, jinja2, rich, matplotlib, aiohttp, pytest, hypothesis (its protobuf and grpcio versions are
# unknown, so ours travel too). Missing there, from pyproject.toml: gguf, structlog, grpcio-tools,
# grpcio-health-checking, grpcio-reflection, prompt-toolkit; from the dev extra, pexpect (tests/test_chat.py
# imports it at collection time). Versions are pyproject.toml's pins; the rest are their dependencies.
#
# Run from the repository root: bash sidecar/bench/gpu/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
DEST=.whl
# One version of each: two versions of a name in .whl stop the install there.
PACKAGES=(
  gguf==0.19.0
  structlog==26.1.0
  protobuf==7.36.2
  grpcio==1.85.3
  grpcio-tools==1.85.1
  grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1
  prompt-toolkit==3.0.53
  wcwidth==0.9.4
  pexpect==4.9.0
  ptyprocess==0.7.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"

args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$DEST" -q)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
"$PY" -m pip download "${args[@]}" "${PACKAGES[@]}"

echo "wheels in $DEST:"
ls -1 "$DEST"
echo "their requirements (each must be in $DEST or already on the GPU machine):"
for w in "$DEST"/*.whl; do
  reqs=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/Requires-Dist: //' \
         | tr '\n' ';' || true)
  echo "  $(basename "$w"): ${reqs:-none}"
done
du -sh "$DEST"
