"""A knowledge-capacity corpus: compact statements of random, high-entropy facts.

Each fact is (entity, value): a unique made-up name (2-3 syllables of data.py's) and a value of
`value_digits` uniformly random decimal digits, i.e. value_digits * log2(10) bits that nothing but
memorizing that fact can predict (a 5-digit value carries 16.6 bits; the previous corpus' values
carried 3-3.7 bits each). The text is almost nothing but fact statements, each a dozen bytes:

    trained forms   "{ent}: {val};"   "{ent} code {val};"   "code of {ent} = {val};"
    question form   "Q: {ent}'s code? A: {val};"

Every fact is stated exactly `exposures` times in the training text (`exposures` shuffled passes
over the facts, each statement's form drawn at random), so exposures per fact are a setting, not a
consequence of the token budget: sweeping the fact count at fixed exposures changes how much there
is to store and nothing else (the training tokens grow with the count).

The split:
- probe facts (`probe_fraction`): never stated in the question form in training (their other
  forms are); asking "Q: {ent}'s code? A:" is a held-out question form about a fact seen in training.
- the other facts get the question form for `question_share` of their statements.
- validation text: `valid_passes` fresh passes over all facts in all four forms (probe facts'
  question form included), from a separate random stream: held-out text for the validation loss and
  for the loss on fact values (`valid_value_spans`).

Recall (`recall`) is exact: a prompt "\\n{statement up to the value}" recalls the fact when every
value digit is the model's arg-max next byte given the true digits before it, i.e. when greedy
decoding would write the value (chance 10^-value_digits). `digit_accuracy` is the share of digits
right under the same teacher forcing (chance 10%).
"""

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .. import data
from .corpus import FactCorpus

Fact = Tuple[str, str]  # (entity, value)

TRAINED_FORMS = ("{ent}: {val};", "{ent} code {val};", "code of {ent} = {val};")
"""Statement forms of every fact in the training text (the first, the most compact, most often)."""
FORM_WEIGHTS = (0.5, 0.25, 0.25)
QUESTION_FORM = "Q: {ent}'s code? A: {val};"
"""Never in the training text for a probe fact."""


@dataclass(frozen=True)
class CapacitySpec:
    num_facts: int = 1000
    value_digits: int = 5  # 16.6 bits per fact
    exposures: int = 100  # statements of each fact in the training text
    probe_fraction: float = 0.2  # facts whose question form is held out of training
    question_share: float = 0.1  # of a non-probe fact's training statements, in the question form
    statements_per_doc: int = 8  # statements per line (a document)
    valid_passes: int = 2  # passes over all facts in the validation text
    seed: int = 0  # facts and text; a different seed is a different set of facts (tuning split)

    @property
    def bits_per_fact(self) -> float:
        import math

        return self.value_digits * math.log2(10)


QUICK_SPEC = CapacitySpec(num_facts=40, value_digits=3, exposures=6, valid_passes=1)


def make_facts(num_facts: int, value_digits: int, seed: int) -> List[Fact]:
    """Unique entity names (2-3 syllables) with independent uniform values; sorted by name."""
    rng = random.Random(seed)
    syl = data._SYLLABLES
    if num_facts > len(syl) ** 2 + len(syl) ** 3:
        raise ValueError(f"num_facts={num_facts} exceeds the {len(syl) ** 2 + len(syl) ** 3} names")
    names = set()
    while len(names) < num_facts:
        names.add("".join(rng.choice(syl) for _ in range(rng.randint(2, 3))).capitalize())
    return [(ent, "".join(rng.choice("0123456789") for _ in range(value_digits))) for ent in sorted(names)]


def _split(form: str, ent: str) -> Tuple[str, str]:
    """(text before the value, text after it) of a statement form for `ent`."""
    head, tail = form.split("{val}")
    return head.format(ent=ent), tail


@dataclass
class CapacityCorpus(FactCorpus):
    """The general-text corpus' container (tokens, write_indexed) over (entity, value) facts."""

    spec: CapacitySpec
    facts: List[Fact]
    probe_facts: List[Fact]  # question form never in training
    seen_facts: List[Fact]  # question form in training at least once

    @property
    def train_statements(self) -> int:
        return self.spec.num_facts * self.spec.exposures


def _lines(statements: List[str], per_doc: int) -> str:
    return "".join(" ".join(statements[i : i + per_doc]) + "\n" for i in range(0, len(statements), per_doc))


