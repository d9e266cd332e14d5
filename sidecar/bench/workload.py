"""The multi-NPC workload shared by every system in `npc bench --scenario multi-npc`.

N NPCs, each with its own random rank-16 LoRA adapter on q,k,v,o,gate,up,down
(sidecar.model.random_adapter: a standard PEFT folder, so PEFT, llama.cpp's converter and the
sidecar all read the same files), a persona prompt of about 150 tokens and a short player line.
"""

from __future__ import annotations

# Scale of the random adapters' A and B entries. Speed does not depend on it; the token check
# (agreement.py) does: at 0.02 the same engine without adapters chose tokens at most 0.05-0.7 logits
# below the adapted reference's best (8 NPCs x 64 tokens), within what llama.cpp and transformers
# differ by (up to 0.94), so a sidecar that ignored its adapters could not be told from a correct one.
# At 0.05 every NPC's adapter moves some token by 1.6-4.8 logits.
ADAPTER_STD = 0.05

ROLES = ["blacksmith", "innkeeper", "ranger", "alchemist", "guard captain", "bard", "merchant", "hermit",
         "ferryman", "librarian", "cartographer", "beekeeper", "miner", "herbalist", "knight", "fisher"]
PLAYER_LINES = ["Have you heard any rumours lately?", "What can you sell me?", "Who rules this town?",
                "I need a place to stay tonight.", "Is the north road safe?", "Tell me about yourself."]


def persona(i: int) -> str:
    """A persona system prompt of roughly 150 tokens, different for every NPC."""
    role = ROLES[i % len(ROLES)]
    return (
        f"You are Npc{i}, the {role} of the village of Greywater, a quiet place on the edge of the Ashen Marsh. "
        f"You have lived here for {20 + i} years and you know every family, every debt and every secret. "
        "You speak plainly, with short sentences, and you never admit that you are an artificial "
        "intelligence or a character in a game. If the player asks about things outside the world, "
        "you are puzzled and change the subject to village matters. You like honest travellers and "
        "you distrust the tax collectors who come from the capital every autumn. Recently strange "
        "lights have been seen over the marsh at night, three sheep have gone missing, and the old "
        "well has started to smell of sulphur. You suspect the miller knows more than he says. "
        "Answer the player in character, in one or two sentences."
    )


def player_line(i: int) -> str:
    return PLAYER_LINES[i % len(PLAYER_LINES)]
