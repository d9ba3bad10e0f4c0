"""Knowledge-capacity experiment (experiments/capacity.py, capacity_corpus.py): the corpus'
promises, exact recall and row usage against brute force, the statistics, and the three commands'
quick runs on one run cache.

python -m pytest -q tests/test_capacity.py
"""

import glob
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import replace

import pytest
import torch

from megatron_ultramem.experiments import capacity, configs
from megatron_ultramem.experiments import capacity_corpus as cc
from tests.helpers import run_experiments

SPEC = cc.CapacitySpec(num_facts=37, value_digits=4, exposures=9, valid_passes=2, seed=5)


# ---------------------------------------------------------------------- corpus
def _statements(text: str):
    """(form, entity, value) of every statement in a text, parsed back with regexes."""
    out = []
    patterns = [(f, re.compile(re.escape(f).replace(r"\{ent\}", r"([A-Za-z]+)")
                              .replace(r"\{val\}", r"([0-9]+)"))) for f in cc.TRAINED_FORMS + (cc.QUESTION_FORM,)]  # fmt: skip
    for line in text.splitlines():
        rest = line
        while rest:
            for form, pat in patterns:
                m = pat.match(rest)
                if m:
                    out.append((form, m.group(1), m.group(2)))
                    rest = rest[m.end():].lstrip(" ")
                    break
            else:
                raise AssertionError(f"unparsed text: {rest[:40]!r}")
    return out


def test_corpus_states_every_fact_exactly_exposures_times_and_holds_out_probe_questions():
    fc = cc.make_corpus(SPEC)
    assert len(fc.facts) == 37 and len({e for e, _ in fc.facts}) == 37
    assert all(len(v) == 4 and v.isdigit() for _, v in fc.facts)
    stated = _statements(fc.train_text)
    values = dict(fc.facts)
    assert all(values[e] == v for _, e, v in stated)  # every statement states a true fact
    per_fact = {}
    for form, e, _ in stated:
        per_fact.setdefault(e, []).append(form)
    assert {e: len(f) for e, f in per_fact.items()} == {e: SPEC.exposures for e, _ in fc.facts}
    probe = {e for e, _ in fc.probe_facts}
    assert len(probe) == round(SPEC.probe_fraction * 37)
    asked = {e for form, e, _ in stated if form == cc.QUESTION_FORM}
    assert not asked & probe and asked == {e for e, _ in fc.seen_facts}
    for e in probe:  # held out in the question form only: stated in the others
        assert f"Q: {e}'s code?" not in fc.train_text and per_fact[e]
    assert len(fc.train_text.splitlines()) == math.ceil(37 * SPEC.exposures / SPEC.statements_per_doc)
    # validation: every fact in all four forms per pass, values where the spans say
    valid = _statements(fc.valid_text)
    assert sorted(valid) == sorted((f, e, v) for e, v in fc.facts for f in
                                   cc.TRAINED_FORMS + (cc.QUESTION_FORM,) for _ in range(SPEC.valid_passes))  # fmt: skip
    assert len(fc.valid_value_spans) == len(valid)
    for a, b in fc.valid_value_spans:
        val = fc.valid_text[a:b]
        assert val.isdigit() and len(val) == 4 and not fc.valid_text[a - 1].isdigit()
        assert fc.valid_text[b] == ";"
    assert cc.make_corpus(SPEC).train_text == fc.train_text  # deterministic
    assert cc.make_corpus(replace(SPEC, seed=6)).facts != fc.facts  # the tuning split: other facts


def test_settings_for_gives_enough_fresh_text_for_the_budget():
    base = replace(capacity.BASE, train_iters=50)
    s = capacity.settings_for(120, base)
    assert s.train_iters == 50 and s.corpus.num_facts == 120
    text = cc.make_corpus(s.corpus).train_text
    need = s.tokens_per_run + s.micro_batch_size * (s.size.seq_length + 1)
    assert len(text) >= need  # the run reads its text at most once
    assert len(cc.make_corpus(replace(s.corpus, exposures=s.corpus.exposures - 1)).train_text) < need
    assert capacity.exposures_read(s) == pytest.approx(s.tokens_per_run / capacity.pass_bytes(s.corpus))


