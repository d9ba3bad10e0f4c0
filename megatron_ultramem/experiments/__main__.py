"""Evidence at CPU scale.

    python -m megatron_ultramem.experiments quality   [--quick] [--seeds 3] [--out DIR] [--wait-load 1.5]
    python -m megatron_ultramem.experiments ablations [--quick] [--seeds 2] [--out DIR] [--wait-load 1.5]
    python -m megatron_ultramem.experiments scaling   [--quick] [--seeds 2] [--num-keys 20,40,79,112]
    python -m megatron_ultramem.experiments capacity  [--quick] [--seeds 2] [--headline-seeds 3] [--facts ...]
    python -m megatron_ultramem.experiments capacity-scaling [--quick] [--seeds 2] [--num-keys ...]
    python -m megatron_ultramem.experiments capacity-diagnosis [--quick] [--seeds 2] (tuning split)
    python -m megatron_ultramem.experiments capacity-levers [--quick] (tuning split)
    python -m megatron_ultramem.experiments capacity-evidence [--quick] [--jobs 2] --work W (the four, timed)
    python -m megatron_ultramem.experiments decode    [--quick] [--out DIR]
    python -m megatron_ultramem.experiments configs   [--quick] [--build]
    python -m megatron_ultramem.experiments mainjob   [--compare]
    python -m megatron_ultramem.experiments readme    [--check]

`quality` trains dense, MoE, PKM and UltraMem at matched total and activated parameters and FLOPs
(configs.py) on the fact corpus (corpus.py) and writes evidence_quality_cpu.md + .png (its facts
are not learned by any model in its budget: it measures text modelling without a knowledge
bottleneck); `capacity` trains the same four at a smaller size on random facts whose number is swept
(capacity.py: recall and loss on the facts, evidence_capacity_cpu.md + .png) and
`capacity-scaling` UltraMem at several table sizes there (evidence_capacity_scaling_cpu.md);
`ablations` trains UltraMem without IVE, TDQKR, MCS, the value-LR decay and with the previous init
(evidence_ablations_cpu.md); `scaling` trains UltraMem at several value-table sizes N at the MoE's
activated parameters (evidence_scaling_cpu.md + .png). The three share one run cache (--work):
runs with the same settings, variant and seed are trained once (the ablations' and the scaling's
UltraMem baseline are the sweep's runs). `decode` times one decode step of the MLP slot and
counts the parameter bytes it reads (decode.py); `configs` prints and checks the matched
configurations. `capacity-evidence` runs the four capacity commands as the committed files ran
them, one after the other on one run cache, and records the wall time of each and of the whole
(evidence_capacity_reproduction_cpu.md). `--jobs J` trains J runs at once, each in its own
process (quality.run_all). `--quick` is the CI smoke size (files get a `_quick` suffix). `mainjob` runs and
records the main job (main_job_cpu.md/.json; `--compare`: compare_cpu.md/.json); `readme` rebuilds
the README's results table from the results files' JSON (`--check`: fail if it is out of date).
"""

import argparse
import importlib
import os
import shlex
import sys
import tempfile

from ..cli import ArgumentParser, check_writable, fail, float_in, int_at_least


