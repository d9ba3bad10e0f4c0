"""`python -m megatron_ultramem`: the main job (train.py; `--help` lists the options).

`--compare` trains the same model and a MoE of matched size (experiments/compare.py). The dispatch
lives here, not in train.py, so that train.py never imports compare.py, which imports train.py.
"""

import sys
from typing import Dict, List, Optional


def run(argv: Optional[List[str]] = None) -> Dict:
    """Parse and validate (a bad flag exits with status 2 before any work), then train."""
    from . import train

    args = train.parse_args(argv)
    train._quiet_megatron()
    if args.compare:
        from .experiments.compare import compare

        return compare(args)
    at_end = None
    if args.export_hf is not None:  # the trained model as a Hugging Face folder
        from .export_hf import export_after_training as at_end
    return train.train(args, at_end=at_end)


def main() -> int:
    run(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
