"""Decode benchmark of the MLP slot: dense vs Megatron-Core MoE vs UltraMem at matched parameters.

    python -m megatron_ultramem.experiments decode [--quick] [--out DIR]

What is measured (fp32, this CPU, eval mode, torch.no_grad):
1. One decode step of the MLP slot alone (input [1, B, D]: one new token for each of B sequences)
   for B in 1, 4, 16, 64, 256, 1024. The slots are taken from GPTModels built by configs.py (the
   same Megatron modules the quality sweep trains): Megatron's MLP, Megatron's MoELayer (top-k,
   allgather dispatcher, SequentialMLP experts), and UltraMemSlot (the dense MLP F_d beside an
   UltraMemLayer; on CPU its default path, cpu_path.py). Latency: the median over repeats; all
   slots are timed in one process, interleaved call by call (A, B, C, A, B, C, ...), each call on a
   fresh random input and after reading a buffer larger than the last-level cache, so that weights
   come from memory as they would in a model whose other layers ran in between ("cold").
2. Parameter bytes read by that step, counted from what the step touched: MoE - the router and the
   unique experts the routing map selected; UltraMem - every parameter except the value table, plus
   the unique value rows selected; dense - every parameter. Next to it the analytic upper bound of
   sizing.py (no row/expert shared between tokens).
3. A training step (forward + backward) of the slot alone at the quality sweep's size and token
   count, and at the decode size, interleaved the same way (warm caches).
4. Where the UltraMem layer's time goes (torch.profiler).
5. A whole-model decode step with a KV cache through Megatron's StaticInferenceContext, when it runs
   on this CPU (the reason is recorded when it does not).
"""

import contextlib
import os
import statistics
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import configs, report
from .configs import ModelSize

DECODE_SIZE = ModelSize(
    num_layers=1, hidden_size=512, num_attention_heads=8, seq_length=64,
    num_experts=16, topk=2, expert_ffn_hidden_size=1024,
    key_dim=64, num_heads=2, topm=32, ffn_multiple_of=64,
)  # fmt: skip
"""MoE slot: 16 experts of 2*512*1024 (16.8M parameters, 67 MB fp32), top-2. Matched UltraMem:
K=64, H=2, m=32, E=4, r=2, h=2, Dv=256, n from the sizing solver; sized to exceed the last-level
cache so that the bytes read matter."""

QUICK_DECODE_SIZE = replace(
    configs.QUICK_SIZE, num_layers=1, num_experts=8, expert_ffn_hidden_size=128
)

BATCHES = (1, 4, 16, 64, 256, 1024)
BYTES = 4  # fp32
KINDS = ("dense", "moe", "ultramem")


@dataclass(frozen=True)
class DecodeSettings:
    size: ModelSize = DECODE_SIZE
    batches: Tuple[int, ...] = BATCHES
    repeats: int = 21
    warmup: int = 3
    flush_mib: int = 256  # buffer read between timed calls (> last-level cache)
    train_size: ModelSize = ModelSize()  # the quality sweep's size, for the training-step timing
    train_tokens: int = 16 * 128  # the quality sweep's micro-batch x sequence
    train_repeats: int = 7
    whole_model_layers: int = 2
    whole_model_prompt: int = 32


QUICK = DecodeSettings(
    size=QUICK_DECODE_SIZE, batches=(1, 4, 16), repeats=3, warmup=1, flush_mib=8,
    train_size=configs.QUICK_SIZE, train_tokens=256, train_repeats=2, whole_model_layers=1,
    whole_model_prompt=8,
)  # fmt: skip


# ---------------------------------------------------------------------- building the slots
def build_slots(size: ModelSize, seed: int = 1234) -> Dict[str, Tuple[torch.nn.Module, configs.Variant]]:
    """{kind: (MLP-slot module of layer 0, variant)} for dense, moe and ultramem at `size`."""
    out = {}
    for kind in KINDS:
        variant = configs.variant_by_name(size, kind)
        model, _ = configs.build_model(variant, size, seed)
        out[kind] = (model.decoder.layers[0].mlp, variant)
    return out


