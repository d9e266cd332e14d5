"""Which facts a turn's prompt carries: the character's knowledge and the lore in its scope, ranked against
the player's line and the last exchange by two signals added together: the cosine of their sentence
vectors (embeddings.py: matches "smithy" to "forge") and BM25 (bm25s with a Snowball stemmer: exact
names and numbers), scaled so the best word match of the turn adds BM25_WEIGHT. A knowledge line's
`asked_as:` questions (how players ask for it) count by meaning: its cosine is the best of its own and
theirs ("got any family in town?" finds "Your brother Torvik runs the tavern").

Chosen by measurement (docs/design-notes.md, "Grounding"): an entry out of the character's scope
gets weight 0 before ranking, so it can never be picked; the lore index (BM25 and vectors) is built
off the event loop (`refresh()`, on the characters watcher's thread) and a turn only scores (about a
millisecond at 10,000 entries). The character's own knowledge is a small index of its own per
character version; its entries fill the block even when nothing matches (they are what the
character knows best), lore entries only when their relevance reaches LORE_MIN.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import bm25s
import numpy as np
import Stemmer

from sidecar.config import FACT_CONTRAST
from sidecar.dialogue.characters import Character
from sidecar.dialogue.embeddings import Embedder, shared_embedder
from sidecar.dialogue.lore import LoreLibrary, LoreSnapshot
from sidecar.dialogue.prompt import recent_turns
from sidecar.dialogue.sessions import SceneRecord, Turn

# Lucene's English list (bm25s') and the words every player question is made of.
STOPWORDS = sorted({
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
    "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
    "will", "with", "i", "me", "my", "you", "your", "yours", "we", "our", "he", "she", "him", "her", "his",
    "who", "what", "where", "when", "how", "which", "why", "do", "does", "did", "can", "could", "would",
    "should", "have", "has", "had", "any", "some", "about", "tell", "know", "so", "here", "around", "from",
    "one", "its", "been", "am", "were", "hey", "oh", "ok",
})

BM25_WEIGHT = 0.5  # what the turn's best word match adds to a cosine (unrelated texts ~0.06, a paraphrase ~0.4)
LORE_MIN = 0.35  # the relevance a lore entry needs to enter the block (~ the 95th percentile of unrelated pairs)
MEMORY_MIN = 0.35  # ... and an earlier exchange to come back as a memory
CONTEXT_WEIGHT = 0.3  # the last exchange steers, the player's line decides


@dataclass(frozen=True)
class Grounding:
    """How many facts a turn's prompt may carry, and how long they may be in all (characters); how many
    earlier exchanges that left the prompt's window it may bring back."""

    max_facts: int = 5
    max_chars: int = 600
    meaning_weight: float = 1.0  # of the sentence vectors' cosine against BM25 (0: words only, for comparison)
    max_memories: int = 2
    memory_chars: int = 160  # of each side of a remembered exchange
    fact_boost: float = 0.0  # logits added to the tokens only the facts bring (prompt.fact_tokens; 0: none)
    fact_contrast: float = FACT_CONTRAST  # weight of decoding against the prompt less the facts (engine.api.Contrast)


class _Index:
    """BM25 and sentence vectors over a fixed list of texts. `asked_as[i]`: how players ask for text i; its
    cosine with a line is the best of the text's and theirs. (Their words stay out of BM25: "town" or "here"
    in a question would outweigh a lore entry's matching words, whose BM25 comes from another index.)"""

    def __init__(self, texts: list[str], stemmer: Stemmer.Stemmer, embedder: Embedder | None = None,
                 asked_as: Sequence[Sequence[str]] = ()):
        self.size = len(texts)
        asked_as = list(asked_as) or [()] * len(texts)
        if len(asked_as) != len(texts):
            raise ValueError(f"asked_as: {len(asked_as)} entries for {len(texts)} texts")
        self._bm25 = bm25s.BM25()
        if texts:
            self._bm25.index(tokenize(texts, stemmer), show_progress=False)
        self.vectors = embedder.embed(texts) if embedder is not None else None
        questions = [q for asked in asked_as for q in asked]
        self._question_vectors = embedder.embed(questions) if embedder is not None and questions else None
        self._question_owner = np.array([i for i, asked in enumerate(asked_as) for _ in asked], dtype=np.int64)

    def scores(self, words: list[str], mask: np.ndarray | None = None) -> np.ndarray:
        if not self.size or not words:
            return np.zeros(self.size, dtype=np.float32)
        return self._bm25.get_scores(words, weight_mask=mask)

    def cosines(self, vector: np.ndarray) -> np.ndarray:
        out = self.vectors @ vector
        if self._question_vectors is not None:
            np.maximum.at(out, self._question_owner, self._question_vectors @ vector)
        return out


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def tokenize(texts: list[str], stemmer: Stemmer.Stemmer) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords=STOPWORDS, stemmer=stemmer, return_ids=False, show_progress=False)


