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
import re
import sys
from typing import Dict, List, Optional

from .report import PLACEHOLDERS

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


def _command(command: str) -> str:
    """A recorded command with each folder-valued flag as its placeholder (files written before
    report.command_line did so name a folder of the machine that ran them)."""
    for flag, placeholder in PLACEHOLDERS.items():
        command = re.sub(rf"{flag}(=|\s+)\S+", rf"{flag}\g<1>{placeholder}", command)
    return command


def _source(blob: Dict) -> str:
    return f"`{_command(blob['command'])}` (`{blob['file']}`, {blob['date'][:10]})"


def _word(verdict: str) -> str:
    return {"win": "**win**", "loss": "**loss**", "tie": "tie", "one seed": "one seed, no verdict"}[verdict]


def _welch_word(diff: float, t: float, lower_is_better: bool) -> str:
    """win / tie / loss for a mean difference with its Welch t (files that kept no per-seed
    values): beyond the seed spread when |t| > 2."""
    if abs(t) <= 2:
        return "tie"
    return "win" if (diff < 0) == lower_is_better else "loss"


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
        word = _welch_word(h["diff"], h["welch_t"], lower_is_better=True)
        text += (f". UltraMem - MoE {h['diff']:+.4f} = {h['diff_in_pooled_std']:+.1f} pooled std "
                 f"(Welch t {h['welch_t']:+.1f}): {_word(word)} for UltraMem")  # fmt: skip
    if "recall_trained_forms" in next(iter(v.values())):
        rec = ", ".join(f"{n} {100 * v[n]['recall_trained_forms']['mean']:.1f}%" for n in v)
        text += (f". No model learns this corpus' facts (recall in trained forms {rec}; chance "
                 "11.3%): this is text modelling, not knowledge")  # fmt: skip
    return ["general-text sweep: text modelling without a knowledge bottleneck (matched total + "
            "activated params)", text]  # fmt: skip


def ablations_row(r: Dict) -> List[str]:
    parts = []
    for e in r["effects"].values():
        same = "same sign as the paper" if e["effect"] * e["paper"] > 0 else "opposite sign to the paper"
        noise = "" if abs(e["effect"]) >= 2 * e["stderr"] else ", within 2 std errors"
        parts.append(f"{e['feature']} {e['effect']:+.4f} ± {e['stderr']:.4f} ({same}{noise})")
    return ["ablations on the general-text sweep: loss(UltraMem) - loss(without the feature)",
            "; ".join(parts)]  # fmt: skip


def scaling_row(r: Dict) -> List[str]:
    pts = ", ".join(f"N={p['N']:,}: {p['valid_loss']['mean']:.4f}" for p in r["points"])
    return [
        "memory-size scaling on the general-text sweep (no knowledge bottleneck), fixed activated "
        "params",
        f"validation loss {pts}; {r['slope_per_doubling']:+.4f} per doubling of N, falls at every "
        f"step: {'yes' if r['falling_at_every_step'] else 'no'} (the paper: the loss keeps falling "
        "as N grows at fixed compute; recall is at chance at every N here, so this says nothing "
        "about capacity: see the capacity rows)",
    ]


def _pm(d: Dict, scale: float = 100, digits: int = 1, unit: str = "%") -> str:
    """'mean ± std' of a capacity summary entry (just the mean for one seed)."""
    if d["std"]:
        return f"{scale * d['mean']:.{digits}f} ± {scale * d['std']:.{digits}f}{unit}"
    return f"{scale * d['mean']:.{digits}f}{unit}"


def capacity_learnable_row(r: Dict) -> List[str]:
    pts = r["points"]
    dense = [(F, pts[F]["dense"]) for F in map(str, r["facts"]) if "dense" in pts[F]]
    first = dense[0][1]["recall_trained_forms"]["mean"]
    curve = ", ".join(f"F={F} ({r['exposures'][F]:.0f} exposures): {_pm(p['recall_trained_forms'])}"
                      for F, p in dense)  # fmt: skip
    ok = first >= 0.5 and r["dense_recall_falls"]
    return [
        f"knowledge capacity ({r['size']}, {r['tokens_per_run']:,} tokens per run, random facts of "
        f"{r['value_digits']} digits): can the experiment see capacity?",
        f"dense recall in trained forms {curve}: learnable at the smallest count (>= 50%) and "
        f"falling as F grows: {'yes' if ok else '**no**'}; capacity-bound (dense below "
        f"80% of its first): F = {', '.join(map(str, r['capacity_bound'])) or 'none'}",
    ]


