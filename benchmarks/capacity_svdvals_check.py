"""The capacity experiment's tuned UltraMem at the headline point (F=400, 5 seeds) trained with the
Tucker aux loss's singular values from torch.linalg.svdvals, the code before issue 16, instead of
`reference.singular_values` (closed form for r = 2). The two agree to float32 rounding (~1e-7
relative, value and gradient); this check measures how far that alone moves recall (README, "How
far to trust single runs"). `--closed-form` runs the same five seeds with the plugin's code.

    python benchmarks/capacity_svdvals_check.py --work W                # evidence_capacity_svdvals_cpu.*
    python benchmarks/capacity_svdvals_check.py --closed-form --work W  # evidence_capacity_closed_form_cpu.*

Seeds 0-2 are the capacity command's own runs (evidence_capacity_cpu.*), so with the same --work
the closed-form check trains only seeds 3 and 4; the svdvals runs are saved under W/svdvals.
Other flags go to `python -m megatron_ultramem.experiments capacity` (--work, --out, --quick, ...). Runs train one at a time:
the svdvals patch lives in this process.
"""

import os
import sys
import tempfile

import torch

ARGV = ["capacity", "--variants", "ultramem_tuned", "--facts", "400", "--seeds", "5",
        "--headline-seeds", "5", "--threads", "1"]  # fmt: skip
NOTES = {
    "svdvals": ("Tuned UltraMem with torch.linalg.svdvals in the aux loss (CPU)",
                "Check: these runs differ from `evidence_capacity_closed_form_cpu.*` (the same seeds) in "
                "one place only: `torch.linalg.svdvals` replaces `reference.singular_values` (closed "
                "form) in the Tucker aux loss (`benchmarks/capacity_svdvals_check.py`)."),
    "closed_form": ("Tuned UltraMem with the plugin's closed-form singular values (CPU)",
                    "Check: the counterpart of `evidence_capacity_svdvals_cpu.*` (the same seeds, the "
                    "aux loss's singular values in closed form as the plugin computes them; seeds 0-2 "
                    "are `evidence_capacity_cpu.*`'s runs)."),
}


def main(argv) -> int:
    from megatron_ultramem import reference
    from megatron_ultramem.experiments import __main__ as experiments
    from megatron_ultramem.experiments import report

    kind = "closed_form" if "--closed-form" in argv else "svdvals"
    report.command_line = lambda: "python benchmarks/capacity_svdvals_check.py " + " ".join(
        report.portable(argv))
    name = f"evidence_capacity_{kind}_cpu"
    args = [a for a in argv if a != "--closed-form"]
    if kind == "svdvals":
        # layer.tucker_aux_loss reads reference.singular_values at call time (one process, --jobs 1)
        reference.singular_values = lambda summed_core, sweeps=None: torch.linalg.svdvals(summed_core)
        # its runs in their own cache, W/svdvals: never loaded as the plugin's
        work = args[args.index("--work") + 1] if "--work" in args else os.path.join(
            tempfile.gettempdir(), "megatron_ultramem_experiments")  # make_runner's default
        args = [a for i, a in enumerate(args) if a != "--work" and args[i - 1:i] != ["--work"]]
        args += ["--work", os.path.join(work, "svdvals")]
    rc = experiments.main(ARGV + ["--name", name] + args)
    out = argv[argv.index("--out") + 1] if "--out" in argv else "benchmarks/results"
    md = os.path.join(out, name + ".md")
    if rc == 0 and os.path.exists(md):
        title, note = NOTES[kind]
        lines = open(md).read().split("\n")
        lines[0] = "# " + title
        lines[1:1] = ["", note]
        with open(md + ".tmp", "w") as f:
            f.write("\n".join(lines))
        os.replace(md + ".tmp", md)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
