"""The knowledge graph: the vision model's 1000 ImageNet classes as WordNet 3.0 synsets, with every hypernym
up to ``entity``, each synset's words (lemmas) and definition.

It answers two questions about a prediction:

* **Roll-ups**: how likely is the image to be a concept at any level of the hierarchy ("animal", "dog",
  "vehicle")? The probability of a concept is the sum of the probabilities of the classes at or below it,
  each class counted once even where it is reachable by two paths (WordNet's nouns form a DAG).
* **Facts**: what the cluster knows about a class or a concept (its definition, what it is a kind of), as
  evidence for the language model, with the synset it came from.

The graph is read from ``knowledge/wordnet.json`` (built by ``knowledge.build`` from WordNet itself), once per
process: about 1,900 synsets. Each synset's classes are kept as an index array, so a roll-up is one
``probs[classes].sum()``: 7 µs here, where finding the classes below a node in a networkx graph took 900 µs
and building that graph 57 ms; loading the file takes about 80 ms.
"""

import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRAPH_FILE = Path(__file__).with_name("wordnet.json")
ROOT = "n00001740"  # entity.n.01
WNID = re.compile(r"^n\d{8}$")
SYNSET_NAME = re.compile(r"^[^.\s]+\.n\.\d{2}$")
MAX_SUGGESTIONS = 5


class UnknownConcept(LookupError):
    """A concept that names no synset of the graph; ``suggestions`` are close words that do."""

    def __init__(self, suggestions: list[str]):
        hint = f"; close matches: {', '.join(suggestions)}" if suggestions else ""
        super().__init__(f"not a concept of the knowledge graph (a WordNet noun, synset name or id){hint}")
        self.suggestions = suggestions


@dataclass(frozen=True)
class Synset:
    id: str  # WordNet id, e.g. n02084071
    name: str  # e.g. dog.n.01
    lemmas: tuple[str, ...]  # e.g. ("dog", "domestic_dog", "Canis_familiaris")
    definition: str
    hypernyms: tuple[str, ...]  # ids of its direct parents

    @property
    def word(self) -> str:
        """Its first lemma, readable: ``domestic cat``."""
        return self.lemmas[0].replace("_", " ")


@dataclass(frozen=True)
class Fact:
    """What the graph says about one synset: its definition and what it is a kind of."""

    synset: Synset
    kind_of: tuple[str, ...]  # the words of its ancestors, nearest first, along its first parents

    def render(self) -> str:
        words = ", ".join(lemma.replace("_", " ") for lemma in self.synset.lemmas[:3])
        kinds = f" It is a kind of {', '.join(self.kind_of)}." if self.kind_of else ""
        return f"{words}: {self.synset.definition}.{kinds}"


