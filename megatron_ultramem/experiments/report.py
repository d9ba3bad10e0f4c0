"""What every results file records: date, machine, versions, the exact command, machine load."""

import os
import platform
import shlex
import subprocess
import sys
from typing import Dict, List


def _run(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:  # pragma: no cover - informational only
        return f"({cmd} failed: {err})"


def now() -> str:
    """UTC date and time, e.g. 2026-12-02 01:23:45."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def uptime() -> str:
    """`uptime` output (the load averages over 1/5/15 minutes)."""
    return _run("uptime")


def versions() -> Dict[str, str]:
    import torch

    try:
        import megatron.core

        mcore = getattr(megatron.core, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        mcore = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": mcore,
        "torch threads": str(torch.get_num_threads()),
    }


PLACEHOLDERS = {"--work": "W"}
"""Flags whose value is a folder of this machine, and the placeholder a results file records
(readme.py also rewrites files written before command_line did)."""


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def portable(args) -> List[str]:
    """Arguments with no path of this machine: absolute paths inside the repository become
    relative to its root; outside it, `--work`'s value becomes W (the README's name for the run
    cache) and any other one DIR."""
    out, previous = [], None
    for arg in args:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--") and os.path.isabs(value):  # --work=/path
            out.append(f"{flag}={PLACEHOLDERS.get(flag, 'DIR')}")
            previous = arg
            continue
        if os.path.isabs(arg):
            inside = os.path.relpath(arg, REPO_ROOT)
            if not inside.startswith(".."):
                arg = inside
            else:
                arg = PLACEHOLDERS.get(previous, "DIR")
        out.append(arg)
        previous = arg
    return out


def command_line_of(argv: List[str]) -> str:
    """`python -m megatron_ultramem.experiments` + argv (portable paths), as a results file records it."""
    return "python -m megatron_ultramem.experiments " + " ".join(shlex.quote(a) for a in portable(argv))


def command_line() -> str:
    """The command as typed (this process' sys.argv)."""
    return command_line_of(sys.argv[1:])


def _where() -> str:
    rel = os.path.relpath(os.getcwd(), REPO_ROOT)
    if rel == ".":
        return "the repository root"
    return f"`{rel}` in the repository" if not rel.startswith("..") else "outside the repository"


def header(title: str, command: str, load_before: str, load_after: str) -> List[str]:
    """Markdown lines: title, date, machine (lscpu | head -20, `nproc --all`: the cores, whatever
    OMP_NUM_THREADS says), versions, command, load."""
    v = versions()
    mem_kib = _run("awk '/MemTotal/ {print $2}' /proc/meminfo")
    ram = f"{int(mem_kib) / 2**20:.0f} GiB" if mem_kib.isdigit() else "unknown"
    return [
        f"# {title}",
        "",
        f"Date: `{_run('date')}`",
        "",
        f"Machine: nproc --all = {_run('nproc --all')}, RAM {ram}, no GPU used (CPU run). "
        "`lscpu | head -20`:",
        "",
        "```",
        _run("lscpu | head -20"),
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        f"Command (from {_where()}): `{command}`",
        "",
        "Machine load (`uptime`; the 2 cores are shared with other engineers' processes):",
        f"- before: `{load_before}`",
        f"- after: `{load_after}`",
        "",
    ]


def write_report(md_path: str, lines: List[str], command: str, **numbers) -> str:
    """A results file: its markdown `lines`, and next to it (`X.md` -> `X.json`) its headline
    `numbers` with date, machine, versions and command, for `python -m megatron_ultramem.experiments
    readme`, which builds the README's results table from these JSON files only. The JSON is
    written atomically. Returns its path."""
    import json

    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    path = os.path.splitext(md_path)[0] + ".json"
    lscpu = _run("lscpu | grep -i 'model name'")
    blob = {
        "file": os.path.basename(md_path),
        "date": now() + " UTC",
        "machine": f"{_run('nproc --all')} cores, {' '.join(lscpu.split(':', 1)[-1].split())}, no GPU",
        "versions": versions(),
        "command": command,
        **numbers,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(blob, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