# ---------------------------------------------------------------------- bytes read
def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def _capture(obj, name: str, sink: list):
    """Wrap obj.name so that its return value is appended to `sink` (instance attribute only)."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        sink.append(result)
        return result

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)  # back to the class attribute


@torch.no_grad()
def bytes_read(kind: str, slot: torch.nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Parameter bytes one forward of `slot` on x [1, B, D] reads, from what it touched."""
    if kind == "dense":
        return {"bytes": BYTES * _numel(slot), "touched": 0}
    if kind == "moe":
        routes = []
        with _capture(slot, "route", routes):
            slot(x)
        routing_map = routes[-1][1]  # [T, experts] bool
        used = int(routing_map.any(0).sum())
        experts = list(slot.experts.local_experts)
        one = _numel(experts[0])
        return {"bytes": BYTES * (_numel(slot.router) + used * one), "touched": used}
    from .. import reference

    mem = slot.memory
    picks = []
    with _capture(mem, "retrieve", picks):
        slot(x)
    virtual = picks[-1][0]  # [T, H*m]
    rows, _ = reference.virtual_to_physical(virtual, mem.permutation, mem.N)
    unique_rows = int(torch.unique(rows).numel())
    fixed = _numel(slot) - mem.values.numel()
    return {"bytes": BYTES * (fixed + unique_rows * mem.values.shape[1]), "touched": unique_rows}


def analytic_bytes(variant: configs.Variant, batch: int, hidden_size: int) -> float:
    """sizing.py's per-step upper bound (no sharing between the batch's tokens), fp32."""
    if variant.kind == "dense":
        return BYTES * 2 * variant.ffn_hidden_size * hidden_size
    shape = variant.moe if variant.kind == "moe" else variant.ultramem
    return shape.bytes_per_token(batch, BYTES) * batch


