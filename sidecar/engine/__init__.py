"""Serving core: tokenizer, sampling, generation. Nothing here knows about characters or gRPC."""
