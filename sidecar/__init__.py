"""npc-sidecar: one quantized base model, one LoRA adapter per character, streaming dialogue."""

__version__ = "0.1.0"