def _bound_points(r: Dict, subject: str, comparisons: str = "comparisons"):
    """(F, the point's variants, subject's comparisons) at each capacity-bound fact count where
    `subject` and its comparison with the MoE were run."""
    for F in map(str, r["capacity_bound"]):
        p, c = r["points"][F], r.get(comparisons, {}).get(F, {})
        if subject in p and "moe" in c:
            yield F, p, c


def capacity_row(r: Dict) -> List[str]:
    parts = []
    for F, p, c in _bound_points(r, "ultramem"):
        others = ", ".join(f"{n} {_pm(p[n]['recall_trained_forms'])}" for n in ("moe", "pkm", "dense") if n in p)
        words = "; ".join(f"vs {n}: {_word(c[n]['recall_trained_forms']['verdict'])}" for n in c)
        parts.append(f"F={F} (n={p['ultramem']['seeds']}): UltraMem {_pm(p['ultramem']['recall_trained_forms'])}, "
                     f"{others} ({words})")  # fmt: skip
    return ["knowledge capacity: recall in trained forms at matched compute and params, at each "
            "capacity-bound fact count (win/loss: all seeds beyond the other's)", "; ".join(parts) or "no capacity-bound point"]


def capacity_tuned_row(r: Dict) -> List[str]:
    """`ultramem_tuned` (the tuning split's choices) against the others at each capacity-bound F."""
    parts = []
    for F, p, c in _bound_points(r, "ultramem_tuned", "tuned_comparisons"):
        key = "recall_trained_forms"
        words = "; ".join(f"vs {n}: {_word(c[n][key]['verdict'])}"
                          + (f", Welch t {c[n][key]['welch_t']:+.1f}" if "welch_t" in c[n][key] else "")
                          for n in c)  # fmt: skip
        parts.append(f"F={F} (n={p['ultramem_tuned']['seeds']}): tuned UltraMem {_pm(p['ultramem_tuned'][key])}, "
                     f"MoE {_pm(p['moe'][key])}, paper-default UltraMem {_pm(p['ultramem'][key])} ({words})")  # fmt: skip
    return ["knowledge capacity, UltraMem with the tuning split's choices (value-table LR x4 constant, "
            "the reference init, m=12; chosen on corpus seed 1, verdict on seed 0): recall in trained "
            "forms at each capacity-bound fact count", "; ".join(parts) or "not run"]


def capacity_heldout_row(r: Dict) -> List[str]:
    parts = []
    for F, p, c in _bound_points(r, "ultramem"):
        parts.append(
            f"F={F}: recall on the held-out question form UltraMem "
            f"{_pm(p['ultramem']['recall_heldout_question'])} vs MoE {_pm(p['moe']['recall_heldout_question'])} "
            f"({_word(c['moe']['recall_heldout_question']['verdict'])}); loss on fact values "
            f"{_pm(p['ultramem']['value_nats'], 1, 2, '')} vs {_pm(p['moe']['value_nats'], 1, 2, '')} nats "
            f"({_word(c['moe']['value_nats']['verdict'])}); other bytes "
            f"{_pm(p['ultramem']['other_nats_per_byte'], 1, 4, '')} vs {_pm(p['moe']['other_nats_per_byte'], 1, 4, '')}"
        )  # fmt: skip
    return ["knowledge capacity, UltraMem vs MoE: held-out question form, loss on values and on "
            "the rest", "; ".join(parts) or "no capacity-bound point"]


def capacity_scaling_row(r: Dict) -> List[str]:
    pts = ", ".join(f"N={p['N']:,}: {_pm(p['recall_trained_forms'])} (rows used "
                    f"{100 * p['row_used_fraction']['mean']:.0f}%, top 1% take "
                    f"{100 * p['row_top1pct_share']['mean']:.0f}%)" for p in r["points"])  # fmt: skip
    fit = r["fits"]["recall_trained_forms"]
    vfit = r["fits"]["value_nats"]
    rising = fit["t"] > 2
    return [
        f"recall against table size N, UltraMem at fixed activated params (F={r['facts']})",
        f"recall in trained forms {pts}; slope {100 * fit['slope']:+.2f} ± {100 * fit['stderr']:.2f} "
        f"pts per doubling of N (t {fit['t']:+.1f}): rising by > 2 std errors: "
        f"{'yes' if rising else '**no**'}; value loss {vfit['slope']:+.3f} ± {vfit['stderr']:.3f} nats "
        "per doubling",
    ]


