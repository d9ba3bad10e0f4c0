"""The docs a user can run: every command in README.md and docs/*.md, from a fresh copy of the
repository; no path of one machine anywhere in the docs or the results commands; the flag table,
the CI script and the README's numbers agree with the code.

Each shell command of a ```bash block must match one rule of COMMANDS, which says how it is
checked (and so why a command is not simply run):
  RUN      run as written (python -> this interpreter), in a fresh copy of the tracked files;
  HELP     needs GPUs, a long CPU run or placeholders: its program's `--help` runs instead;
  DRY_RUN  a launcher: run with DRY_RUN=1 and a stand-in Megatron-LM checkout (a placeholder
           argument list becomes a small MoE one);
  CI       an install + test command: .ci/run runs exactly this string (checked here);
  INSTALL  installs a third-party package: not run (the extra it names must exist);
  CHECKOUT needs a Megatron-LM clone (clone, patch, the verification runs): `bash -n` and every
           repository path it names exists.
A new command in the docs without a rule fails test_every_command_has_a_rule.

python -m pytest -q tests/test_docs.py
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

RUN, HELP, DRY_RUN, CI, INSTALL, CHECKOUT = "RUN", "HELP", "DRY_RUN", "CI", "INSTALL", "CHECKOUT"
COMMANDS = [
    # (regex over the whole command, mode, why)
    (r"pip install torch==2\.13\.0 && pip install -e \. && python -m megatron_ultramem", CI,
     "the quick start: CI's first virtualenv"),
    (r'pip install -e "\.\[test,dali,eval\]" && python -m pytest -q tests', CI, "the test command"),
    (r"bash \.ci/install-megatron-core-0\.19\.sh venv-mc019 && venv-mc019/bin/python -m pytest -q tests",
     CI, "CI's second virtualenv"),
    (r"python -m megatron_ultramem\.(sizing|megatron_lm\.convert) [^<]*", RUN, "standard library, instant"),
    (r"python -m megatron_ultramem\.megatron_lm\.convert .*<MoE model args>", HELP, "a placeholder"),
    (r"python -m megatron_ultramem\.experiments readme", RUN, "rebuilds the README: must leave it unchanged"),
    (r"python -m megatron_ultramem\.experiments (mainjob|quality|ablations|scaling|decode|capacity(-\w+)?)\b.*", HELP,
     "minutes to an hour of CPU each"),
    (r"python benchmarks/bench_decode\.py", HELP, "minutes of CPU"),
    (r"python -m megatron_ultramem --data-backend dali .*", HELP, "a full main-job run"),
    (r"python -m megatron_ultramem --save \S+ --save-interval \d+ --export-hf \S+", HELP, "a full main-job run"),
    (r"python -m megatron_ultramem\.(export_hf --load|import_hf --hf) .*", HELP,
     "needs a trained checkpoint (tests/test_export_hf.py runs both on one)"),
    (r"(cd examples/lm_eval && )?lm-eval run --model hf .*", HELP,
     "needs an exported model (tests/test_export_hf.py runs the local task through lm-eval's API)"),
    (r"torchrun .*-m megatron_ultramem\.pretrain .*", HELP, "pretrain() needs GPUs; placeholders"),
    (r"torchrun .*-m megatron_ultramem\.megatron_lm\.pretrain_gpt --megatron-lm .*", CHECKOUT,
     "a Megatron-LM checkout and GPUs"),
    (r"torchrun .*/path/to/Megatron-LM/pretrain_gpt\.py .*", CHECKOUT, "a patched checkout and GPUs"),
    (r"MEGATRON_LM_PATH=\S+ launch/train_single_node\.sh --dry-run .*", DRY_RUN, "prints the torchrun line"),
    (r"pip install ('megatron-ultramem\[dali\]'|nvidia-dali-cuda120|einops)", INSTALL, "a package"),
    (r"git clone -b core_\S+ https://github\.com/NVIDIA/Megatron-LM\.git \S+", CHECKOUT, "a download"),
    (r"git -C \S+ apply .*", CHECKOUT, "patches a clone"),
    (r"MEGATRON_LM_PATH=\S+ .*tests/megatron_lm/verify_megatron_lm\.py.*", CHECKOUT,
     "runs Megatron-LM's scripts from a clone"),
    (r"python -m pytest -q tests/megatron_lm tests/test_optim\.py( tests/\w+\.py)*", CI,
     "a subset of the test command"),
    (r"git clone https://github\.com/NVIDIA/Megatron-LM \S+ && git -C \S+ checkout [0-9a-f]{7,40}", CHECKOUT,
     "a download (Megatron-LM main, for the 0.20 verification)"),
    (r"python3 -m venv \S+ && PIP=\"\S+ -m pip\"", INSTALL, "the 0.20 verification's virtualenv"),
    (r"\$PIP install .*", INSTALL, "builds megatron-core from a Megatron-LM clone: minutes, by hand"),
]  # fmt: skip


def fenced_blocks(path):
    """(language, body) of every fenced block of a markdown file."""
    lang, body, out = None, [], []
    for line in open(os.path.join(ROOT, path)).read().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                out.append((lang, body))
                lang = None
        elif lang is not None:
            body.append(line)
    return out


def shell_commands(path):
    """The commands of a file's ```bash blocks, continuation lines joined, comment lines dropped."""
    out = []
    for lang, body in fenced_blocks(path):
        if lang not in ("bash", "sh"):
            continue
        current = ""
        for line in body:
            text = line.strip()
            if not current and (not text or text.startswith("#")):
                continue
            if text.endswith("\\"):
                current += text[:-1].strip() + " "
                continue
            out.append(re.sub(r"\s+#\s.*$", "", current + text).strip())  # an end-of-line comment
            current = ""
    return out