class FactRetriever:
    """Picks a turn's facts. `facts()` may run on any thread; `refresh()` on the watcher's."""

    def __init__(self, lore: LoreLibrary | None = None, grounding: Grounding = Grounding()):
        self.lore, self.grounding = lore, grounding
        self._stemmer = Stemmer.Stemmer("english")
        self._embedder = shared_embedder()
        self._lock = threading.Lock()  # the stemmer and the caches are not shared across threads unguarded
        self._lore_index: tuple[LoreSnapshot, _Index] | None = None
        self._knowledge: OrderedDict[str, _Index] = OrderedDict()  # by character version, LRU
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.reload()

    def reload(self) -> None:
        """Rescans the lore folder and rebuilds the index if it changed (the characters watcher calls it)."""
        if self.lore is not None:
            self.lore.reload()
        self.refresh()

    def refresh(self) -> None:
        """Rebuilds the lore index when the lore changed (after `LoreLibrary.reload()`)."""
        if self.lore is None:
            return
        snapshot = self.lore.snapshot()
        if self._lore_index is not None and self._lore_index[0].version == snapshot.version:
            return
        index = _Index([e.text for e in snapshot.entries], Stemmer.Stemmer("english"), self._embedder)
        with self._lock:
            self._lore_index = (snapshot, index)
            self._masks.clear()

    def facts(self, character: Character, line: str, recent: str = "") -> tuple[str, ...]:
        """The facts for this turn, best first: at most max_facts, max_chars in all."""
        vectors = self._embedder.embed([line, recent])
        with self._lock:
            words, context = self._words(line), self._words(recent)
            own = self._knowledge_index(character)
            own_words = own.scores(words) + CONTEXT_WEIGHT * own.scores(context)
            own_meaning = own.cosines(vectors[0]) + CONTEXT_WEIGHT * own.cosines(vectors[1])
            lore_words = lore_meaning = np.zeros(0, dtype=np.float32)
            if self._lore_index is not None:
                snapshot, index = self._lore_index
                mask = self._mask(character, snapshot)
                if mask.any():
                    lore_words = index.scores(words, mask) + CONTEXT_WEIGHT * index.scores(context, mask)
                    lore_meaning = index.cosines(vectors[0]) + CONTEXT_WEIGHT * index.cosines(vectors[1])
        # One scale for both pools: the turn's best word match, wherever it is, adds BM25_WEIGHT.
        best_match = max(float(own_words.max(initial=0.0)), float(lore_words.max(initial=0.0))) or 1.0
        meaning = self.grounding.meaning_weight
        ranked = [(float(r), 0, text) for r, text in
                  zip(meaning * own_meaning + BM25_WEIGHT * own_words / best_match, character.knowledge, strict=True)]
        if lore_meaning.size:
            relevance = np.where(mask > 0, meaning * lore_meaning + BM25_WEIGHT * lore_words / best_match, -np.inf)
            top = np.argsort(-relevance, kind="stable")[: self.grounding.max_facts]
            ranked += [(float(relevance[i]), 1, snapshot.entries[i].text) for i in top if relevance[i] >= LORE_MIN]
        ranked.sort(key=lambda r: (-r[0], r[1]))  # ties: knowledge before lore
        out, used = [], 0
        for _, _, text in ranked:
            if len(out) == self.grounding.max_facts:
                break
            if used + len(text) <= self.grounding.max_chars and text not in out:
                out.append(text)
                used += len(text)
        return tuple(out)

    def for_turn(self, character: Character, history: Sequence[Turn], line: str) -> tuple[str, ...]:
        """The facts for the player's line, with the last exchange with this character as context."""
        last = recent_turns(character, history)[-1:]
        return self.facts(character, line, " ".join(f"{t.player_line} {t.npc_line}" for t in last))

    def recall(self, character: Character, history: Sequence[Turn], line: str,
               scenes: Mapping[str, SceneRecord] | None = None, names: Mapping[str, str] | None = None,
               current_scene: str = "") -> tuple[str, ...]:
        """Long-term memory: the earlier exchanges with this character that left the prompt's window
        (memory.max_turns), and the lines of the `scenes` it was in (but `current_scene`, whose lines the
        prompt holds), that share words with the line; oldest first, as lines for the prompt. `names`
        maps character ids to names (a scene line says who spoke)."""
        own = [t for t in history if t.character_id == character.id and not t.scene_id]
        window = character.memory.max_turns
        old = own[: len(own) - window] if window else own
        scenes, names, cut = scenes or {}, names or {}, self.grounding.memory_chars
        candidates = []  # (text to match, line for the prompt), oldest first
        old_ids = {id(t) for t in old}
        for t in history:
            if id(t) in old_ids:
                candidates.append((f"{t.player_line} {t.npc_line}", f'The player said "{_clip(t.player_line, cut)}" '
                                                                       f'and you answered "{_clip(t.npc_line, cut)}"'))
            elif t.scene_id and t.scene_id != current_scene and t.scene_id in scenes \
                    and character.id in scenes[t.scene_id].character_ids:
                who = "you" if t.character_id == character.id else names.get(t.character_id, t.character_id)
                where = _clip(scenes[t.scene_id].situation, 80)
                candidates.append((t.npc_line, f'In a scene ({where}), {who} said "{_clip(t.npc_line, cut)}"'))
        if not candidates or self.grounding.max_memories == 0:
            return ()
        candidates = list({shown: (text, shown) for text, shown in candidates}.values())  # a line said twice: once
        texts = [text for text, _ in candidates]
        vectors = self._embedder.embed([line, *texts])
        with self._lock:
            words = self._words(line)
            matches = _Index(texts, self._stemmer).scores(words)
        relevance = (self.grounding.meaning_weight * (vectors[1:] @ vectors[0])
                     + BM25_WEIGHT * matches / (float(matches.max(initial=0.0)) or 1.0))
        top = np.argsort(-relevance, kind="stable")[: self.grounding.max_memories]
        return tuple(candidates[i][1] for i in sorted(i for i in top if relevance[i] >= MEMORY_MIN))

    def in_scope(self, character: Character) -> list[str]:
        """Every lore entry the character may be given (for `npc chat /lore` and the scope tests)."""
        if self._lore_index is None:
            return []
        snapshot = self._lore_index[0]
        return [e.text for e in snapshot.entries if e.scope.admits(character)]

    def _words(self, text: str) -> list[str]:
        return tokenize([text], self._stemmer)[0] if text.strip() else []

    def _knowledge_index(self, character: Character) -> _Index:
        index = self._knowledge.get(character.version)
        if index is None:
            index = self._knowledge[character.version] = _Index(list(character.knowledge), self._stemmer,
                                                                 self._embedder, character.asked_as)
            if len(self._knowledge) > 256:
                self._knowledge.popitem(last=False)
        self._knowledge.move_to_end(character.version)
        return index

    def _mask(self, character: Character, snapshot: LoreSnapshot) -> np.ndarray:
        """1.0 where the character's scope admits the entry, else 0.0 (bm25s multiplies the scores by it)."""
        key = (character.id, character.factions, character.places)
        mask = self._masks.get(key)
        if mask is None:
            mask = np.fromiter((e.scope.admits(character) for e in snapshot.entries), dtype=np.float32,
                               count=len(snapshot.entries))
            self._masks[key] = mask
            if len(self._masks) > 1024:
                self._masks.popitem(last=False)
        return mask