def _num_keys(text: str) -> str:
    """--num-keys: comma-separated n >= 1 (validated; scaling.py splits the string)."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1 (n, keys per side), got {text!r}"
        )
    return ",".join(parts)


def _training_flags(q: argparse.ArgumentParser, seeds_help: str) -> None:
    pos = int_at_least(1)
    q.add_argument("--quick", action="store_true", help="CI smoke size (well under 60 s)")
    q.add_argument("--seeds", type=pos, default=None, help=seeds_help)
    q.add_argument("--out", default="benchmarks/results", help="where the .md and .png go")
    q.add_argument("--work", default=None,
                   help="data cache and per-run JSON, shared by quality/ablations/scaling "
                   "(default: a folder in the temp dir)")  # fmt: skip
    q.add_argument("--train-iters", type=pos, default=None, help="override the step count")
    q.add_argument("--entities", type=pos, default=None, help="override the corpus' entity count")
    q.add_argument("--fresh", action="store_true", help="ignore finished runs saved under --work")
    q.add_argument("--threads", type=pos, default=None,
                   help="torch intra-op threads (of each run's process with --jobs; default 1 there)")
    q.add_argument("--jobs", type=pos, default=1,
                   help="runs trained at once, each in its own process (2: both cores of a 2-core machine)")
    q.add_argument("--wait-load", type=float_in(0.0, low_open=True), default=None, metavar="L",
                   help="before each run, wait until the 1-minute load average is below L")


def _capacity_flags(q: argparse.ArgumentParser, corpus_seed: int = 0) -> None:
    q.add_argument("--facts", default=None, help="comma-separated fact counts")
    q.add_argument("--corpus-seed", type=int, default=corpus_seed,
                   help="the facts (0: the verdict's; another seed: a tuning split for choices)")
    q.add_argument("--name", default=None, help="results file name without extension")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megatron_ultramem.experiments", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    q = sub.add_parser("quality", help="dense, MoE, PKM, UltraMem: loss, fact recall, tokens/s")
    _training_flags(q, "seeds per variant (default 3; --quick 2)")
    a = sub.add_parser("ablations", help="UltraMem without IVE / TDQKR / MCS / value-LR decay, old init")
    _training_flags(a, "seeds per ablation and for the UltraMem baseline (default 2)")
    s = sub.add_parser("scaling", help="UltraMem at several value-table sizes, fixed activated params")
    _training_flags(s, "seeds per size (default 2)")
    s.add_argument("--num-keys", type=_num_keys, default=None,
                   help="comma-separated n (keys per side, N = n^2); default 20,40,79,112")
    k = sub.add_parser("capacity", help="knowledge capacity: recall of random facts against their number")
    _training_flags(k, "seeds per point (default 2)")
    _capacity_flags(k)
    k.add_argument("--headline-seeds", type=int, default=None,
                   help="seeds at the headline fact count (default 3; --quick: --seeds)")
    k.add_argument("--headline-facts", type=int, default=None, help="the headline fact count")
    k.add_argument("--variants", default=None, help="comma-separated (default ultramem,moe,pkm,dense)")
    ks = sub.add_parser("capacity-scaling", help="UltraMem recall against table size, fixed activated params")
    _training_flags(ks, "seeds per size (default 2)")
    _capacity_flags(ks)
    ks.add_argument("--num-keys", default=None,
                    help="comma-separated n (keys per side, N = n^2); default 14,20,28,40,56")
    kd = sub.add_parser("capacity-diagnosis", help="UltraMem with one change at a time (tuning split)")
    _training_flags(kd, "seeds per variant (default 2)")
    _capacity_flags(kd, corpus_seed=1)
    kd.add_argument("--exposures-mult", type=int, default=2,
                    help="also train UltraMem, MoE and dense on this many times the tokens (1: skip)")
    kl = sub.add_parser("capacity-levers", help="which settings let a dense model learn facts (tuning split)")
    _training_flags(kl, "seeds per lever (default 1)")
    _capacity_flags(kl, corpus_seed=1)
    ke = sub.add_parser("capacity-evidence", help="the four capacity commands as the committed files ran "
                        "them, timed end to end")  # fmt: skip
    ke.add_argument("--quick", action="store_true", help="CI smoke size, one seed")
    ke.add_argument("--out", default="benchmarks/results")
    ke.add_argument("--work", default=None, help="the run cache (empty: a reproduction from scratch)")
    ke.add_argument("--jobs", type=int_at_least(1), default=2, help="runs trained at once (default 2)")
    ke.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads per run (default 1)")
    ke.add_argument("--fresh", action="store_true", help="ignore finished runs saved under --work")
    d = sub.add_parser("decode", help="one decode step of the MLP slot: latency, bytes read")
    d.add_argument("--quick", action="store_true", help="CI smoke size")
    d.add_argument("--out", default="benchmarks/results")
    d.add_argument("--repeats", type=int_at_least(1), default=None, help="timed repeats per (config, batch)")
    d.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads")
    d.add_argument("--no-profile", action="store_true", help="skip the profiler section")
    m = sub.add_parser("mainjob", help="run the main job (or --compare) and record it")
    m.add_argument("--compare", action="store_true", help="record `python -m megatron_ultramem --compare`")
    m.add_argument("--out", default="benchmarks/results")
    m.add_argument("--flags", default="", help="extra main-job flags, one string (tests: a short run)")
    r = sub.add_parser("readme", help="the README's results table from the results files")
    r.add_argument("--results", default="benchmarks/results")
    r.add_argument("--readme", default="README.md")
    r.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    c = sub.add_parser("configs", help="print and check the matched configurations")
    c.add_argument("--quick", action="store_true")
    c.add_argument("--build", action="store_true")
    return p


def validate(args) -> None:
    """Paths and the main job's flags, checked before any run (one line, exit status 2)."""
    for flag in ("out", "work"):
        path = getattr(args, flag, None)
        if path is not None:
            check_writable(path, f"--{flag}")
    if getattr(args, "jobs", 1) > 1 and getattr(args, "wait_load", None) is not None:
        fail(f"--wait-load: waits for an idle machine before each run, and --jobs {args.jobs} loads it "
             "with its own runs: use one or the other (--jobs 1 with --wait-load)")  # fmt: skip
    if args.command == "readme":
        if not os.path.isdir(args.results):
            fail(f"--results {args.results}: no such directory (the benchmarks/results folder)")
        if not os.path.isfile(args.readme):
            fail(f"--readme {args.readme}: no such file (the README.md to update)")
    if args.command == "mainjob":
        try:
            flags = shlex.split(args.flags)
        except ValueError as err:
            fail(f"--flags {args.flags!r}: not a shell word list ({err})")
        from .. import train

        train.parse_args(flags)  # the main job's own check of its flags (exit status 2)