def make_corpus(spec: CapacitySpec = CapacitySpec()) -> CapacityCorpus:
    """Generate the corpus for `spec` (deterministic in spec.seed)."""
    facts = make_facts(spec.num_facts, spec.value_digits, spec.seed)
    rng = random.Random(spec.seed + 101)
    order = list(range(len(facts)))
    rng.shuffle(order)
    n_probe = max(1, round(spec.probe_fraction * len(facts)))
    probe = {facts[i] for i in order[:n_probe]}

    train_rng = random.Random(spec.seed + 202)
    statements, asked = [], set()
    for _ in range(spec.exposures):  # one pass: every fact once, in a fresh order
        for ent, val in train_rng.sample(facts, len(facts)):
            if (ent, val) not in probe and train_rng.random() < spec.question_share:
                form = QUESTION_FORM
                asked.add((ent, val))
            else:
                form = train_rng.choices(TRAINED_FORMS, FORM_WEIGHTS)[0]
            statements.append(form.format(ent=ent, val=val))
    train = _lines(statements, spec.statements_per_doc)

    valid_rng = random.Random(spec.seed + 303)
    valid_statements = []
    for _ in range(spec.valid_passes):
        for ent, val in valid_rng.sample(facts, len(facts)):
            for form in valid_rng.sample(TRAINED_FORMS + (QUESTION_FORM,), 4):
                valid_statements.append((form, ent, val))
    valid_rng.shuffle(valid_statements)
    docs, spans, offset = [], [], 0
    per_doc = spec.statements_per_doc
    for i in range(0, len(valid_statements), per_doc):
        parts = []
        for form, ent, val in valid_statements[i : i + per_doc]:
            head, tail = _split(form, ent)
            spans.append((offset + len(head), offset + len(head) + len(val)))
            parts.append(head + val + tail)
            offset += len(parts[-1]) + 1  # the joining space, or the newline after the last
        docs.append(" ".join(parts) + "\n")
    valid = "".join(docs)
    assert not asked & probe and train.isascii() and valid.isascii()
    return CapacityCorpus(
        spec=spec,
        train_text=train,
        valid_text=valid,
        facts=facts,
        probe_facts=[f for f in facts if f in probe],
        seen_facts=[f for f in facts if f in asked],
        valid_value_spans=spans,
    )


# ---------------------------------------------------------------------- recall
@torch.no_grad()
def _argmax_hits(model, prompts: Sequence[str], values: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """[len(prompts), digits] bool: whether each value byte is the model's arg-max next byte given
    the prompt and the true bytes before it (teacher forcing). Sequences are right-padded (causal
    attention: padding never affects the scored positions)."""
    from ..train import _causal_mask

    digits = len(values[0])
    out = torch.zeros(len(prompts), digits, dtype=torch.bool)
    for lo in range(0, len(prompts), batch_size):
        enc = [(list(p.encode("ascii")), list(v.encode("ascii")))
               for p, v in zip(prompts[lo : lo + batch_size], values[lo : lo + batch_size])]  # fmt: skip
        S = max(len(p) + len(v) for p, v in enc)
        tokens = torch.zeros(len(enc), S, dtype=torch.int64)
        first = torch.tensor([len(p) - 1 for p, _ in enc])  # position predicting the first digit
        for i, (p, v) in enumerate(enc):
            tokens[i, : len(p) + len(v)] = torch.tensor(p + v)
        pos = torch.arange(S).expand(len(enc), S)
        logits = model(tokens, pos, _causal_mask(S))  # [b, S, V]
        idx = first[:, None] + torch.arange(digits)  # [b, digits]
        pred = logits.argmax(-1).gather(1, idx)
        out[lo : lo + len(enc)] = pred == tokens.gather(1, idx + 1)
    return out


def recall(model, facts: Sequence[Fact], forms: Sequence[str]) -> Dict[str, float]:
    """Exact recall (all digits arg-max) and digit accuracy of `facts` asked in each of `forms`
    (prompt: newline + the statement up to its value), with per-form recall and the count."""
    prompts, values = [], []
    for form in forms:
        for ent, val in facts:
            prompts.append("\n" + _split(form, ent)[0])
            values.append(val)
    was_training = model.training
    model.eval()
    hits = _argmax_hits(model, prompts, values) if prompts else torch.zeros(0, 1, dtype=torch.bool)
    model.train(was_training)
    exact = hits.all(dim=1).double()
    per_form = exact.view(len(forms), len(facts)).mean(dim=1).tolist() if facts else []
    n = max(1, len(prompts))
    return {
        "accuracy": float(exact.sum()) / n,
        "digit_accuracy": float(hits.double().mean()) if prompts else 0.0,
        "per_form": dict(zip(forms, per_form)),
        "count": len(prompts),
    }
