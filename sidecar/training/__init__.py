"""`npc train` / `npc eval`: a character's persona adapter from its dialogue.jsonl, and how well it fits."""
