"""Evidence experiments (megatron_ultramem/experiments): corpus split, matched counts, CLI smoke runs.

python -m pytest -q tests/test_experiments.py
"""

import os

import pytest

from megatron_ultramem.experiments import configs, corpus
from tests.helpers import run_experiments

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


def test_value_spans_point_at_each_stated_value():
    fc = corpus.make_corpus(corpus.QUICK_SPEC)
    assert len(fc.valid_value_spans) == fc.spec.num_valid_docs * fc.spec.facts_per_doc
    facts = {(e, r): v for e, r, v in fc.facts}
    for a, b in fc.valid_value_spans:
        value = fc.valid_text[a:b]
        # the value is a whole word of some stated fact, and the fact's entity precedes or follows
        assert value in corpus.RELATIONS["color"] + corpus.RELATIONS["city"] + \
            corpus.RELATIONS["food"] + corpus.RELATIONS["number"], value
        assert not fc.valid_text[b].isalnum() and not fc.valid_text[a - 1].isalnum()
        line_start = fc.valid_text.rfind("\n", 0, a) + 1
        line = fc.valid_text[line_start : fc.valid_text.find("\n", b)]
        assert any(v == value and e in line for (e, _), v in facts.items())


def test_value_loss_on_an_untrained_model(megatron_world):
    size = configs.QUICK_SIZE
    model, _ = configs.build_model(configs.variant_by_name(size, "dense"), size)
    fc = corpus.make_corpus(corpus.QUICK_SPEC)
    split = corpus.value_loss(model, fc, size.seq_length, num_windows=8)
    assert split["values"] > 10 and split["other_bytes"] > 8 * size.seq_length * 0.7
    # untrained: about ln(256) = 5.55 nats per byte, values are 2-7 bytes long
    assert 4.5 < split["other_nats_per_byte"] < 6.5
    assert 2 * 4.5 < split["value_nats"] < 7 * 6.5


def test_previous_init_is_the_uncalibrated_paper_init(megatron_world):
    """ultramem_prev_init = the calibrated model with each table times the winners' RMS score:
    values ~ N(0, E/(2 m H L)) as before the calibration, everything else unchanged."""
    import math

    import torch

    from megatron_ultramem.layer import UltraMemLayer

    size = configs.QUICK_SIZE
    new, _ = configs.build_model(configs.variant_by_name(size, "ultramem"), size, seed=7)
    old, _ = configs.build_model(configs.variant_by_name(size, "ultramem_prev_init"), size, seed=7)
    new_layers = [m for m in new.modules() if isinstance(m, UltraMemLayer)]
    old_layers = [m for m in old.modules() if isinstance(m, UltraMemLayer)]
    assert new_layers and len(new_layers) == len(old_layers)
    for a, b in zip(new_layers, old_layers):
        rms = a.winner_score_rms()
        assert rms > 2  # the top-m winners' scores are far from unit mean square
        assert torch.allclose(b.values, a.values * rms, rtol=1e-6, atol=0)
        paper_std = math.sqrt(a.E / (2.0 * a.m * a.H * size.num_layers))
        assert abs(b.values.std().item() / paper_std - 1) < 0.05  # N*Dv draws: ~1% sampling error
    names = {n for n, _ in new.named_parameters()}
    for (n, p), (_, q) in zip(new.named_parameters(), old.named_parameters()):
        if not n.endswith(".values"):
            assert torch.equal(p, q), n
    assert any(n.endswith(".values") for n in names)


def test_ablation_and_scaling_variants():
    size = configs.ModelSize()
    by = {v.name: v for v in configs.matched_variants(size)}
    assert set(configs.ABLATIONS) <= set(by) and set(configs.QUALITY) <= set(by)
    assert by["ultramem_no_value_lr_decay"].value_lr_mult == 1.0
    assert by["ultramem"].value_lr_mult is None  # the main job's default rho0 = 4
    assert by["ultramem_prev_init"].ultramem == by["ultramem"].ultramem
    cfg = configs.build_config(by["ultramem_no_value_lr_decay"], size)
    assert cfg.ultramem_value_lr_mult == 1.0
    assert configs.build_config(by["ultramem"], size).ultramem_value_lr_mult == 4.0
    assert set(configs.PAPER_TABLE2) == set(configs.ABLATIONS)

    from megatron_ultramem.experiments import scaling

    variants = configs.scaling_variants(size, scaling.NUM_KEYS)
    scaling.check_fixed_active(variants, size)  # activated and FLOPs within the sweep's tolerances
    assert any(v is by["ultramem"] or v == by["ultramem"] for v in variants)  # shared runs
    Ns = [v.ultramem.num_values for v in variants]
    assert Ns == sorted(Ns) and Ns[-1] / Ns[0] >= 16 and len(Ns) >= 4
    totals = [configs.analytic_counts(v, size)["total"] for v in variants]
    assert totals == sorted(totals)
    # a larger grid pays for its key tables with a smaller dense MLP (fixed activated parameters)
    fds = [v.ultramem.dense_ffn_hidden_size for v in variants]
    assert fds == sorted(fds, reverse=True)


def test_scaling_variants_build_with_their_analytic_counts(megatron_world):
    from megatron_ultramem.experiments import scaling

    size = configs.QUICK_SIZE
    for v in configs.scaling_variants(size, scaling.QUICK_NUM_KEYS):
        model, _ = configs.build_model(v, size)
        assert configs.measured_counts(model, size.seq_length) == configs.analytic_counts(v, size)


