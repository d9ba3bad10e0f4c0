"""Command-line plumbing shared by every entry point: one-line errors, exit code 2.

Every command of the package refuses bad input the same way, before any work starts: one line on
stderr that names the flag (or path, or environment variable) and the allowed values, exit code 2,
nothing written. `ArgumentParser` gives argparse's own errors that shape (argparse prints the
usage first, which for a few dozen options is a screenful), `fail` is the one exit for checks
after parsing, and the `type=` helpers put the allowed values into argparse's messages
("argument --threads: expected an integer >= 1, got '-1'").

Standard library only: the sizing helper and the launch scripts use it without torch or Megatron.
"""

import argparse
import contextlib
import math
import os
import sys
from typing import Iterator, NoReturn, Optional, Sequence

EXIT_BAD_INPUT = 2
"""argparse's exit status for a usage error; every bad-input refusal of the package uses it."""


class BadInput(ValueError):
    """A user input that is refused: the message names the flag/path and the allowed values."""


def fail(message: str) -> NoReturn:
    """Print `error: <message>` (one line) to stderr and exit with status 2."""
    text = " ".join(str(message).split())  # one line, whatever the message's formatting
    print(f"error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: <message> (--help lists the options)`."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        print(f"{self.prog}: error: {text} (--help lists the options)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)


# ---------------------------------------------------------------------- argparse types
def int_at_least(minimum: int, maximum: Optional[int] = None):
    """type= for an integer in [minimum, maximum]; the message states the range."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {allowed}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False):
    """type= for a finite float in [low, high] ((low, high] with low_open); nan/inf refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            left = f"> {low:g}" if low_open else f">= {low:g}"
            right = "" if high == math.inf else f" and <= {high:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {left}{right}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def int_list(minimum: int = 1):
    """type= for a comma-separated list of integers >= minimum (at least one)."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers >= {minimum} (e.g. 1,8,64), got {text!r}"
            )
        return values

    parse.__name__ = "integer list"
    return parse


def check_writable(path: str, flag: str) -> None:
    """Refuse (fail) a `path` that cannot become a writable directory. Creates nothing: the nearest
    existing ancestor must be a writable directory, probed with a temporary file."""
    probe_dir = os.path.abspath(path)
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        fail(f"{flag} {path}: {probe_dir} is not a directory")
    probe = os.path.join(probe_dir, f".ultramem_write_probe{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        fail(f"{flag} {path} is not writable ({err.strerror or err})")


def run_main(main, argv: Optional[Sequence[str]] = None) -> int:
    """Call `main(argv)`, turning a BadInput that escaped it into the one-line exit 2."""
    try:
        return main(argv)
    except BadInput as err:
        fail(str(err))


def repair_help_strings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Escape a bare '%' in help strings that argparse cannot format, so that `--help` works
    (megatron-core 0.19.2's --moe-paged-stash-buffer-size-factor-cuda says "10%)", which makes
    its whole --help fail)."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            try:
                formatter._expand_help(action)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    return parser


@contextlib.contextmanager
def bad_input_exits(prog: str) -> Iterator[None]:
    """Around a foreign parse-and-validate (Megatron's `parse_and_validate_args`): its argparse
    errors become one line (argparse prints Megatron's several-hundred-flag usage first otherwise),
    and a ValueError / AssertionError raised by its argument checks becomes `fail(message)`.
    `argparse.ArgumentParser.error` is swapped for the duration only."""
    original = argparse.ArgumentParser.error

    def error(self, message: str) -> NoReturn:
        print(f"{prog}: error: {' '.join(message.split())} (--help lists the options)",
              file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(EXIT_BAD_INPUT)

    argparse.ArgumentParser.error = error
    try:
        yield
    except (ValueError, AssertionError) as err:
        fail(str(err) or type(err).__name__)
    finally:
        argparse.ArgumentParser.error = original
