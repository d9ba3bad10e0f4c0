"""Quality sweep: dense, MoE, PKM and UltraMem trained on CPU for the same tokens, same schedule.

    python -m megatron_ultramem.experiments quality [--quick] [--seeds 3] [--out DIR] [--wait-load 1.5]

Every run is the main job's training step (train.py): `train.init_distributed`, the model from
`configs.build_model` (memory variants through `train.make_config` + `train.build_model`),
Megatron's DistributedDataParallel, its forward-backward schedule with `train.forward_step` (the
schedule scales the MoE's load-balancing loss, the plugin's schedule hook the Tucker aux loss),
Megatron's optimizer with the value tables in their own group and the value-LR scheduler
(`train.build_optimizer`), gradient clipping at 1.0, and the Tucker SVD refresh after every
optimizer step. The matched counts (total, activated, FLOPs per token) are asserted on every built
model before it trains.

Data: the fact corpus (corpus.py) as Megatron indexed datasets read through GPTDataset in
Megatron's sampler order; the train order follows the run's seed (as does the init), so for one
seed every variant sees the same batches; validation batches are the same for every run.

Reported per run: validation loss (held-out text), the validation loss split into fact values and
everything else (corpus.value_loss), fact recall on held-out and seen questions and on the trained
forms, training tokens/s (optimizer steps only). Each finished run is saved as JSON under --work
(keyed by the settings, not by the seed count), so an interrupted sweep resumes where it stopped
and `ablations` / `scaling` reuse the sweep's UltraMem runs instead of training them again.
"""

import hashlib
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import configs, corpus, report
from .configs import ModelSize
from .corpus import CorpusSpec

CORPUS = CorpusSpec(num_entities=100)
"""The sweep's corpus: 400 facts. Why this size: see `CORPUS_REASON` (measured, not assumed)."""

CORPUS_REASON = (
    "400 facts (100 entities x 4 relations), each stated about {exposures:.0f} times in the "
    "{tokens:,} training tokens of a run. The dense model does not hold them: at the end of its "
    "runs it recalls {dense_forms} of the facts in the very statement forms it was trained on "
    "(chance {chance}), and its validation loss on the fact values is {dense_value} nats per value "
    "against {uniform:.2f} for a guess among the relation's values, so most of what is left to "
    "learn in this corpus is facts, which is what a memory layer is for. (The previous corpus, 120 "
    "facts, gave the dense model 3x more exposures per fact in fewer tokens.)"
)


@dataclass(frozen=True)
class Settings:
    """Everything that decides a run's result apart from the seed (and the variant)."""

    size: ModelSize = ModelSize()
    corpus: CorpusSpec = CORPUS
    train_iters: int = 400
    micro_batch_size: int = 16
    lr: float = 3e-3  # the main job's schedule (train.DEFAULTS)
    min_lr: float = 3e-4
    warmup_iters: int = 20
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    eval_interval: int = 50
    eval_iters: int = 8
    value_windows: int = 128  # validation windows scored for the value / other split
    recall_facts: int = 150  # per group (held-out questions, seen questions)

    @property
    def tokens_per_run(self) -> int:
        return self.train_iters * self.micro_batch_size * self.size.seq_length

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK = Settings(
    size=configs.QUICK_SIZE, corpus=corpus.QUICK_SPEC, train_iters=6, micro_batch_size=4,
    warmup_iters=1, eval_interval=3, eval_iters=1, value_windows=8, recall_facts=8,
)  # fmt: skip


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def optimizer_args(s: Settings) -> SimpleNamespace:
    """What `train.build_optimizer` reads from the main job's parsed arguments."""
    return SimpleNamespace(
        lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay, clip_grad=s.clip_grad, bf16=False,
        use_distributed_optimizer=False, warmup_iters=s.warmup_iters, train_iters=s.train_iters,
    )  # fmt: skip