EVIDENCE = (
    ("capacity", "--variants", "ultramem,ultramem_tuned,moe,pkm,dense"),
    ("capacity-scaling", "--num-keys", "14,20,28,56"),
    ("capacity-levers",),
    ("capacity-diagnosis", "--seeds", "2", "--exposures-mult", "1"),
)
"""The commands behind the committed capacity evidence, in order (capacity-scaling takes the
sweep's UltraMem, MoE and dense runs at F=400 from the run cache; the longest, the diagnosis, last)."""
QUICK_EVIDENCE = {"capacity": ("--seeds", "1", "--headline-seeds", "2"), "capacity-diagnosis": ("--seeds", "1"),
                  "capacity-scaling": ("--seeds", "1")}  # fmt: skip
"""The flags `capacity-evidence --quick` sets in each command (one seed)."""


def evidence_commands(args) -> list:
    """capacity-evidence's command lines (argv after the module), each with the shared flags."""
    shared = ["--quick"] * args.quick + ["--out", args.out] * (args.out != "benchmarks/results")
    shared += ["--jobs", str(args.jobs)]
    shared += ["--work", args.work] * (args.work is not None) + ["--threads", str(args.threads)] * bool(args.threads)
    shared += ["--fresh"] * args.fresh
    out = []
    for cmd in EVIDENCE:
        cmd = list(cmd)
        extra = QUICK_EVIDENCE.get(cmd[0], ()) if args.quick else ()
        for flag, value in zip(extra[::2], extra[1::2]):  # --quick's value replaces the evidence's
            if flag in cmd:
                cmd[cmd.index(flag) + 1] = value
            else:
                cmd += [flag, value]
        out.append(cmd + shared)
    return out


def _run_files(work: str) -> dict:
    """run file -> modification time, of every run saved under the run cache `work`."""
    import glob

    return {f: os.path.getmtime(f) for f in glob.glob(os.path.join(work, "runs_*", "*.json"))}


