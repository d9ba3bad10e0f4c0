"""Quality sweep: every matched configuration trained on CPU for the same tokens, same schedule.

    python -m megatron_ultramem.experiments quality [--quick] [--seeds 2] [--out DIR]

The loop is the main job's (train.py): `init_distributed`, the model from `configs.build_model`
(UltraMem variants through `train.make_config` + `train.build_model`), `train.lm_loss`, torch AdamW
over `optim.param_groups` (the value table in its own group), `optim.UltraMemParamScheduler`
(cosine LR with warmup; the value group's multiplier decays from rho0 to 1), gradient clipping at
1.0, the Tucker SVD refresh after every optimizer step for memory layers, and the aux losses (MoE
load balancing, Tucker) injected through Megatron's MoEAuxLossAutoScaler at scale 1.
Data: the fact corpus (corpus.py) as Megatron indexed datasets read through GPTDataset in
Megatron's sampler order; the train order follows the run's seed, validation batches are the same
for every run.

Reported per run: validation loss (held-out text), fact recall on held-out questions (probe facts)
and on questions seen in training, training tokens/s (optimizer steps only, evaluation excluded).
Each finished run is saved as JSON under --work, so an interrupted sweep resumes where it stopped.
"""

import hashlib
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List

import torch

from . import configs, corpus, report
from .configs import ModelSize
from .corpus import CorpusSpec