class KnowledgeGraph:
    def __init__(self, data: dict):
        self.source: str = data["source"]
        self.synsets: dict[str, Synset] = {
            key: Synset(key, entry["name"], tuple(entry["lemmas"]), entry["definition"], tuple(entry["hypernyms"]))
            for key, entry in data["synsets"].items()
        }
        self.classes: list[str] = list(data["classes"])  # class index -> synset id
        self._by_name = {s.name: key for key, s in self.synsets.items()}
        # A word names the synsets it is a lemma of; where there are several, WordNet's sense order decides.
        self._by_word: dict[str, str] = {}
        for key, synset in self.synsets.items():
            for lemma in synset.lemmas:
                self._by_word.setdefault(_word(lemma), key)
        for word, keys in data["senses"].items():
            self._by_word[_word(word)] = keys[0]
        below: dict[str, set[int]] = {key: set() for key in self.synsets}
        for index, key in enumerate(self.classes):
            for ancestor in self.ancestors(key):
                below[ancestor].add(index)
        self._classes_below = {key: np.array(sorted(found), dtype=np.int64) for key, found in below.items()}
        self._vocabulary = sorted(self._by_word)

    @classmethod
    def load(cls, path: Path = GRAPH_FILE) -> "KnowledgeGraph":
        return cls(json.loads(path.read_text()))

    def ancestors(self, key: str) -> set[str]:
        """The synset and every synset above it."""
        seen, todo = set(), [key]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(self.synsets[node].hypernyms)
        return seen

    def resolve(self, concept: str) -> Synset:
        """A concept named by a word (``dog``, ``hot dog``), a synset name (``dog.n.01``) or an id
        (``n02084071``), case-insensitively. Unknown: ``UnknownConcept`` with close matches."""
        text = concept.strip()
        if WNID.match(text) and text in self.synsets:
            return self.synsets[text]
        if SYNSET_NAME.match(text.lower()) and text.lower() in self._by_name:
            return self.synsets[self._by_name[text.lower()]]
        key = self._by_word.get(_word(text))
        if key is None:
            raise UnknownConcept(self.suggest(text))
        return self.synsets[key]

    def suggest(self, text: str) -> list[str]:
        """Words of the graph close to ``text`` in spelling."""
        word = _word(text.split(".")[0])[:64]
        matches = difflib.get_close_matches(word, self._vocabulary, n=MAX_SUGGESTIONS, cutoff=0.6)
        return [match.replace("_", " ") for match in matches]

    def classes_below(self, key: str) -> np.ndarray:
        """Indices of the classes at or below a synset."""
        return self._classes_below[key]

    def rollup(self, probs: np.ndarray, key: str) -> float:
        """The probability that the image is a ``key``: its classes' probabilities summed."""
        if len(probs) != len(self.classes):
            raise ValueError(f"a roll-up needs the {len(self.classes)} ImageNet class probabilities, got {len(probs)}")
        return float(min(1.0, probs[self._classes_below[key]].sum(dtype=np.float64)))

    def class_synset(self, index: int) -> Synset:
        return self.synsets[self.classes[index]]

    def fact(self, key: str, depth: int = 4) -> Fact:
        """A synset's definition and up to ``depth`` of its ancestors, nearest first (first parent each step)."""
        kinds, node = [], self.synsets[key]
        while node.hypernyms and len(kinds) < depth:
            node = self.synsets[node.hypernyms[0]]
            kinds.append(node.word)
        return Fact(self.synsets[key], tuple(kinds))

    def mentioned(self, text: str, limit: int) -> list[Synset]:
        """Synsets named in a text by one of their words (longest words first, each synset once), at most
        ``limit``, in the order they appear. Words of two letters, the verb "can", and the graph's most general
        synsets (``entity``, ``object``, ``whole``...) are not looked for: they name too much."""
        tokens = re.findall(r"[a-z0-9'-]+", text.lower())[:2000]
        found: list[tuple[int, Synset]] = []
        taken = [False] * len(tokens)
        for size in (3, 2, 1):
            for start in range(len(tokens) - size + 1):
                if any(taken[start : start + size]):
                    continue
                phrase = _word(" ".join(tokens[start : start + size]))
                if len(phrase) <= 2 or phrase in NOT_CONCEPTS:
                    continue
                key = self._by_word.get(phrase) or self._by_word.get(phrase.removesuffix("s"))  # plurals
                if key is None or len(self.classes_below(key)) > GENERAL_CLASSES:
                    continue
                if all(key != synset.id for _, synset in found):
                    found.append((start, self.synsets[key]))
                taken[start : start + size] = [True] * size
        return [synset for _, synset in sorted(found, key=lambda pair: pair[0])][:limit]


# Words of the graph that a question uses as something else far more often ("can you...").
NOT_CONCEPTS = frozenset({"can"})
# A synset above more classes than this is too general to be worth a fact ("object", "organism").
GENERAL_CLASSES = 400


def _word(text: str) -> str:
    return "_".join(text.lower().replace("-", " ").replace("_", " ").split())


@functools.cache
def knowledge_graph() -> KnowledgeGraph:
    """The shipped graph, loaded once per process."""
    return KnowledgeGraph.load()
