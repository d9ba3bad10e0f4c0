"""Knowledge capacity at matched compute: how many random facts each MLP slot stores.

    python -m megatron_ultramem.experiments capacity [--quick] [--seeds 2] [--headline-seeds 3]
        [--facts 150,250,400,630] [--variants ultramem,moe,pkm,dense] [--corpus-seed 0] [--work W]
    python -m megatron_ultramem.experiments capacity-scaling [--quick] [--seeds 2]
        [--num-keys 14,20,28,40,56] [--facts 400] [--work W]

What a memory layer is for (the papers' case): a large, sparsely read table stores knowledge that a
MoE or a dense MLP of the same activated size cannot. The general-text sweep (`quality`) cannot
test that, because no model there learns the facts at all. Here the corpus (capacity_corpus.py) is
nothing but compact statements of random facts, each value 5 random digits (16.6 bits that only
memorization predicts), and every model gets the same token budget (the same training tokens at the
same FLOPs per token: matched compute). The number of facts F is swept: at a fixed budget, more
facts means fewer statements of each (exposures = tokens / bytes of one pass over the facts) and
more bits to hold, so from some F on the dense model cannot keep up: that is where a memory layer
should pay. The sweep's range was chosen on a separate set of facts (corpus seed 1, the tuning
split); the verdict uses corpus seed 0.

`capacity` trains dense, MoE, PKM and UltraMem (configs.matched_variants at `SIZE`: the same
activated parameters and FLOPs per token, MoE/PKM/UltraMem the same total parameters, asserted on
every built model by quality.run_one) at each F with --seeds seeds (--headline-seeds at
`HEADLINE_FACTS`) and reports per variant: exact recall in the trained statement forms, recall on
the held-out question form (probe facts), recall on the question form of facts that had it in
training, the validation loss on fact values (nats per value; a uniform guess pays 5 ln 10 = 11.5)
and on everything else (nats per byte), and the memory's row usage. UltraMem is compared with the
MoE at every F where the dense model is capacity-bound (its recall below `BOUND` of its recall at
the smallest F): a win or a loss only when the seeds do not overlap (every seed of one above
every seed of the other), else a tie.

`capacity-scaling` trains UltraMem at several value-table sizes N = n^2 at fixed activated
parameters (configs.memory_at_moe_active: the dense MLP beside the memory gives up what the larger
key tables take) at `HEADLINE_FACTS`, and reports recall and value loss against N with the
least-squares slope per doubling of N and its standard error (over every run), and each size's
row usage: the fraction of rows selected at least once and the share of selections taken by the
most-selected 1% of rows, over the validation text (so a flat curve can be told from an unused
table).

Both share `quality`'s run cache (--work): each finished run is a JSON file keyed by the settings
(one key per F), so an interrupted sweep resumes where it stopped, and `capacity-scaling` reuses
the sweep's UltraMem, MoE and dense runs at its F.
"""

import math
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import capacity_corpus as cc
from . import configs, corpus, report
from .configs import ModelSize
from .quality import Runner, Settings, compare, make_runner, run_all, seeds_from_args, train_minutes

SIZE = ModelSize(
    num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
    num_experts=8, topk=2, expert_ffn_hidden_size=128, key_dim=16, num_heads=2, topm=8,
)  # fmt: skip
"""Half the general-text sweep's depth and width: four times cheaper per token, so a run can state
each of a few hundred facts a few hundred times (facts are short: seq 64 holds 3-5 statements)."""

BASE = Settings(
    size=SIZE, corpus=cc.CapacitySpec(), train_iters=732, micro_batch_size=32, lr=1e-2,
    min_lr=1e-3, warmup_iters=20, weight_decay=0.1, clip_grad=1.0, eval_interval=122, eval_iters=4,
    value_windows=128, recall_facts=0,
)  # fmt: skip
"""1.5M training tokens per run (732 steps x 32 x 64). lr 1e-2: on the tuning split the dense model
recalled 62% of 200 facts at 3e-3 and 96% at 1e-2 (same 300 exposures). recall_facts is unused
(every fact is asked)."""

FACTS = (160, 250, 400, 630)
"""Fact counts (ratio ~1.6): on the tuning split the dense model recalled 96% of 200 facts after
~300 exposures (592 steps), 13% of 400 (184 exposures) and 0.1% of 600 (124) at this budget."""
HEADLINE_FACTS = 400
"""The point with 3 seeds and the table-size sweep: the dense model is capacity-bound there."""
BOUND = 0.8
"""A fact count is capacity-bound when the dense mean recall there is below this fraction of its
recall at the smallest count."""
VARIANTS = ("ultramem", "moe", "pkm", "dense")

QUICK_SIZE = configs.QUICK_SIZE
QUICK_BASE = Settings(
    size=QUICK_SIZE, corpus=cc.QUICK_SPEC, train_iters=6, micro_batch_size=4, warmup_iters=1,
    eval_interval=3, eval_iters=1, value_windows=8, recall_facts=0,
)  # fmt: skip
QUICK_FACTS = (20, 40)
QUICK_NUM_KEYS = (14, 28, 56)  # 56: the quick sweep's UltraMem (shared runs)

NUM_KEYS = (14, 20, 28, 40, 56)
"""n per side for capacity-scaling: N = 196 .. 3,136 rows (16x); 56 is the matched UltraMem.
Beyond n = 56 the key tables would leave the dense MLP beside the memory under 64 units."""


# ---------------------------------------------------------------------- settings
def pass_bytes(spec: cc.CapacitySpec) -> int:
    """Bytes of one pass over the facts (each stated once) in the training text of `spec`."""
    return len(cc.make_corpus(replace(spec, exposures=1)).train_text)


def settings_for(num_facts: int, base: Settings) -> Settings:
    """`base` (its train_iters: the token budget) with `num_facts` facts and just enough passes
    over them in the training text that a run reads it at most once (fresh statements only)."""
    spec = replace(base.corpus, num_facts=num_facts, exposures=1)
    need = base.tokens_per_run + base.micro_batch_size * (base.size.seq_length + 1)
    spec = replace(spec, exposures=math.ceil(need / pass_bytes(spec)))
    return replace(base, corpus=spec)


def exposures_read(settings: Settings) -> float:
    """Statements of each fact a run reads: its tokens over the bytes of one pass."""
    return settings.tokens_per_run / pass_bytes(settings.corpus)


