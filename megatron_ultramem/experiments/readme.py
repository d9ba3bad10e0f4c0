"""The generated parts of the docs: the README's "Measured results" table, built only from the
committed result files, and the printed output of the sizing / convert commands shown in the
README and in examples/mixtral_to_ultramem.md.

    python -m megatron_ultramem.experiments readme [--results benchmarks/results] [--readme README.md]
    python -m megatron_ultramem.experiments readme --check   # exit 1 if a file is out of date

Each results row reads one JSON file that a benchmark wrote next to its .md (report.write_report),
so a number in the README always has a file with its command, date, machine and load behind it.
The table replaces the lines between `<!-- results:begin -->` and `<!-- results:end -->`. A missing
file gives a row that says so instead of a number.

Command outputs: a ```bash block holding one `python -m megatron_ultramem.sizing ...` or
`python -m megatron_ultramem.megatron_lm.convert ...` command, followed by `<!-- output:begin -->`
and `<!-- output:end -->`, gets what that command prints (stdout, then its stderr notes) between
the two markers. The commands run in-process (standard library only, deterministic).
"""

import json
import os
import sys
from typing import Dict, List, Optional

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
OUT_BEGIN, OUT_END = "<!-- output:begin -->", "<!-- output:end -->"
OUTPUT_MODULES = ("megatron_ultramem.sizing", "megatron_ultramem.megatron_lm.convert")
DOC_FILES = ("examples/mixtral_to_ultramem.md",)
"""Markdown files besides the README whose command outputs are generated (paths from the README's
folder)."""


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
    if "train_loss_window" in r:  # like with like: means over equal windows, validation before/after
        losses = (
            f"train loss (mean of {r['train_loss_window']} step{'s' * (r['train_loss_window'] > 1)}) "
            f"{r['first_train_loss']:.3f} -> "
            f"{r['final_train_loss']:.3f}, validation {r['initial_valid_loss']:.3f} (untrained) -> "
            f"{r['final_valid_loss']:.3f}"
        )
    else:  # a results file written before the windows were recorded
        losses = (
            f"train loss {r['first_train_loss']:.3f} (step 1) -> {r['final_train_loss']:.3f} (mean "
            f"of the last 10 steps), validation {r['final_valid_loss']:.3f}"
        )
    return [
        "main job, default flags",
        f"{r['wall_seconds']:.0f} s wall ({r['train_iters']} steps, {r['tokens_per_second']:,.0f} "
        f"tokens/s); {losses}",
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


def _command_before(text: str, at: int) -> str:
    """The ```bash block that ends right before position `at`, as one line."""
    head = text[:at].rstrip()
    if not head.endswith("```"):
        raise SystemExit(f"{OUT_BEGIN} at offset {at} does not follow a ```bash block")
    start = head.rfind("```bash\n", 0, len(head) - 3)
    body = head[start + len("```bash\n") : -3]
    return " ".join(line.rstrip("\\").strip() for line in body.strip().splitlines())


def run_command(command: str) -> str:
    """What `command` (python -m <one of OUTPUT_MODULES> ...) prints, stdout then stderr."""
    import contextlib
    import importlib
    import io
    import shlex

    argv = shlex.split(command)
    if argv[:2] != ["python", "-m"] or argv[2] not in OUTPUT_MODULES:
        raise SystemExit(f"output block after {command!r}: only {', '.join(OUTPUT_MODULES)} run here")
    from ..cli import run_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = run_main(importlib.import_module(argv[2]).main, argv[3:])
    if code != 0:
        raise SystemExit(f"{command!r} exited with {code}: {buf.getvalue()[-2000:]}")
    return buf.getvalue()


def render_outputs(text: str) -> str:
    """`text` with every output block (module doc) filled in from its command."""
    out, pos = [], 0
    while True:
        at = text.find(OUT_BEGIN, pos)
        if at < 0:
            return "".join(out) + text[pos:]
        end = text.find(OUT_END, at)
        if end < 0:
            raise SystemExit(f"{OUT_BEGIN} at offset {at} has no {OUT_END}")
        printed = run_command(_command_before(text, at))
        out.append(text[pos:at] + OUT_BEGIN + "\n```text\n" + printed.rstrip("\n") + "\n```\n")
        pos = end


def main(args) -> int:
    """Regenerate (or with --check, compare) the README and DOC_FILES."""
    files = [args.readme] + [os.path.join(os.path.dirname(os.path.abspath(args.readme)), f) for f in DOC_FILES]
    stale = []
    for path in files:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            text = f.read()
        new = render(text, args.results) if path == args.readme else text
        new = render_outputs(new)
        if new == text:
            continue
        stale.append(path)
        if not args.check:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(new)
            os.replace(tmp, path)
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python -m megatron_ultramem.experiments readme",
                  file=sys.stderr)  # fmt: skip
        return 1 if stale else 0
    print(f"{args.readme}: results table from {args.results}; command outputs in "
          f"{', '.join(os.path.relpath(f) for f in files)}")  # fmt: skip
    return 0