# ---------------------------------------------------------------------- recall vs brute force
class OracleModel(torch.nn.Module):
    """Byte LM stub: at each position its arg-max is the true next byte when the row's prompt
    names a known entity, else byte '0'. Recall must count exactly the known facts."""

    def __init__(self, known, wrong_digit=None):
        super().__init__()
        self.known, self.wrong_digit = known, wrong_digit  # wrong_digit: (entity, digit index)

    def forward(self, tokens, pos, mask):
        b, S = tokens.shape
        logits = torch.zeros(b, S, 256)
        for i in range(b):
            text = bytes(tokens[i].tolist()).decode("ascii", "replace")
            ent = next((e for e in self.known if e in text), None)
            for t in range(S - 1):
                target = int(tokens[i, t + 1]) if ent else ord("0")
                logits[i, t, target] = 5.0
            if ent and self.wrong_digit and self.wrong_digit[0] == ent:
                start = text.index(ent) + len(ent)
                first = next(p for p in range(start, S) if chr(tokens[i, p]).isdigit())
                logits[i, first - 1 + self.wrong_digit[1], ord("x")] = 9.0
        return logits


def test_recall_counts_exactly_the_facts_whose_digits_are_all_argmax():
    rng = random.Random(0)
    facts = cc.make_facts(40, 5, seed=3)
    known = set(rng.sample([e for e, _ in facts], 13))
    broken = sorted(known)[0]  # known, but its 3rd digit is predicted wrong
    model = OracleModel(known, wrong_digit=(broken, 2))
    r = cc.recall(model, facts, cc.TRAINED_FORMS)
    assert r["count"] == 40 * 3
    assert r["accuracy"] == pytest.approx(12 / 40)  # 13 known, one with a wrong digit
    # digits: known facts all right but one digit; unknown ones right only where the digit is 0
    right = sum(5 for e, v in facts if e in known) - 1 + sum(v.count("0") for e, v in facts if e not in known)
    assert r["digit_accuracy"] == pytest.approx(right / (40 * 5))
    assert set(r["per_form"]) == set(cc.TRAINED_FORMS)
    assert all(x == pytest.approx(12 / 40) for x in r["per_form"].values())


# ---------------------------------------------------------------------- row usage vs brute force
def test_row_usage_counts_every_selection_of_every_layer(megatron_world):
    from megatron_ultramem.layer import UltraMemLayer
    from megatron_ultramem.reference import virtual_to_physical

    size = configs.QUICK_SIZE
    v = configs.scaling_variants(size, [12])[0]  # N = 144: every count matters
    model, _ = configs.build_model(v, size, seed=3)
    fc = cc.make_corpus(replace(SPEC, num_facts=60))
    layers = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
    inputs = {id(layer): [] for layer in layers}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, _l=layer: inputs[id(_l)].append(a[0].detach()))
             for layer in layers]  # fmt: skip
    usage = capacity.row_usage(model, fc, size.seq_length, num_windows=5)
    for h in hooks:
        h.remove()
    assert usage["tokens"] == 5 * size.seq_length and len(usage["layers"]) == len(layers)
    for layer, got in zip(layers, usage["layers"]):
        assert "retrieve" not in vars(layer)  # the class method again
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[id(layer)]])
        with torch.no_grad():
            virtual, _ = layer.retrieve(x)
        rows, _ = virtual_to_physical(virtual, layer.permutation, layer.N)
        count = torch.bincount(rows.reshape(-1), minlength=layer.N).tolist()
        assert got["selections"] == x.shape[0] * layer.H * layer.m == sum(count)
        assert got["used_fraction"] == pytest.approx(sum(c > 0 for c in count) / layer.N)
        top = sorted(count, reverse=True)[: max(1, round(0.01 * layer.N))]
        assert got["top1pct_share"] == pytest.approx(sum(top) / sum(count))
    assert capacity.row_usage(configs.build_model(configs.variant_by_name(size, "dense"), size)[0],
                              fc, size.seq_length, 2) == {}  # fmt: skip