# ---------------------------------------------------------------------- timing
class _Flusher:
    """Reads a buffer larger than the last-level cache (evicts the weights between calls)."""

    def __init__(self, mib: int):
        self.buf = torch.ones(mib * 2**20 // 4)

    def __call__(self) -> float:
        return float(self.buf.sum())


def _median_ms(xs: List[float]) -> float:
    return 1e3 * statistics.median(xs)


def time_interleaved(calls: Dict[str, Callable[[int], None]], repeats: int, warmup: int,
                     before: Optional[Callable[[], object]] = None) -> Dict[str, List[float]]:  # fmt: skip
    """Run calls[k](r) for r in range(warmup + repeats), rotating the order each round; returns
    each call's timed durations (seconds). `before()` runs untimed before every call."""
    names = list(calls)
    times = {k: [] for k in names}
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            if before is not None:
                before()
            t0 = time.perf_counter()
            calls[k](r)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


@torch.no_grad()
def decode_step_table(slots, settings: DecodeSettings, log=print) -> List[Dict]:
    """Latency and bytes of one decode step per slot and batch size."""
    D = settings.size.hidden_size
    flush = _Flusher(settings.flush_mib)
    rows = []
    for B in settings.batches:
        gen = torch.Generator().manual_seed(B)
        xs = [torch.randn(1, B, D, generator=gen) for _ in range(settings.warmup + settings.repeats)]
        calls = {k: (lambda r, m=slots[k][0]: m(xs[r])) for k in KINDS}
        times = time_interleaved(calls, settings.repeats, settings.warmup, flush)
        row = {"batch": B}
        for k in KINDS:
            module, variant = slots[k]
            counted = [bytes_read(k, module, xs[i]) for i in range(min(3, len(xs)))]
            row[k] = {
                "ms": _median_ms(times[k]),
                "ms_min": 1e3 * min(times[k]),
                "bytes": statistics.mean(c["bytes"] for c in counted),
                "touched": statistics.mean(c["touched"] for c in counted),
                "analytic_bytes": analytic_bytes(variant, B, D),
            }
        rows.append(row)
        log(f"  B={B}: " + ", ".join(f"{k} {row[k]['ms']:.3f} ms" for k in KINDS), flush=True)
    return rows


def train_step_table(size: ModelSize, tokens: int, repeats: int, seed: int = 1234) -> Dict[str, Dict]:
    """Forward and forward+backward of the slot alone on [s, b, D] with s*b = tokens (train mode)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    slots = build_slots(size, seed)
    for m, _ in slots.values():
        m.train()
    D = size.hidden_size
    s = min(size.seq_length, tokens)
    b = tokens // s
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(s, b, D, generator=gen)
    g = torch.randn(s, b, D, generator=gen)

    def fwd_bwd(module):
        def call(r):
            xi = x.clone().requires_grad_(True)
            out, _ = module(xi)
            out.backward(g)
            for p in module.parameters():
                p.grad = None

        return call

    def fwd(module):
        def call(r):
            with torch.no_grad():
                module(x)

        return call

    both = time_interleaved({k: fwd_bwd(slots[k][0]) for k in KINDS}, repeats, 2)
    fwd_only = time_interleaved({k: fwd(slots[k][0]) for k in KINDS}, repeats, 2)
    return {
        k: {"fwd_bwd_ms": _median_ms(both[k]), "fwd_ms": _median_ms(fwd_only[k]),
            "params": _numel(slots[k][0])}
        for k in KINDS
    }  # fmt: skip


# ---------------------------------------------------------------------- profiling
def profile_memory(size: ModelSize, tokens: int, seed: int = 1234, top: int = 18) -> Dict[str, object]:
    """torch.profiler of the UltraMem slot's forward+backward (train mode) at `tokens` tokens, with
    the layer's stages labelled (record_function wrappers set on the instance, not in layer.py)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from .. import cpu_path, reference

    slots = build_slots(size, seed)
    slot = slots["ultramem"][0]
    slot.train()
    mem = slot.memory
    stages = {
        "retrieve": mem.retrieve,
        "pooled_values": mem.pooled_values,
        "linear_out": mem.linear_out.forward,
    }

    def labelled(name, fn):
        def wrapper(*a, **k):
            with record_function(f"ultramem.{name}"):
                return fn(*a, **k)

        return wrapper

    for name, fn in stages.items():
        target = mem.linear_out if name == "linear_out" else mem
        setattr(target, "forward" if name == "linear_out" else name, labelled(name, fn))
    # module functions the layer looks up at call time: the CPU path's TDQKR or the reference's
    patched = [(cpu_path, "tdqkr"), (reference, "row_col_scores"), (reference, "tucker_topm")]
    originals = [getattr(mod, name) for mod, name in patched]
    for (mod, name), fn in zip(patched, originals):
        setattr(mod, name, labelled(name, fn))
    orig_mlp = slot.mlp.forward
    slot.mlp.forward = labelled("dense_mlp", orig_mlp)
    s = min(size.seq_length, tokens)
    x = torch.randn(s, tokens // s, size.hidden_size)
    g = torch.randn_like(x)

    def step():
        out, _ = slot(x.clone().requires_grad_(True))
        out.backward(g)
        for p in slot.parameters():
            p.grad = None

    try:
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
    finally:
        for (mod, name), fn in zip(patched, originals):
            setattr(mod, name, fn)
        for name in stages:
            target = mem.linear_out if name == "linear_out" else mem
            delattr(target, "forward" if name == "linear_out" else name)
        del slot.mlp.forward
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_self = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    stage_rows = [
        (e.key, e.cpu_time_total / 3e3) for e in events if e.key.startswith("ultramem.")
    ]
    return {
        "total_ms_per_step": total / 3e3,
        "top_ops": [(e.key, e.self_cpu_time_total / 3e3, e.count // 3) for e in by_self],
        "stages_ms": sorted(stage_rows, key=lambda r: -r[1]),
    }


# ---------------------------------------------------------------------- whole model, KV cache
@torch.no_grad()
def whole_model_decode(settings: DecodeSettings, batches, seed: int = 1234, log=print) -> Dict:
    """One decode step of whole GPTModels (prefill a prompt, then time the next token) through
    megatron.core.inference's StaticInferenceContext. Returns {kind: {batch: ms}} or {'error': ...}."""
    from megatron.core.inference.contexts import StaticInferenceContext

    size = replace(settings.size, num_layers=settings.whole_model_layers)
    P = settings.whole_model_prompt
    out = {"layers": size.num_layers, "prompt": P, "ms": {}}
    models = {}
    for kind in KINDS:
        model, _ = configs.build_model(configs.variant_by_name(size, kind), size, seed)
        models[kind] = model.eval()
    flush = _Flusher(settings.flush_mib)
    for B in batches:
        gen = torch.Generator().manual_seed(B)
        prompt = torch.randint(0, size.vocab_size, (B, P), generator=gen)
        ctxs = {}
        for kind, model in models.items():
            ctx = StaticInferenceContext(B, P + 1)
            mask = torch.ones(1, 1, P, P, dtype=torch.bool).triu(1)
            model(prompt, torch.arange(P).expand(B, P), mask, inference_context=ctx,
                  runtime_gather_output=True)  # fmt: skip
            ctx.sequence_len_offset = P
            ctx.enable_decode_mode()
            ctxs[kind] = ctx
        nxt = torch.randint(0, size.vocab_size, (B, 1), generator=gen)
        pos = torch.full((B, 1), P)

        def call(kind):
            def run(r):
                ctxs[kind].sequence_len_offset = P  # rewrite the same cache slot each repeat
                logits = models[kind](nxt, pos, None, inference_context=ctxs[kind],
                                      runtime_gather_output=True)  # fmt: skip
                assert logits.shape[0] == B

            return run

        times = time_interleaved({k: call(k) for k in KINDS}, settings.repeats, settings.warmup, flush)
        out["ms"][B] = {k: _median_ms(times[k]) for k in KINDS}
        if B == batches[0]:  # the cached step computes what a full forward computes
            full = torch.cat([prompt, nxt], 1)
            mask = torch.ones(1, 1, P + 1, P + 1, dtype=torch.bool).triu(1)
            err = {}
            for kind, model in models.items():
                ctxs[kind].sequence_len_offset = P
                step = model(nxt, pos, None, inference_context=ctxs[kind], runtime_gather_output=True)
                ref = model(full, torch.arange(P + 1).expand(B, P + 1), mask)[:, -1:]
                err[kind] = float((step - ref).abs().max() / ref.abs().max())
            out["check"] = err
        log(f"  whole model B={B}: " + ", ".join(f"{k} {out['ms'][B][k]:.2f} ms" for k in KINDS),
            flush=True)  # fmt: skip
    return out


# ---------------------------------------------------------------------- report
def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:,.0f} {unit}" if unit == "B" else f"{x:,.2f} {unit}"
        x /= 1024
    return f"{x:.2f} GiB"


def _targets(rows: List[Dict], train_small: Dict, train_big: Dict) -> List[str]:
    lines = ["| target | measured | met? |", "|---|---|---|"]

    def ratio(row, a, b, key="ms"):
        return row[a][key] / row[b][key]

    small = [r for r in rows if r["batch"] <= 64]
    large = [r for r in rows if r["batch"] <= 1024]
    worst_small = max(ratio(r, "ultramem", "moe") for r in small)
    worst_large = max(ratio(r, "ultramem", "moe") for r in large)
    lines.append(
        f"| UltraMem decode latency <= 0.5x MoE for B = 1..64 | worst {worst_small:.2f}x ("
        + ", ".join(f"B={r['batch']}: {ratio(r, 'ultramem', 'moe'):.2f}x" for r in small)
        + f") | {'yes' if worst_small <= 0.5 else 'no'} |"
    )
    lines.append(
        f"| UltraMem decode latency <= 1.0x MoE up to B = 1024 | worst {worst_large:.2f}x ("
        + ", ".join(f"B={r['batch']}: {ratio(r, 'ultramem', 'moe'):.2f}x" for r in large)
        + f") | {'yes' if worst_large <= 1.0 else 'no'} |"
    )
    fewer = [1.0 / ratio(r, "ultramem", "moe", "bytes") for r in small]
    lines.append(
        f"| parameter bytes read >= 5x fewer than MoE for B <= 64 | worst {min(fewer):.2f}x fewer ("
        + ", ".join(f"B={r['batch']}: {f:.2f}x" for r, f in zip(small, fewer))
        + f") | {'yes' if min(fewer) >= 5 else 'no'} |"
    )
    for label, t in (("quality-sweep size", train_small), ("decode size", train_big)):
        rr = t["ultramem"]["fwd_bwd_ms"] / t["moe"]["fwd_bwd_ms"]
        lines.append(
            f"| training step (fwd+bwd) of the layer <= 1.0x MoE's ({label}) | {rr:.2f}x "
            f"({t['ultramem']['fwd_bwd_ms']:.1f} vs {t['moe']['fwd_bwd_ms']:.1f} ms) "
            f"| {'yes' if rr <= 1.0 else 'no'} |"
        )
    return lines


def main(args) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from .. import train

    settings = QUICK if args.quick else DecodeSettings()
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    command = report.command_line()
    t_start = time.perf_counter()
    train.init_distributed(seed=1234)

    variants, counts, table = configs.describe(settings.size)
    print("\n".join(table), flush=True)
    slots = build_slots(settings.size)
    for m, _ in slots.values():
        m.eval()
    print("decode step of the MLP slot:", flush=True)
    rows = decode_step_table(slots, settings)
    del slots
    print("training step of the slot:", flush=True)
    train_small = train_step_table(settings.train_size, settings.train_tokens, settings.train_repeats)
    train_big = train_step_table(settings.size, settings.train_tokens, settings.train_repeats)
    print(f"  {train_small}\n  {train_big}", flush=True)

    prof = None
    if not args.no_profile:
        print("profile:", flush=True)
        prof = profile_memory(settings.train_size, settings.train_tokens)
    try:
        whole = whole_model_decode(settings, settings.batches)
    except Exception as err:  # recorded in the report: the reason it does not run on CPU
        whole = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
        print(f"whole-model decode failed: {whole['error']}", flush=True)
    wall = time.perf_counter() - t_start
    load_after = report.uptime()

    size = settings.size
    lines = report.header(
        "Decode step of the MLP slot on CPU: dense vs MoE vs UltraMem"
        + (" - QUICK smoke run, not evidence" if args.quick else ""),
        command, load_before, load_after,
    )
    lines += [
        f"Wall time of the whole command: {wall / 60:.1f} min.",
        "",
        "## Set-up",
        "",
        "- Caches (`lscpu | grep -i cache`): "
        + "; ".join(" ".join(l.split()) for l in report._run("lscpu | grep -i cache").splitlines()),
        f"- Slot size (one layer, D={size.hidden_size}, fp32): " + "; ".join(
            f"`{v.name}`: {v.description}" for v in variants if v.name in KINDS),
        "",
        *table,
        "",
        "- Decode step: input [1, B, D] (one new token per sequence), `model.eval()`, "
        f"`torch.no_grad()`, median of {settings.repeats} timed calls after {settings.warmup} "
        "warm-up calls; the three slots interleaved call by call in one process; a fresh random "
        f"input per call; a {settings.flush_mib} MiB buffer is read before each timed call "
        "(weights come from DRAM, not cache, as in a model whose other layers ran in between).",
        "- Bytes read: parameter bytes (fp32) of what the step touched; UltraMem's unique value rows "
        "and MoE's unique experts are counted from the routing of 3 of the timed inputs (mean). "
        "Analytic: `sizing.py` (`MoEShape/UltraMemShape.bytes_per_token(B, 4) * B`), the upper "
        "bound with no row or expert shared between tokens. Not counted: UltraMem's permutation "
        "lookups (8 B per selected index, a buffer, not a parameter) and activations.",
        "",
        "## Decode step latency (ms, median)",
        "",
        "| B | dense | MoE | UltraMem | UltraMem / MoE | UltraMem / dense | MoE / dense |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        d, m, um = r["dense"]["ms"], r["moe"]["ms"], r["ultramem"]["ms"]
        lines.append(f"| {r['batch']} | {d:.3f} | {m:.3f} | {um:.3f} | {um / m:.2f}x "
                     f"| {um / d:.2f}x | {m / d:.2f}x |")  # fmt: skip
    lines += [
        "",
        "## Parameter bytes read per decode step (fp32)",
        "",
        "| B | dense | MoE: experts touched | MoE bytes (analytic bound) | UltraMem: unique rows "
        "| UltraMem bytes (analytic bound) | MoE / UltraMem |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, um = r["moe"], r["ultramem"]
        lines.append(
            f"| {r['batch']} | {_fmt_bytes(r['dense']['bytes'])} | {m['touched']:.1f} "
            f"| {_fmt_bytes(m['bytes'])} ({_fmt_bytes(m['analytic_bytes'])}) | {um['touched']:,.0f} "
            f"| {_fmt_bytes(um['bytes'])} ({_fmt_bytes(um['analytic_bytes'])}) "
            f"| {m['bytes'] / um['bytes']:.2f}x |"
        )
    lines += [
        "",
        f"## Training step of the slot alone (train mode, {settings.train_tokens} tokens, median of "
        f"{settings.train_repeats}, interleaved, warm cache)",
        "",
        "| size | slot | params | forward ms | forward+backward ms | vs MoE (fwd+bwd) |",
        "|---|---|---|---|---|---|",
    ]
    for label, t in (("quality sweep (D=%d)" % settings.train_size.hidden_size, train_small),
                     ("decode (D=%d)" % size.hidden_size, train_big)):  # fmt: skip
        for k in KINDS:
            lines.append(
                f"| {label} | {k} | {t[k]['params']:,} | {t[k]['fwd_ms']:.1f} "
                f"| {t[k]['fwd_bwd_ms']:.1f} | {t[k]['fwd_bwd_ms'] / t['moe']['fwd_bwd_ms']:.2f}x |"
            )
    lines += ["", "## Targets (as measured here)", "", *_targets(rows, train_small, train_big), ""]
    if prof is not None:
        lines += [
            f"## Where the UltraMem slot's training step goes (torch.profiler, quality-sweep size, "
            f"{settings.train_tokens} tokens, per step)",
            "",
            f"Profiled total self CPU time: {prof['total_ms_per_step']:.1f} ms/step.",
            "",
            "Stages (forward, inclusive CPU time; backward ops are not inside these labels):",
            "",
            "| stage | ms/step |",
            "|---|---|",
            *[f"| {k} | {ms:.2f} |" for k, ms in prof["stages_ms"]],
            "",
            "Top ops by self CPU time (forward and backward):",
            "",
            "| op | self ms/step | calls/step |",
            "|---|---|---|",
            *[f"| `{k}` | {ms:.2f} | {n} |" for k, ms, n in prof["top_ops"]],
            "",
        ]
    lines += ["## Whole model, one decode step with a KV cache (StaticInferenceContext)", ""]
    if "error" in whole:
        lines += [
            "Did not run on this CPU: " + whole["error"],
            "",
            "```",
            whole["trace"],
            "```",
        ]
    else:
        lines += [
            f"GPTModel with {whole['layers']} layers at the slot size above (every layer's MLP slot "
            f"is the variant's), prompt of {whole['prompt']} tokens prefilled, then one token per "
            "sequence timed (median, interleaved, cold cache as above). `GPTModel.forward(..., "
            "inference_context=StaticInferenceContext(B, prompt + 1), runtime_gather_output=True)` in "
            "decode mode.",
            "",
            f"Check at B={settings.batches[0]}: the cached step's logits vs a full forward over "
            "prompt + token without cache, max abs difference / max abs logit: "
            + ", ".join(f"{k} {v:.1e}" for k, v in whole.get("check", {}).items()),
            "",
            "| B | dense ms | MoE ms | UltraMem ms | UltraMem / MoE |",
            "|---|---|---|---|---|",
        ]
        for B, t in whole["ms"].items():
            lines.append(f"| {B} | {t['dense']:.2f} | {t['moe']:.2f} | {t['ultramem']:.2f} "
                         f"| {t['ultramem'] / t['moe']:.2f}x |")  # fmt: skip
    md = os.path.join(args.out, f"evidence_decode_cpu{suffix}.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {md} ({wall / 60:.1f} min)", flush=True)
    return 0