def rule_of(command):
    matches = [(mode, why) for pattern, mode, why in COMMANDS if re.fullmatch(pattern, command)]
    return matches[0] if matches else None


ALL = [(path, cmd) for path in DOCS for cmd in shell_commands(path)]


def test_every_command_has_a_rule():
    missing = [f"{path}: {cmd}" for path, cmd in ALL if rule_of(cmd) is None]
    assert not missing, "commands without a rule in tests/test_docs.py COMMANDS:\n" + "\n".join(missing)
    assert len(ALL) >= 25


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """The repository's tracked (and new, not ignored) files, as a clone would have them."""
    dest = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return str(dest)


def _env(copy):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DRY_RUN", "MEGATRON_LM_PATH")}
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHON"] = sys.executable
    return env


def _python(argv):
    return [sys.executable if a == "python" else a for a in argv]


SMALL_MOE = "--num-layers 4 --hidden-size 1024 --ffn-hidden-size 2816 --num-experts 8 --moe-router-topk 2 --swiglu"


def _help_argv(argv):
    """The program of a command, with --help: `python -m X`, `torchrun ... -m X`, a script."""
    if argv[0] == "lm-eval" or "lm-eval" in argv[:4]:  # the `eval` extra's console script
        return [sys.executable, "-m", "lm_eval", "run", "--help"]
    if "-m" in argv:
        return [sys.executable, "-m", argv[argv.index("-m") + 1], "--help"]
    script = next(a for a in argv if a.endswith(".py"))
    return [sys.executable, script, "--help"]