def optimizer_config_view(config) -> SimpleNamespace:
    """What `train.build_optimizer` reads from the model config. A model without memory layers
    (dense, MoE) has a plain TransformerConfig; it has no value table, so the value group's
    settings are the neutral ones (rho0 = 1, no weight decay on values: Megatron's overrides then
    only name parameters that do not exist)."""
    return SimpleNamespace(
        params_dtype=config.params_dtype,
        ultramem_value_lr_mult=getattr(config, "ultramem_value_lr_mult", 1.0),
        ultramem_value_weight_decay=getattr(config, "ultramem_value_weight_decay", False),
        ultramem_value_lr_decay_rate=getattr(config, "ultramem_value_lr_decay_rate", 1.0),
    )


def quality_metrics(model, fc: corpus.FactCorpus, settings: Settings) -> Dict:
    """The fact corpus' end-of-run metrics: loss on values vs the rest, fact recall."""
    return {
        "value_split": corpus.value_loss(model, fc, settings.size.seq_length, settings.value_windows),
        # the first recall_facts of each list (shuffled once by _shuffle_for_recall)
        "recall_heldout_question": corpus.fact_recall(model, fc.probe_facts[: settings.recall_facts]),
        "recall_seen_question": corpus.fact_recall(model, fc.seen_facts[: settings.recall_facts]),
        "recall_trained_forms": corpus.fact_recall(model, fc.facts, corpus.RECALL_TEMPLATES[1:]),
    }


