"""A memory-hungry fact corpus with a held-out split, and the fact-recall metric.

Built from data.py's pieces (entity names, relations and their values, fact templates, the filler
grammar) and, like it, a pure function of the seed; tokens are bytes (vocabulary 256).

What is in it:
- facts: `num_entities` random entities x 4 relations (data.make_facts), each fact stated many
  times across documents in varied templates; the only way to lower the loss on a value is to have
  memorized the (entity, relation) -> value association.
- structured filler: data.py's sentence grammar plus small additions ("7 plus 5 is 12."), learnable
  by any dense model.

The split:
- probe facts (`probe_fraction` of all facts): their question form "The {rel} of {ent} is {val}."
  never appears in the training text; the fact is stated in training only through the other
  templates. Asking "The color of Zorbak is" is then a held-out question about a fact seen in
  training (the model must carry the association over to the question form it saw for other facts).
- seen facts: the other facts whose question form occurs in training at least once (recall here
  is memorization of a form seen in training).
- validation text: documents drawn with a separate random stream (fresh combinations, all
  templates, including probe facts' question forms): held-out text for the validation loss.

The metric (`fact_recall`): for a prompt "\\nThe {rel} of {ent} is", score every candidate value of
the relation by the summed log-probability of " {val}." under the model and count the prompt as
recalled when the true value ranks first (chance: 1/8 for three relations, 1/13 for 'number').
The same with the training statement forms whose value comes last (`RECALL_TEMPLATES`, e.g.
"For {ent}, the {rel} is") measures memorization in the forms the model was trained on.
"""

import os
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .. import data

Fact = Tuple[str, str, str]  # (entity, relation, value)

QUESTION_TEMPLATE = data._FACT_TEMPLATES[0]  # "The {rel} of {ent} is {val}."
assert QUESTION_TEMPLATE.startswith("The {rel} of {ent} is")
OTHER_TEMPLATES = list(data._FACT_TEMPLATES[1:]) + [
    "For {ent}, the {rel} is {val}.",
    "{ent} ({rel}: {val}).",
    "Records list {val} under the {rel} of {ent}.",
]
"""Statement forms that never contain the question prompt of the fact they state."""

RELATIONS: Dict[str, List[str]] = {rel: list(values) for rel, values in data._RELATIONS}


def question(entity: str, relation: str) -> str:
    """The held-out question prompt, e.g. "The color of Zorbak is"."""
    return QUESTION_TEMPLATE.split(" {val}")[0].format(rel=relation, ent=entity)


def _filler(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return (
            f"{rng.choice(data._FILLER_SUBJECTS)} {rng.choice(data._FILLER_VERBS)} "
            f"{rng.choice(data._FILLER_TAILS)}"
        )
    if kind < 0.8:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{a} plus {b} is {a + b}."
    start = rng.randint(1, 5)
    return "Count: " + " ".join(str(start + i) for i in range(rng.randint(3, 6))) + "."


@dataclass(frozen=True)
class CorpusSpec:
    num_entities: int = 30  # 120 facts: what ~250 CPU steps can start to memorize (see quality.py)
    num_train_docs: int = 4000
    num_valid_docs: int = 300
    facts_per_doc: int = 6
    filler_per_fact: float = 0.3  # probability of a filler sentence after each fact
    probe_fraction: float = 0.4  # facts whose question form is held out of training
    seed: int = 0


QUICK_SPEC = CorpusSpec(num_entities=24, num_train_docs=300, num_valid_docs=40)


@dataclass
class FactCorpus:
    spec: CorpusSpec
    train_text: str
    valid_text: str
    facts: List[Fact]
    probe_facts: List[Fact]  # question form never in training
    seen_facts: List[Fact]  # question form in training (at least once)
    valid_value_spans: List[Tuple[int, int]] = None  # (start, end) of every value in valid_text

    def tokens(self, split: str) -> torch.Tensor:
        text = {"train": self.train_text, "valid": self.valid_text}[split]
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)

    def write_indexed(self, folder: str) -> Dict[str, str]:
        """Megatron indexed datasets `folder/train`, `folder/valid` (one document per line)."""
        from ..data_pipeline import write_indexed_corpus

        prefixes = {}
        for split in ("train", "valid"):
            prefix = os.path.join(folder, split)
            write_indexed_corpus(self.tokens(split), prefix)
            prefixes[split] = prefix
        return prefixes


