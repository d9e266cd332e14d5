"""What a PEFT adapter folder is made of: file names, the config's size limit, and what names a version.

Shared by the loader (model/lora.py) and the character files (dialogue/characters.py), which must agree
on all three; no torch here, so reading characters stays cheap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json is a page of settings


def adapter_digest(file_digests: Mapping[str, bytes | None]) -> bytes:
    """sha256 over each adapter file's name and sha256 (None: the file is missing).

    The registry's adapter version and the loader's fingerprint are both this, so the same bytes
    get the same name whichever read them.
    """
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest = file_digests[name]
        h.update(name.encode() + b"\0" + (b"missing" if digest is None else digest))
    return h.digest()
