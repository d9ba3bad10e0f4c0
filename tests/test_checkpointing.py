"""Main-job checkpoints: the manifest, damage found before loading, resuming an older iteration by
number, and extending a run with a larger --train-iters.

The checkpoint is conftest's `tiny_checkpoint` (iterations 1 and 2 of TINY_RUN). The bad-input
table (test_bad_inputs.py) holds the refusals of damaged checkpoints through the command line.

python -m pytest -q tests/test_checkpointing.py
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from megatron_ultramem import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megatron_ultramem", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip


def _metrics(path):
    with open(path) as f:
        return json.load(f)


def test_manifest_lists_every_file_with_size_and_sha256(tiny_checkpoint):
    ck, _ = tiny_checkpoint
    for it in (1, 2):
        d = checkpointing.iteration_dir(ck, it)
        manifest = json.load(open(os.path.join(d, checkpointing.MANIFEST)))["files"]
        on_disk = sorted(
            os.path.relpath(os.path.join(b, n), d) for b, _, names in os.walk(d) for n in names
        )
        assert sorted(manifest) == [f for f in on_disk if f != checkpointing.MANIFEST]
        for rel, entry in manifest.items():
            data = open(os.path.join(d, rel), "rb").read()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        checkpointing.verify_checkpoint(ck, it)
    assert checkpointing.iterations(ck) == [1, 2] and checkpointing.resolve_iteration(ck) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_one_byte", "delete", "append"])
def test_any_damage_to_any_file_is_found(tiny_checkpoint, tmp_path, damage):
    """Every file of iteration 2, damaged in one way: resolve_iteration names it and points at
    iteration 1 (the newest intact one)."""
    ck, _ = tiny_checkpoint
    files = json.load(open(os.path.join(checkpointing.iteration_dir(ck, 2), "manifest.json")))["files"]
    for rel in files:
        copy = tmp_path / f"ck_{abs(hash(rel))}"
        shutil.copytree(ck, copy)
        path = os.path.join(checkpointing.iteration_dir(str(copy), 2), rel)
        size = os.path.getsize(path)
        if damage == "truncate":
            os.truncate(path, size // 2)
        elif damage == "flip_one_byte":
            with open(path, "r+b") as f:
                f.seek(size // 2)
                byte = f.read(1)
                f.seek(size // 2)
                f.write(bytes([byte[0] ^ 0x01]))
        elif damage == "delete":
            os.remove(path)
        else:
            with open(path, "ab") as f:
                f.write(b"\0")
        with pytest.raises(checkpointing.CheckpointError) as info:
            checkpointing.resolve_iteration(str(copy))
        message = str(info.value)
        assert f"iter_0000002/{rel}" in message and "--ckpt-step 1" in message, message
        assert checkpointing.resolve_iteration(str(copy), 1) == 1  # the older one still loads
        shutil.rmtree(copy)


def test_resume_an_older_iteration_by_number(tiny_checkpoint, tmp_path):
    """--load DIR --ckpt-step 1 continues from iteration 1 exactly: step 2's loss equals the
    original run's step 2, bit for bit (CPU, one thread, same data position, optimizer, RNG)."""
    ck, flags = tiny_checkpoint
    original = _metrics(os.path.join(os.path.dirname(ck), "out", "metrics.json"))
    shutil.copytree(ck, tmp_path / "ck")
    proc = _run(flags + ["--load", "ck", "--ckpt-step", "1", "--output-dir", "again"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _metrics(tmp_path / "again" / "metrics.json")
    assert again["resumed_from_iteration"] == 1
    assert again["train_loss"] == original["train_loss"]  # step 1 from the history, step 2 recomputed
    assert again["learning_rate"] == original["learning_rate"]


def _cosine(step, lr, min_lr, warmup, decay):
    """Megatron's OptimizerParamScheduler 'cosine' LR at num_steps = step (linear warmup)."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def test_extending_train_iters_takes_the_longer_schedule(tiny_checkpoint, tmp_path):
    """A run saved at its end (2 of 2 steps) resumed with --train-iters 5: steps 1-2 keep the
    saved history, steps 3-5 train with the schedule of a 5-step run (cosine to step 5, the value
    LR multiplier decaying over 5 steps), computed here independently. The weights at step 2 are
    the 2-step run's, so the losses cannot equal a 5-step run's (test_extension_equals_... shows
    they do where the two schedules coincide)."""
    ck, flags = tiny_checkpoint
    original = _metrics(os.path.join(os.path.dirname(ck), "out", "metrics.json"))
    shutil.copytree(ck, tmp_path / "ck")
    proc = _run(flags + ["--load", "ck", "--train-iters", "5", "--output-dir", "ext"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ext = _metrics(tmp_path / "ext" / "metrics.json")
    assert ext["resumed_from_iteration"] == 2 and ext["train_iters"] == 5
    for step in ("1", "2"):
        assert ext["train_loss"][step] == original["train_loss"][step]
        assert ext["learning_rate"][step] == original["learning_rate"][step]
    lr, min_lr, warmup = 3e-3, 3e-4, 0  # the main job's --lr / --min-lr; warmup min(20, 2 // 10)
    for step in (3, 4, 5):
        want = _cosine(step, lr, min_lr, warmup, 5)
        # relative 1e-12: the same float64 formula, evaluated in another order by Megatron
        assert ext["learning_rate"][str(step)] == pytest.approx(want, rel=1e-12)
        mult = 1 + (4.0 - 1) * max(0.0, 1 - step / 5)  # rho0 = 4 decaying linearly to 1 at step 5
        assert ext["value_learning_rate"][str(step)] == pytest.approx(want * mult, rel=1e-12)
    # the start prints the model's size, the end compares like with like
    first = next(l for l in proc.stdout.splitlines() if l.startswith("model: "))
    assert f"{ext['parameters']:,} parameters" in first
    last = proc.stdout.strip().splitlines()[-1]
    assert "(resumed after 2)" in last and "train loss, mean of 1 step," in last


def test_extension_equals_the_uninterrupted_run_when_schedules_coincide(tmp_path):
    """With a constant LR (--min-lr = --lr, no warmup, --ultramem-value-lr-mult 1) the 2-step and
    the 4-step schedule agree on steps 1-2, so a 2-step run extended to 4 must equal an
    uninterrupted 4-step run bit for bit: the data position, optimizer state and RNG carry over."""
    from tests.conftest import TINY_RUN

    const = [a for a in TINY_RUN] + ["--lr", "1e-3", "--min-lr", "1e-3", "--warmup-iters", "0",
                                     "--ultramem-value-lr-mult", "1"]  # fmt: skip
    flags = lambda n: const + ["--train-iters", str(n)]  # the last value wins
    full = _run(flags(4) + ["--output-dir", "full"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    short = _run(flags(2) + ["--output-dir", "short", "--save", "ck", "--save-interval", "2"], tmp_path)
    assert short.returncode == 0, short.stderr[-3000:]
    ext = _run(flags(4) + ["--output-dir", "ext", "--load", "ck"], tmp_path)
    assert ext.returncode == 0, ext.stderr[-3000:]
    a, b = _metrics(tmp_path / "full" / "metrics.json"), _metrics(tmp_path / "ext" / "metrics.json")
    assert b["resumed_from_iteration"] == 2
    assert b["train_loss"] == a["train_loss"] and b["valid_loss"] == a["valid_loss"]


def test_short_runs_get_a_short_warmup():
    """`python -m megatron_ultramem --train-iters 20` is accepted: the warmup default is
    min(20, --train-iters // 10); an explicit one must stay below --train-iters."""
    from megatron_ultramem import train

    for iters, warmup in ((20, 2), (6, 0), (250, 20), (1000, 20)):
        args = train.parse_args(["--train-iters", str(iters)])
        train.validate_args(args)
        assert args.warmup_iters == warmup