def _document(rng: random.Random, facts: Sequence[Fact], probe: set, spec: CorpusSpec,
              allow_question_for_probes: bool, asked: set, value_spans: List = None) -> str:  # fmt: skip
    """One line of text; adds to `asked` the facts it states in the question form, and to
    `value_spans` (when given) the (start, end) offsets of each stated value within the line."""
    parts, spans, offset = [], [], 0
    for _ in range(spec.facts_per_doc):
        ent, rel, val = fact = facts[rng.randrange(len(facts))]
        if fact in probe and not allow_question_for_probes:
            template = rng.choice(OTHER_TEMPLATES)
        else:  # the question form as often as any other single template
            template = rng.choice([QUESTION_TEMPLATE] + OTHER_TEMPLATES)
        if template is QUESTION_TEMPLATE:
            asked.add(fact)
        start = offset + len(template.split("{val}")[0].format(ent=ent, rel=rel))
        spans.append((start, start + len(val)))
        parts.append(template.format(ent=ent, rel=rel, val=val))
        offset += len(parts[-1]) + 1  # the joining space
        if rng.random() < spec.filler_per_fact:
            parts.append(_filler(rng))
            offset += len(parts[-1]) + 1
    if value_spans is not None:
        value_spans.extend(spans)
    return " ".join(parts) + "\n"


def make_corpus(spec: CorpusSpec = CorpusSpec()) -> FactCorpus:
    """Generate the corpus for `spec` (deterministic in spec.seed)."""
    facts = data.make_facts(spec.num_entities, spec.seed)
    rng = random.Random(spec.seed + 101)
    order = list(range(len(facts)))
    rng.shuffle(order)
    n_probe = max(1, round(spec.probe_fraction * len(facts)))
    probe_idx = sorted(order[:n_probe])
    probe = {facts[i] for i in probe_idx}
    train_rng, valid_rng = random.Random(spec.seed + 202), random.Random(spec.seed + 303)
    asked = set()  # facts whose question form is in the training text
    train = "".join(
        _document(train_rng, facts, probe, spec, False, asked) for _ in range(spec.num_train_docs)
    )
    valid_docs, valid_spans, offset = [], [], 0
    for _ in range(spec.num_valid_docs):
        spans = []
        valid_docs.append(_document(valid_rng, facts, probe, spec, True, set(), spans))
        valid_spans.extend((offset + a, offset + b) for a, b in spans)
        offset += len(valid_docs[-1])
    valid = "".join(valid_docs)
    assert not asked & probe
    assert valid.isascii()  # byte offsets == character offsets
    return FactCorpus(
        spec=spec,
        train_text=train,
        valid_text=valid,
        facts=facts,
        probe_facts=[facts[i] for i in probe_idx],
        seen_facts=[f for f in facts if f in asked],
        valid_value_spans=valid_spans,
    )


# ---------------------------------------------------------------------- fact recall
def _encode(text: str) -> List[int]:
    return list(text.encode("utf-8"))


@torch.no_grad()
def candidate_logprobs(model, pairs: Sequence[Tuple[str, str]], batch_size: int = 256) -> torch.Tensor:
    """Summed log p(continuation | prompt) for each (prompt, continuation) pair: [len(pairs)].

    `model` is a Megatron GPTModel ([b, s] tokens -> [b, s, V] logits without labels); sequences
    are right-padded (causal attention: padding never affects the scored positions).
    """
    from ..train import _causal_mask

    out = torch.empty(len(pairs), dtype=torch.float64)
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        enc = [(_encode(p), _encode(c)) for p, c in chunk]
        S = max(len(p) + len(c) for p, c in enc)
        tokens = torch.zeros(len(chunk), S, dtype=torch.int64)
        for i, (p, c) in enumerate(enc):
            tokens[i, : len(p) + len(c)] = torch.tensor(p + c)
        pos = torch.arange(S).expand(len(chunk), S)
        logits = model(tokens, pos, _causal_mask(S)).float()  # [b, S, V]
        logp = torch.log_softmax(logits, dim=-1)
        for i, (p, c) in enumerate(enc):
            idx = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # positions predicting c
            out[lo + i] = logp[i, idx, tokens[i, idx + 1]].double().sum()
    return out


def _split_template(template: str, ent: str, rel: str) -> Tuple[str, str]:
    """(prompt, continuation with the value as {val}) of a statement form whose value comes after
    its entity and relation: "The {rel} of {ent} is {val}." -> ("The color of X is", " {val}.")."""
    head, tail = template.split("{val}")
    return head.rstrip().format(ent=ent, rel=rel), " {val}" + tail