# ---------------------------------------------------------------------- statistics
def test_verdict_is_beyond_the_seed_spread_only():
    assert capacity.verdict([0.5, 0.6], [0.3, 0.4])["verdict"] == "win"
    assert capacity.verdict([0.3, 0.4], [0.5, 0.6])["verdict"] == "loss"
    assert capacity.verdict([0.3, 0.6], [0.4, 0.5])["verdict"] == "tie"
    assert capacity.verdict([0.4, 0.5], [0.5, 0.6])["verdict"] == "tie"  # touching: not beyond
    assert capacity.verdict([0.9], [0.1, 0.2])["verdict"] == "one seed"  # no spread on one side
    low = capacity.verdict([1.0, 1.1], [2.0, 2.5], higher_is_better=False)  # a loss: lower wins
    assert low["verdict"] == "win" and low["diff"] == pytest.approx(1.05 - 2.25)
    c = capacity.verdict([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert c["verdict"] == "tie" and c["welch_t"] == pytest.approx(-1 / (2 / 3) ** 0.5)


def test_fit_slope_matches_numpy_polyfit_and_its_covariance():
    import numpy

    rng = random.Random(1)
    xs = [math.log2(n) for n in (196, 196, 400, 400, 784, 784, 3136, 3136)]
    ys = [0.1 + 0.03 * x + rng.gauss(0, 0.02) for x in xs]
    fit = capacity.fit_slope(xs, ys)
    (slope, _), cov = numpy.polyfit(xs, ys, 1, cov=True)  # cov scaled by chi2 / (n - 2)
    assert fit["slope"] == pytest.approx(slope, rel=1e-10)
    assert fit["stderr"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)
    assert capacity.fit_slope([1, 2, 3], [0, 0, 0])["t"] == 0.0  # flat and exact: not rising


def test_command_line_records_the_work_folder_as_a_placeholder(monkeypatch):
    from megatron_ultramem.experiments import readme, report

    monkeypatch.setattr(sys, "argv", ["x", "capacity", "--work", "/some/where", "--threads", "1"])
    assert report.command_line() == "python -m megatron_ultramem.experiments capacity --work W --threads 1"
    monkeypatch.setattr(sys, "argv", ["x", "capacity", "--work=/a/b"])
    assert report.command_line().endswith("capacity --work=W")
    assert readme._command("python -m x quality --work /work/exp_work --seeds 3") == \
        "python -m x quality --work W --seeds 3"  # fmt: skip


# ---------------------------------------------------------------------- the commands


@pytest.mark.parametrize("args, flag", [
    (["capacity", "--facts", "10,x"], "--facts"),
    (["capacity", "--facts", "0,10"], "--facts"),
    (["capacity", "--entities", "5"], "--entities"),
    (["capacity", "--variants", "ultramem,nope"], "--variants"),
    (["capacity", "--facts", "10,20", "--headline-facts", "30"], "--headline-facts"),
    (["capacity-scaling", "--facts", "10,20"], "--facts"),
    (["capacity-scaling", "--num-keys", "14,900"], "--num-keys"),
    (["capacity-diagnosis", "--corpus-seed", "0"], "--corpus-seed"),
    (["capacity-diagnosis", "--exposures-mult", "0"], "--exposures-mult"),
    (["capacity-levers", "--corpus-seed", "0"], "--corpus-seed"),
    (["capacity-levers", "--facts", "100"], "--facts"),
    (["capacity", "--jobs", "2", "--wait-load", "1.5"], "--wait-load"),
])  # fmt: skip
def test_bad_flags_fail_with_one_line_and_exit_2_before_any_work(tmp_path, capsys, args, flag):
    from megatron_ultramem.experiments.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(args + ["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith(f"error: {flag}: ") and "\n" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


def _evidence_argvs(*flags):
    """capacity-evidence's four command lines (--quick), with `flags` as its own."""
    from megatron_ultramem.experiments.__main__ import build_parser, evidence_commands

    return evidence_commands(build_parser().parse_args(["capacity-evidence", "--quick", *flags]))


RUN_METRICS = ("train_loss", "eval_loss", "final_valid_loss", "value_split", "recall_trained_forms",
               "recall_heldout_question", "row_usage")  # fmt: skip
"""What a run file must hold identically wherever it was trained (1 torch thread: bitwise)."""


def test_quick_capacity_scaling_diagnosis_levers_write_their_files_and_share_runs(tmp_path):
    """The four commands of `capacity-evidence --quick` (one seed but two at the headline point) one
    by one on one run cache, one run at a time: capacity-scaling loads the sweep's UltraMem run at
    its fact count; each writes its .md (command, machine, load), its plot and the JSON the README
    rows are built from. Then `capacity-evidence --jobs 2` on a copy of the cache with four runs
    deleted trains exactly those four, two at a time in worker processes, bit for bit as before."""
    from megatron_ultramem.experiments import readme

    work, out = str(tmp_path / "w"), tmp_path
    argvs = _evidence_argvs("--jobs", "1", "--threads", "1", "--work", work, "--out", str(out))
    assert [a[0] for a in argvs] == ["capacity", "capacity-scaling", "capacity-levers", "capacity-diagnosis"]
    argvs = {a[0]: a for a in argvs}
    proc = run_experiments(argvs["capacity"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "evidence_capacity_cpu_quick.md").read_text()
    assert "--work W" in md and work not in md and "load average" in md and "lscpu" in md
    # exposures per fact (statements of it read in a run) at each F, from the quick settings
    from megatron_ultramem.experiments.__main__ import build_parser

    base = capacity.base_from_args(build_parser().parse_args(["capacity", "--quick", "--work", work]))
    small, large = (capacity.exposures_read(capacity.settings_for(F, base)) for F in capacity.QUICK_FACTS)
    assert small > large  # fewer facts, same tokens: more statements of each
    names = ("ultramem", "ultramem_tuned", "moe", "pkm", "dense")
    for name in names:
        assert f"| {capacity.QUICK_FACTS[0]} | {small:.0f} | {name} | 1 |" in md
        assert f"| {capacity.QUICK_FACTS[-1]} | {large:.0f} | {name} | 2 |" in md
    assert (out / "evidence_capacity_cpu_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blob = json.loads((out / "evidence_capacity_cpu_quick.json").read_text())
    assert blob["facts"] == list(capacity.QUICK_FACTS) and blob["corpus_seed"] == 0
    p = blob["points"][str(capacity.QUICK_FACTS[-1])]
    assert set(p) == set(names) and p["ultramem"]["row_used_fraction"]["mean"] > 0
    assert "row_used_fraction" not in p["moe"]
    c = blob["comparisons"][str(capacity.QUICK_FACTS[-1])]["moe"]["recall_trained_forms"]
    assert c["diff"] == pytest.approx(p["ultramem"]["recall_trained_forms"]["mean"] - p["moe"]["recall_trained_forms"]["mean"])
    assert set(blob["tuned_comparisons"][str(capacity.QUICK_FACTS[-1])]) == {"moe", "ultramem", "dense"}

    proc = run_experiments(argvs["capacity-scaling"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ultramem seed") == 1 and "ultramem seed 0: loaded" in proc.stdout
    sc = json.loads((out / "evidence_capacity_scaling_cpu_quick.json").read_text())
    assert [q["n"] for q in sc["points"]] == [14, 20, 28, 56]  # 56: the sweep's UltraMem (loaded)
    assert all(q["N"] == q["n"] ** 2 and q["seeds"] == 1 for q in sc["points"])
    assert sc["fits"]["recall_trained_forms"]["points"] == 4
    assert set(sc["references"]) == {"moe", "dense"} and "per doubling" in (out / "evidence_capacity_scaling_cpu_quick.md").read_text()

    proc = run_experiments(argvs["capacity-diagnosis"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dg = json.loads((out / "evidence_capacity_diagnosis_cpu_quick.json").read_text())
    assert dg["corpus_seed"] == 1 and set(dg["variants"]) == set(capacity.QUICK_DIAGNOSIS)
    assert not dg["longer"]  # --exposures-mult 1: no longer runs

    proc = run_experiments(argvs["capacity-levers"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lv = json.loads((out / "evidence_capacity_levers_cpu_quick.json").read_text())
    assert [x["lever"] for x in lv["levers"]] == [label for label, _, _ in capacity.LEVERS[:3]]
    assert lv["corpus_seed"] == 1 and all(x["seeds"] == 1 for x in lv["levers"])

    # --jobs 2: the deleted runs trained again in two worker processes, the rest loaded
    work2, out2 = tmp_path / "w2", tmp_path / "out2"
    shutil.copytree(work, work2)
    runs = sorted(os.path.relpath(f, work) for f in glob.glob(os.path.join(work, "runs_*", "*.json")))
    dirs = {}
    for rel in runs:
        dirs.setdefault(os.path.dirname(rel), []).append(os.path.basename(rel))
    pick = random.Random(18)
    sweep = [os.path.join(d, f) for d, fs in dirs.items() if "ultramem_tuned_seed0.json" in fs for f in fs]
    diagnosis = [os.path.join(d, "ultramem_m4_seed0.json") for d, fs in dirs.items() if "ultramem_m4_seed0.json" in fs]
    lever = [os.path.join(d, "dense_seed0.json") for d, fs in dirs.items() if fs == ["dense_seed0.json"]]
    assert len(diagnosis) == 1 and lever
    deleted = pick.sample(sweep, 2) + diagnosis + [pick.choice(lever)]
    for rel in deleted:
        os.remove(work2 / rel)
    proc = run_experiments(["capacity-evidence", "--quick", "--jobs", "2", "--work", str(work2), "--out", str(out2)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out2 / "evidence_capacity_reproduction_cpu_quick.json").read_text())
    assert sum(c["runs_trained"] for c in rep["commands"]) == len(deleted)
    assert rep["jobs"] == 2 and not rep["from_scratch"] and not rep["target_met"]
    assert rep["complete"] and rep["commands_total"] == len(rep["commands"]) == 4
    assert [c["command"].split()[3] for c in rep["commands"]] == list(argvs)
    for rel in deleted:
        a, b = (json.loads(open(os.path.join(w, rel)).read()) for w in (work, str(work2)))
        assert b["torch_threads"] == 1  # a worker's default
        assert {k: a.get(k) for k in RUN_METRICS} == {k: b.get(k) for k in RUN_METRICS}, rel
    for rel in set(runs) - set(deleted):  # loaded, not trained again
        assert open(os.path.join(work, rel)).read() == open(work2 / rel).read()

    results = tmp_path / "results"
    results.mkdir()
    for name in ("capacity", "capacity_scaling", "capacity_diagnosis", "capacity_levers"):
        (results / f"evidence_{name}_cpu.json").write_text((out / f"evidence_{name}_cpu_quick.json").read_text())
    (results / "evidence_capacity_reproduction_cpu.json").write_text(
        (out2 / "evidence_capacity_reproduction_cpu_quick.json").read_text())
    rows = "\n".join(readme.table(str(results)))
    assert "reproduced from an empty run cache" in rows and "not measured: the run cache was not empty" in rows
    assert "can the experiment see capacity?" in rows and "per doubling of N" in rows
    assert "one change at a time" in rows and "--work W" in rows and "which levers" in rows


def test_svdvals_check_trains_with_svdvals_in_its_own_cache(tmp_path, monkeypatch):
    """benchmarks/capacity_svdvals_check.py (README, "How far to trust single runs"): in svdvals
    mode the capacity command runs with torch.linalg.svdvals as reference.singular_values and its
    runs under W/svdvals (never loaded as the plugin's); --closed-form leaves the plugin's function
    and W. Then both for real on the quick settings: each file with its own title and command."""
    import importlib.util
    import subprocess

    from megatron_ultramem import reference
    from megatron_ultramem.experiments import __main__ as experiments
    from megatron_ultramem.experiments import report

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("svdvals_check", os.path.join(root, "benchmarks", "capacity_svdvals_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(reference, "singular_values", reference.singular_values)  # restored after
    monkeypatch.setattr(report, "command_line", report.command_line)
    seen = []
    C = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(experiments, "main", lambda argv: seen.append(
        (argv[argv.index("--work") + 1], torch.equal(reference.singular_values(C), torch.linalg.svdvals(C)))) or 0)
    fake = str(tmp_path / "fake")  # the fake main writes nothing; never the repository's results
    check.main(["--closed-form", "--work", "W", "--out", fake])
    check.main(["--work", "W", "--out", fake])
    assert seen == [("W", False), (os.path.join("W", "svdvals"), True)]

    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    work, out = tmp_path / "w", tmp_path / "out"
    quick = ["--quick", "--facts", "40", "--seeds", "1", "--headline-seeds", "1", "--work", str(work), "--out", str(out)]
    for extra in ([], ["--closed-form"]):
        proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "capacity_svdvals_check.py"), *extra, *quick],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(glob.glob(str(work / "svdvals" / "runs_*" / "ultramem_tuned_seed0.json"))) == 1
    assert len(glob.glob(str(work / "runs_*" / "ultramem_tuned_seed0.json"))) == 1
    md_svd, md_closed = ((out / f"evidence_capacity_{k}_cpu.md").read_text() for k in ("svdvals", "closed_form"))
    assert md_svd.startswith("# Tuned UltraMem with torch.linalg.svdvals") and "`torch.linalg.svdvals` replaces" in md_svd
    assert md_closed.startswith("# Tuned UltraMem with the plugin's closed-form") and "--closed-form" in md_closed
    assert json.loads((out / "evidence_capacity_svdvals_cpu.json").read_text())["command"].startswith(
        "python benchmarks/capacity_svdvals_check.py")
