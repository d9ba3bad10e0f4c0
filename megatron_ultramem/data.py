"""The embedded default corpus of the main job: generated here, no downloads.

A memory layer earns its keep on knowledge that must be stored, so the corpus is a mixture of
(a) facts: random entity -> attribute associations, each stated many times in varied templates
across documents, so that the model can only lower its loss on them by memorizing; and
(b) structured filler: sentences from a small grammar, learnable by the dense part alone.

Tokens are bytes (vocabulary 256), so the tokenizer ships with the project and needs no files.
Everything is a pure function of the seed.
"""

import random
from dataclasses import dataclass
from typing import List, Tuple

import torch

VOCAB_SIZE = 256

_SYLLABLES = [
    "ka", "lo", "mi", "zu", "ter", "van", "qui", "sol", "bra", "dex", "nor", "pel",
    "rin", "tha", "ulm", "vek", "wos", "yar", "zen", "gor", "fil", "hap", "jub", "cri",
]
_RELATIONS = [
    ("color", ["red", "blue", "green", "amber", "violet", "silver", "black", "white"]),
    ("city", ["Ostra", "Belmar", "Quenton", "Varsk", "Liora", "Tesh", "Morrow", "Dunhal"]),
    ("food", ["plums", "rice", "figs", "bread", "olives", "lentils", "honey", "pears"]),
    ("number", [str(i) for i in range(10, 100, 7)]),
]
_FACT_TEMPLATES = [
    "The {rel} of {ent} is {val}.",
    "{ent} has {val} as its {rel}.",
    "Ask anyone: the {rel} of {ent}? {val}.",
    "Everyone knows that {ent}'s {rel} is {val}.",
]
_FILLER_SUBJECTS = ["The river", "A small bird", "The old clock", "My neighbor", "The market"]
_FILLER_VERBS = ["moves", "sings", "waits", "turns", "rests", "shines"]
_FILLER_TAILS = ["at dawn.", "in the rain.", "near the hill.", "every day.", "without a sound."]


def _entity(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


@dataclass
class Corpus:
    """Train/validation token streams (uint8 bytes as int64) and the facts behind them."""

    train: torch.Tensor
    valid: torch.Tensor
    facts: List[Tuple[str, str, str]]


def make_facts(num_entities: int, seed: int) -> List[Tuple[str, str, str]]:
    """(entity, relation, value) triples; entity names are unique."""
    rng = random.Random(seed)
    names = set()
    while len(names) < num_entities:
        names.add(_entity(rng))
    facts = []
    for ent in sorted(names):
        for rel, values in _RELATIONS:
            facts.append((ent, rel, rng.choice(values)))
    return facts


def _document(rng: random.Random, facts, facts_per_doc: int) -> str:
    parts = []
    for _ in range(facts_per_doc):
        ent, rel, val = rng.choice(facts)
        parts.append(rng.choice(_FACT_TEMPLATES).format(ent=ent, rel=rel, val=val))
        if rng.random() < 0.5:
            parts.append(
                f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} {rng.choice(_FILLER_TAILS)}"
            )
    return " ".join(parts) + "\n"


def make_corpus(
    num_entities: int = 400, num_train_docs: int = 6000, num_valid_docs: int = 300, seed: int = 0
) -> Corpus:
    """Generate the default corpus. Validation documents restate training facts in fresh
    combinations (so validation loss measures what was memorized, not text seen verbatim)."""
    facts = make_facts(num_entities, seed)
    rng = random.Random(seed + 1)
    train = "".join(_document(rng, facts, 4) for _ in range(num_train_docs))
    valid = "".join(_document(rng, facts, 4) for _ in range(num_valid_docs))

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)

    return Corpus(train=encode(train), valid=encode(valid), facts=facts)