@dataclass(frozen=True)
class Settings:
    size: ModelSize = ModelSize()
    corpus: CorpusSpec = CorpusSpec()
    train_iters: int = 250
    micro_batch_size: int = 16
    lr: float = 3e-3  # the main job's schedule (train.DEFAULTS)
    min_lr: float = 3e-4
    warmup_iters: int = 20
    weight_decay: float = 0.1
    eval_interval: int = 50
    eval_iters: int = 4
    recall_facts: int = 150  # per group (held-out questions, seen questions)
    seeds: int = 2  # for the headline pair (ultramem, moe)
    other_seeds: int = 1  # for every other variant

    @property
    def tokens_per_run(self) -> int:
        return self.train_iters * self.micro_batch_size * self.size.seq_length

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK = Settings(
    size=configs.QUICK_SIZE, corpus=corpus.QUICK_SPEC, train_iters=6, micro_batch_size=4,
    warmup_iters=1, eval_interval=3, eval_iters=1, recall_facts=8,
)  # fmt: skip


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def run_one(variant: configs.Variant, settings: Settings, seed: int, fc: corpus.FactCorpus,
            prefixes: Dict[str, str], log=print) -> Dict:  # fmt: skip
    """Train one configuration with one seed; returns its metrics (and curves)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from .. import data_pipeline, train
    from ..optim import UltraMemParamScheduler, param_groups

    size, s = settings.size, settings
    train.init_distributed(seed=seed)
    model, config = configs.build_model(variant, size, seed)
    counts = configs.measured_counts(model, size.seq_length)
    analytic = configs.analytic_counts(variant, size)
    if counts != analytic:
        raise AssertionError(f"{variant.name}: built counts {counts} != analytic {analytic}")
    layers = train.memory_layers(model)

    mbs, seq = s.micro_batch_size, size.seq_length
    train_ds = data_pipeline.build_gpt_dataset(prefixes["train"], seq, s.train_iters * mbs, seed, "train")
    valid_ds = data_pipeline.build_gpt_dataset(
        prefixes["valid"], seq, s.eval_iters * mbs, fc.spec.seed, "valid"
    )  # same validation batches for every run
    batches = data_pipeline.build_train_iterator("torch", train_ds, mbs)
    valid = list(itertools.islice(data_pipeline.build_train_iterator("torch", valid_ds, mbs), s.eval_iters))

    value_wd = getattr(config, "ultramem_value_weight_decay", False)
    optimizer = torch.optim.AdamW(
        param_groups(model, s.weight_decay, value_wd), lr=s.lr, betas=(0.9, 0.95), eps=1e-8
    )
    scheduler = UltraMemParamScheduler(
        optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr, lr_warmup_steps=s.warmup_iters,
        lr_decay_steps=s.train_iters, lr_decay_style="cosine", start_wd=s.weight_decay,
        end_wd=s.weight_decay, wd_incr_steps=s.train_iters, wd_incr_style="constant",
        value_lr_mult=getattr(config, "ultramem_value_lr_mult", 1.0),
        value_lr_decay_rate=getattr(config, "ultramem_value_lr_decay_rate", 1.0),
    )  # fmt: skip
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            val = sum(train.lm_loss(model, b).item() for b in valid) / len(valid)
        model.train()
        return val

    train_loss, step_seconds, eval_steps, eval_loss = [], [], [], []
    train_seconds = 0.0
    model.train()
    scheduler.step(1)
    for step in range(1, s.train_iters + 1):
        t0 = time.perf_counter()
        loss = train.lm_loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step(1)
        for layer in layers:
            layer.refresh_tucker_vectors()
        value = loss.item()
        step_seconds.append(time.perf_counter() - t0)
        train_seconds += step_seconds[-1]
        if not math.isfinite(value):
            raise RuntimeError(f"{variant.name} seed {seed}: non-finite loss at step {step}")
        train_loss.append(value)
        if step % s.eval_interval == 0 or step == s.train_iters:
            eval_steps.append(step)
            eval_loss.append(evaluate())
            log(f"  {variant.name} seed {seed} step {step}/{s.train_iters} loss {value:.3f} "
                f"val {eval_loss[-1]:.3f} ({step * mbs * seq / train_seconds:,.0f} tok/s)")  # fmt: skip
    t0 = time.perf_counter()
    # the first recall_facts of each list (shuffled once by _shuffle_for_recall)
    recall_probe = corpus.fact_recall(model, fc.probe_facts[: s.recall_facts])
    recall_seen = corpus.fact_recall(model, fc.seen_facts[: s.recall_facts])
    recall_forms = corpus.fact_recall(model, fc.facts, corpus.RECALL_TEMPLATES[1:])
    recall_seconds = time.perf_counter() - t0
    return {
        "variant": variant.name,
        "seed": seed,
        "counts": counts,
        "train_loss": train_loss,
        "eval_steps": eval_steps,
        "eval_loss": eval_loss,
        "final_valid_loss": eval_loss[-1],
        "recall_heldout_question": recall_probe,
        "recall_seen_question": recall_seen,
        "recall_trained_forms": recall_forms,
        "train_seconds": train_seconds,
        "step_seconds": step_seconds,
        "tokens_per_second": s.tokens_per_run / train_seconds,
        "recall_seconds": recall_seconds,
    }


def _shuffle_for_recall(fc: corpus.FactCorpus, seed: int) -> None:
    """Shuffle the fact lists once (deterministic), so the first n of each are a fair sample."""
    import random

    rng = random.Random(seed + 404)
    rng.shuffle(fc.probe_facts)
    rng.shuffle(fc.seen_facts)


def plan(settings: Settings) -> List[tuple]:
    """(variant, seed) pairs in run order: the headline pair first, interleaved by seed."""
    variants = configs.matched_variants(settings.size)
    by_name = {v.name: v for v in variants}
    runs = []
    for seed in range(settings.seeds):
        for name in configs.HEADLINE:
            runs.append((by_name[name], seed))
    for seed in range(settings.other_seeds):
        for v in variants:
            if v.name not in configs.HEADLINE:
                runs.append((v, seed))
    return runs


def _mean_std(xs: List[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def _pct_mean_std(xs: List[float]) -> str:
    xs = [100 * x for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.1f}%"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}%"


def summarize(results: List[Dict], settings: Settings) -> List[str]:
    order = [v.name for v in configs.matched_variants(settings.size)]
    order = list(configs.HEADLINE) + [n for n in order if n not in configs.HEADLINE]
    by = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    lines = [
        "| variant | seeds | total params | activated/token | val loss | recall held-out Q | "
        "recall seen Q | recall trained forms | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        rs = by.get(name)
        if not rs:
            continue
        c = rs[0]["counts"]
        lines.append(
            f"| {name} | {len(rs)} | {c['total']:,} | {c['active']:,} "
            f"| {_mean_std([r['final_valid_loss'] for r in rs])} "
            f"| {_pct_mean_std([r['recall_heldout_question']['accuracy'] for r in rs])} "
            f"| {_pct_mean_std([r['recall_seen_question']['accuracy'] for r in rs])} "
            f"| {_pct_mean_std([r['recall_trained_forms']['accuracy'] for r in rs])} "
            f"| {statistics.mean(r['tokens_per_second'] for r in rs):,.0f} |"
        )
    return lines


def plot(results: List[Dict], settings: Settings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    for i, (name, rs) in enumerate(sorted(by.items())):
        color = f"C{i}"
        style = "-" if name in configs.HEADLINE else "--"
        curve = [statistics.mean(vals) for vals in zip(*(r["train_loss"] for r in rs))]
        smooth, ema = [], None
        for x in curve:  # EMA 0.9 for readability; the raw losses are in the run JSONs
            ema = x if ema is None else 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax1.plot(range(1, len(smooth) + 1), smooth, style, color=color, lw=1.2,
                 label=f"{name} (n={len(rs)})")  # fmt: skip
        steps = rs[0]["eval_steps"]
        val = [statistics.mean(v) for v in zip(*(r["eval_loss"] for r in rs))]
        ax2.plot(steps, val, style, marker="o", ms=3, color=color, label=name)
    ax1.set_title("train loss (EMA 0.9, mean over seeds)")
    ax2.set_title("validation loss (held-out text, mean over seeds)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_yscale("log")
    ax2.set_yscale("log")
    lo = min(min(r["eval_loss"]) for r in results)
    ax2.set_ylim(lo * 0.95, lo * 4)
    fig.suptitle(f"{settings.size.num_layers}L/{settings.size.hidden_size}d GPT, "
                 f"{settings.tokens_per_run:,} tokens per run, CPU")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main(args) -> int:
    _quiet()
    settings = QUICK if args.quick else Settings()
    settings = replace(settings, seeds=args.seeds)
    if args.train_iters:
        settings = replace(settings, train_iters=args.train_iters)
    if args.entities:
        settings = replace(settings, corpus=replace(settings.corpus, num_entities=args.entities))
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    suffix = "_quick" if args.quick else ""
    out = args.out
    os.makedirs(out, exist_ok=True)
    work = args.work or os.path.join(tempfile.gettempdir(), "megatron_ultramem_experiments")
    run_dir = os.path.join(work, f"quality_{settings.key()}")
    os.makedirs(run_dir, exist_ok=True)
    load_before = report.uptime()
    command = report.command_line()
    t_start = time.perf_counter()

    variants, analytic, table = configs.describe(settings.size)
    print("\n".join(table), flush=True)
    fc = corpus.make_corpus(settings.corpus)
    _shuffle_for_recall(fc, settings.corpus.seed)
    prefixes = fc.write_indexed(os.path.join(work, f"corpus_{settings.key()}"))

    results = []
    for variant, seed in plan(settings):
        if only and variant.name not in only:
            continue
        path = os.path.join(run_dir, f"{variant.name}_seed{seed}.json")
        if os.path.exists(path) and not args.fresh:
            with open(path) as f:
                results.append(json.load(f))
            print(f"{variant.name} seed {seed}: loaded {path}", flush=True)
            continue
        print(f"{variant.name} seed {seed}: training ({report.uptime()})", flush=True)
        r = run_one(variant, settings, seed, fc, prefixes)
        r["load_after"] = report.uptime()
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(r, f)
        os.replace(tmp, path)
        print(f"{variant.name} seed {seed}: val {r['final_valid_loss']:.4f} recall held-out "
              f"{r['recall_heldout_question']['accuracy']:.3f} seen "
              f"{r['recall_seen_question']['accuracy']:.3f} {r['tokens_per_second']:,.0f} tok/s "
              f"({r['train_seconds']:.0f}s)", flush=True)  # fmt: skip
        results.append(r)
    wall = time.perf_counter() - t_start
    load_after = report.uptime()

    png = os.path.join(out, f"evidence_quality_cpu{suffix}.png")
    plot(results, settings, png)
    md = os.path.join(out, f"evidence_quality_cpu{suffix}.md")
    lines = report.header(
        "Quality at CPU scale: dense vs MoE vs PKM vs UltraMem (and ablations)"
        + (" - QUICK smoke run, not evidence" if args.quick else ""),
        command, load_before, load_after,
    )
    chance_p = results[0]["recall_heldout_question"]["chance"]
    lines += [
        f"Wall time of the whole command: {wall / 60:.1f} min ({len(results)} runs; runs loaded "
        "from an earlier invocation's JSON count 0 here).",
        "",
        "## Set-up",
        "",
        f"- Model: GPTModel {settings.size.num_layers} layers, hidden {settings.size.hidden_size}, "
        f"{settings.size.num_attention_heads} heads, seq {settings.size.seq_length}, byte vocab "
        f"{settings.size.vocab_size}, RoPE, no linear biases; every layer's MLP slot is the variant's.",
        f"- Training: {settings.train_iters} steps x {settings.micro_batch_size} x "
        f"{settings.size.seq_length} = {settings.tokens_per_run:,} tokens per run, AdamW (0.9, 0.95), "
        f"lr {settings.lr} cosine to {settings.min_lr} after {settings.warmup_iters} warmup steps, "
        f"wd {settings.weight_decay}, clip 1.0; memory value table LR x4 decaying to x1 "
        "(UltraMemParamScheduler), Tucker refresh each step; MoE aux loss coeff 0.01.",
        f"- Corpus (corpus.py, seed {settings.corpus.seed}): {len(fc.facts)} facts "
        f"({settings.corpus.num_entities} entities x 4 relations), {len(fc.train_text):,} train bytes, "
        f"{len(fc.valid_text):,} validation bytes; {len(fc.probe_facts)} probe facts whose question "
        "form never appears in training.",
        f"- Validation loss: {settings.eval_iters} x {settings.micro_batch_size} sequences of held-out "
        "text (same batches for every run), at the last step.",
        f"- Fact recall (rank-1 accuracy of the true value among its relation's 8 or 13 values by "
        f"summed log-prob of the continuation; chance {100 * chance_p:.1f}%): **held-out Q**: the "
        f"{min(settings.recall_facts, len(fc.probe_facts))} probe facts asked `\\nThe {{rel}} of "
        "{ent} is` (a form never seen for them in training); **seen Q**: "
        f"{min(settings.recall_facts, len(fc.seen_facts))} other facts asked the same way (the form "
        f"appears in training); **trained forms**: all {len(fc.facts)} facts x "
        f"{len(corpus.RECALL_TEMPLATES) - 1} training statement forms with the value last "
        "(`For {ent}, the {rel} is`, ...), i.e. memorization in the forms trained on.",
        f"- Seeds: {settings.seeds} for ultramem and moe (mean ± sample std), "
        f"{settings.other_seeds} for the others. A seed sets the init and the training data order.",
        "- tokens/s: optimizer steps only (forward, backward, clip, AdamW, Tucker refresh), "
        "evaluation excluded; the machine is shared, so treat it as indicative.",
        "",
        "## Matched configurations (counts from the built models; asserted equal to the analytic "
        "counts)",
        "",
    ]
    for v in variants:
        lines.append(f"- `{v.name}`: {v.description}")
    lines += ["", *table, "",
              f"Tolerances asserted vs MoE: total ±{100 * configs.TOTAL_TOL:.0f}% (not dense), "
              f"activated ±{100 * configs.ACTIVE_TOL:.0f}%, FLOPs ±{100 * configs.FLOPS_TOL:.0f}%.",
              "", "## Results", "", *summarize(results, settings), "",
              f"Loss curves: `{os.path.basename(png)}`.", ""]  # fmt: skip
    lines += ["Per run:", "", "| variant | seed | val loss | recall held-out Q | recall seen Q | "
              "recall trained forms | tokens/s | train s | load after |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['final_valid_loss']:.4f} "
            f"| {100 * r['recall_heldout_question']['accuracy']:.1f}% "
            f"| {100 * r['recall_seen_question']['accuracy']:.1f}% "
            f"| {100 * r['recall_trained_forms']['accuracy']:.1f}% | {r['tokens_per_second']:,.0f} "
            f"| {r['train_seconds']:.0f} | {r.get('load_after', '').split('load average:')[-1].strip()} |"
        )
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {md} and {png} ({wall / 60:.1f} min)", flush=True)
    return 0