@pytest.mark.parametrize("path,command", ALL, ids=[f"{p}:{c[:70]}" for p, c in ALL])
def test_docs_command(path, command, fresh_copy):
    rule = rule_of(command)
    assert rule is not None, command
    mode, _ = rule
    env = _env(fresh_copy)
    if mode == CI:
        ci = open(os.path.join(ROOT, ".ci", "run")).read()
        if "tests/megatron_lm tests/test_optim.py" in command:  # a subset of the suite CI runs
            assert all(os.path.exists(os.path.join(fresh_copy, p)) for p in command.split()[4:])
            assert "python -m pytest -q tests'" in ci
            return
        assert f"'{command}'" in ci, f".ci/run does not run {command!r} as written"
        return
    if mode == INSTALL:
        if "megatron-ultramem[" in command:
            extra = re.search(r"\[(\w+)\]", command).group(1)
            assert f"\n{extra} = " in open(os.path.join(ROOT, "pyproject.toml")).read()
        return
    if mode == CHECKOUT:
        line = re.sub(r"<[^>]*>", "ARGS", command)
        proc = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        for word in shlex.split(line):
            word = word.split("=", 1)[-1]
            if re.match(r"^(tests|patches|launch|megatron_ultramem|\.\./patches)/", word):
                assert os.path.exists(os.path.join(fresh_copy, word.replace("../", ""))), word
        return
    argv = shlex.split(re.sub(r"<[^>]*>", "<placeholder>", command))
    if mode == DRY_RUN:
        stand_in = os.path.join(fresh_copy, "mlm")
        os.makedirs(stand_in, exist_ok=True)
        open(os.path.join(stand_in, "pretrain_gpt.py"), "w").close()
        words = [w for w in argv if w != "<placeholder>"] + (shlex.split(SMALL_MOE) if "<" in command else [])
        words = [w for w in words if "=" not in w or not w.startswith("MEGATRON_LM_PATH")]
        proc = subprocess.run(["bash", *words], cwd=fresh_copy, env=dict(env, MEGATRON_LM_PATH="mlm"),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("torchrun ") and "--spec megatron_ultramem.megatron_lm" in proc.stdout
        return
    if mode == HELP:
        proc = subprocess.run(_help_argv(argv), cwd=fresh_copy, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        if "megatron_ultramem.pretrain" in argv and "needs megatron.training" in proc.stderr:
            assert proc.returncode == 2  # megatron-core 0.16: the entry says what it needs
            return
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]
        return
    before = open(os.path.join(fresh_copy, "README.md")).read()
    proc = subprocess.run(_python(argv), cwd=fresh_copy, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert open(os.path.join(fresh_copy, "README.md")).read() == before  # nothing in the docs stale


MACHINE_PATH = re.compile(r"(?<![\w.~-])/(work|home|tmp|Users|root|opt|mnt|scratch|srv|data)/")


def test_no_path_of_a_machine():
    """README, docs/, examples/ and the commands recorded in benchmarks/results name no absolute
    path (/path/to/... placeholders are fine)."""
    import json

    found = []
    for path in DOCS + sorted(glob.glob(os.path.join(ROOT, "examples", "*.md"))):
        text = open(os.path.join(ROOT, path)).read()
        found += [f"{os.path.relpath(path, ROOT)}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")):
        command = json.load(open(path)).get("command", "")
        if MACHINE_PATH.search(command) or os.path.isabs(command.split(" ")[0]):
            found.append(f"{os.path.basename(path)}: {command}")
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.md")):
        for line in open(path):
            if line.startswith("Command (") and MACHINE_PATH.search(line):
                found.append(f"{os.path.basename(path)}: {line.strip()}")
    assert not found, found


def _cell_value(text):
    text = text.strip()
    if text in ("none", "hidden/2", "`--seed`"):
        return None
    if text in ("true", "false"):
        return text == "true"
    text = text.strip("`")
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def test_flag_table_equals_the_defaults():
    """The README's flag table: the default column is UltraMemConfig's, the main-job column what
    `python -m megatron_ultramem --help` prints (the parser's defaults)."""
    import dataclasses

    from megatron_ultramem import train
    from megatron_ultramem.config import UltraMemConfig

    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("| field | default | main job default | meaning |"):].split("\n\n")[0]
    config = {f.name: f.default for f in dataclasses.fields(UltraMemConfig) if f.name.startswith("ultramem_")}
    parser = vars(train.build_parser().parse_args([]))
    seen = set()
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = [n.strip("` ") for n in cells[0].split(",")]
        names = [n if n.startswith("ultramem_") else names[0].rsplit("_", 1)[0] + n for n in names]
        for name, default, main in zip(names, cells[1].split(", "), cells[2].split(", ")):
            assert _cell_value(default) == config[name], name
            assert _cell_value(main) == parser[name], name
            seen.add(name)
    assert seen == set(config)
    help_text = train.build_parser().format_help()
    for name in ("--ultramem-num-keys", "--ultramem-aux-loss-alpha", "--ultramem-seed", "--warmup-iters"):
        assert name in help_text
    assert "(default: 32)" in help_text and "(default: --seed)" in help_text


def test_readme_bytes_claim_is_the_sizing_table():
    """The README's opening numbers are the Mixtral sizing table's (examples/mixtral_to_ultramem.md,
    generated): equal bytes at batch 1, the batch-8 and batch-4096 ratios."""
    example = open(os.path.join(ROOT, "examples", "mixtral_to_ultramem.md")).read()
    ratios = dict(re.findall(r"^\s+(\d+)\s+\S+ \S+\s+\S+ \S+\s+([\d.]+)$", example, re.M))
    assert ratios["1"] == "1.00"
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert f"Mixtral 8x7B reads {ratios['8']}x fewer bytes per token at batch 8 and {ratios['4096']}x at 4096" in readme
    assert "as many bytes as the MoE's activated experts" in readme
