"""Game semantics: characters, their hot-reloaded registry, sessions and prompts. Knows nothing about gRPC."""