def capacity_evidence(args) -> int:
    """`capacity-evidence`: EVIDENCE's commands one after the other on one run cache, then a results
    file with the wall time of each and of the whole (the issue's target: <= 3 h on the 2-core
    machine, from an empty cache)."""
    import json
    import time

    from . import report

    argvs = evidence_commands(args)
    parsed = [build_parser().parse_args(a) for a in argvs]
    for a in parsed:
        validate(a)  # every command's flags before the first run
    work = args.work or os.path.join(tempfile.gettempdir(), "megatron_ultramem_experiments")  # make_runner's
    before = _run_files(work)
    load_before = report.uptime()
    t0 = time.perf_counter()
    rows, argv0 = [], sys.argv
    for argv, a in zip(argvs, parsed):
        files = _run_files(work)
        t = time.perf_counter()
        sys.argv = [argv0[0], *argv]  # each results file records its own command (report.command_line)
        try:
            code = _dispatch(a)
        finally:
            sys.argv = argv0
        if code:
            return code
        trained = [f for f, m in _run_files(work).items() if files.get(f) != m]
        train_s = sum(json.load(open(f)).get("wall_seconds", 0.0) for f in trained)
        rows.append({"command": report.command_line_of(argv), "wall_minutes": (time.perf_counter() - t) / 60,
                     "runs_trained": len(trained), "runs_train_minutes": train_s / 60})  # fmt: skip
        name, wall = _write_evidence_report(args, rows, len(argvs), bool(before), load_before,
                                            (time.perf_counter() - t0) / 60)  # after each: a cut-short run says so
    print(f"wrote {name}.md ({wall:.1f} min)", flush=True)
    return 0


def _write_evidence_report(args, rows, commands: int, cached: bool, load_before: str, wall: float):
    """capacity-evidence's results file for the commands done so far (`rows`, of `commands`)."""
    from . import readme, report

    complete = len(rows) == commands
    scratch = not cached or args.fresh
    met = complete and scratch and not args.quick and wall <= EVIDENCE_TARGET_MINUTES
    numbers = dict(commands=rows, commands_total=commands, complete=complete, quick=args.quick,
                   wall_minutes=wall, from_scratch=scratch, target_minutes=EVIDENCE_TARGET_MINUTES,
                   target_met=met, jobs=args.jobs, threads_per_run=args.threads or 1)  # fmt: skip
    verdict = readme.reproduction_verdict(numbers)
    lines = report.header("Capacity evidence reproduced end to end (CPU)"
                          + (" - QUICK smoke run, not evidence" if args.quick else ""),
                          report.command_line(), load_before, report.uptime())  # fmt: skip
    lines += [
        f"Run cache at the start: {'empty' if not cached else 'not empty'}"
        + (" (--fresh: every run trained again)" if args.fresh else "") + f". Runs trained at once: "
        f"{args.jobs}, torch threads per run: {args.threads or 1}.", "",
        "| command | runs trained | wall min | runs' own training min (summed) |", "|---|---|---|---|",
        *(f"| `{r['command']}` | {r['runs_trained']} | {r['wall_minutes']:.1f} | {r['runs_train_minutes']:.1f} |"
          for r in rows),
        "",
        f"{'Whole capacity evidence' if complete else f'The first {len(rows)} of {commands} commands'}: "
        f"**{wall:.1f} min** wall for {sum(r['runs_trained'] for r in rows)} runs (target <= "
        f"{EVIDENCE_TARGET_MINUTES} min for all {commands} from an empty cache: {verdict}).",
    ]  # fmt: skip
    name = f"evidence_capacity_reproduction_cpu{'_quick' if args.quick else ''}"
    os.makedirs(args.out, exist_ok=True)
    report.write_report(os.path.join(args.out, f"{name}.md"), lines, report.command_line(), **numbers)
    return name, wall


EVIDENCE_TARGET_MINUTES = 180
"""Issue 18: the whole capacity evidence reproducible in <= 3 hours on the project's 2-core machine."""


HANDLERS = {  # command -> (module of this package, its function taking the parsed args)
    "quality": ("quality", "main"),
    "ablations": ("ablations", "main"),
    "scaling": ("scaling", "main"),
    "capacity": ("capacity", "main"),
    "capacity-scaling": ("capacity", "scaling_main"),
    "capacity-diagnosis": ("capacity", "diagnosis_main"),
    "capacity-levers": ("capacity", "levers_main"),
    "mainjob": ("mainjob", "main"),
    "readme": ("readme", "main"),
    "decode": ("decode", "main"),
}


def _dispatch(args) -> int:
    """The command's function from HANDLERS, imported on use (each command pulls in only what it needs)."""
    module, function = HANDLERS[args.command]
    return getattr(importlib.import_module(f".{module}", __package__), function)(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    if args.command == "capacity-evidence":
        return capacity_evidence(args)
    if args.command in HANDLERS:
        return _dispatch(args)
    from . import configs

    return configs.main((["--quick"] if args.quick else []) + (["--build"] if args.build else []))


if __name__ == "__main__":
    sys.exit(main())
