"""Evidence experiments (megatron_ultramem/experiments): corpus split, matched counts, CLI smoke runs.

python -m pytest -q tests/test_experiments.py
"""

import os
import subprocess
import sys

import pytest

from megatron_ultramem.experiments import configs, corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------- corpus
def test_corpus_is_deterministic_for_a_seed():
    a = corpus.make_corpus(corpus.QUICK_SPEC)
    b = corpus.make_corpus(corpus.QUICK_SPEC)
    assert a.train_text == b.train_text and a.valid_text == b.valid_text
    assert a.probe_facts == b.probe_facts and a.seen_facts == b.seen_facts
    c = corpus.make_corpus(corpus.CorpusSpec(**{**corpus.QUICK_SPEC.__dict__, "seed": 1}))
    assert c.train_text != a.train_text


@pytest.mark.parametrize("spec", [corpus.QUICK_SPEC, corpus.CorpusSpec()])
def test_heldout_questions_never_in_training_text(spec):
    fc = corpus.make_corpus(spec)
    assert fc.probe_facts and fc.seen_facts
    assert not set(fc.probe_facts) & set(fc.seen_facts)
    for ent, rel, val in fc.probe_facts:
        q = corpus.question(ent, rel)
        assert q not in fc.train_text, q  # the split's promise
        # ... but the fact itself is stated in training through another template
        assert any(t.format(ent=ent, rel=rel, val=val) in fc.train_text for t in corpus.OTHER_TEMPLATES)
    for ent, rel, val in fc.seen_facts[:50]:
        assert f"{corpus.question(ent, rel)} {val}." in fc.train_text
    # held-out text: validation documents are not copies of training documents
    train_docs = set(fc.train_text.splitlines())
    valid_docs = fc.valid_text.splitlines()
    assert valid_docs and sum(d in train_docs for d in valid_docs) == 0


def test_question_prompt_matches_template():
    assert corpus.question("Zorbak", "color") == "The color of Zorbak is"


def test_indexed_corpus_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    fc = corpus.make_corpus(corpus.QUICK_SPEC)
    prefixes = fc.write_indexed(str(tmp_path))
    ds = IndexedDataset(prefixes["valid"])
    text = b"".join(bytes(ds[i].tolist()) for i in range(len(ds))).decode()
    assert text == fc.valid_text


# ---------------------------------------------------------------------- matched configurations
@pytest.mark.parametrize("size", [configs.QUICK_SIZE, configs.ModelSize()], ids=["quick", "default"])
def test_matched_counts_equal_the_built_megatron_models(megatron_world, size):
    """Analytic total / activated / FLOPs per token == counts read off the built GPTModels
    (sum of numel; activated and FLOPs from module shapes), and the matching holds."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ultramem.layer import UltraMemLayer

    variants, analytic, _ = configs.describe(size)  # asserts the matching tolerances
    assert [v.name for v in variants][:2] == ["moe", "dense"]
    for v in variants:
        model, _ = configs.build_model(v, size)
        assert configs.measured_counts(model, size.seq_length) == analytic[v.name], v.name
        assert sum(p.numel() for p in model.parameters()) == analytic[v.name]["total"]
        kinds = {type(m) for m in model.modules()}
        assert (MoELayer in kinds) == (v.kind == "moe")
        assert (UltraMemLayer in kinds) == (v.kind == "ultramem")
        if v.kind == "ultramem":
            mem = next(m for m in model.modules() if isinstance(m, UltraMemLayer))
            u = v.ultramem
            assert (mem.E, mem.r, mem.h, mem.m, mem.H) == (
                u.expansion, u.tucker_rank, u.num_cores, u.topm, u.num_heads)
            assert tuple(mem.values.shape) == (u.num_keys**2, u.value_dim)
    by = {v.name: v for v in variants}
    assert by["pkm"].ultramem.expansion == 1 and by["pkm"].score_activation == "softmax"
    assert (by["ultramem_no_ive"].ultramem.expansion, by["ultramem_no_tdqkr"].ultramem.tucker_rank,
            by["ultramem_no_mcs"].ultramem.num_cores) == (1, 1, 1)  # fmt: skip
    moe = analytic["moe"]
    assert analytic["dense"]["total"] < moe["total"] and analytic["dense"]["active"] == moe["active"]


def test_check_matched_rejects_a_mismatch():
    _, counts, _ = configs.describe(configs.QUICK_SIZE)
    counts["ultramem"] = dict(counts["ultramem"], active=int(counts["moe"]["active"] * 1.05))
    with pytest.raises(AssertionError):
        configs.check_matched(counts)


def test_fact_recall_on_an_untrained_model(megatron_world):
    size = configs.QUICK_SIZE
    model, _ = configs.build_model(configs.variant_by_name(size, "ultramem"), size)
    fc = corpus.make_corpus(corpus.QUICK_SPEC)
    facts = fc.probe_facts[:5]
    r = corpus.fact_recall(model, facts)
    assert 0.0 <= r["accuracy"] <= 1.0 and r["count"] == 5
    assert r["chance"] == pytest.approx(sum(1 / len(corpus.RELATIONS[f[1]]) for f in facts) / 5)
    # the scores are the model's: summed log-probs of the continuation bytes
    pairs = [("\nThe color of Zorbak is", " red."), ("\nThe color of Zorbak is", " blue.")]
    lp = corpus.candidate_logprobs(model, pairs)
    assert lp.shape == (2,) and (lp < 0).all()


# ---------------------------------------------------------------------- CLI smoke runs
def _run(args, cwd, timeout=600):  # a guard only: a loaded 2-core machine needs minutes
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "megatron_ultramem.experiments", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_quality_quick_writes_its_files(tmp_path):
    proc = _run(["quality", "--quick", "--out", str(tmp_path), "--work", str(tmp_path / "w")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "evidence_quality_cpu_quick.md").read_text()
    for name in ("moe", "dense", "pkm", "ultramem", "ultramem_no_ive", "ultramem_no_tdqkr",
                 "ultramem_no_mcs"):  # fmt: skip
        assert f"| {name} |" in md
    assert "Command" in md and "load average" in md and "lscpu" in md
    assert "± " in md  # 2 seeds of the headline pair
    png = (tmp_path / "evidence_quality_cpu_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_quick_writes_its_file(tmp_path):
    proc = _run(["decode", "--quick", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "evidence_decode_cpu_quick.md").read_text()
    assert "## Decode step latency" in md and "## Parameter bytes read" in md
    assert "## Targets" in md and "## Training step" in md
    for b in (1, 4, 16):
        assert f"\n| {b} |" in md