RECALL_TEMPLATES = [QUESTION_TEMPLATE] + [
    t for t in OTHER_TEMPLATES if t.index("{val}") > max(t.index("{ent}"), t.index("{rel}"))
]
"""Statement forms usable as prompts (the value comes last), the question form first."""


def fact_recall(model, facts: Sequence[Fact], templates: Sequence[str] = (QUESTION_TEMPLATE,),
                batch_size: int = 256) -> Dict[str, float]:  # fmt: skip
    """Rank-1 accuracy of the true value among its relation's values, prompted with each template
    in `templates` for each fact (default: the question form), with the mean reciprocal rank and
    the chance accuracy."""
    pairs, spans = [], []
    for ent, rel, val in facts:
        cands = RELATIONS[rel]
        for template in templates:
            prompt, cont = _split_template(template, ent, rel)
            spans.append((len(pairs), len(cands), cands.index(val)))
            pairs.extend(("\n" + prompt, cont.format(val=c)) for c in cands)
    was_training = model.training
    model.eval()
    scores = candidate_logprobs(model, pairs, batch_size)
    model.train(was_training)
    hits, rr, chance = 0, 0.0, 0.0
    for start, k, true in spans:
        s = scores[start : start + k]
        rank = int((s > s[true]).sum()) + 1
        hits += rank == 1
        rr += 1.0 / rank
        chance += 1.0 / k
    n = max(1, len(spans))
    return {"accuracy": hits / n, "mrr": rr / n, "chance": chance / n, "count": len(spans)}


# ---------------------------------------------------------------------- loss on the values
@torch.no_grad()
def value_loss(model, fc: FactCorpus, seq_length: int, num_windows: int = 128,
               batch_size: int = 16) -> Dict[str, float]:  # fmt: skip
    """Validation loss split into the fact values and everything else.

    The first `num_windows` consecutive windows of `seq_length + 1` bytes of the validation text
    (the same for every model) are scored once; a target byte is a value byte when it lies inside
    one of `fc.valid_value_spans`. Returns `value_nats`: summed loss over the bytes of each value
    that lies wholly inside a window's targets, averaged over those values (a model that knows
    nothing about the fact but the relation's value set pays about ln 8 = 2.08 nats, ln 13 = 2.56
    for 'number'); `other_nats_per_byte`: the mean loss of all other target bytes; and the counts.
    """
    from ..train import _causal_mask

    tokens = fc.tokens("valid")
    n_win = min(num_windows, (len(tokens) - 1) // seq_length)
    is_value = torch.zeros(len(tokens), dtype=torch.bool)
    value_id = torch.full((len(tokens),), -1, dtype=torch.int64)
    for i, (a, b) in enumerate(fc.valid_value_spans):
        is_value[a:b] = True
        value_id[a:b] = i
    was_training = model.training
    model.eval()
    per_value: Dict[int, float] = {}
    bytes_seen: Dict[int, int] = {}
    other_sum, other_count = 0.0, 0
    for lo in range(0, n_win, batch_size):
        idx = torch.arange(lo, min(n_win, lo + batch_size))
        starts = idx * seq_length
        window = starts[:, None] + torch.arange(seq_length + 1)  # [b, s+1]
        seq = tokens[window]
        pos = torch.arange(seq_length).expand(len(idx), seq_length)
        labels = seq[:, 1:]
        loss = model(seq[:, :-1], pos, _causal_mask(seq_length), labels=labels).double()  # [b, s]
        targets = window[:, 1:]
        mask = is_value[targets]
        other_sum += float(loss[~mask].sum())
        other_count += int((~mask).sum())
        for t, l in zip(value_id[targets][mask].tolist(), loss[mask].tolist()):
            per_value[t] = per_value.get(t, 0.0) + l
            bytes_seen[t] = bytes_seen.get(t, 0) + 1
    model.train(was_training)
    whole = [v for v, n in bytes_seen.items()
             if n == fc.valid_value_spans[v][1] - fc.valid_value_spans[v][0]]  # fmt: skip
    return {
        "value_nats": sum(per_value[v] for v in whole) / max(1, len(whole)),
        "other_nats_per_byte": other_sum / max(1, other_count),
        "values": len(whole),
        "other_bytes": other_count,
    }
