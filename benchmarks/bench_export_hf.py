"""Time to export the main job's model as a Hugging Face folder (CPU).

    python benchmarks/bench_export_hf.py [--runs 5] [--out benchmarks/results/export_hf_cpu.md]

Trains the main job for 4 steps with its default architecture and saves its checkpoint, then runs
`python -m megatron_ultramem.export_hf --load CK --out HF --force` `--runs` times, each as its own
process (what a user runs), and records per run: the process's wall time, its CPU time (user + sys,
from the kernel's child accounting: what the export costs whatever else runs on the machine), the
export's own time as the command prints it (reading the tensors, mapping them, writing the folder;
imports excluded) and the 1-minute load average before and after. Medians over the runs go to the
JSON next to the markdown (report.write_report).
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_ultramem.experiments import report  # noqa: E402

TRAIN = ["--train-iters", "4", "--warmup-iters", "1", "--eval-interval", "4", "--eval-iters", "1",
         "--micro-batch-size", "4", "--seq-length", "32", "--no-progress", "--save", "ck",
         "--save-interval", "4"]  # fmt: skip
EXPORT = ["--load", "ck", "--out", "hf", "--force"]


def load1() -> float:
    return os.getloadavg()[0]


def run(args, cwd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "export_hf_cpu.md"))
    args = p.parse_args()
    command = "python benchmarks/bench_export_hf.py " + " ".join(sys.argv[1:])
    load_before = report.uptime()
    with tempfile.TemporaryDirectory() as tmp:
        run(["megatron_ultramem", *TRAIN], tmp)
        rows = []
        for i in range(args.runs):
            l0 = load1()
            proc, wall, cpu = run(["megatron_ultramem.export_hf", *EXPORT], tmp)
            m = re.search(r"wrote hf: (\d+) tensors, ([0-9.]+) MB in (\d+) file\(s\).* in ([0-9.]+) s", proc.stdout)
            rows.append(dict(run=i + 1, wall=wall, cpu=cpu, own=float(m.group(4)), load_before=l0, load_after=load1()))
            tensors, mb = int(m.group(1)), float(m.group(2))
            print(f"run {i + 1}: wall {wall:.1f} s, CPU {cpu:.1f} s, export's own {m.group(4)} s", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "cpu", "own")}
    lines = report.header("Exporting the main job's model to a Hugging Face folder (CPU)", command,
                          load_before, report.uptime())  # fmt: skip
    lines += [
        f"The main job's default architecture (4 layers, hidden 128, two memory layers with N = 1,024 "
        f"rows), trained 4 steps and saved (`python -m megatron_ultramem {' '.join(TRAIN)}`), then "
        f"`python -m megatron_ultramem.export_hf {' '.join(EXPORT)}` {args.runs} times, each its own "
        f"process: {tensors} tensors, {mb:.1f} MB in fp32.",
        "",
        "| run | wall (s) | CPU user+sys (s) | export's own time (s) | load avg before / after |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['run']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['own']:.1f} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |" for r in rows]  # fmt: skip
    lines += [
        f"| **median** | **{med['wall']:.1f}** | **{med['cpu']:.1f}** | **{med['own']:.1f}** | |",
        "",
        "CPU time is what the export costs on this machine whatever else runs; wall time stretches "
        "with the load (the cores are shared). Most of it is importing torch, Megatron-Core and "
        "transformers; the export's own time (reading the tensors, mapping them, writing "
        "the folder) is printed by the command.",
    ]
    report.write_report(args.out, lines, command, runs=args.runs, tensors=tensors, megabytes=mb,
                        median_wall_seconds=med["wall"], median_cpu_seconds=med["cpu"],
                        median_export_seconds=med["own"], per_run=rows)  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
