"""Hugging Face folder (config.json + *.safetensors + tokenizer.json) -> Checkpoint.

Float weights only (F32 / F16 / BF16); quant.py quantizes them as the weight format asks.
Pickled `*.bin` checkpoints are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors import safe_open

from sidecar.errors import ModelFileError
from sidecar.model.checkpoint import Checkpoint, SourceTensor, validate
from sidecar.model.config import LlamaConfig, RopeScaling
from sidecar.model.vocab import HfTokenizerFiles

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down", "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias", "self_attn.v_proj.bias": "v_bias",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "head"}


def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelFileError(path, "missing")
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(path, f"not valid JSON ({e})") from None


def _rope_scaling(cfg: dict[str, Any], path: Path) -> RopeScaling | None:
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                           high_freq_factor=float(params["high_freq_factor"]),
                           original_max_position=int(params["original_max_position_embeddings"]))
    raise ModelFileError(path, f"unsupported rope scaling {kind!r}")


def _config(cfg: dict[str, Any], path: Path, tied: bool) -> LlamaConfig:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise ModelFileError(path, f"unsupported model_type {model_type!r} (supported: {supported})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):  # Llama's attention_bias includes o_proj's
        raise ModelFileError(path, "attention_bias / mlp_bias are not supported")
    rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    try:
        heads = int(cfg["num_attention_heads"])
        context = int(cfg.get("max_position_embeddings", 4096))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        if window:  # served up to the window, where sliding-window attention equals full attention
            context = min(context, int(window))
        return LlamaConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position=context,
            tie_embeddings=tied,
            rope_scaling=_rope_scaling(cfg, path),
            qkv_bias=model_type == "qwen2",
            architecture=model_type,
        )
    except KeyError as e:
        raise ModelFileError(path, f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelFileError(path, f"invalid value: {e}") from None


def _tensors(folder: Path) -> dict[str, SourceTensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (pickled *.bin checkpoints are refused; convert to safetensors)" if any(folder.glob("*.bin")) else ""
        raise ModelFileError(folder, f"no *.safetensors files{hint}")
    tensors: dict[str, SourceTensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    canonical = _canonical_name(name)
                    if canonical is None:
                        continue
                    t = f.get_tensor(name)
                    kind = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}.get(str(t.dtype))
                    if kind is None:
                        raise ModelFileError(file, f"tensor {name!r} has unsupported dtype {t.dtype}")
                    tensors[canonical] = SourceTensor(name, kind, tuple(t.shape), t)
        except ModelFileError:
            raise
        except Exception as e:  # safetensors raises its own error types on damaged files
            raise ModelFileError(file, f"cannot read safetensors ({e})") from None
    return tensors


def _canonical_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"layers.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    return None


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _tokenizer(folder: Path) -> tuple[HfTokenizerFiles, str | None, tuple[str, ...]]:
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelFileError(tokenizer_json, "missing (only fast tokenizers, tokenizer.json, are supported)")
    tcfg = _read_json(folder / "tokenizer_config.json", required=False)
    template = tcfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    spec = _read_json(tokenizer_json)
    post = json.dumps(spec.get("post_processor") or {})
    add_bos = bool(tcfg.get("add_bos_token", '"SpecialToken"' in post and '"single"' in post))
    eos = [_token_text(tcfg.get("eos_token"))]
    return HfTokenizerFiles(tokenizer_json, _token_text(tcfg.get("bos_token")), tuple(e for e in eos if e),
                            add_bos), template, tuple(e for e in eos if e)


def load_hf_folder(folder: Path) -> Checkpoint:
    cfg = _read_json(folder / "config.json")
    tensors = _tensors(folder)
    tied = bool(cfg.get("tie_word_embeddings", False)) or "head" not in tensors
    config = _config(cfg, folder / "config.json", tied)
    validate(folder, config, tensors)
    return replace(read_hf_metadata(folder, config), tensors=tensors)


def read_hf_metadata(folder: Path, config: LlamaConfig | None = None) -> Checkpoint:
    """The folder's shape, tokenizer files, chat template and eos ids, without reading a weight
    (`tensors` is empty): what a backend that loads the weights itself (TensorRT-LLM) needs."""
    cfg = _read_json(folder / "config.json")
    if config is None:
        config = _config(cfg, folder / "config.json", tied=bool(cfg.get("tie_word_embeddings", False)))
    files, template, eos_tokens = _tokenizer(folder)
    gen = _read_json(folder / "generation_config.json", required=False)
    eos_ids = gen.get("eos_token_id", cfg.get("eos_token_id"))
    if eos_ids is None:
        from tokenizers import Tokenizer as HfTokenizer

        tok = HfTokenizer.from_file(str(files.tokenizer_json))
        eos_ids = [tok.token_to_id(e) for e in eos_tokens if tok.token_to_id(e) is not None]
    eos_ids = tuple(eos_ids) if isinstance(eos_ids, list) else (eos_ids,)
    return Checkpoint(folder, "safetensors", config, {}, files, template, tuple(int(e) for e in eos_ids))