def capacity_diagnosis_row(r: Dict) -> List[str]:
    v = r["variants"]
    base, moe = v["ultramem"]["recall_trained_forms"], v["moe"]["recall_trained_forms"]
    changes = [n for n in v if n not in ("ultramem", "moe", "dense")]
    seeds = min(v[n]["seeds"] for n in v)
    def name(n): return f"`{n}` {_pm(v[n]['recall_trained_forms'])}"
    def names(ns): return ", ".join(name(n) for n in ns) or "none"
    helped = [n for n in r["helped"] if n in changes]
    hurt = [n for n in r["hurt"] if n in changes]
    text = f"tuning split (corpus seed {r['corpus_seed']}, F={r['facts']}, {seeds} seed{'s' if seeds > 1 else ''} each): UltraMem {_pm(base)} vs MoE {_pm(moe)}. "
    if seeds < 2:
        text += "One seed: differences, no verdicts: " + names(changes)
    else:
        text += (f"Changed the result (every seed beyond every seed of `ultramem`): higher {names(helped)}; "
                 f"lower {names(hurt)}; within the spread: {names([n for n in changes if n not in helped + hurt])}")
    if r.get("longer"):
        L = r["longer"]
        text += (f". At {r['exposures_mult']}x the tokens: " + ", ".join(
            f"{n} {_pm(L[n]['recall_trained_forms'])}" for n in L))
    return ["why UltraMem vs MoE on recall: one change at a time", text]


def capacity_levers_row(r: Dict) -> List[str]:
    parts = [f"{x['lever']} ({x['facts']} facts, {x['exposures']:.0f} exposures): "
             f"{_pm(x['recall_trained_forms'])}" for x in r["levers"]]  # fmt: skip
    return [f"which levers let a dense model learn facts in a CPU budget (tuning split, corpus seed "
            f"{r['corpus_seed']}; recall in trained forms)", "; ".join(parts)]  # fmt: skip


def reproduction_verdict(r: Dict) -> str:
    """The target's verdict in a capacity-evidence results file (its .md and the README row)."""
    done, total = len(r["commands"]), r["commands_total"]
    if r["target_met"]:
        return "met"
    if not r["from_scratch"]:
        return "not measured: the run cache was not empty"
    if r.get("quick"):  # files written before the field existed are not --quick runs
        return "not measured: --quick"
    return f"not measured: only {done} of {total} commands ran" if done < total else "**not met**"


def capacity_reproduction_row(r: Dict) -> List[str]:
    """`capacity-evidence`: the four capacity commands one after the other, timed end to end."""
    runs = sum(c["runs_trained"] for c in r["commands"])
    done, total = len(r["commands"]), r["commands_total"]
    verdict = reproduction_verdict(r)
    return [
        "the whole capacity evidence (the four capacity commands above), reproduced from an empty run "
        f"cache with {r['jobs']} runs at once, {r['threads_per_run']} torch thread each",
        f"{r['wall_minutes']:.0f} min wall for {runs} runs{'' if done == total else f' of the first {done} commands'} ("
        + ", ".join(f"{c['command'].split()[3]} {c['wall_minutes']:.0f} min" for c in r["commands"])
        + f"); target <= {r['target_minutes']} min: {verdict}",
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
    ("evidence_capacity_levers_cpu.json", capacity_levers_row),
    ("evidence_capacity_cpu.json", capacity_learnable_row),
    ("evidence_capacity_cpu.json", capacity_row),
    ("evidence_capacity_cpu.json", capacity_tuned_row),
    ("evidence_capacity_cpu.json", capacity_heldout_row),
    ("evidence_capacity_scaling_cpu.json", capacity_scaling_row),
    ("evidence_capacity_diagnosis_cpu.json", capacity_diagnosis_row),
    ("evidence_capacity_reproduction_cpu.json", capacity_reproduction_row),
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
