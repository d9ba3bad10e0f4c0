"""Record the main job (and its `--compare` mode) as results files.

    python -m megatron_ultramem.experiments mainjob [--compare] [--out benchmarks/results] [--flags "..."]

Runs `python -m megatron_ultramem --no-progress` (or `... --compare --no-progress`) in a fresh
process with its default flags, times the whole command (imports included: what a user waits for),
and writes main_job_cpu.md/.json with the loss curve (or compare_cpu.md/.json with the two-model
plot) into --out.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from . import report

MAIN_BUDGET_S = 300
"""The main job's target on this 2-core CPU (README)."""


def main(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    flags = (["--compare"] if args.compare else []) + shlex.split(args.flags)
    command = "python -m megatron_ultramem " + " ".join(flags + ["--no-progress"])
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = os.path.join(tmp, "run")
        load_before = report.uptime()
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_ultramem", *flags, "--no-progress", "--output-dir", out_dir],
            capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        load_after = report.uptime()
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        name = "compare_cpu" if args.compare else "main_job_cpu"
        md = os.path.join(args.out, f"{name}.md")
        png = os.path.join(args.out, f"{name}.png")
        lines = report.header(
            "--compare: the main job's UltraMem model vs a matched MoE (CPU)" if args.compare
            else "Main job on this CPU", command, load_before, load_after,
        )  # fmt: skip
        if args.compare:
            with open(os.path.join(out_dir, "compare_metrics.json")) as f:
                r = json.load(f)
            shutil.copy(os.path.join(out_dir, "compare_loss_curve.png"), png)
            u, m = r["ultramem"], r["moe"]
            lines += [
                f"Wall time of the command: {wall:.0f} s (budget {r['budget_seconds']} s for the two "
                "runs).", "",
                "| model | parameters | final validation loss | final train loss (mean of last 10) "
                "| tokens/s |", "|---|---|---|---|---|",
                *(f"| {x['model']} | {x['parameters']:,} | {x['final_valid_loss']:.4f} "
                  f"| {x['final_train_loss']:.4f} | {x['tokens_per_second']:,.0f} |" for x in (u, m)),
                "", f"Matched (MoE vs UltraMem model, relative): {r['matched']['moe_vs_ultramem_relative']}; "
                f"MoE shape {r['moe_shape']}. Same seed and data order: {r['same_seed_and_data_order']}.",
                "", "One seed: the run-to-run spread at this size is about 0.005 (evidence_quality_cpu.md "
                "has the seeds).", "", f"Loss curves: `{os.path.basename(png)}`.",
            ]  # fmt: skip
            numbers = dict(ultramem=u["final_valid_loss"], moe=m["final_valid_loss"], wall_seconds=wall)
        else:
            with open(os.path.join(out_dir, "metrics.json")) as f:
                r = json.load(f)
            shutil.copy(os.path.join(out_dir, "loss_curve.png"), png)
            a = r["args"]
            lines += [
                "| what | value |", "|---|---|",
                f"| wall time, whole command | {wall:.1f} s (target < {MAIN_BUDGET_S} s) |",
                f"| training loop ({r['train_iters']} steps, {a['micro_batch_size']} x {a['seq_length']} "
                f"tokens) | {r['wall_seconds']:.1f} s, {r['tokens_per_second']:,.0f} tokens/s |",
                f"| train loss (byte LM, nats/byte), mean of {r['train_loss_window']} steps | "
                f"{r['first_train_loss']:.3f} (first) -> {r['final_train_loss']:.3f} (last) |",
                f"| validation loss | {r['initial_valid_loss']:.3f} (untrained) -> "
                f"{r['final_valid_loss']:.3f} |",
                f"| model | {r['model']}, {r['parameters']:,} params, {r['memory_layers']} memory "
                f"layers, {r['value_table_parameters']:,} value-table params |",
                "", f"Loss curve: `{os.path.basename(png)}`.",
            ]  # fmt: skip
            numbers = dict(
                wall_seconds=wall, train_iters=r["train_iters"],
                tokens_per_second=r["tokens_per_second"], first_train_loss=r["first_train_loss"],
                final_train_loss=r["final_train_loss"], train_loss_window=r["train_loss_window"],
                initial_valid_loss=r["initial_valid_loss"], final_valid_loss=r["final_valid_loss"],
            )  # fmt: skip
        report.write_report(md, lines, command, **numbers)
    print(f"wrote {md} ({wall:.0f} s)")
    return 0
