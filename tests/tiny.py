"""Small random Llama and Qwen2 models written as GGUF files and Hugging Face folders, for loader tests.

Each file is paired with a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` holding exactly the
weights the file encodes (dequantized, in the HF layout), so our logits can be compared with the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig as HfLlamaConfig
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 512
HIDDEN = 256  # K-quants need rows of 256 values
SHAPES = {"heads": 4, "kv_heads": 2, "inter": 512, "layers": 2}

_GGUF_LAYER = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_HF_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# Block layouts (ggml's block_*): (bytes per block, values per block, byte offsets of the f16 super-scale `d`
# and of the f16 `dmin`, None where the kind has none).
_RANDOM_BLOCKS = {"Q2_K": (84, 256, 80, 82), "Q3_K": (110, 256, 108, None), "Q4_K": (144, 256, 0, 2),
                  "Q5_K": (176, 256, 0, 2), "Q6_K": (210, 256, 208, None), "IQ4_NL": (18, 32, 0, None)}


def hf_config(rope_parameters: dict | None = None, max_position: int = 512) -> HfLlamaConfig:
    return HfLlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=SHAPES["inter"], num_hidden_layers=SHAPES["layers"],
        num_attention_heads=SHAPES["heads"], num_key_value_heads=SHAPES["kv_heads"],
        max_position_embeddings=max_position,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )


def hf_twin(arch: str, rope_parameters: dict | None = None) -> LlamaForCausalLM | Qwen2ForCausalLM:
    """A random transformers model of the tiny shape; "qwen2" adds q/k/v biases ("llama" and any other
    name: a Llama, so that a file of an unsupported architecture can still be written)."""
    if arch != "qwen2":
        return LlamaForCausalLM(hf_config(rope_parameters)).eval()
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=SHAPES["inter"], num_hidden_layers=SHAPES["layers"],
        num_attention_heads=SHAPES["heads"], num_key_value_heads=SHAPES["kv_heads"], max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, use_sliding_window=False,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 1000000.0},
    )
    return Qwen2ForCausalLM(config).eval()


def encode(values: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Stored payload of `kind` for a float32 [rows, cols] matrix (K-quants: random blocks)."""
    if kind == "F32":
        return values.astype(np.float32)
    if kind in _RANDOM_BLOCKS:
        # gguf-py cannot quantize K-quants; random blocks with a sane super-scale are just as good
        # a test of the loader, since the reference model gets their exact dequantized values.
        size, per_block, d_offset, dmin_offset = _RANDOM_BLOCKS[kind]
        rows, cols = values.shape
        raw = rng.integers(0, 256, size=(rows, cols // per_block, size), dtype=np.uint8)
        raw[..., d_offset:d_offset + 2] = np.array([2e-4], dtype=np.float16).view(np.uint8)
        if dmin_offset is not None:
            raw[..., dmin_offset:dmin_offset + 2] = np.array([1e-4], dtype=np.float16).view(np.uint8)
        return raw.reshape(rows, -1)
    return quantize(values.astype(np.float32), Q[kind])


def decode(payload: np.ndarray, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    if kind == "F32":
        return torch.from_numpy(payload.astype(np.float32)).reshape(shape)
    return torch.from_numpy(np.array(dequantize(payload, Q[kind]), dtype=np.float32)).reshape(shape)


def gguf_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf's `permute`), applied to stored rows."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(out, -1)


def tiny_gguf(path: Path, kind: str, seed: int = 0, rope_parameters: dict | None = None,
              arch: str = "llama", embed_kind: str | None = None, chat_template: str | None = None,
              stated_ffn_length: int | None = None, bpe_pre: str | None = None,
              matrix_kinds: dict[str, str] | None = None) -> LlamaForCausalLM:
    """Writes a random tiny Llama GGUF whose matrices are stored as `kind` (the embedding as
    `embed_kind`, default `kind`); returns its HF twin. `stated_ffn_length`: metadata that contradicts
    the tensors' shapes. `bpe_pre`: a byte-level BPE vocabulary with merges (trained_bpe) under that
    pre-tokenizer name instead of the bytes-only one. `matrix_kinds`: a kind per matrix name ("v", "down",
    ...) over `kind`, as Q4_K_M files mix Q4_K and Q6_K."""
    rng = np.random.default_rng(seed)
    hf = hf_twin(arch, rope_parameters)
    config = hf.config
    head_dim = HIDDEN // SHAPES["heads"]
    qwen2 = arch == "qwen2"  # q/k/v biases; llama.cpp stores its q/k rows unpermuted (NEOX RoPE)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(SHAPES["layers"])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(stated_ffn_length or SHAPES["inter"])
    writer.add_head_count(SHAPES["heads"])
    writer.add_head_count_kv(SHAPES["kv_heads"])
    writer.add_rope_dimension_count(head_dim)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if bpe_pre:
        _add_bpe_vocab(writer, bpe_pre)
    else:
        _add_byte_vocab(writer)

    state = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], permute_heads: int | None = None,
            matrix_kind: str = kind) -> None:
        stored_kind = matrix_kind if len(shape) == 2 else "F32"  # norms stay F32, as in real files
        if gguf_name.endswith(".bias"):
            values = rng.normal(0, 0.5, size=shape)
        else:
            values = rng.normal(0, 0.05, size=shape) if len(shape) == 2 else rng.uniform(0.5, 1.5, size=shape)
        payload = encode(values.astype(np.float32), stored_kind, rng)
        stored = payload if permute_heads is None else gguf_permute(payload, permute_heads)
        # float32 / float16 arrays carry their type; block formats are raw bytes plus a type tag
        raw_dtype = None if stored_kind in ("F32", "F16") else Q[stored_kind]
        writer.add_tensor(gguf_name, stored, raw_dtype=raw_dtype)
        state[hf_name] = decode(payload, stored_kind, shape)

    add("token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN), matrix_kind=embed_kind or kind)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    for i in range(SHAPES["layers"]):
        shapes = {"q": (HIDDEN, HIDDEN), "k": (SHAPES["kv_heads"] * head_dim, HIDDEN),
                  "v": (SHAPES["kv_heads"] * head_dim, HIDDEN), "o": (HIDDEN, HIDDEN),
                  "gate": (SHAPES["inter"], HIDDEN), "up": (SHAPES["inter"], HIDDEN), "down": (HIDDEN, SHAPES["inter"])}
        for name, shape in shapes.items():
            permute = SHAPES["heads"] if name == "q" else SHAPES["kv_heads"] if name == "k" else None
            add(f"blk.{i}.{_GGUF_LAYER[name]}.weight", f"model.layers.{i}.{_HF_LAYER[name]}.weight", shape,
                None if qwen2 else permute, matrix_kind=(matrix_kinds or {}).get(name, kind))
            if qwen2 and name in ("q", "k", "v"):
                add(f"blk.{i}.{_GGUF_LAYER[name]}.bias", f"model.layers.{i}.{_HF_LAYER[name]}.bias", shape[:1])
        add(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,))
    if rope_parameters and rope_parameters.get("rope_type") == "llama3":
        # What llama.cpp's converter stores for Llama 3.1: per-frequency divisors.
        base = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        scaled = hf.model.rotary_emb.inv_freq.numpy()
        writer.add_tensor("rope_freqs.weight", (base / scaled).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, strict=False)
    return hf


def _byte_vocab() -> list[str]:
    from sidecar.engine.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    return ["<|endoftext|>", "<s>", "</s>"] + chars + [f"w{i}" for i in range(VOCAB - 3 - len(chars))]


def _add_byte_vocab(writer: gguf.GGUFWriter) -> None:
    tokens = _byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# What the test vocabulary's merges are learned from (texts unlike the ones the tests tokenize).
_BPE_TRAINING_TEXT = [
    "The blacksmith's forge stands by the north gate; a sword there costs forty gold, and she'll haggle.",
    "In 1999 there were 12 ships; by 2024, 365 days later, 7 remained. Prices: 3.50, 120, 42,000!",
    "Whitespace  matters:\tthe   quick brown\n\nfox   jumps over the lazy dog.\r\n",
    "Ünïcödé wörds, naïve façades, 東京 and 北京, здравствуй мир, 🐉 dragons and 🔥 fire.",
    "don't you'll we've they're I'm he'd it's DON'T YOU'LL WE'VE",
] * 4


def trained_bpe() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE vocabulary of VOCAB tokens, learned here, specials first."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=BPE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_BPE_TRAINING_TEXT, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens + [f"<unused{i}>" for i in range(VOCAB - len(tokens))], merges


def _add_bpe_vocab(writer: gguf.GGUFWriter, pre: str) -> None:
    tokens, merges = trained_bpe()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in BPE_SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def tiny_hf_folder(folder: Path, seed: int = 0, rope_parameters: dict | None = None,
                   dtype: torch.dtype = torch.float32, arch: str = "llama") -> LlamaForCausalLM | Qwen2ForCausalLM:
    """Writes a random tiny Llama (or Qwen2) as a Hugging Face folder (safetensors + tokenizer.json)."""
    torch.manual_seed(seed)
    hf = hf_twin(arch, rope_parameters)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.05) if p.dim() == 2 else p.uniform_(0.5, 1.5)
            p.copy_(p.to(dtype).float())  # the reference holds exactly what the file stores
    hf.save_pretrained(folder)
    if dtype != torch.float32:
        from safetensors.torch import load_file, save_file

        stored = load_file(folder / "model.safetensors")
        save_file({k: v.to(dtype) for k, v in stored.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    vocab = {t: i for i, t in enumerate(_byte_vocab())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return hf


SPM_PIECES = ["▁", "e", "t", "a", "o", "n", "h", "l", "r", "s", "d", "i", "▁t", "he", "▁the", "▁a", "an", "▁an", "nd",
              "▁and", "er", "in", "▁dr", "ag", "on", "▁dragon", "▁s", "le", "ep", "▁sleep", "▁sleeps", "H", "ll",
              "▁H", "▁Hello", "el", "lo", "ell", "▁He", "▁Hel", "▁Hell", ",", "!", "w", "▁w", "or", "▁wor", "ld",
              "▁world"]


def tiny_spm_gguf(path: Path) -> None:
    """A one-layer Llama GGUF with a small sentencepiece (`llama`) vocabulary with byte fallback."""
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    writer = gguf.GGUFWriter(str(path), "llama")
    hidden, inter = 64, 128
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(vocab), hidden), "output_norm.weight": (hidden,)}
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                        ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)),
                        ("ffn_down", (hidden, inter)), ("attn_norm", (hidden,)), ("ffn_norm", (hidden,))]:
        shapes[f"blk.0.{name}.weight"] = shape
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.normal(0, 0.05, size=shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
