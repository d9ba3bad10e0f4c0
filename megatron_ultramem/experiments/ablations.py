"""Ablations of UltraMem at CPU scale, each against the full UltraMem of the quality sweep.

    python -m megatron_ultramem.experiments ablations [--quick] [--seeds 2] [--out DIR] [--wait-load 1.5]

Variants (configs.ABLATIONS, every one at the MoE's total and activated parameters, asserted):
without IVE (E=1), without TDQKR (r=1), without MCS (h=1), without the value-LR decay (rho0 = 1:
a constant 1x value LR) and with the previous init (the uncalibrated paper init, see
configs.uncalibrate_init). Same settings, corpus, training step and seeds as `quality`, so the
UltraMem baseline runs are the sweep's (loaded from the shared run cache, trained if missing).

The table puts each feature's effect, loss(UltraMem) - loss(UltraMem without it) (negative: the
feature helps), next to the paper's Table 2 change from adding it (ULTRAMEM.md). The paper's rows
are cumulative at 151M activated / 1.5B sparse parameters and 1T tokens; only the signs are
comparable, and a difference smaller than about two standard errors is not a sign at all.
"""

import os
import statistics
import time
from typing import Dict, List

from . import configs, report
from .quality import (
    by_variant,
    make_runner,
    mean_std,
    per_run_table,
    result_table,
    run_all,
    run_header,
    seeds_from_args,
    settings_from_args,
    setup_lines,
    variant_summary,
    write_report,
)


def effects(by: Dict[str, List[Dict]]) -> Dict[str, Dict]:
    """Per ablation: the feature's effect, loss(UltraMem) - loss(without it), its standard error
    (nan with one run on a side), the paired per-seed effects, and the paper's Table 2 change."""
    base = {r["seed"]: r["final_valid_loss"] for r in by["ultramem"]}
    out = {}
    for name in configs.ABLATIONS:
        rs = by.get(name)
        if not rs:
            continue
        feature, paper = configs.PAPER_TABLE2[name]
        a = [r["final_valid_loss"] for r in rs]
        u = list(base.values())
        effect = statistics.mean(u) - statistics.mean(a)
        if len(a) > 1 and len(u) > 1:
            se = (statistics.variance(a) / len(a) + statistics.variance(u) / len(u)) ** 0.5
        else:
            se = float("nan")
        out[name] = {
            "feature": feature,
            "seeds": len(rs),
            "effect": effect,
            "stderr": se,
            "paired": [base[r["seed"]] - r["final_valid_loss"] for r in rs if r["seed"] in base],
            "paper": paper,
        }
    return out


def effect_rows(by: Dict[str, List[Dict]]) -> List[str]:
    """One row per ablation: the feature's effect with its standard error, next to the paper's."""
    lines = [
        "| ablation | feature | seeds | val loss | feature's effect: UltraMem - ablation | std error "
        "| effect / std error | paired per-seed effects | paper Table 2 (adding it) | same sign as "
        "the paper? |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in effects(by).items():
        effect, se, paper = e["effect"], e["stderr"], e["paper"]
        ratio = effect / se if se and se == se else float("nan")
        if abs(ratio) < 2:
            agree = f"{'yes' if effect * paper > 0 else 'no'} (within noise: |effect| < 2 std errors)"
        else:
            agree = "yes" if effect * paper > 0 else "**no**"
        a = [r["final_valid_loss"] for r in by[name]]
        lines.append(
            f"| `{name}` | {e['feature']} | {e['seeds']} | {mean_std(a)} | {effect:+.4f} | {se:.4f} "
            f"| {ratio:+.1f} | {', '.join(f'{p:+.4f}' for p in e['paired'])} | {paper:+.3f} | {agree} |"
        )
    return lines


def main(args) -> int:
    settings = settings_from_args(args)
    seeds = seeds_from_args(args, 2)
    runner = make_runner(args, settings)
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    load_before = report.uptime()
    t_start = time.perf_counter()
    variants, _, table = configs.describe(settings.size)
    by_name = {v.name: v for v in variants}
    names = ("ultramem",) + configs.ABLATIONS
    run_all([(runner, by_name[n], seed) for seed in range(seeds) for n in names], args.jobs, args.threads)
    wall = time.perf_counter() - t_start
    load_after = report.uptime()
    results = runner.results
    by = by_variant(results)

    lines = run_header(
        "Ablations of UltraMem at CPU scale" + (" - QUICK smoke run, not evidence" if args.quick else ""),
        report.command_line(), load_before, load_after, runner, wall,
    )
    lines += ["## Set-up", "",
              *setup_lines(settings, runner.fc, f"{seeds} for UltraMem and each ablation."),
              "- The UltraMem baseline is the quality sweep's `ultramem` (same settings key and "
              "seeds; loaded from its run files when the sweep ran first).",
              "- Previous init: the model is built with the calibrated paper init and each memory "
              "layer's values are then multiplied by `UltraMemLayer.winner_score_rms()`, the factor "
              "the calibration divides the paper's value std by (configs.uncalibrate_init): values "
              "~ N(0, E/(2 m H L)) as before the calibration, output variance 20-46x 1/(2L).",
              "- Without the value-LR decay: `ultramem_value_lr_mult` = 1.0 (rho0 = 1, a constant "
              "1x value LR) instead of 4 decaying linearly to 1.", "",
              "## Variants (counts asserted on the built models)", ""]  # fmt: skip
    for name in names:
        lines.append(f"- `{name}`: {by_name[name].description}")
    lines += ["", *[row for row in table if row.split("|")[1].strip() in ("variant", "moe", "---")
                    or row.split("|")[1].strip() in names], ""]  # fmt: skip
    lines += ["## Effects", "",
              "Feature's effect = mean val loss of UltraMem - mean val loss without the feature "
              "(negative: the feature lowers the loss, like the paper's Table 2 numbers). std error "
              "= sqrt(s_u^2/n_u + s_a^2/n_a) from the two groups' sample stds. The paper's numbers "
              "are at 151M activated parameters and 1T tokens, cumulative over its ablation ladder; "
              "compare signs only.", "", *effect_rows(by), "",
              "## Results", "", *result_table(results, names), "",
              "## Per run", "", *per_run_table(results)]  # fmt: skip
    md = os.path.join(args.out, f"evidence_ablations_cpu{suffix}.md")
    write_report(md, lines, results, effects=effects(by),
                 variants={n: variant_summary(by[n]) for n in names if n in by})  # fmt: skip
    print(f"wrote {md} ({wall / 60:.1f} min)", flush=True)
    return 0