# ---------------------------------------------------------------------- metrics
@torch.no_grad()
def row_usage(model, fc, seq_length: int, num_windows: int) -> Dict:
    """Selections of each memory layer's physical rows over the first `num_windows` windows of the
    validation text: the fraction of rows selected at least once and the share of all selections
    taken by the most-selected 1% of rows (per layer and their mean); {} without memory layers."""
    from ..layer import UltraMemLayer
    from ..reference import virtual_to_physical
    from ..train import _causal_mask

    layers = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
    if not layers:
        return {}
    counts = [torch.zeros(layer.N, dtype=torch.int64) for layer in layers]
    for layer, count in zip(layers, counts):

        def counted(x, _layer=layer, _count=count, _retrieve=layer.retrieve):
            virtual, scores = _retrieve(x)  # [T, H*m] virtual indices
            rows, _ = virtual_to_physical(virtual, _layer.permutation, _layer.N)
            _count += torch.bincount(rows.reshape(-1), minlength=_layer.N)
            return virtual, scores

        layer.retrieve = counted  # an instance attribute over the method, removed below
    tokens = fc.tokens("valid")
    n_win = min(num_windows, (len(tokens) - 1) // seq_length)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, n_win, 32):
            idx = torch.arange(lo, min(n_win, lo + 32))
            seq = tokens[idx[:, None] * seq_length + torch.arange(seq_length)]  # [b, s]
            model(seq, torch.arange(seq_length).expand(len(idx), seq_length), _causal_mask(seq_length))
    finally:
        for layer in layers:
            del layer.retrieve
        model.train(was_training)
    per_layer = []
    for layer, count in zip(layers, counts):
        c = count.double()
        top = max(1, round(0.01 * layer.N))
        per_layer.append({
            "rows": layer.N,
            "used_fraction": float((c > 0).double().mean()),
            "top1pct_share": float(c.sort(descending=True).values[:top].sum() / c.sum()),
            "selections": int(c.sum()),
        })  # fmt: skip
    return {
        "tokens": n_win * seq_length,
        "used_fraction": statistics.mean(p["used_fraction"] for p in per_layer),
        "top1pct_share": statistics.mean(p["top1pct_share"] for p in per_layer),
        "layers": per_layer,
    }


def capacity_metrics(model, fc: cc.CapacityCorpus, settings: Settings) -> Dict:
    """End-of-run metrics (quality.run_one's `measure`)."""
    seq = settings.size.seq_length
    return {
        "value_split": corpus.value_loss(model, fc, seq, settings.value_windows),
        "recall_trained_forms": cc.recall(model, fc.facts, cc.TRAINED_FORMS),
        "recall_heldout_question": cc.recall(model, fc.probe_facts, (cc.QUESTION_FORM,)),
        "recall_seen_question": cc.recall(model, fc.seen_facts, (cc.QUESTION_FORM,)),
        "row_usage": row_usage(model, fc, seq, settings.value_windows),
    }


# ---------------------------------------------------------------------- statistics
def _ms(xs: Sequence[float]) -> Dict[str, float]:
    return {
        "mean": statistics.mean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "values": list(xs),
    }


METRICS = {
    "recall_trained_forms": lambda r: r["recall_trained_forms"]["accuracy"],
    "recall_heldout_question": lambda r: r["recall_heldout_question"]["accuracy"],
    "recall_seen_question": lambda r: r["recall_seen_question"]["accuracy"],
    "digit_accuracy": lambda r: r["recall_trained_forms"]["digit_accuracy"],
    "value_nats": lambda r: r["value_split"]["value_nats"],
    "other_nats_per_byte": lambda r: r["value_split"]["other_nats_per_byte"],
    "valid_loss": lambda r: r["final_valid_loss"],
}


def summary(rs: Sequence[Dict]) -> Dict:
    """Per metric: mean, sample std, min, max and the per-seed values; counts; row usage."""
    out = {"seeds": len(rs), "total_params": rs[0]["counts"]["total"],
           "active_params": rs[0]["counts"]["active"], "flops": rs[0]["counts"]["flops"]}  # fmt: skip
    out.update({k: _ms([f(r) for r in rs]) for k, f in METRICS.items()})
    if rs[0].get("row_usage"):
        out["row_used_fraction"] = _ms([r["row_usage"]["used_fraction"] for r in rs])
        out["row_top1pct_share"] = _ms([r["row_usage"]["top1pct_share"] for r in rs])
    out["train_minutes"] = train_minutes(rs)
    out["tokens_per_second"] = statistics.mean(r["tokens_per_second"] for r in rs)
    return out


def verdict(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> Dict:
    """a vs b: 'win' when every value of a is better than every value of b, 'loss' the other way,
    else 'tie' (the seed spreads overlap); 'one seed' when a side has a single value; with mean(a) - mean(b) and, for >= 2 values a side,
    quality.compare's pooled std and Welch t."""
    better = (lambda x, y: x > y) if higher_is_better else (lambda x, y: x < y)
    if min(len(a), len(b)) < 2:
        word = "one seed"  # no seed spread to be beyond: a difference, not a verdict
    elif better(min(a) if higher_is_better else max(a), max(b) if higher_is_better else min(b)):
        word = "win"
    elif better(min(b) if higher_is_better else max(b), max(a) if higher_is_better else min(a)):
        word = "loss"
    else:
        word = "tie"
    out = {"verdict": word, "diff": statistics.mean(a) - statistics.mean(b), "n": [len(a), len(b)]}
    if len(a) > 1 and len(b) > 1:
        out.update({k: v for k, v in compare(a, b).items() if k != "diff"})
    return out


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """Least-squares slope of ys against xs with its standard error (residual variance over
    n - 2 degrees of freedom) and t = slope / se."""
    n = len(xs)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - my - slope * (x - mx) for x, y in zip(xs, ys)]
    se = math.sqrt(sum(e * e for e in resid) / (n - 2) / sxx) if n > 2 else float("nan")
    if se > 0:
        t = slope / se
    else:  # an exact fit: no noise to measure the slope against
        t = 0.0 if slope == 0 else math.copysign(math.inf, slope)
    return {"slope": slope, "stderr": se, "t": t, "points": n}


# ---------------------------------------------------------------------- running
def _bad(flag: str, message: str) -> None:
    """A bad flag: one line naming it on stderr, exit code 2, before any work."""
    print(f"error: {flag}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _runners(args, base: Settings, facts: Sequence[int]) -> Dict[int, Runner]:
    return {
        F: make_runner(args, settings_for(F, base), make_corpus=cc.make_corpus, measure=capacity_metrics)
        for F in facts
    }


def base_from_args(args) -> Settings:
    if args.entities:
        _bad("--entities", "the capacity corpus has no entity count; use --facts")
    base = QUICK_BASE if args.quick else BASE
    if args.train_iters:
        base = replace(base, train_iters=args.train_iters)
    if args.corpus_seed:
        base = replace(base, corpus=replace(base.corpus, seed=args.corpus_seed))
    return base


def _ints(text: Optional[str], default: Sequence[int], flag: str = "--facts") -> List[int]:
    if not text:
        return list(default)
    try:
        out = sorted({int(x) for x in text.split(",")})
    except ValueError:
        _bad(flag, f"expected comma-separated integers, got {text!r}")
    if not out or out[0] < 1:
        _bad(flag, f"expected positive integers, got {text!r}")
    return out


def _pct(d: Dict) -> str:
    if d.get("std"):
        return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}%"
    return f"{100 * d['mean']:.1f}%"


def _num(d: Dict, digits: int) -> str:
    if d.get("std"):
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"
    return f"{d['mean']:.{digits}f}"


def _seeds(d: Dict, scale: float = 100, digits: int = 1) -> str:
    return ", ".join(f"{scale * v:.{digits}f}" for v in d["values"])


def _load_only(text: str) -> str:
    return text.split("load average:")[-1].strip()


def per_run_lines(results: Sequence[Dict], key=lambda r: "") -> List[str]:
    lines = [
        "| point | variant | seed | recall trained forms | recall held-out Q | recall seen Q | digit acc "
        "| value nats | other nats/byte | val loss | rows used | top-1% share | tokens/s | train s "
        "| wall s | trained at (UTC) | load before | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        u = r.get("row_usage") or {}
        usage = f"{100 * u['used_fraction']:.1f}% | {100 * u['top1pct_share']:.1f}%" if u else "- | -"
        lines.append(
            f"| {key(r)} | {r['variant']} | {r['seed']} "
            f"| {100 * r['recall_trained_forms']['accuracy']:.1f}% "
            f"| {100 * r['recall_heldout_question']['accuracy']:.1f}% "
            f"| {100 * r['recall_seen_question']['accuracy']:.1f}% "
            f"| {100 * r['recall_trained_forms']['digit_accuracy']:.1f}% "
            f"| {r['value_split']['value_nats']:.2f} | {r['value_split']['other_nats_per_byte']:.4f} "
            f"| {r['final_valid_loss']:.4f} | {usage} "
            f"| {r['tokens_per_second']:,.0f} | {r['train_seconds']:.0f} "
            f"| {r.get('wall_seconds', r['train_seconds']):.0f} | {r.get('finished_at', '')} "
            f"| {_load_only(r.get('load_before', ''))} | {_load_only(r.get('load_after', ''))} |"
        )
    return lines


def header_lines(title: str, load_before: str, load_after: str, runners: Sequence[Runner],
                 results: Sequence[Dict], wall: float) -> List[str]:  # fmt: skip
    lines = report.header(title, report.command_line(), load_before, load_after)
    trained = [r for r in results if not r.get("loaded")]
    waited = sum(rn.waited for rn in runners)
    lines += [
        f"Wall time of this command: {wall / 60:.1f} min ({len(trained)} runs trained here"
        + (f", {waited / 60:.1f} min of it waiting for the load to fall" if waited else "")
        + f"; {len(results) - len(trained)} runs loaded from earlier commands' run files, see the "
        f"per-run table). Training wall time of all {len(results)} runs in this file "
        f"(each its own, wherever it was trained): {train_minutes(results):.1f} min. Run files: "
        + ", ".join(f"`W/{os.path.basename(rn.run_dir)}/`" for rn in runners)
        + " under the run cache `--work W`.",
        "",
    ]
    return lines


def setup_lines(base: Settings, runners: Dict[int, Runner]) -> List[str]:
    sz, c = base.size, base.corpus
    any_fc = next(iter(runners.values())).fc
    lines = [
        f"- Model: GPTModel {sz.num_layers} layers, hidden {sz.hidden_size}, "
        f"{sz.num_attention_heads} heads, seq {sz.seq_length}, byte vocab {sz.vocab_size}, RoPE, "
        "no linear biases; every layer's MLP slot is the variant's.",
        f"- Training (quality.run_one: the main job's step, Megatron DDP, forward-backward "
        f"schedule, Megatron Adam with the value tables in their own group): {base.train_iters} "
        f"steps x {base.micro_batch_size} x {sz.seq_length} = {base.tokens_per_run:,} tokens per "
        f"run for every variant and fact count (matched compute), Adam (0.9, 0.95), lr {base.lr} "
        f"cosine to {base.min_lr} after {base.warmup_iters} warmup steps, wd {base.weight_decay}, "
        f"clip {base.clip_grad}; memory value-table LR x4 decaying linearly to x1 (the main job's "
        "default), Tucker refresh each step; MoE load-balancing loss coeff 0.01.",
        f"- Corpus (capacity_corpus.py, seed {c.seed}"
        + (" - the verdict's facts" if c.seed == 0 else " - a tuning split, not the verdict's facts")
        + f"): F facts, each an entity name and {c.value_digits} random digits "
        f"({c.bits_per_fact:.1f} bits); statements `{'`, `'.join(cc.TRAINED_FORMS)}` (weights "
        f"{', '.join(str(w) for w in cc.FORM_WEIGHTS)}) and, for {100 * (1 - c.probe_fraction):.0f}% "
        f"of the facts, the question form `{cc.QUESTION_FORM}` in {100 * c.question_share:.0f}% "
        f"of their statements; {100 * c.probe_fraction:.0f}% are probe facts, never asked that way "
        "in training. The training text holds fresh passes over the facts (each pass every fact "
        "once, new order and forms); a run reads it once at most.",
        "- Exposures per fact (statements of it read in a run) at each F: "
        + ", ".join(f"F={F}: {exposures_read(rn.settings):.0f}" for F, rn in runners.items()) + ".",
        f"- **recall trained forms**: exact recall (every value digit the arg-max next byte, i.e. "
        f"greedy decoding writes the value; chance 10^-{c.value_digits}) of every fact prompted with each of the "
        f"{len(cc.TRAINED_FORMS)} trained forms; **held-out Q**: probe facts asked "
        "`Q: {ent}'s code? A:`; **seen Q**: the other facts asked so; **digit acc**: digits right "
        "under teacher forcing in the trained forms (chance 10%).",
        f"- **value nats**: summed loss over the digits of each value in the first "
        f"{base.value_windows} windows of the validation text ({len(any_fc.valid_text) // 1000}k+ "
        "bytes: every fact in all four forms, fresh order), per value (a uniform guess: "
        f"{c.value_digits} ln 10 = {c.value_digits * math.log(10):.1f}); **other nats/byte**: the "
        "mean loss of every other byte there (names, forms; the validation loss on the rest); "
        f"**val loss**: all bytes of {base.eval_iters} x {base.micro_batch_size} validation sequences.",
        f"- **rows used** / **top-1% share** (memory variants): over the same {base.value_windows} "
        f"validation windows ({base.value_windows * sz.seq_length:,} tokens), the fraction of each "
        "layer's value rows selected at least once and the share of all selections taken by its "
        "most-selected 1% of rows (mean over layers).",
        "- A seed sets the init and the training order (every variant of a seed sees the same "
        "batches); the facts are the corpus seed's. mean ± sample std over seeds.",
    ]
    return lines


def matched_lines(size: ModelSize, variants: Sequence[configs.Variant]) -> List[str]:
    """The variants' descriptions and counts; asserts the sweep's matching (configs.check_matched)."""
    moe = configs.variant_by_name(size, "moe")
    counts = {v.name: configs.analytic_counts(v, size) for v in [moe] + [v for v in variants if v.name != "moe"]}
    table = configs.check_matched(counts)
    names = [v.name for v in variants]
    lines = ["## Matched configurations (analytic counts, asserted equal to each built model's "
             "before it trains)", ""]  # fmt: skip
    lines += [f"- `{v.name}`: {v.description}" for v in variants]
    lines += [""] + [row for row in table if row.split("|")[1].strip() in ("variant", "---", *names)]
    lines += ["", f"Tolerances asserted vs MoE: total ±{100 * configs.TOTAL_TOL:.0f}% (not dense), "
              f"activated ±{100 * configs.ACTIVE_TOL:.0f}%, FLOPs ±{100 * configs.FLOPS_TOL:.0f}%.", ""]  # fmt: skip
    return lines


def plot_capacity(points: Dict[int, Dict[str, Dict]], names: Sequence[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("recall_trained_forms", "recall, trained forms", 100),
              ("recall_heldout_question", "recall, held-out question form", 100),
              ("value_nats", "loss on fact values (nats/value)", 1))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    facts = sorted(points)
    for ax, (key, label, scale) in zip(axes, panels):
        for i, name in enumerate(names):
            Fs = [F for F in facts if name in points[F]]
            if not Fs:
                continue
            color = f"C{i}"
            mean = [scale * points[F][name][key]["mean"] for F in Fs]
            lo = [scale * points[F][name][key]["min"] for F in Fs]
            hi = [scale * points[F][name][key]["max"] for F in Fs]
            ax.plot(Fs, mean, marker="o", ms=4, color=color, label=name)
            ax.fill_between(Fs, lo, hi, color=color, alpha=0.15)
            for F in Fs:
                vals = points[F][name][key]["values"]
                ax.scatter([F] * len(vals), [scale * v for v in vals], s=9, color=color, alpha=0.6)
        ax.set_xscale("log")
        ax.minorticks_off()  # log-scale minor labels would print over the fact counts
        ax.set_xticks(facts)
        ax.set_xticklabels([str(F) for F in facts])
        ax.set_xlabel("facts F (same training tokens for every F)")
        ax.set_ylabel(label + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " - line: mean over seeds, band: min-max, dots: seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------- capacity
def _variants(size: ModelSize, text: Optional[str]) -> List[configs.Variant]:
    """--variants: configs' names or `ultramem_tuned`."""
    out = []
    for name in (n.strip() for n in text.split(",")) if text else VARIANTS:
        if name == "ultramem_tuned":
            out.append(tuned_variant(size))
            continue
        try:
            out.append(configs.variant_by_name(size, name))
        except KeyError as err:
            _bad("--variants", err.args[0] + " or 'ultramem_tuned'")
    return out


def main(args) -> int:
    base = base_from_args(args)
    facts = _ints(args.facts, QUICK_FACTS if args.quick else FACTS)
    headline = args.headline_facts or (facts[-1] if args.quick else HEADLINE_FACTS)
    if headline not in facts:
        _bad("--headline-facts", f"{headline} is not one of --facts {facts}")
    seeds = seeds_from_args(args, 2)
    headline_seeds = max(seeds, args.headline_seeds if args.headline_seeds is not None else (seeds if args.quick else 3))
    variants = _variants(base.size, args.variants)
    matched_lines(base.size, variants)  # asserts the matching before any run
    names = [v.name for v in variants]
    suffix = ("_quick" if args.quick else "") + ("" if not args.corpus_seed else f"_tuning{args.corpus_seed}")
    name = args.name or f"evidence_capacity_cpu{suffix}"
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    t_start = time.perf_counter()
    runners = _runners(args, base, facts)
    # by seed, so that a cut-short sweep has every point
    run_all([(runners[F], v, seed) for seed in range(headline_seeds) for F in facts
             if seed < seeds or F == headline for v in variants], args.jobs, args.threads)  # fmt: skip
    wall = time.perf_counter() - t_start
    load_after = report.uptime()

    points = {F: {} for F in facts}
    results = []
    for F, rn in runners.items():
        results += rn.results
        for r in rn.results:
            r["_F"] = F
        for n in names:
            rs = [r for r in rn.results if r["variant"] == n]
            if rs:
                points[F][n] = summary(rs)
    dense = [F for F in facts if "dense" in points[F]]
    ref = points[dense[0]]["dense"]["recall_trained_forms"]["mean"] if dense else None
    bound = [F for F in dense if points[F]["dense"]["recall_trained_forms"]["mean"] < BOUND * ref]
    falls = len(dense) > 1 and all(
        points[b]["dense"]["recall_trained_forms"]["mean"] <= points[a]["dense"]["recall_trained_forms"]["mean"]
        for a, b in zip(dense, dense[1:])
    )  # fmt: skip
    comparisons = compare_points(points, "ultramem", ("moe", "pkm", "dense"))
    tuned = compare_points(points, "ultramem_tuned", ("moe", "ultramem", "dense"))

    png = os.path.join(args.out, f"{name}.png")
    plot_capacity(points, names, png, f"{base.size.num_layers}L/{base.size.hidden_size}d GPT, "
                  f"{base.tokens_per_run:,} tokens per run, corpus seed {base.corpus.seed}")  # fmt: skip
    title = "Knowledge capacity at matched compute (CPU)" + (" - QUICK smoke run, not evidence" if args.quick else "")
    if args.corpus_seed:
        title += f" - tuning split (corpus seed {args.corpus_seed})"
    lines = header_lines(title, load_before, load_after, list(runners.values()), results, wall)
    lines += ["## Set-up", "", *setup_lines(base, runners),
              f"- Seeds: {seeds} per point, {headline_seeds} at F={headline} (the headline point).", ""]  # fmt: skip
    lines += matched_lines(base.size, variants)
    lines += results_lines(points, names, facts, exposures={F: exposures_read(rn.settings) for F, rn in runners.items()})
    lines += verdict_lines(points, comparisons, facts, bound, ref, falls)
    if tuned:
        lines += comparison_lines(tuned, facts, bound, "ultramem_tuned", "UltraMem with the tuning "
                                  "split's choices (`ultramem_tuned`, chosen on corpus seed 1's facts)")  # fmt: skip
    lines += [f"Plot: `{os.path.basename(png)}`.", "", "## Per run", "",
              *per_run_lines(results, key=lambda r: f"F={r['_F']}")]  # fmt: skip
    md = os.path.join(args.out, f"{name}.md")
    report.write_report(
        md, lines, report.command_line(), runs_train_minutes=train_minutes(results),
        size=f"{base.size.num_layers}L/{base.size.hidden_size}d GPT", tokens_per_run=base.tokens_per_run,
        corpus_seed=base.corpus.seed, value_digits=base.corpus.value_digits, facts=facts,
        exposures={str(F): exposures_read(rn.settings) for F, rn in runners.items()},
        headline_facts=headline, capacity_bound=bound, dense_recall_falls=falls,
        points={str(F): p for F, p in points.items()},
        comparisons={str(F): c for F, c in comparisons.items()},
        tuned_comparisons={str(F): c for F, c in tuned.items()},
    )  # fmt: skip
    print(f"wrote {md} and {png} ({wall / 60:.1f} min)", flush=True)
    return 0


def results_lines(points, names, facts, exposures) -> List[str]:
    lines = ["## Results", "",
             "| F | exposures | variant | seeds | recall trained forms | (per seed, %) | recall held-out Q "
             "| recall seen Q | digit acc | value nats | other nats/byte | val loss | rows used "
             "| top-1% share | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for F in facts:
        for n in names:
            p = points[F].get(n)
            if not p:
                continue
            usage = (f"{_pct(p['row_used_fraction'])} | {_pct(p['row_top1pct_share'])}"
                     if "row_used_fraction" in p else "- | -")  # fmt: skip
            lines.append(
                f"| {F} | {exposures[F]:.0f} | {n} | {p['seeds']} | {_pct(p['recall_trained_forms'])} "
                f"| {_seeds(p['recall_trained_forms'])} | {_pct(p['recall_heldout_question'])} "
                f"| {_pct(p['recall_seen_question'])} | {_pct(p['digit_accuracy'])} "
                f"| {_num(p['value_nats'], 2)} | {_num(p['other_nats_per_byte'], 4)} "
                f"| {_num(p['valid_loss'], 4)} | {usage} | {p['tokens_per_second']:,.0f} |"
            )
    return lines + [""]


def verdict_lines(points, comparisons, facts, bound, ref, falls) -> List[str]:
    lines = ["## Verdicts", ""]
    if ref is not None:
        lines.append(
            f"- Facts are learnable in the budget: the dense model recalls {100 * ref:.1f}% of the "
            f"facts in trained forms at F={facts[0]} (needed: >= 50%). Its recall falls as F grows: "
            f"{'yes' if falls else 'no'} ("
            + ", ".join(f"F={F}: {100 * points[F]['dense']['recall_trained_forms']['mean']:.1f}%"
                        for F in facts if "dense" in points[F]) + "). "
            f"Capacity-bound points (dense below {100 * BOUND:.0f}% of its F={facts[0]} recall): "
            f"{', '.join(str(F) for F in bound) or 'none'}."
        )  # fmt: skip
    return lines + [""] + comparison_lines(comparisons, facts, bound, "ultramem", "UltraMem")


def compare_points(points, subject: str, others: Sequence[str]) -> Dict[int, Dict[str, Dict]]:
    """{F: {other: {metric: verdict(subject, other)}}} where both were run."""
    out = {}
    for F, p in points.items():
        for other in others:
            if subject in p and other in p:
                out.setdefault(F, {})[other] = {
                    key: verdict(p[subject][key]["values"], p[other][key]["values"], key.startswith("recall"))
                    for key in ("recall_trained_forms", "recall_heldout_question", "value_nats")
                }  # fmt: skip
    return out


def comparison_lines(comparisons, facts, bound, subject: str, label: str) -> List[str]:
    lines = [f"{label} against each other variant (win/loss: every seed of one beyond every seed "
             "of the other; tie: the seed spreads overlap; Welch t with >= 2 seeds a side):", "",
             f"| F | capacity-bound | vs | recall trained forms: `{subject}` - other | verdict | Welch t "
             "| recall held-out Q: diff | verdict | value nats: diff | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for F in facts:
        for other, c in comparisons.get(F, {}).items():
            rt, hq, vn = c["recall_trained_forms"], c["recall_heldout_question"], c["value_nats"]
            t = f"{rt['welch_t']:+.1f}" if math.isfinite(rt.get("welch_t", math.inf)) else "-"
            lines.append(
                f"| {F} | {'yes' if F in bound else 'no'} | {other} | {100 * rt['diff']:+.1f} pts "
                f"| {rt['verdict']} | {t} | {100 * hq['diff']:+.1f} pts | {hq['verdict']} "
                f"| {vn['diff']:+.2f} | {vn['verdict']} |"
            )
    return lines + [""]


# ---------------------------------------------------------------------- recall against N
def scaling_main(args) -> int:
    """`capacity-scaling`: UltraMem at several table sizes, fixed activated parameters."""
    from .scaling import check_fixed_active

    base = base_from_args(args)
    F = _ints(args.facts, [QUICK_FACTS[-1] if args.quick else HEADLINE_FACTS])
    if len(F) != 1:
        _bad("--facts", f"capacity-scaling takes one fact count, got {F}")
    F = F[0]
    seeds = seeds_from_args(args, 2)
    num_keys = _ints(args.num_keys, QUICK_NUM_KEYS if args.quick else NUM_KEYS, "--num-keys")
    size = base.size
    try:
        variants = configs.scaling_variants(size, num_keys)
    except ValueError as err:
        _bad("--num-keys", str(err))
    table = check_fixed_active(variants, size)
    suffix = ("_quick" if args.quick else "") + ("" if not args.corpus_seed else f"_tuning{args.corpus_seed}")
    name = args.name or f"evidence_capacity_scaling_cpu{suffix}"
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    t_start = time.perf_counter()
    runner = _runners(args, base, [F])[F]
    run_all([(runner, v, seed) for seed in range(seeds) for v in variants], args.jobs, args.threads)
    wall = time.perf_counter() - t_start
    load_after = report.uptime()
    results = list(runner.results)
    refs = {}  # the capacity sweep's MoE and dense at this F, when in the cache (never trained here)
    for ref in ("moe", "dense"):
        rs = [r for r in (runner.peek(configs.variant_by_name(size, ref), s) for s in range(5)) if r]
        if rs:
            refs[ref] = summary(rs)

    Ns = [v.ultramem.num_values for v in variants]
    points = [summary([r for r in results if r["variant"] == v.name]) for v in variants]
    xs = [math.log2(v.ultramem.num_values) for v in variants for r in results if r["variant"] == v.name]
    fits = {}
    for key in ("recall_trained_forms", "recall_heldout_question", "value_nats"):
        ys = [METRICS[key](r) for v in variants for r in results if r["variant"] == v.name]
        fits[key] = fit_slope(xs, ys) if len(set(xs)) > 1 and len(xs) > 2 else None

    png = os.path.join(args.out, f"{name}.png")
    plot_scaling(Ns, points, refs, png, f"UltraMem at fixed activated parameters, F={F} facts, "
                 f"{base.tokens_per_run:,} tokens per run")  # fmt: skip
    title = "Recall against value-table size at fixed activated parameters (CPU)" + (
        " - QUICK smoke run, not evidence" if args.quick else "")  # fmt: skip
    lines = header_lines(title, load_before, load_after, [runner], results, wall)
    lines += ["## Set-up", "", *setup_lines(base, {F: runner}),
              f"- Seeds: {seeds} per size. Sizes: n keys per side, N = n^2 value rows in each "
              f"of the {size.num_layers} memory layers, everything else as the capacity sweep's "
              "UltraMem; the dense MLP beside each memory (F_d) gives up what the larger key tables "
              "take, so activated parameters and FLOPs per token stay the MoE's "
              "(configs.memory_at_moe_active) while total parameters grow with N.", "",
              "## Sizes (analytic counts, asserted equal to each built model's before it trains)", "",
              *table, ""]  # fmt: skip
    lines += ["## Results", "",
              "| n | N | F_d | total params | seeds | recall trained forms | (per seed, %) "
              "| recall held-out Q | digit acc | value nats | other nats/byte | rows used "
              "| top-1% share | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v, p in zip(variants, points):
        u = v.ultramem
        lines.append(
            f"| {u.num_keys} | {u.num_values:,} | {u.dense_ffn_hidden_size} | {p['total_params']:,} "
            f"| {p['seeds']} | {_pct(p['recall_trained_forms'])} | {_seeds(p['recall_trained_forms'])} "
            f"| {_pct(p['recall_heldout_question'])} | {_pct(p['digit_accuracy'])} "
            f"| {_num(p['value_nats'], 2)} | {_num(p['other_nats_per_byte'], 4)} "
            f"| {_pct(p['row_used_fraction'])} | {_pct(p['row_top1pct_share'])} "
            f"| {p['tokens_per_second']:,.0f} |"
        )
    lines.append("")
    for ref, p in refs.items():
        lines.append(f"Reference from the capacity sweep at F={F}: {ref} recall trained forms "
                     f"{_pct(p['recall_trained_forms'])}, value nats {_num(p['value_nats'], 2)} "
                     f"({p['seeds']} seeds).")  # fmt: skip
    lines += ["", "## Fitted slopes per doubling of N (least squares over every run, x = log2 N)", "",
              "| metric | slope per doubling | std error | t = slope / se | runs | rising by > 2 se? |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for key, fit in fits.items():
        if fit is None:
            continue
        scale, unit = (100, " pts") if key.startswith("recall") else (1, " nats")
        good = fit["t"] > 2 if key.startswith("recall") else fit["t"] < -2
        lines.append(
            f"| {key} | {scale * fit['slope']:+.2f}{unit} | {scale * fit['stderr']:.2f}{unit} "
            f"| {fit['t']:+.1f} | {fit['points']} | "
            + ("yes" if good else "no") + (" (falling is better)" if key == "value_nats" else "") + " |"
        )
    lines += ["", f"Plot: `{os.path.basename(png)}`.", "", "## Per run", "",
              *per_run_lines(results, key=lambda r: f"N={next(v.ultramem.num_values for v in variants if v.name == r['variant']):,}")]  # fmt: skip
    md = os.path.join(args.out, f"{name}.md")
    report.write_report(
        md, lines, report.command_line(), runs_train_minutes=train_minutes(results),
        facts=F, tokens_per_run=base.tokens_per_run, corpus_seed=base.corpus.seed,
        points=[{"n": v.ultramem.num_keys, "N": v.ultramem.num_values,
                 "dense_ffn": v.ultramem.dense_ffn_hidden_size, **p} for v, p in zip(variants, points)],
        fits=fits, references=refs,
    )  # fmt: skip
    print(f"wrote {md} and {png} ({wall / 60:.1f} min)", flush=True)
    return 0


def plot_scaling(Ns, points, refs, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("recall_trained_forms", "recall, trained forms (%)", 100),
              ("value_nats", "loss on fact values (nats/value)", 1),
              ("row_used_fraction", "rows selected at least once (%)", 100))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (key, label, scale) in zip(axes, panels):
        mean = [scale * p[key]["mean"] for p in points]
        ax.plot(Ns, mean, marker="o", color="C0", label="UltraMem (mean)")
        ax.fill_between(Ns, [scale * p[key]["min"] for p in points],
                        [scale * p[key]["max"] for p in points], color="C0", alpha=0.15)  # fmt: skip
        for N, p in zip(Ns, points):
            ax.scatter([N] * len(p[key]["values"]), [scale * v for v in p[key]["values"]], s=9, color="C0")
        if key == "row_used_fraction":
            ax2 = ax.twinx()
            ax2.plot(Ns, [100 * p["row_top1pct_share"]["mean"] for p in points], marker="s", color="C3")
            ax2.set_ylabel("selections taken by the top 1% of rows (%)", color="C3")
        for i, (name, p) in enumerate(refs.items()):
            if key in p:
                ax.axhline(scale * p[key]["mean"], color=f"C{i + 1}", ls="--", lw=1, label=f"{name} (sweep)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("value rows N per layer (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------- why UltraMem vs MoE
TUNING_SEED = 1
"""The diagnosis' corpus seed: its own facts, never the verdict's (corpus seed 0)."""


def diagnosis_variants(size: ModelSize) -> List[configs.Variant]:
    """UltraMem with one thing changed each (matched to the same MoE where the change moves the
    counts: m, H, K and E re-solve n and F_d), then the references MoE and dense."""
    base = configs.variant_by_name(size, "ultramem")

    def sized(name: str, what: str, **knobs) -> configs.Variant:
        v = configs.variant_by_name(replace(size, **knobs), "ultramem")
        return replace(v, name=name, description=f"{what}: {configs._describe_memory(v.ultramem)}")

    def changed(name: str, what: str, **fields) -> configs.Variant:
        return replace(base, name=name, description=f"{what} (shape as `ultramem`)", **fields)

    return [
        base,
        changed("ultramem_rho1", "value LR x1 (rho0 = 1: no boost)", value_lr_mult=1.0),
        changed("ultramem_rho16", "value LR x16 decaying linearly to x1", value_lr_mult=16.0),
        changed("ultramem_rho4_const", "value LR x4 constant (no decay)", config_overrides=CONSTANT),
        changed("ultramem_rho8_const", "value LR x8 constant", value_lr_mult=8.0, config_overrides=CONSTANT),
        changed("ultramem_rho16_const", "value LR x16 constant", value_lr_mult=16.0,
                config_overrides=CONSTANT),  # fmt: skip
        changed("ultramem_init_reference", "the reference code's init (values std 0.02, ...)",
                config_overrides=(("ultramem_init", "reference"),)),  # fmt: skip
        sized("ultramem_m4", "m = 4", topm=4),
        sized("ultramem_m12", "m = 12", topm=12),
        sized("ultramem_m16", "m = 16 (FLOPs +3.7% of the MoE's: the m^2 r rescoring)", topm=16),
        sized("ultramem_h1", "H = 1", num_heads=1),
        sized("ultramem_h1_m16", "H = 1, m = 16 (as many rows per token as H = 2, m = 8)",
              num_heads=1, topm=16),  # H = 4: its key tables alone exceed the activated budget
        sized("ultramem_k8", "K = 8 (half the key parameters; a larger dense MLP beside)", key_dim=8),
        configs.variant_by_name(size, "ultramem_no_ive"),
        changed("ultramem_softmax", "softmax over each head's m scores (as PKM; the paper: raw "
                "scores)", score_activation="softmax"),  # fmt: skip
        tuned_variant(size),
        configs.variant_by_name(size, "moe"),
        configs.variant_by_name(size, "dense"),
    ]


CONSTANT = (("ultramem_value_lr_decay_rate", 1e9),)
"""A value-LR multiplier that never decays (it would reach 1x at step 1e9 * train_iters)."""


def tuned_variant(size: ModelSize) -> configs.Variant:
    """`ultramem_tuned`: the changes that raised recall on the tuning split, together (see
    evidence_capacity_diagnosis_cpu.md): a constant x4 value LR, the reference init, m = 12."""
    v = configs.variant_by_name(replace(size, topm=12), "ultramem")
    return replace(v, name="ultramem_tuned", config_overrides=CONSTANT + (("ultramem_init", "reference"),),
                   description="UltraMem with the tuning split's choices: value LR x4 constant, the "
                   f"reference init, m = 12: {configs._describe_memory(v.ultramem)}")  # fmt: skip


DIAGNOSIS_TOTAL_TOL = 0.015
"""Total parameters vs the MoE for the diagnosis' variants (m = 4 and H = 1 land at -1.06%)."""
DIAGNOSIS_FLOPS_TOL = 0.04
"""FLOPs per token vs the MoE for the diagnosis' variants (m = 16: +3.7%)."""
QUICK_DIAGNOSIS = ("ultramem", "ultramem_rho1", "ultramem_m4", "moe")


def diagnosis_main(args) -> int:
    """`capacity-diagnosis`: UltraMem with one change at a time, on the tuning split."""
    if args.corpus_seed == 0:
        _bad("--corpus-seed", "the diagnosis must not use the verdict's facts (0): choose another seed")
    base = base_from_args(args)
    size = base.size
    F = _ints(args.facts, [QUICK_FACTS[-1] if args.quick else HEADLINE_FACTS])
    if len(F) != 1:
        _bad("--facts", f"capacity-diagnosis takes one fact count, got {F}")
    F = F[0]
    seeds = seeds_from_args(args, 2)
    if args.exposures_mult < 1:
        _bad("--exposures-mult", f"must be >= 1 (1: skip the longer runs), got {args.exposures_mult}")
    variants = diagnosis_variants(size)
    if args.quick:
        variants = [v for v in variants if v.name in QUICK_DIAGNOSIS]
    counts = {v.name: configs.analytic_counts(v, size) for v in variants}
    # every variant at the MoE's counts; n is an integer, so a changed m or H can miss the total by
    # a little more than the sweep's 1%
    table = configs.check_matched(counts, total_tol=DIAGNOSIS_TOTAL_TOL, flops_tol=DIAGNOSIS_FLOPS_TOL)
    longer = args.exposures_mult
    name = args.name or f"evidence_capacity_diagnosis_cpu{'_quick' if args.quick else ''}"
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    t_start = time.perf_counter()
    runner = _runners(args, base, [F])[F]
    runners = [runner]
    long_runner = None
    if longer > 1:  # the exposures lever: the same facts, `longer` x the tokens
        long_base = replace(base, train_iters=base.train_iters * longer)
        long_runner = _runners(args, long_base, [F])[F]
        runners.append(long_runner)
    long_names = ("ultramem", "moe", "dense")
    run_all([(rn, v, seed) for seed in range(seeds) for rn in runners for v in variants
             if rn is runner or v.name in long_names], args.jobs, args.threads)  # fmt: skip
    wall = time.perf_counter() - t_start
    load_after = report.uptime()

    rows = {v.name: summary([r for r in runner.results if r["variant"] == v.name]) for v in variants}
    long_rows = {}
    if long_runner is not None:
        long_rows = {n: summary([r for r in long_runner.results if r["variant"] == n]) for n in long_names
                     if any(r["variant"] == n for r in long_runner.results)}  # fmt: skip
    results = runner.results + (long_runner.results if long_runner else [])
    key = "recall_trained_forms"

    def versus(a: str, b: str, pool=rows) -> Dict:
        return verdict(pool[a][key]["values"], pool[b][key]["values"])

    title = "Why UltraMem vs MoE: one change at a time, on a tuning split (CPU)" + (
        " - QUICK smoke run, not evidence" if args.quick else "")  # fmt: skip
    lines = header_lines(title, load_before, load_after, runners, results, wall)
    lines += ["## Set-up", "", *setup_lines(base, {F: runner}),
              f"- The facts are corpus seed {base.corpus.seed}'s, not the verdict's (seed 0): choices "
              "made here are not tuned on the facts the verdict is measured on.",
              f"- Seeds: {seeds} per variant. Every variant at the MoE's activated parameters "
              f"(±{100 * configs.ACTIVE_TOL:.0f}%), FLOPs (±{100 * DIAGNOSIS_FLOPS_TOL:.0f}%) and, but "
              f"dense, total parameters (±{100 * DIAGNOSIS_TOTAL_TOL:.1f}%), asserted; m, H, K and E "
              "re-solve n and the dense MLP F_d.", "",
              "## Variants (analytic counts, asserted equal to each built model's before it trains)", "",
              *[f"- `{v.name}`: {v.description}" for v in variants], "", *table, ""]  # fmt: skip
    lines += ["## Results", "",
              "| variant | seeds | recall trained forms | (per seed, %) | vs `ultramem` | verdict "
              "| vs MoE | verdict | recall held-out Q | value nats | rows used | top-1% share "
              "| tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    changes = {}
    for v in variants:
        p = rows[v.name]
        vs_base = versus(v.name, "ultramem") if v.name != "ultramem" else None
        vs_moe = versus(v.name, "moe") if v.name != "moe" and "moe" in rows else None
        changes[v.name] = {"vs_ultramem": vs_base, "vs_moe": vs_moe}
        usage = (f"{_pct(p['row_used_fraction'])} | {_pct(p['row_top1pct_share'])}"
                 if "row_used_fraction" in p else "- | -")  # fmt: skip
        lines.append(
            f"| `{v.name}` | {p['seeds']} | {_pct(p[key])} | {_seeds(p[key])} "
            + (f"| {100 * vs_base['diff']:+.1f} pts | {vs_base['verdict']} " if vs_base else "| - | - ")
            + (f"| {100 * vs_moe['diff']:+.1f} pts | {vs_moe['verdict']} " if vs_moe else "| - | - ")
            + f"| {_pct(p['recall_heldout_question'])} | {_num(p['value_nats'], 2)} | {usage} "
            f"| {p['tokens_per_second']:,.0f} |"
        )
    long_cmp = {}
    if long_rows:
        lines += ["", f"### The exposures lever: {longer}x the tokens ({longer * base.tokens_per_run:,} "
                  f"per run, {longer * exposures_read(runner.settings):.0f} exposures per fact)", "",
                  "| variant | seeds | recall trained forms | (per seed, %) | at 1x | vs MoE at "
                  f"{longer}x | verdict | value nats |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for n, p in long_rows.items():
            c = verdict(p[key]["values"], long_rows["moe"][key]["values"]) if n != "moe" and "moe" in long_rows else None
            long_cmp[n] = c
            lines.append(
                f"| `{n}` | {p['seeds']} | {_pct(p[key])} | {_seeds(p[key])} | {_pct(rows[n][key])} "
                + (f"| {100 * c['diff']:+.1f} pts | {c['verdict']} " if c else "| - | - ")
                + f"| {_num(p['value_nats'], 2)} |"
            )
    def moved(word):  # the changes (not the moe / dense references) with this verdict vs `ultramem`
        return [n for n, c in changes.items() if c["vs_ultramem"] and c["vs_ultramem"]["verdict"] == word
                and n not in ("moe", "dense")]  # fmt: skip
    helped, hurt = moved("win"), moved("loss")
    lines += ["", "## What changed the result", ""]
    if min(p["seeds"] for p in rows.values()) < 2:
        lines += ["- One seed per variant: the differences above are not verdicts (no seed spread to be "
                  "beyond); rerun with `--seeds 2` or more.", ""]
    else:
        lines += [f"- Beyond the seed spread above `ultramem`: {', '.join(f'`{n}`' for n in helped) or 'none'}.",
                  f"- Beyond the seed spread below it: {', '.join(f'`{n}`' for n in hurt) or 'none'}.",
                  "- Everything else: within the seed spread (no change measured at this many seeds).", ""]
    lines += [
              "## Per run", "", *per_run_lines(results, key=lambda r: "")]  # fmt: skip
    md = os.path.join(args.out, f"{name}.md")
    report.write_report(
        md, lines, report.command_line(), runs_train_minutes=train_minutes(results),
        facts=F, corpus_seed=base.corpus.seed, tokens_per_run=base.tokens_per_run,
        variants=rows, comparisons=changes, helped=helped, hurt=hurt,
        exposures_mult=longer, longer=long_rows, longer_vs_moe=long_cmp,
    )  # fmt: skip
    print(f"wrote {md} ({wall / 60:.1f} min)", flush=True)
    return 0


# ---------------------------------------------------------------------- which levers make it fit
LEVERS = (
    ("base", "the sweep's settings at F=400 (2L/64d, lr 1e-2, 5 digits, 1.5M tokens)", {}),
    ("lr 3e-3", "a third of the learning rate (min lr too)", {"lr": 3e-3, "min_lr": 3e-4}),
    ("F=250", "fewer facts, same tokens: more exposures each", {"facts": 250}),
    ("2x tokens", "twice the tokens: twice the exposures", {"iters": 2}),
    ("F=800, 2x tokens", "twice the facts at the base's exposures per fact", {"facts": 800, "iters": 2}),
    ("3 digits", "10 bits per fact instead of 16.6 (shorter statements)", {"digits": 3}),
    ("4L/128d", "the general-text sweep's model (4x the FLOPs per token)", {"size": configs.ModelSize()}),
)
"""Dense runs on the tuning split, one thing changed each against `base` (`capacity-levers`)."""


def lever_settings(base: Settings, change: Dict) -> Tuple[int, Settings]:
    """(fact count, settings) of one lever."""
    s = replace(base, train_iters=base.train_iters * change.get("iters", 1),
                lr=change.get("lr", base.lr), min_lr=change.get("min_lr", base.min_lr),
                size=change.get("size", base.size),
                corpus=replace(base.corpus, value_digits=change.get("digits", base.corpus.value_digits)))  # fmt: skip
    F = change.get("facts", HEADLINE_FACTS)
    return F, settings_for(F, s)


def levers_main(args) -> int:
    """`capacity-levers`: which settings let a dense model learn facts in a CPU budget."""
    if args.corpus_seed == 0:
        _bad("--corpus-seed", "the levers must not use the verdict's facts (0): choose another seed")
    if args.facts:
        _bad("--facts", "capacity-levers sets each lever's fact count (LEVERS)")
    base = base_from_args(args)
    seeds = seeds_from_args(args, 1)
    levers = LEVERS if not args.quick else tuple((l, d, {k: v for k, v in c.items() if k != "size"})
                                                  for l, d, c in LEVERS[:3])  # fmt: skip
    name = args.name or f"evidence_capacity_levers_cpu{'_quick' if args.quick else ''}"
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    t_start = time.perf_counter()
    planned = []
    for label, what, change in levers:
        F, s = lever_settings(base, {**change, **({"facts": QUICK_FACTS[-1]} if args.quick and "facts" not in change else {})})
        planned.append((label, what, F, s, make_runner(args, s, make_corpus=cc.make_corpus, measure=capacity_metrics)))
    run_all([(rn, configs.variant_by_name(s.size, "dense"), seed) for *_, s, rn in planned for seed in range(seeds)],
            args.jobs, args.threads)  # fmt: skip
    runners = [rn for *_, rn in planned]
    results = [r for rn in runners for r in rn.results]
    rows = [(label, what, F, s, summary(rn.results)) for label, what, F, s, rn in planned]
    wall = time.perf_counter() - t_start
    load_after = report.uptime()
    lines = header_lines("Which levers let a dense model learn facts in a CPU budget (tuning split)"
                         + (" - QUICK smoke run, not evidence" if args.quick else ""),
                         load_before, load_after, runners, results, wall)  # fmt: skip
    lines += ["## Set-up", "", *setup_lines(base, {rows[0][2]: runners[0]})[:-1],
              f"- Every lever is a dense model (the MoE's activated parameters at its size) on corpus "
              f"seed {base.corpus.seed}'s facts (not the verdict's), {seeds} seed(s): a pilot, to "
              "choose the sweep's settings, not a comparison between variants.", "",
              "## Results", "",
              "| lever | change | F | digits | model | tokens | exposures | recall trained forms "
              "| digit acc | recall held-out Q | value nats (uniform) | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    out = []
    for label, what, F, s, p in rows:
        uniform = s.corpus.value_digits * math.log(10)
        lines.append(
            f"| {label} | {what} | {F} | {s.corpus.value_digits} | {s.size.num_layers}L/{s.size.hidden_size}d "
            f"| {s.tokens_per_run:,} | {exposures_read(s):.0f} | {_pct(p['recall_trained_forms'])} "
            f"| {_pct(p['digit_accuracy'])} | {_pct(p['recall_heldout_question'])} "
            f"| {_num(p['value_nats'], 2)} ({uniform:.1f}) | {60 * p['train_minutes'] / p['seeds']:.0f} |"
        )  # fmt: skip
        out.append({"lever": label, "change": what, "facts": F, "digits": s.corpus.value_digits,
                    "size": f"{s.size.num_layers}L/{s.size.hidden_size}d", "tokens": s.tokens_per_run,
                    "exposures": exposures_read(s), **p})  # fmt: skip
    lines += ["", "## Per run", "", *per_run_lines(results)]
    md = os.path.join(args.out, f"{name}.md")
    report.write_report(md, lines, report.command_line(), runs_train_minutes=train_minutes(results),
                        corpus_seed=base.corpus.seed, levers=out)  # fmt: skip
    print(f"wrote {md} ({wall / 60:.1f} min)", flush=True)
    return 0