def test_pooled_comparison():
    from megatron_ultramem.experiments.quality import compare

    c = compare([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert c["diff"] == -1.0 and c["pooled_std"] == 1.0 and c["diff_in_pooled_std"] == -1.0
    assert abs(c["welch_t"] + 1 / (2 / 3) ** 0.5) < 1e-12


# ---------------------------------------------------------------------- CLI smoke runs


def test_quick_sweep_ablations_scaling_write_their_files_and_share_runs(tmp_path):
    """quality, ablations and scaling (--quick) on one run cache, as the README's commands run them:
    the ablations load the sweep's UltraMem runs instead of training them again; each writes its
    .md (with command, machine and load), its plot and the JSON summary the README is built from."""
    import json

    from megatron_ultramem.experiments import readme, scaling

    work = str(tmp_path / "w")
    proc = run_experiments(["quality", "--quick", "--out", str(tmp_path), "--work", work], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "evidence_quality_cpu_quick.md").read_text()
    for name in ("moe", "dense", "pkm", "ultramem", "ultramem_no_ive", "ultramem_no_tdqkr",
                 "ultramem_no_mcs"):  # fmt: skip
        assert f"| {name} |" in md
    assert "Command" in md and "load average" in md and "lscpu" in md
    assert "± " in md  # 2 seeds of the headline pair
    png = (tmp_path / "evidence_quality_cpu_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    quality = json.loads((tmp_path / "evidence_quality_cpu_quick.json").read_text())
    assert set(quality["variants"]) == {"ultramem", "moe", "pkm", "dense"}
    u, m = quality["variants"]["ultramem"]["valid_loss"], quality["variants"]["moe"]["valid_loss"]
    assert quality["ultramem_minus_moe"]["diff"] == pytest.approx(u["mean"] - m["mean"])

    proc = run_experiments(["ablations", "--quick", "--out", str(tmp_path), "--work", work], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ultramem seed") == 2 and "ultramem seed 0: loaded" in proc.stdout
    md = (tmp_path / "evidence_ablations_cpu_quick.md").read_text()
    for name in ("ultramem",) + configs.ABLATIONS:
        assert f"| {name} |" in md or f"| `{name}` |" in md, name
    for paper in ("-0.017", "-0.008", "-0.003", "-0.022"):
        assert paper in md
    assert "Command" in md and "load average" in md and "± " in md
    ablations = json.loads((tmp_path / "evidence_ablations_cpu_quick.json").read_text())
    assert set(ablations["effects"]) == set(configs.ABLATIONS)
    v = ablations["variants"]
    for name, e in ablations["effects"].items():  # effect = mean(UltraMem) - mean(ablation)
        assert e["effect"] == pytest.approx(v["ultramem"]["valid_loss"]["mean"] - v[name]["valid_loss"]["mean"])

    proc = run_experiments(["scaling", "--quick", "--out", str(tmp_path), "--work", work], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "evidence_scaling_cpu_quick.md").read_text()
    assert "## Results" in md and "per doubling" in md and "load average" in md
    png = (tmp_path / "evidence_scaling_cpu_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((tmp_path / "evidence_scaling_cpu_quick.json").read_text())["points"]
    assert [p["n"] for p in points] == sorted(scaling.QUICK_NUM_KEYS)
    assert all(p["seeds"] == 2 and p["N"] == p["n"] ** 2 for p in points)

    # the README table from these files (renamed as the committed ones are)
    results = tmp_path / "results"
    results.mkdir()
    for name in ("quality", "ablations", "scaling"):
        src = tmp_path / f"evidence_{name}_cpu_quick.json"
        (results / f"evidence_{name}_cpu.json").write_text(src.read_text())
    rows = "\n".join(readme.table(str(results)))
    assert f"{u['mean']:.4f} ± {u['std']:.4f}" in rows and "per doubling of N" in rows
    assert "| main_job_cpu.json | not measured yet |" in rows


def test_decode_quick_writes_its_file(tmp_path):
    proc = run_experiments(["decode", "--quick", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "evidence_decode_cpu_quick.md").read_text()
    assert "## Decode step latency" in md and "## Parameter bytes read" in md
    assert "## Targets" in md and "## Training step" in md
    for b in (1, 4, 16):
        assert f"\n| {b} |" in md




@pytest.mark.parametrize("compare", [False, True], ids=["main", "compare"])
def test_mainjob_records_the_main_job(tmp_path, compare):
    """`experiments mainjob` runs the main job in a fresh process and writes its .md, plot and the
    JSON the README row is built from, with the numbers of the run's own metrics.json."""
    import json

    from megatron_ultramem.experiments import readme

    flags = "--train-iters 4 --eval-interval 2 --eval-iters 1 --warmup-iters 1 --micro-batch-size 4 --seq-length 32"
    proc = run_experiments(["mainjob", "--out", str(tmp_path), "--flags", flags] + (["--compare"] if compare else []),
                tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "compare_cpu" if compare else "main_job_cpu"
    md = (tmp_path / f"{name}.md").read_text()
    assert "Command" in md and "load average" in md and flags in md
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blob = json.loads((tmp_path / f"{name}.json").read_text())
    row = readme.ROWS[[r[0] for r in readme.ROWS].index(f"{name}.json")][1](blob)
    if compare:
        assert blob["ultramem"] > 0 and blob["moe"] > 0 and f"{blob['ultramem']:.4f}" in row[1]
    else:
        assert blob["train_iters"] == 4 and blob["wall_seconds"] > 0
        assert f"-> {blob['final_valid_loss']:.3f}" in row[1]  # validation: untrained -> final


def test_readme_results_table_is_built_from_the_committed_files():
    """README.md's results section is exactly what `experiments readme` builds from
    benchmarks/results (run `python -m megatron_ultramem.experiments readme` after a benchmark)."""
    proc = run_experiments(["readme", "--check", "--readme", os.path.join(ROOT, "README.md"),
                 "--results", os.path.join(ROOT, "benchmarks", "results")], ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
