"""`python -m megatron_ultramem`: the main job (see train.py; `--help` lists the options)."""

import sys

from .train import main as _train_main


def main() -> int:
    _train_main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
