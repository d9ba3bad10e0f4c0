"""The README's "Measured results" table, built only from the committed result files.

    python -m megatron_ultramem.experiments readme [--results benchmarks/results] [--readme README.md]
    python -m megatron_ultramem.experiments readme --check   # exit 1 if README.md is out of date

Each row reads one JSON file that a benchmark wrote next to its .md (report.write_report), so a
number in the README always has a file with its command, date, machine and load behind it. The
table replaces the lines between `<!-- results:begin -->` and `<!-- results:end -->`. A missing
file gives a row that says so instead of a number.
"""

import json
import os
import sys
from typing import Dict, List, Optional

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _load(results: str, name: str) -> Optional[Dict]:
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ms(d: Dict, digits: int = 4) -> str:
    """'mean ± std' of a variant_summary entry."""
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _source(blob: Dict) -> str:
    return f"`{blob['command']}` (`{blob['file']}`, {blob['date'][:10]})"


def main_job_row(r: Dict) -> List[str]:
    return [
        "main job, default flags",
        f"{r['wall_seconds']:.0f} s wall ({r['train_iters']} steps, {r['tokens_per_second']:,.0f} "
        f"tokens/s); loss {r['first_train_loss']:.3f} -> {r['final_train_loss']:.3f}, validation "
        f"{r['final_valid_loss']:.3f}",
    ]


def compare_row(r: Dict) -> List[str]:
    u, m = r["ultramem"], r["moe"]
    return [
        "`--compare`: the main job's model vs a MoE of matched size, same data",
        f"validation loss UltraMem {u:.4f}, MoE {m:.4f} (UltraMem - MoE {u - m:+.4f}; one seed)",
    ]


def quality_row(r: Dict) -> List[str]:
    v = r["variants"]
    parts = [f"{name} {_ms(v[name]['valid_loss'])} (n={v[name]['seeds']})" for name in v]
    text = f"validation loss, {r['size']}, {r['tokens_per_run']:,} tokens per run: " + ", ".join(parts)
    h = r.get("ultramem_minus_moe")
    if h:
        where = "at or below" if h["diff"] <= 0 else "**above**"
        text += (f". UltraMem's mean is {where} MoE's: {h['diff']:+.4f} = "
                 f"{h['diff_in_pooled_std']:+.1f} pooled std (Welch t {h['welch_t']:+.1f})")  # fmt: skip
        if abs(h["diff_in_pooled_std"]) < 1:
            text += ": a tie within the seed-to-seed noise, not a win"
    return ["quality at CPU scale (matched total + activated params)", text]


def ablations_row(r: Dict) -> List[str]:
    parts = []
    for e in r["effects"].values():
        same = "same sign as the paper" if e["effect"] * e["paper"] > 0 else "opposite sign to the paper"
        noise = "" if abs(e["effect"]) >= 2 * e["stderr"] else ", within 2 std errors"
        parts.append(f"{e['feature']} {e['effect']:+.4f} ± {e['stderr']:.4f} ({same}{noise})")
    return ["ablations: loss(UltraMem) - loss(without the feature)", "; ".join(parts)]


def scaling_row(r: Dict) -> List[str]:
    pts = ", ".join(f"N={p['N']:,}: {p['valid_loss']['mean']:.4f}" for p in r["points"])
    return [
        "memory-size scaling at fixed activated params",
        f"validation loss {pts}; {r['slope_per_doubling']:+.4f} per doubling of N, falls at every "
        f"step: {'yes' if r['falling_at_every_step'] else 'no'} (the paper: the loss keeps falling "
        "as N grows at fixed compute)",
    ]


def decode_row(r: Dict) -> List[str]:
    dec = ", ".join(f"B={b}: {t['ratio']:.2f}x" for b, t in r["decode"].items())
    tr = ", ".join(f"T={t}: {v['ratio']:.2f}x" for t, v in r["train"].items())
    return [
        "decode step of the layer vs a 16-expert top-2 MoE (N=65,536, m=32, fp32, CPU)",
        f"UltraMem / MoE latency {dec}; training step {tr} (the bytes one token must read put "
        f"the B=1 floor at {r['single_token_bytes_ratio']:.2f}x)",
    ]


ROWS = (
    ("main_job_cpu.json", main_job_row),
    ("compare_cpu.json", compare_row),
    ("evidence_quality_cpu.json", quality_row),
    ("evidence_ablations_cpu.json", ablations_row),
    ("evidence_scaling_cpu.json", scaling_row),
    ("bench_decode_cpu.json", decode_row),
)


def table(results: str) -> List[str]:
    lines = [
        "| what | result | reproduce (results file, date) |",
        "|---|---|---|",
    ]
    machines = set()
    for name, row in ROWS:
        blob = _load(results, name)
        if blob is None:
            lines.append(f"| {name} | not measured yet | |")
            continue
        machines.add(blob["machine"])
        what, text = row(blob)
        lines.append(f"| {what} | {text} | {_source(blob)} |")
    lines += [
        "| Triton kernels and the layer on a GPU | not measured: no session has had a GPU yet "
        "(`benchmarks/gpu_check.py` is the prepared script) | |",
        "",
        "Machines: " + "; ".join(sorted(machines)) + ". Each file has the full command, versions "
        "and the machine load before and after.",
    ]
    return lines


def render(readme_text: str, results: str) -> str:
    if BEGIN not in readme_text or END not in readme_text:
        raise SystemExit(f"README has no {BEGIN} ... {END} section")
    head, rest = readme_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + "\n".join(table(results)) + "\n" + END + tail


def main(args) -> int:
    with open(args.readme) as f:
        text = f.read()
    new = render(text, args.results)
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date: run python -m megatron_ultramem.experiments readme",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if new != text:
        tmp = args.readme + ".tmp"
        with open(tmp, "w") as f:
            f.write(new)
        os.replace(tmp, args.readme)
    print(f"{args.readme}: results table from {args.results}")
    return 0
