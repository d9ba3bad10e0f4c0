"""Evidence at CPU scale (issue 6).

    python -m megatron_ultramem.experiments quality [--quick] [--seeds 2] [--out DIR]
    python -m megatron_ultramem.experiments decode  [--quick] [--out DIR]
    python -m megatron_ultramem.experiments configs [--quick] [--build]

`quality` trains every matched configuration (configs.py) on the fact corpus (corpus.py) and writes
evidence_quality_cpu.md + .png; `decode` times one decode step of the MLP slot and counts the
parameter bytes it reads (decode.py) and writes evidence_decode_cpu.md; `configs` prints and
checks the matched configurations. `--quick` is the CI smoke size (files get a `_quick` suffix).
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_ultramem.experiments")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="train every configuration; loss, fact recall, tokens/s")
    q.add_argument("--quick", action="store_true", help="CI smoke size (< 90 s)")
    q.add_argument("--seeds", type=int, default=2, help="seeds of the headline pair (ultramem, moe)")
    q.add_argument("--out", default="benchmarks/results", help="where the .md and .png go")
    q.add_argument("--work", default=None, help="data cache and per-run JSON (default: a temp dir)")
    q.add_argument("--train-iters", type=int, default=None, help="override the step count")
    q.add_argument("--entities", type=int, default=None, help="override the corpus' entity count")
    q.add_argument("--only", default=None, help="comma-separated variant names")
    q.add_argument("--fresh", action="store_true", help="ignore finished runs saved under --work")
    q.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    d = sub.add_parser("decode", help="one decode step of the MLP slot: latency, bytes read")
    d.add_argument("--quick", action="store_true", help="CI smoke size")
    d.add_argument("--out", default="benchmarks/results")
    d.add_argument("--repeats", type=int, default=None, help="timed repeats per (config, batch)")
    d.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    d.add_argument("--no-profile", action="store_true", help="skip the profiler section")
    c = sub.add_parser("configs", help="print and check the matched configurations")
    c.add_argument("--quick", action="store_true")
    c.add_argument("--build", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quality":
        if args.seeds < 1:
            raise SystemExit("error: --seeds must be >= 1")
        from . import quality

        return quality.main(args)
    if args.command == "decode":
        from . import decode

        return decode.main(args)
    from . import configs

    return configs.main((["--quick"] if args.quick else []) + (["--build"] if args.build else []))


if __name__ == "__main__":
    sys.exit(main())