def run_one(variant: configs.Variant, settings: Settings, seed: int, fc, prefixes: Dict[str, str],
            log=print, measure: Callable = quality_metrics) -> Dict:  # fmt: skip
    """Train one configuration with one seed through the main job's step; returns its metrics
    (`measure(model, fc, settings)` after the last step: a dict merged into the result)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .. import data_pipeline, train

    size, s = settings.size, settings
    train.init_distributed(seed=seed)
    model, config = configs.build_model(variant, size, seed)
    counts = configs.measured_counts(model, size.seq_length)
    analytic = configs.analytic_counts(variant, size)
    if counts != analytic:
        raise AssertionError(f"{variant.name}: built counts {counts} != analytic {analytic}")
    layers = train.memory_layers(model)

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer, scheduler = train.build_optimizer(optimizer_args(s), optimizer_config_view(config), ddp)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    forward_backward = get_forward_backward_func()

    mbs, seq = s.micro_batch_size, size.seq_length
    train_ds = data_pipeline.build_gpt_dataset(prefixes["train"], seq, s.train_iters * mbs, seed, "train")
    valid_ds = data_pipeline.build_gpt_dataset(
        prefixes["valid"], seq, s.eval_iters * mbs, fc.spec.seed, "valid"
    )  # same validation batches for every run
    batches = data_pipeline.build_train_iterator("torch", train_ds, mbs)
    valid = list(itertools.islice(data_pipeline.build_train_iterator("torch", valid_ds, mbs), s.eval_iters))

    def evaluate() -> float:  # the main job's evaluation
        model.eval()
        with torch.no_grad():
            val = sum(train.lm_loss(model, b).item() for b in valid) / len(valid)
        model.train()
        return val

    train_loss, step_seconds, eval_steps, eval_loss = [], [], [], []
    train_seconds, skipped = 0.0, 0
    ddp.train()
    scheduler.step(1)  # as the main job: start at step 1's LR
    for step in range(1, s.train_iters + 1):
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=train.forward_step, data_iterator=batches, model=[ddp],
            num_microbatches=1, seq_length=seq, micro_batch_size=mbs, forward_only=False,
        )  # fmt: skip
        ok, _, _ = optimizer.step()
        scheduler.step(1)
        if ok:
            for layer in layers:
                layer.refresh_tucker_vectors()
        else:
            skipped += 1
        loss_sum, count = reports[0]["lm loss"].tolist()
        value = loss_sum / count
        step_seconds.append(time.perf_counter() - t0)
        train_seconds += step_seconds[-1]
        if not math.isfinite(value):
            raise RuntimeError(f"{variant.name} seed {seed}: non-finite loss at step {step}")
        train_loss.append(value)
        if step % s.eval_interval == 0 or step == s.train_iters:
            eval_steps.append(step)
            eval_loss.append(evaluate())
            log(f"  {variant.name} seed {seed} step {step}/{s.train_iters} loss {value:.3f} "
                f"val {eval_loss[-1]:.4f} ({step * mbs * seq / train_seconds:,.0f} tok/s)", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    metrics = measure(model, fc, s)
    metric_seconds = time.perf_counter() - t0
    return {
        "variant": variant.name,
        "seed": seed,
        "description": variant.description,
        "counts": counts,
        "train_loss": train_loss,
        "eval_steps": eval_steps,
        "eval_loss": eval_loss,
        "final_valid_loss": eval_loss[-1],
        **metrics,
        "skipped_steps": skipped,
        "train_seconds": train_seconds,
        "step_seconds": step_seconds,
        "tokens_per_second": s.tokens_per_run / train_seconds,
        "metric_seconds": metric_seconds,
    }


def _shuffle_for_recall(fc: corpus.FactCorpus, seed: int) -> None:
    """Shuffle the fact lists once (deterministic), so the first n of each are a fair sample."""
    import random

    rng = random.Random(seed + 404)
    rng.shuffle(fc.probe_facts)
    rng.shuffle(fc.seen_facts)


def quality_corpus(spec: CorpusSpec) -> corpus.FactCorpus:
    """The fact corpus of `spec`, its fact lists shuffled for `quality_metrics`."""
    fc = corpus.make_corpus(spec)
    _shuffle_for_recall(fc, spec.seed)
    return fc


# ---------------------------------------------------------------------- running and caching
def wait_for_load(threshold: Optional[float], max_wait: float = 3600.0, poll: float = 10.0) -> float:
    """Sleep until the 1-minute load average is below `threshold` (None: do not wait); returns the
    seconds waited. The 2 cores are shared: a run starts only when the machine is (nearly) idle."""
    if threshold is None:
        return 0.0
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - t0 < max_wait:
        time.sleep(poll)
    return time.perf_counter() - t0


def train_and_save(path: str, variant: configs.Variant, settings: Settings, seed: int, fc,
                   prefixes: Dict[str, str], measure: Callable, command: str, waited: float = 0.0,
                   log: Callable = print) -> Dict:  # fmt: skip
    """Train one run (run_one) and save its result to `path` atomically (a .tmp renamed into
    place: a run cut short leaves no file, so it is trained again on resume). Runs in the command's
    process (Runner.get) or in a worker process (run_all with jobs > 1): everything it takes pickles."""
    load_before = report.uptime()
    started = report.now()
    log(f"{variant.name} seed {seed}: training (waited {waited:.0f}s for load; {load_before})", flush=True)
    t0 = time.perf_counter()
    r = run_one(variant, settings, seed, fc, prefixes, log, measure)
    r.update(wall_seconds=time.perf_counter() - t0, waited_seconds=waited, started_at=started,
             finished_at=report.now(), load_before=load_before, load_after=report.uptime(),
             torch_threads=torch.get_num_threads(), command=command, versions=report.versions())  # fmt: skip
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(r, f)
    os.replace(tmp, path)
    log(f"{variant.name} seed {seed}: val {r['final_valid_loss']:.4f} value "
        f"{r['value_split']['value_nats']:.3f} nats, recall held-out "
        f"{r['recall_heldout_question']['accuracy']:.3f} trained forms "
        f"{r['recall_trained_forms']['accuracy']:.3f}, {r['tokens_per_second']:,.0f} tok/s "
        f"({r['wall_seconds']:.0f}s)", flush=True)  # fmt: skip
    return r


@dataclass
class Runner:
    """Runs (variant, seed) pairs of one Settings, or loads them from --work when already done."""

    settings: Settings
    work: str
    fresh: bool = False
    wait_load: Optional[float] = None
    command: str = ""
    log: Callable = print
    results: List[Dict] = field(default_factory=list)
    make_corpus: Callable = quality_corpus  # settings.corpus -> corpus (.write_indexed, .spec)
    measure: Callable = quality_metrics  # run_one's end-of-run metrics

    def __post_init__(self):
        s = self.settings
        self.run_dir = os.path.join(self.work, f"runs_{s.key()}")
        os.makedirs(self.run_dir, exist_ok=True)
        self.fc = self.make_corpus(s.corpus)
        self.prefixes = self.fc.write_indexed(os.path.join(self.work, f"corpus_{s.key()}"))
        self.trained_here: set = set()  # run files this command trained (also through run_all's workers)
        self.waited = 0.0

    def path(self, variant: configs.Variant, seed: int) -> str:
        return os.path.join(self.run_dir, f"{variant.name}_seed{seed}.json")

    def peek(self, variant: configs.Variant, seed: int) -> Optional[Dict]:
        """The saved run, or None (never trains, not added to `results`)."""
        path = self.path(variant, seed)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def needs_training(self, variant: configs.Variant, seed: int) -> bool:
        path = self.path(variant, seed)
        return path not in self.trained_here and (self.fresh or not os.path.exists(path))

    def get(self, variant: configs.Variant, seed: int) -> Dict:
        path = self.path(variant, seed)
        if not self.needs_training(variant, seed):
            with open(path) as f:
                r = json.load(f)
            r["loaded"] = path not in self.trained_here
            if r["loaded"]:
                self.log(f"{variant.name} seed {seed}: loaded {path} (trained {r.get('finished_at', '?')})",
                         flush=True)  # fmt: skip
            self.results.append(r)
            return r
        waited = wait_for_load(self.wait_load)
        self.waited += waited
        r = train_and_save(path, variant, self.settings, seed, self.fc, self.prefixes, self.measure,
                           self.command, waited, self.log)  # fmt: skip
        self.trained_here.add(path)
        r["loaded"] = False
        self.results.append(r)
        return r


def _worker_init(threads: int) -> None:
    _quiet()
    torch.set_num_threads(threads)


def run_all(plan: Sequence[Tuple[Runner, configs.Variant, int]], jobs: int = 1,
            threads: Optional[int] = None) -> List[Dict]:  # fmt: skip
    """Each (runner, variant, seed) of `plan`, trained or loaded, in the plan's order (each runner's
    `results` as if its `get` had been called in that order).

    jobs > 1: the runs not saved yet are trained first, `jobs` at a time, each in a worker process
    with `threads` torch threads (default 1), and saved as they finish; the plan is then loaded in
    order. On the project's 2 cores, two 1-thread runs at once keep both cores busy on these small
    models, where one run's second thread does not (benchmarks/results/
    evidence_capacity_reproduction_cpu.md). An interrupted command keeps every finished run."""
    if jobs > 1:
        todo: Dict[str, Tuple[Runner, configs.Variant, int]] = {}
        for rn, v, seed in plan:
            if rn.needs_training(v, seed):
                todo.setdefault(rn.path(v, seed), (rn, v, seed))  # two runners can share a run file
        if todo:
            import concurrent.futures as cf
            import multiprocessing

            # spawn, not fork: a forked child of a process that has run torch's OpenMP pool can hang
            ctx = multiprocessing.get_context("spawn")
            pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                          initargs=(threads or 1,))  # fmt: skip
            try:
                futures = {
                    pool.submit(train_and_save, path, v, rn.settings, seed, rn.fc, rn.prefixes,
                                rn.measure, rn.command): path
                    for path, (rn, v, seed) in todo.items()
                }  # fmt: skip
                for fut in cf.as_completed(futures):
                    fut.result()  # a failed run stops the command (the finished ones stay saved)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            for rn, v, seed in plan:  # every runner of a trained file (two can share one)
                if rn.path(v, seed) in todo:
                    rn.trained_here.add(rn.path(v, seed))
    return [rn.get(v, seed) for rn, v, seed in plan]


# ---------------------------------------------------------------------- statistics
def by_variant(results: Sequence[Dict]) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for r in results:
        out.setdefault(r["variant"], []).append(r)
    return out


def mean_std(xs: Sequence[float], digits: int = 4) -> str:
    """'mean ± sample std' (just the value for one run)."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def pct_mean_std(xs: Sequence[float]) -> str:
    return mean_std([100 * x for x in xs], 1) + "%"


def compare(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """mean(a) - mean(b) with the pooled sample std, the difference in pooled stds, and Welch's t
    (difference over its standard error). Needs >= 2 values on each side."""
    ma, mb = statistics.mean(a), statistics.mean(b)
    va, vb = statistics.variance(a), statistics.variance(b)
    na, nb = len(a), len(b)
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    se = math.sqrt(va / na + vb / nb)
    return {
        "diff": ma - mb,
        "pooled_std": pooled,
        "diff_in_pooled_std": (ma - mb) / pooled if pooled > 0 else float("inf"),
        "stderr": se,
        "welch_t": (ma - mb) / se if se > 0 else float("inf"),
    }


RESULT_COLUMNS = (
    "| variant | seeds | total params | activated/token | val loss | value nats | other nats/byte "
    "| recall held-out Q | recall seen Q | recall trained forms | tokens/s |"
)


def result_row(name: str, rs: Sequence[Dict]) -> str:
    c = rs[0]["counts"]
    return (
        f"| {name} | {len(rs)} | {c['total']:,} | {c['active']:,} "
        f"| {mean_std([r['final_valid_loss'] for r in rs])} "
        f"| {mean_std([r['value_split']['value_nats'] for r in rs], 3)} "
        f"| {mean_std([r['value_split']['other_nats_per_byte'] for r in rs], 4)} "
        f"| {pct_mean_std([r['recall_heldout_question']['accuracy'] for r in rs])} "
        f"| {pct_mean_std([r['recall_seen_question']['accuracy'] for r in rs])} "
        f"| {pct_mean_std([r['recall_trained_forms']['accuracy'] for r in rs])} "
        f"| {statistics.mean(r['tokens_per_second'] for r in rs):,.0f} |"
    )


def result_table(results: Sequence[Dict], order: Sequence[str]) -> List[str]:
    by = by_variant(results)
    lines = [RESULT_COLUMNS, "|---|---|---|---|---|---|---|---|---|---|---|"]
    return lines + [result_row(n, by[n]) for n in order if n in by]


def _load_only(r: Dict) -> str:
    return r.get("load_before", "").split("load average:")[-1].strip()


def per_run_table(results: Sequence[Dict]) -> List[str]:
    lines = [
        "| variant | seed | val loss | value nats | recall held-out Q | recall seen Q | recall trained "
        "forms | tokens/s | wall s | trained at (UTC) | load before | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['final_valid_loss']:.4f} "
            f"| {r['value_split']['value_nats']:.3f} "
            f"| {100 * r['recall_heldout_question']['accuracy']:.1f}% "
            f"| {100 * r['recall_seen_question']['accuracy']:.1f}% "
            f"| {100 * r['recall_trained_forms']['accuracy']:.1f}% | {r['tokens_per_second']:,.0f} "
            f"| {r.get('wall_seconds', r['train_seconds']):.0f} | {r.get('finished_at', '')} "
            f"| {_load_only(r)} "
            f"| {r.get('load_after', '').split('load average:')[-1].strip()} |"
        )
    return lines


# ---------------------------------------------------------------------- report pieces
def setup_lines(settings: Settings, fc: corpus.FactCorpus, seeds_line: str) -> List[str]:
    sz, c = settings.size, settings.corpus
    return [
        f"- Model: GPTModel {sz.num_layers} layers, hidden {sz.hidden_size}, "
        f"{sz.num_attention_heads} heads, seq {sz.seq_length}, byte vocab {sz.vocab_size}, RoPE, "
        "no linear biases; every layer's MLP slot is the variant's.",
        f"- Training (the main job's step: Megatron DDP, forward-backward schedule, Megatron Adam "
        f"with the value tables in their own group): {settings.train_iters} steps x "
        f"{settings.micro_batch_size} x {sz.seq_length} = {settings.tokens_per_run:,} tokens per "
        f"run, Adam (0.9, 0.95, eps 1e-8), lr {settings.lr} cosine to {settings.min_lr} after "
        f"{settings.warmup_iters} warmup steps, wd {settings.weight_decay}, clip "
        f"{settings.clip_grad}; memory value-table LR x4 decaying linearly to x1 (rho0 = 4, the "
        "main job's default), Tucker refresh each step, Tucker aux loss alpha 0.001; MoE "
        "load-balancing loss coeff 0.01 (scaled by Megatron's schedule).",
        f"- Corpus (corpus.py, seed {c.seed}): {len(fc.facts)} facts ({c.num_entities} entities x 4 "
        f"relations), {len(fc.train_text):,} train bytes ({c.num_train_docs} documents of "
        f"{c.facts_per_doc} fact statements), {len(fc.valid_text):,} validation bytes; "
        f"{len(fc.probe_facts)} probe facts whose question form never appears in training.",
        f"- Validation loss: {settings.eval_iters} x {settings.micro_batch_size} sequences of held-out "
        "text (the same for every run), at the last step. **value nats**: the summed loss over the "
        f"bytes of each fact value in the first {settings.value_windows} validation windows, per "
        "value (ln 8 = 2.08 for a guess among a relation's 8 values); **other nats/byte**: the mean "
        "loss of every other byte there.",
        "- Fact recall (rank-1 accuracy of the true value among its relation's 8 or 13 values by "
        "summed log-prob of the continuation): **held-out Q**: probe facts asked "
        "`\\nThe {rel} of {ent} is` (a form never seen for them in training); **seen Q**: other "
        "facts asked the same way; **trained forms**: all facts x "
        f"{len(corpus.RECALL_TEMPLATES) - 1} training statement forms with the value last "
        "(`For {ent}, the {rel} is`, ...), i.e. memorization in the forms trained on.",
        f"- Seeds: {seeds_line} A seed sets the init and the training data order (all variants of "
        "one seed see the same batches). mean ± sample std over seeds.",
        "- tokens/s: optimizer steps only (forward, backward, Adam, Tucker refresh), evaluation "
        "excluded; the machine is shared, so treat it as indicative.",
    ]


def run_header(title: str, command: str, load_before: str, load_after: str, runner: Runner,
               wall: float) -> List[str]:  # fmt: skip
    lines = report.header(title, command, load_before, load_after)
    trained = [r for r in runner.results if not r.get("loaded")]
    loaded = [r for r in runner.results if r.get("loaded")]
    lines += [
        f"Wall time of this command: {wall / 60:.1f} min ({len(trained)} runs trained here"
        + (f", {runner.waited / 60:.1f} min of it waiting for the 1-minute load to fall below "
           f"{runner.wait_load}" if runner.wait_load is not None else "")
        + f"; {len(loaded)} runs loaded from earlier commands' run files, see the "
        "per-run table for when and under what load each was trained). Training wall time of all "
        f"{len(runner.results)} runs in this file: {train_minutes(runner.results):.1f} min. "
        f"Run files: `W/{os.path.basename(runner.run_dir)}/` under the run cache `--work W` "
        f"(settings key `{runner.settings.key()}`).",
        "",
    ]
    return lines


def train_minutes(results: Sequence[Dict]) -> float:
    """Training wall time of the runs, summed (each run's own, wherever it was trained)."""
    return sum(r.get("wall_seconds", r["train_seconds"]) for r in results) / 60


def write_report(md: str, lines: Sequence[str], results: Sequence[Dict], **numbers) -> None:
    """report.write_report with this command line and the runs' summed training time."""
    report.write_report(md, lines, report.command_line(), runs_train_minutes=train_minutes(results),
                        **numbers)  # fmt: skip


def seeds_from_args(args, default: int) -> int:
    """--seeds, or the command's default."""
    seeds = args.seeds if args.seeds is not None else default
    if seeds < 1:
        raise SystemExit("error: --seeds must be >= 1")
    return seeds


def settings_from_args(args) -> Settings:
    settings = QUICK if args.quick else Settings()
    if args.train_iters:
        settings = replace(settings, train_iters=args.train_iters)
    if args.entities:
        settings = replace(settings, corpus=replace(settings.corpus, num_entities=args.entities))
    return settings


def make_runner(args, settings: Settings, **hooks) -> Runner:
    """A Runner for `settings` from the command's flags; `hooks`: Runner's make_corpus/measure."""
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or os.path.join(tempfile.gettempdir(), "megatron_ultramem_experiments")
    return Runner(settings, work, fresh=args.fresh, wait_load=args.wait_load,
                  command=report.command_line(), **hooks)  # fmt: skip


def plot_curves(results: Sequence[Dict], settings: Settings, path: str, order: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by = by_variant(results)
    for i, name in enumerate(n for n in order if n in by):
        rs, color = by[name], f"C{i}"
        curve = [statistics.mean(vals) for vals in zip(*(r["train_loss"] for r in rs))]
        smooth, ema = [], None
        for x in curve:  # EMA 0.9 for readability; the raw losses are in the run JSONs
            ema = x if ema is None else 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax1.plot(range(1, len(smooth) + 1), smooth, color=color, lw=1.2, label=f"{name} (n={len(rs)})")
        steps = rs[0]["eval_steps"]
        vals = list(zip(*(r["eval_loss"] for r in rs)))
        mean = [statistics.mean(v) for v in vals]
        ax2.plot(steps, mean, marker="o", ms=3, color=color, label=name)
        if len(rs) > 1:
            std = [statistics.stdev(v) for v in vals]
            ax2.fill_between(steps, [m - s for m, s in zip(mean, std)],
                             [m + s for m, s in zip(mean, std)], color=color, alpha=0.15)  # fmt: skip
    ax1.set_title("train loss (EMA 0.9, mean over seeds)")
    ax2.set_title("validation loss (mean ± std over seeds)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_yscale("log")
    ax2.set_yscale("log")
    lo = min(min(r["eval_loss"]) for r in results)
    ax2.set_ylim(lo * 0.95, lo * 2)
    fig.suptitle(f"{settings.size.num_layers}L/{settings.size.hidden_size}d GPT, "
                 f"{settings.tokens_per_run:,} tokens per run, CPU")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------- the sweep
def main(args) -> int:
    settings = settings_from_args(args)
    seeds = seeds_from_args(args, 2 if args.quick else 3)
    runner = make_runner(args, settings)
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    t_start = time.perf_counter()

    variants, _, table = configs.describe(settings.size)
    print("\n".join(table), flush=True)
    by_name = {v.name: v for v in variants}
    # interleaved by seed: a cut-short sweep still has every variant
    run_all([(runner, by_name[n], seed) for seed in range(seeds) for n in configs.QUALITY], args.jobs, args.threads)
    wall = time.perf_counter() - t_start
    load_after = report.uptime()
    results = runner.results

    png = os.path.join(args.out, f"evidence_quality_cpu{suffix}.png")
    plot_curves(results, settings, png, configs.QUALITY)
    by = by_variant(results)
    fc = runner.fc
    lines = run_header(
        "Quality at CPU scale: dense vs MoE vs PKM vs UltraMem"
        + (" - QUICK smoke run, not evidence" if args.quick else ""),
        report.command_line(), load_before, load_after, runner, wall,
    )
    lines += ["## Set-up", "", *setup_lines(settings, fc, f"{seeds} for every variant."), ""]
    dense = by.get("dense", [])
    if dense and not args.quick and settings.corpus == CORPUS:
        exposures = settings.tokens_per_run / len(fc.train_text) * fc.spec.num_train_docs * fc.spec.facts_per_doc / len(fc.facts)
        lines += ["Why this corpus: " + CORPUS_REASON.format(
            exposures=exposures, tokens=settings.tokens_per_run,
            dense_forms=pct_mean_std([r["recall_trained_forms"]["accuracy"] for r in dense]),
            chance=f"{100 * dense[0]['recall_trained_forms']['chance']:.1f}%",
            dense_value=mean_std([r["value_split"]["value_nats"] for r in dense], 3),
            uniform=math.log(8)), ""]  # fmt: skip
    lines += ["## Matched configurations (counts from the built models; asserted equal to the "
              "analytic counts before each run)", ""]  # fmt: skip
    for v in variants:
        if v.name in configs.QUALITY:
            lines.append(f"- `{v.name}`: {v.description}")
    lines += ["", "All matched configurations (the ablations of `evidence_ablations_cpu.md` too):",
              "", *table, "",
              f"Tolerances asserted vs MoE: total ±{100 * configs.TOTAL_TOL:.0f}% (not dense), "
              f"activated ±{100 * configs.ACTIVE_TOL:.0f}%, FLOPs ±{100 * configs.FLOPS_TOL:.0f}%.",
              "", "## Results", "", *result_table(results, configs.QUALITY), ""]  # fmt: skip
    lines += headline_lines(by)
    lines += [f"Loss curves: `{os.path.basename(png)}`.", "", "## Per run", "", *per_run_table(results)]
    md = os.path.join(args.out, f"evidence_quality_cpu{suffix}.md")
    headline = None
    if len(by.get("ultramem", [])) > 1 and len(by.get("moe", [])) > 1:
        headline = compare([r["final_valid_loss"] for r in by["ultramem"]],
                           [r["final_valid_loss"] for r in by["moe"]])  # fmt: skip
    write_report(
        md, lines, results, tokens_per_run=settings.tokens_per_run,
        size=f"{settings.size.num_layers}L/{settings.size.hidden_size}d GPT",
        variants={n: variant_summary(by[n]) for n in configs.QUALITY if n in by},
        ultramem_minus_moe=headline,
    )  # fmt: skip
    print(f"wrote {md} and {png} ({wall / 60:.1f} min)", flush=True)
    return 0


def variant_summary(rs: Sequence[Dict]) -> Dict:
    """Mean and sample std (0 for one run) of a variant's validation loss and fact recall."""

    def ms(xs):
        return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}

    return {
        "seeds": len(rs),
        "total_params": rs[0]["counts"]["total"],
        "active_params": rs[0]["counts"]["active"],
        "valid_loss": ms([r["final_valid_loss"] for r in rs]),
        "value_nats": ms([r["value_split"]["value_nats"] for r in rs]),
        "recall_trained_forms": ms([r["recall_trained_forms"]["accuracy"] for r in rs]),
        "recall_heldout_question": ms([r["recall_heldout_question"]["accuracy"] for r in rs]),
    }


def headline_lines(by: Dict[str, List[Dict]]) -> List[str]:
    """The closing comparison: UltraMem's mean validation loss vs MoE's (and PKM, dense)."""
    u = [r["final_valid_loss"] for r in by.get("ultramem", [])]
    if len(u) < 2:
        return []
    lines = ["## UltraMem vs the others (validation loss)", "",
             "| vs | UltraMem mean - other mean | pooled sample std | difference in pooled std "
             "| Welch t | UltraMem at or below? |", "|---|---|---|---|---|---|"]  # fmt: skip
    for other in ("moe", "pkm", "dense"):
        o = [r["final_valid_loss"] for r in by.get(other, [])]
        if len(o) < 2:
            continue
        c = compare(u, o)
        lines.append(
            f"| {other} | {c['diff']:+.4f} | {c['pooled_std']:.4f} | {c['diff_in_pooled_std']:+.1f} "
            f"| {c['welch_t']:+.1f} | {'yes' if c['diff'] <= 0 else 'no'} |"
        )
    c = compare(u, [r["final_valid_loss"] for r in by["moe"]]) if len(by.get("moe", [])) > 1 else None
    if c is not None:
        verdict = "at or below" if c["diff"] <= 0 else "above"
        lines += ["", f"**UltraMem's mean validation loss is {verdict} MoE's by {abs(c['diff']):.4f} "
                  f"({abs(c['diff_in_pooled_std']):.1f} pooled standard deviations; Welch t = "
                  f"{c['welch_t']:+.1f} over {len(u)} + {len(by['moe'])} seeds).**"]  # fmt: skip
    return lines + [""]
