"""Bad input at every entry point: one line naming the flag/path and the allowed values, exit
status 2, nothing written, no traceback.

The table below has one row per bad input: `Case(entry, argv, expect, env=..., setup=...)`.
`expect` are substrings the single error line must contain (the flag, path or variable, and the
allowed values). Every row checks: exit status 2; stderr is exactly one line (Python warnings from
imports are not the error and are silenced); no "Traceback"; each `expect` substring; the case's
working directory holds the same files afterwards (nothing written, no half-made output). A
launcher's stderr may also carry the converter's `note:` lines from the step that succeeded.

Entry points (ENTRIES) run in-process where the entry checks its arguments before any heavy work
(fast: one import, then microseconds a row), as a subprocess where the real process matters
(the launchers, and one `sub=True` row per Python entry that runs `python -m ...` for real).

To add an entry point: one line in ENTRIES, e.g. `"export":
Entry(module="megatron_ultramem.export_hf", call=_main_of("megatron_ultramem.export_hf"))`, then
rows `Case("export", [...], ("--load", "allowed ..."))`, one line each. `setup` names a function
of SETUPS that prepares files in the case's directory (a file where a directory is expected, a
damaged checkpoint, ...); one that needs a session fixture (the tiny main-job checkpoint, its
Hugging Face export) names it in its `fixture` attribute.

python -m pytest -q tests/test_bad_inputs.py
"""

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------- entry points
@dataclass(frozen=True)
class Entry:
    """How an entry point runs: `module` for `python -m`, `call(argv)` in-process (None: only as a
    subprocess), `script` for a shell launcher."""

    module: Optional[str] = None
    call: Optional[Callable] = None
    script: Optional[str] = None


def _main_of(module: str, name: str = "main") -> Callable:
    def call(argv):
        from megatron_ultramem.cli import run_main

        return run_main(getattr(importlib.import_module(module), name), argv)

    return call


def _main_job(argv):
    """What `python -m megatron_ultramem` does before any work (__main__.run: parse; --compare's
    own checks; train() and compare() start with validate_args)."""
    from megatron_ultramem import train

    args = train.parse_args(argv)
    if args.compare:
        from megatron_ultramem.experiments.compare import _check_args

        _check_args(args)
    train.validate_args(args)
    return 0  # accepted: the row fails


def _pretrain(argv):
    from megatron_ultramem import pretrain

    pretrain.require_megatron_training()
    pretrain.parse_args(argv)  # Megatron's parse + validate and the plugin's, no global state on error
    return 0


def _wrapper(argv):
    """The Megatron-LM wrapper up to the point where it runs the checkout's script."""
    from megatron_ultramem.megatron_lm import pretrain_gpt

    path, rest = pretrain_gpt.split_megatron_lm_path(argv)
    name, rest = pretrain_gpt._take_option(rest, "--megatron-lm-script")
    pretrain_gpt.resolve_script(path, name or "pretrain_gpt.py")
    return 0


ENTRIES: Dict[str, Entry] = {
    "main": Entry(module="megatron_ultramem", call=_main_job),
    "pretrain": Entry(module="megatron_ultramem.pretrain", call=_pretrain),
    "wrapper": Entry(module="megatron_ultramem.megatron_lm.pretrain_gpt", call=_wrapper),
    "sizing": Entry(module="megatron_ultramem.sizing", call=_main_of("megatron_ultramem.sizing")),
    "convert": Entry(module="megatron_ultramem.megatron_lm.convert",
                     call=_main_of("megatron_ultramem.megatron_lm.convert")),  # fmt: skip
    "experiments": Entry(module="megatron_ultramem.experiments",
                         call=_main_of("megatron_ultramem.experiments.__main__")),  # fmt: skip
    "export": Entry(module="megatron_ultramem.export_hf", call=_main_of("megatron_ultramem.export_hf")),
    "import": Entry(module="megatron_ultramem.import_hf", call=_main_of("megatron_ultramem.import_hf")),
    "single": Entry(script="launch/train_single_node.sh"),
    "multi": Entry(script="launch/train_multi_node.sh"),
    "slurm": Entry(script="launch/train_slurm.sbatch"),
}


# ---------------------------------------------------------------------- setups (files in the case dir)
def _file(d):
    (d / "a_file").write_text("not a directory")


def _empty_dir(d):
    (d / "empty").mkdir()


def _checkout(d):
    (d / "mlm").mkdir()
    (d / "mlm" / "pretrain_gpt.py").write_text("")


def _ck(damage: Optional[Callable] = None):
    def setup(d, ckpt):
        shutil.copytree(ckpt, d / "ck")
        if damage:
            damage(d / "ck")

    setup.fixture = "tiny_checkpoint"
    return setup


def _hf(d, export):
    """The tiny checkpoint's Hugging Face export as `hf`."""
    shutil.copytree(export[0], d / "hf")


_hf.fixture = "tiny_export"


def _megatron_lm(**changes):
    """A Megatron-LM-style checkpoint (the `--for pretrain` import of the tiny export) as `ck`,
    its saved arguments changed: a model the export must refuse."""

    def setup(d, export):
        import argparse

        import torch
        from megatron.core import dist_checkpointing

        shutil.copytree(os.path.join(export[1], "release"), d / "ck" / "iter_0000001")
        (d / "ck" / "latest_checkpointed_iteration.txt").write_text("1")
        common = dist_checkpointing.load_common_state_dict(str(d / "ck" / "iter_0000001"))
        common["args"] = argparse.Namespace(**{**vars(common["args"]), **changes})
        # common.pt: where 0.16 keeps the common state, and what 0.19 (which keeps it inside the
        # torch_dist files) still reads first
        torch.save(common, d / "ck" / "iter_0000001" / "common.pt")

    setup.fixture = "tiny_export"
    return setup


def _truncate(rel, size=100):
    def damage(ck):
        with open(ck / rel, "r+b") as f:
            f.truncate(size)

    return damage


def _delete(rel, *fallbacks):
    """Delete `rel` (or the first fallback that exists: megatron-core 0.19's dist_checkpointing
    writes no common.pt)."""

    def damage(ck):
        path = next((ck / r for r in (rel, *fallbacks) if (ck / r).exists()), ck / rel)
        os.remove(path)

    return damage


def _flip(rel, offset=64, length=4096):
    def damage(ck):
        with open(ck / rel, "r+b") as f:
            f.seek(offset)
            data = f.read(length)
            f.seek(offset)
            f.write(bytes(b ^ 0xFF for b in data))

    return damage


def _write(rel, text):
    return lambda ck: (ck / rel).write_text(text)


def _both(*damages):
    return lambda ck: [d(ck) for d in damages]


SETUPS = {
    "a_file": _file,
    "empty_dir": _empty_dir,
    "checkout": _checkout,
    "ck": _ck(),
    "ck_truncated_shard": _ck(_truncate("iter_0000002/__0_0.distcp")),
    "ck_no_metadata": _ck(_delete("iter_0000002/.metadata")),
    "ck_no_common": _ck(_delete("iter_0000002/common.pt", "iter_0000002/metadata.json")),
    "ck_truncated_state": _ck(_truncate("iter_0000002/ultramem_state.json", 10)),
    "ck_flipped": _ck(_flip("iter_0000002/__0_0.distcp")),
    "ck_no_manifest": _ck(_delete("iter_0000002/manifest.json")),
    "ck_bad_tracker": _ck(_write("latest_checkpointed_iteration.txt", "banana")),
    "ck_tracker_past": _ck(_write("latest_checkpointed_iteration.txt", "7")),
    "ck_rng_deleted": _ck(_delete("iter_0000002/rng_rank0.pt")),
    "ck_both_damaged": _ck(_both(_truncate("iter_0000002/ultramem_state.json"), _flip("iter_0000001/__0_0.distcp"))),
    "ck_old_damaged": _ck(_truncate("iter_0000001/__0_0.distcp")),
    "hf": _hf,
    "mlm_no_memory": _megatron_lm(ultramem_mode=None),
    "mlm_moe": _megatron_lm(num_experts=4),
    "mlm_squared_relu": _megatron_lm(squared_relu=True),
}


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    entry: str
    argv: Sequence[str]
    expect: Tuple[str, ...]
    env: Dict[str, str] = field(default_factory=dict)
    setup: Optional[str] = None
    sub: bool = False  # also run as a real `python -m` process
    issue: bool = False  # one of the cases listed in issue 17
    expect_016: Optional[Tuple[str, ...]] = None  # pretrain: what megatron-core 0.16 says instead

    def id(self) -> str:
        text = " ".join(self.argv)
        if len(text) > 100:
            text = text[:40] + "~" + text[-60:]
        if self.env:
            text += " " + " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.entry}:{self.setup or ''}:{text}".replace(" ", "_")


from tests.conftest import TINY_RUN as CK  # noqa: E402  (the checkpoint's own flags)

NEED_TRAINING = ("needs megatron.training from megatron-core >= 0.19",)
PT = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
      "--max-position-embeddings 32 --micro-batch-size 1 --train-iters 1 --lr 1e-4 --mock-data "
      "--tokenizer-type NullTokenizer --vocab-size 128 --transformer-impl local").split()  # fmt: skip
MOE = "--num-layers 4 --hidden-size 1024 --ffn-hidden-size 2816 --num-experts 8 --moe-router-topk 2 --swiglu".split()
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
LAUNCH = {"MEGATRON_LM_PATH": "mlm", "NPROC_PER_NODE": "8", "DRY_RUN": "1"}
MULTI = {**LAUNCH, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0"}


def _pt(*extra, expect, **kw):
    return Case("pretrain", [*PT, *extra], expect, expect_016=NEED_TRAINING, **kw)


CASES = [
    # ------------------------------------------------------------ main job: python -m megatron_ultramem
    Case("main", ["--tensor-model-parallel-size", "0"], ("--tensor-model-parallel-size", ">= 1"), sub=True, issue=True),
    Case("main", ["--expert-model-parallel-size", "-1"], ("--expert-model-parallel-size", ">= 1"), issue=True),
    Case("main", ["--threads", "-1"], ("--threads", ">= 1"), issue=True),
    Case("main", ["--threads", "abc"], ("--threads", "'abc'")),
    Case("main", [], ("RANK=0", "torchrun", "WORLD_SIZE"), env={"RANK": "0"}, issue=True),
    Case("main", [], ("RANK", "WORLD_SIZE=abc", "integers"), env={**TORCHRUN, "WORLD_SIZE": "abc"}),
    Case("main", [], ("RANK=3", "0 <= RANK < WORLD_SIZE"), env={**TORCHRUN, "RANK": "3", "WORLD_SIZE": "2"}),
    Case("main", ["--tensor-model-parallel-size", "3"], ("--tensor-model-parallel-size 3", "divide the world size 1")),
    Case("main", ["--expert-model-parallel-size", "2"], ("--expert-model-parallel-size 2", "divide the world size")),
    Case("main", ["--train-iters", "0"], ("--train-iters", ">= 1")),
    Case("main", ["--train-iters", "abc"], ("--train-iters", "'abc'")),
    Case("main", ["--train-iters", "20", "--warmup-iters", "20"], ("--warmup-iters", "[0, 20)")),
    Case("main", ["--warmup-iters", "-1"], ("--warmup-iters", ">= 0")),
    Case("main", ["--lr", "0"], ("--lr", "> 0")),
    Case("main", ["--lr", "nan"], ("--lr", "finite")),
    Case("main", ["--lr", "inf"], ("--lr", "finite")),
    Case("main", ["--min-lr", "1"], ("--min-lr 1.0", "<= --lr")),
    Case("main", ["--weight-decay", "-0.1"], ("--weight-decay", ">= 0")),
    Case("main", ["--clip-grad", "-1"], ("--clip-grad", ">= 0")),
    Case("main", ["--hidden-size", "130"], ("--hidden-size (130)", "divisible by --num-attention-heads (4)")),
    Case("main", ["--num-layers", "0"], ("--num-layers", ">= 1")),
    Case("main", ["--num-attention-heads", "-4"], ("--num-attention-heads", ">= 1")),
    Case("main", ["--ffn-hidden-size", "x"], ("--ffn-hidden-size", "'x'")),
    Case("main", ["--seq-length", "0"], ("--seq-length", ">= 1")),
    Case("main", ["--micro-batch-size", "-2"], ("--micro-batch-size", ">= 1")),
    Case("main", ["--eval-interval", "0"], ("--eval-interval", ">= 1")),
    Case("main", ["--eval-iters", "0"], ("--eval-iters", ">= 1")),
    Case("main", ["--seed", "-1"], ("--seed", ">= 0")),
    Case("main", ["--ultramem-topm", "1000"], ("--ultramem-topm", "allowed 1..64")),
    Case("main", ["--ultramem-topm", "0"], ("--ultramem-topm", ">= 1")),
    Case("main", ["--ultramem-mode", "bogus"], ("--ultramem-mode", "'parallel'")),
    Case("main", ["--ultramem-expansion", "3"], ("--ultramem-expansion", "perfect square")),
    Case("main", ["--ultramem-num-cores", "3"], ("--ultramem-value-dim (Dv=64)", "--ultramem-num-cores (h=3)")),
    Case("main", ["--ultramem-layers", "[0,1]"], ("--ultramem-layers has 2 entries", "--num-layers is 4")),
    Case("main", ["--ultramem-layers", "[0,0,0,0]"], ("--ultramem-layers", "selects no layer")),
    Case("main", ["--ultramem-layers", "abc"], ("--ultramem-layers", "an int N")),
    Case("main", ["--ultramem-mode", "skip", "--ultramem-layers", "2"], ("--ultramem-layers 2", "--ultramem-skip-units"), issue=True),
    Case("main", ["--ultramem-skip-units", "0:1"], ("--ultramem-skip-units 0:1", "--ultramem-mode skip")),
    Case("main", ["--ultramem-mode", "skip", "--ultramem-skip-units", "0:9"], ("--ultramem-skip-units", "allowed block indices 0..3")),
    Case("main", ["--ultramem-value-lr-mult", "nan"], ("--ultramem-value-lr-mult", "finite number > 0"), issue=True),
    Case("main", ["--ultramem-aux-loss-alpha", "-1"], ("--ultramem-aux-loss-alpha", ">= 0")),
    Case("main", ["--ultramem-aux-loss-tau", "abc"], ("--ultramem-aux-loss-tau", "finite number >= 0")),
    Case("main", ["--ultramem-value-lr-decay-rate", "0"], ("--ultramem-value-lr-decay-rate", "> 0")),
    Case("main", ["--ultramem-impl", "cuda"], ("--ultramem-impl", "'triton'")),
    Case("main", ["--ultramem-init", "xyz"], ("--ultramem-init", "'paper'")),
    Case("main", ["--ultramem-score-activation", "relu"], ("--ultramem-score-activation", "'softmax'")),
    Case("main", ["--ultramem-key-dim", "0"], ("--ultramem-key-dim", ">= 1")),
    Case("main", ["--ultramem-num-keys", "-5"], ("--ultramem-num-keys", ">= 1")),
    Case("main", ["--ultramem-value-dim", "0"], ("--ultramem-value-dim", ">= 1")),
    Case("main", ["--ultramem-seed", "-3"], ("--ultramem-seed", ">= 0")),
    Case("main", ["--save-interval", "2"], ("--save-interval needs --save DIR",)),
    Case("main", ["--save-interval", "0", "--save", "x"], ("--save-interval", ">= 1")),
    Case("main", ["--ckpt-step", "3"], ("--ckpt-step needs --load DIR",)),
    Case("main", ["--output-dir", "a_file/run"], ("--output-dir a_file/run", "is not a directory"), setup="a_file"),
    Case("main", ["--save", "a_file/ck", "--save-interval", "1"], ("--save a_file/ck", "is not a directory"), setup="a_file"),
    Case("main", ["--load", "nowhere"], ("--load nowhere: no such directory",)),
    Case("main", ["--load", "empty"], ("--load empty", "no checkpoint there"), setup="empty_dir"),
    Case("main", ["--load", "a_file"], ("--load a_file: no such directory",), setup="a_file"),
    Case("main", ["--data-path", "nope"], ("--data-path", "nope", ".bin not found")),
    Case("main", ["--data-path", "nope", "--split", "100,0,0"], ("--split", "train and valid > 0")),
    Case("main", ["--data-path", "nope", "--split", "a,b,c"], ("--split", "three non-negative shares")),
    Case("main", ["--data-workers", "-1"], ("--data-workers", ">= 0")),
    Case("main", ["--data-prefetch", "0"], ("--data-prefetch", ">= 1")),
    Case("main", ["--data-backend", "spark"], ("--data-backend", "'torch'")),
    Case("main", ["--log-interval", "0"], ("--log-interval", ">= 1")),
    Case("main", ["--compare", "--save", "ck2"], ("--compare does not take --save",)),
    Case("main", ["--compare", "--export-hf", "hf2"], ("--compare does not take --export-hf",)),
    Case("main", ["--export-hf", "."], ("--export-hf .: exists and is not empty", "name another folder"), setup="a_file"),
    Case("main", ["--export-hf", "a_file"], ("--export-hf a_file: exists and is not a directory",), setup="a_file"),
    Case("main", ["--compare", "--ultramem-mode", "skip"], ("--compare needs --ultramem-mode parallel or replace",)),
    Case("main", ["--compare", "--tensor-model-parallel-size", "2"], ("--compare runs with --tensor-model-parallel-size 1",)),
    Case("main", ["--bogus-flag"], ("unrecognized arguments: --bogus-flag",)),
    Case("main", ["--ultramem-layer", "2"], ("unrecognized arguments: --ultramem-layer",)),
    # a damaged or mismatched checkpoint (the fixture's iterations 1 and 2)
    Case("main", [*CK, "--load", "ck"], ("iter_0000002/__0_0.distcp is 100 bytes", "newest intact checkpoint is iteration 1", "--ckpt-step 1"), setup="ck_truncated_shard", sub=True, issue=True),
    Case("main", [*CK, "--load", "ck"], ("iter_0000002/.metadata is missing", "--ckpt-step 1"), setup="ck_no_metadata", issue=True),
    Case("main", [*CK, "--load", "ck"], ("iter_0000002/", "is missing", "--ckpt-step 1"), setup="ck_no_common", issue=True),
    Case("main", [*CK, "--load", "ck"], ("iter_0000002/ultramem_state.json is 10 bytes", "--ckpt-step 1"), setup="ck_truncated_state", issue=True),
    Case("main", [*CK, "--load", "ck"], ("iter_0000002/__0_0.distcp does not match its SHA-256", "--ckpt-step 1"), setup="ck_flipped", issue=True),
    Case("main", [*CK, "--load", "ck"], ("iter_0000002/manifest.json is missing", "--ckpt-step 1"), setup="ck_no_manifest"),
    Case("main", [*CK, "--load", "ck"], ("iter_0000002/rng_rank0.pt is missing",), setup="ck_rng_deleted"),
    Case("main", [*CK, "--load", "ck"], ("latest_checkpointed_iteration.txt says 'banana'", "--ckpt-step 2"), setup="ck_bad_tracker"),
    Case("main", [*CK, "--load", "ck"], ("says '7'", "not a checkpoint directory", "--ckpt-step 2"), setup="ck_tracker_past"),
    Case("main", [*CK, "--load", "ck"], ("ultramem_state.json is", "no intact checkpoint is left", "without --load"), setup="ck_both_damaged"),
    Case("main", [*CK, "--load", "ck", "--ckpt-step", "1"], ("iteration 1 is damaged", "iter_0000001/__0_0.distcp"), setup="ck_old_damaged"),
    Case("main", [*CK, "--load", "ck", "--ckpt-step", "5"], ("--ckpt-step 5", "available: 1, 2"), setup="ck"),
    Case("main", [*CK, "--load", "ck", "--train-iters", "2"], ("--train-iters 2", "iteration 2", "--train-iters > 2"), setup="ck"),
    Case("main", [*CK, "--load", "ck", "--train-iters", "4", "--hidden-size", "64"], ("--hidden-size: checkpoint 32, this run 64",), setup="ck"),
    Case("main", [*CK, "--load", "ck", "--train-iters", "4", "--warmup-iters", "1"], ("--warmup-iters: checkpoint 0, this run 1",), setup="ck"),
    # ------------------------------------------------------------ python -m megatron_ultramem.pretrain
    _pt("--ultramem-topm", "0", expect=("--ultramem-topm", ">= 1"), sub=True),
    _pt("--ultramem-mode", "bogus", expect=("--ultramem-mode", "'parallel'")),
    _pt("--ultramem-topm", "100000", expect=("--ultramem-topm (m=100000)", "allowed 1..128")),
    _pt("--spec", "megatron_ultramem.megatron_lm", "nope", expect=("--spec megatron_ultramem.megatron_lm nope", "ultramem_block_spec")),
    _pt("--ultramem-mode", "skip", expect=("--ultramem-skip-units", "at least one unit")),
    _pt("--ultramem-mode", "skip", "--ultramem-skip-units", "0:1", "--ultramem-layers", "2", expect=("--ultramem-layers=2", "--ultramem-skip-units"), issue=True),
    _pt("--ultramem-value-lr-mult", "nan", expect=("--ultramem-value-lr-mult", "finite number > 0"), issue=True),
    _pt("--unknown-flag", expect=("unrecognized arguments: --unknown-flag",)),
    _pt("--ultramem-num-keys", "abc", expect=("--ultramem-num-keys", "'abc'")),
    _pt("--ultramem-layers", "[0,1,1]", expect=("--ultramem-layers has 3 entries", "num_layers is 2")),
    _pt("--transformer-impl", "transformer_engine", expect=("--transformer-impl transformer_engine", "--transformer-impl local")),
    # ------------------------------------------------------------ the Megatron-LM wrapper
    Case("wrapper", [], ("--megatron-lm PATH", "MEGATRON_LM_PATH"), env={"MEGATRON_LM_PATH": ""}, sub=True),
    Case("wrapper", ["--megatron-lm", "nowhere"], ("--megatron-lm nowhere: no such directory",)),
    Case("wrapper", ["--megatron-lm", "a_file"], ("--megatron-lm a_file: no such directory",), setup="a_file"),
    Case("wrapper", ["--megatron-lm", "empty"], ("pretrain_gpt.py not found", "pretrain_hybrid.py"), setup="empty_dir"),
    Case("wrapper", ["--megatron-lm", "mlm", "--megatron-lm-script", "../x.py"], ("--megatron-lm-script ../x.py", "pretrain_hybrid.py"), setup="checkout"),
    Case("wrapper", ["--megatron-lm", "mlm", "--megatron-lm-script", "pretrain_hybrid.py"], ("pretrain_hybrid.py not found",), setup="checkout"),
    Case("wrapper", ["--megatron-lm"], ("--megatron-lm needs a value",)),
    Case("wrapper", [], ("--megatron-lm nowhere: no such directory",), env={"MEGATRON_LM_PATH": "nowhere"}),
    # ------------------------------------------------------------ python -m megatron_ultramem.sizing
    Case("sizing", [], ("--hidden-size", "required"), sub=True),
    Case("sizing", [*MOE, "--hidden-size", "0"], ("--hidden-size 0", ">= 1")),
    Case("sizing", [*MOE, "--num-layers", "abc"], ("--num-layers 'abc'", "integer >= 1")),
    Case("sizing", ["--num-layers", "4", "--hidden-size", "64"], ("--num-experts", "not a MoE model")),
    Case("sizing", [*MOE, "--moe-router-topk", "9"], ("--moe-router-topk 9", "1..8"), issue=True),
    Case("sizing", [*MOE, "--moe-layer-freq", "[0,1]"], ("--moe-layer-freq has 2 entries", "num_layers is 4")),
    Case("sizing", [*MOE, "--moe-layer-freq", "[0]*4"], ("--moe-layer-freq", "selects no MoE layer")),
    Case("sizing", [*MOE, "--moe-layer-freq", "abc"], ("--moe-layer-freq", "an int N")),
    Case("sizing", [*MOE, "--ultramem-num-heads", "0"], ("--ultramem-num-heads", ">= 1"), issue=True),
    Case("sizing", [*MOE, "--ultramem-topm", "2000"], ("--ultramem-topm 2000", "allowed 1..1024")),
    Case("sizing", [*MOE, "--ultramem-topm", "0"], ("--ultramem-topm", ">= 1")),
    Case("sizing", [*MOE, "--ultramem-expansion", "3"], ("--ultramem-expansion 3", "perfect square")),
    Case("sizing", [*MOE, "--ultramem-value-dim", "511", "--tensor-model-parallel-size", "2"], ("--ultramem-value-dim 511", "multiples of 2")),
    Case("sizing", [*MOE, "--ultramem-num-cores", "3", "--tensor-model-parallel-size", "2"], ("--ultramem-num-cores 3", "divide one another")),
    Case("sizing", [*MOE, "--batch-sizes", "0,-1"], ("--batch-sizes", "integers >= 1"), issue=True),
    Case("sizing", [*MOE, "--batch-sizes", "abc"], ("--batch-sizes", "integers >= 1")),
    Case("sizing", [*MOE, "--bytes-per-param", "0"], ("--bytes-per-param", "> 0"), issue=True),
    Case("sizing", [*MOE, "--bytes-per-param", "nan"], ("--bytes-per-param", "finite")),
    Case("sizing", [*MOE, "--mode", "skip"], ("--mode", "'replace'")),
    Case("sizing", [*MOE, "--dense-ffn-hidden-size", "0"], ("--dense-ffn-hidden-size", ">= 1")),
    Case("sizing", [*MOE, "--mode", "replace", "--dense-ffn-hidden-size", "1024"], ("--dense-ffn-hidden-size", "mode parallel only")),
    Case("sizing", [*MOE, "--moe-layer-freq", "2", "--moe-layers-per-memory", "3"], ("--moe-layers-per-memory 3", "divisor of the 2 MoE layers")),
    Case("sizing", [*MOE, "--moe-layers-per-memory", "2"], ("--moe-layers-per-memory > 1", "dense MLP size fixed")),
    Case("sizing", ["--hidden-size", "256", "--num-experts", "4", "--hybrid-layer-pattern", "M*M*"], ("--hybrid-layer-pattern 'M*M*'", "no E (MoE) layer")),
    Case("sizing", ["--hidden-size", "256", "--num-experts", "4", "--hybrid-layer-pattern", "M*E", "--num-layers", "4"], ("has 3 layers", "--num-layers is 4")),
    Case("sizing", [*MOE, "--ffn-multiple-of", "0"], ("--ffn-multiple-of", ">= 1")),
    Case("sizing", [*MOE, "--hidden-size"], ("--hidden-size needs a value",)),
    Case("sizing", [*MOE, "--moe-shared-expert-intermediate-size", "-1"], ("--moe-shared-expert-intermediate-size -1", ">= 0")),
    Case("sizing", [*MOE, "--ultramem-mode", "skip"], ("--ultramem-mode 'skip'", "parallel, replace")),
    Case("sizing", [*MOE, "--mode", "replace", "--ultramem-mode", "parallel"], ("--mode replace disagrees with --ultramem-mode parallel",)),
    Case("sizing", [*MOE, "--moe-router-topk", "0"], ("--moe-router-topk 0", ">= 1")),
    # ------------------------------------------------------------ python -m megatron_ultramem.megatron_lm.convert
    Case("convert", MOE, ("after '--'",), sub=True),
    Case("convert", ["--"], ("--hidden-size", "required")),
    Case("convert", ["--format", "xml", "--", *MOE], ("--format", "'shell'")),
    Case("convert", ["--", *MOE, "--num-layers", "abc"], ("--num-layers 'abc'", "integer >= 1"), issue=True),
    Case("convert", ["--", *MOE, "--tensor-model-parallel-size", "3", "--ultramem-value-dim", "512"], ("--ultramem-value-dim 512", "multiples of 3"), issue=True),
    Case("convert", ["--ultramem-topm", "1500", "--", *MOE], ("--ultramem-topm", "1..1024")),
    Case("convert", ["--", *MOE, "--ultramem-layers", "[0,0,0,1]"], ("--ultramem-layers '[0,0,0,1]'", "remove it")),
    Case("convert", ["--mode", "parallel", "--", *MOE, "--ultramem-mode", "replace"], ("--mode parallel disagrees with --ultramem-mode replace",)),
    Case("convert", ["--", "--num-layers", "4", "--hidden-size", "64"], ("--num-experts", "not a MoE model")),
    Case("convert", ["--", *MOE, "--num-experts", "0"], ("--num-experts 0", ">= 1")),
    Case("convert", ["--", *MOE, "--expert-model-parallel-size", "0"], ("--expert-model-parallel-size 0", ">= 1")),
    Case("convert", ["--", *MOE, "--tensor-model-parallel-size", "abc"], ("--tensor-model-parallel-size 'abc'",)),
    Case("convert", ["--", *MOE, "--pipeline-model-parallel-size", "0"], ("--pipeline-model-parallel-size 0",)),
    Case("convert", ["--", "--hidden-size", "256", "--num-experts", "4", "--hybrid-layer-pattern"], ("--hybrid-layer-pattern needs a value",)),
    Case("convert", ["--", *MOE, "--mtp-num-layers", "-1"], ("--mtp-num-layers -1", ">= 0")),
    Case("convert", ["--", *MOE, "--moe-ffn-hidden-size", "0"], ("--moe-ffn-hidden-size 0",)),
    Case("convert", ["--moe-layers-per-memory", "0", "--", *MOE], ("--moe-layers-per-memory", ">= 1")),
    Case("convert", ["--ultramem-key-dim", "x", "--", *MOE], ("--ultramem-key-dim", "'x'")),
    Case("convert", ["--", *MOE, "--ffn-hidden-size", "-5"], ("--ffn-hidden-size", ">= 1")),
    Case("convert", ["--bogus", "--", *MOE], ("unrecognized arguments: --bogus",)),
    Case("convert", ["--", *MOE, "--moe-layer-freq"], ("--moe-layer-freq needs a value",)),
    # ------------------------------------------------------------ python -m megatron_ultramem.experiments
    Case("experiments", [], ("required: command",), sub=True),
    Case("experiments", ["bogus"], ("invalid choice: 'bogus'", "'quality'")),
    Case("experiments", ["scaling", "--num-keys", "abc"], ("--num-keys", "integers >= 1"), issue=True),
    Case("experiments", ["scaling", "--num-keys", "0,20"], ("--num-keys", "integers >= 1")),
    Case("experiments", ["quality", "--seeds", "0"], ("--seeds", ">= 1")),
    Case("experiments", ["quality", "--seeds", "abc"], ("--seeds", "'abc'")),
    Case("experiments", ["ablations", "--threads", "-1"], ("--threads", ">= 1")),
    Case("experiments", ["quality", "--train-iters", "0"], ("--train-iters", ">= 1")),
    Case("experiments", ["quality", "--wait-load", "-1"], ("--wait-load", "> 0")),
    Case("experiments", ["quality", "--out", "a_file/x"], ("--out a_file/x", "is not a directory"), setup="a_file"),
    Case("experiments", ["scaling", "--work", "a_file/w"], ("--work a_file/w", "is not a directory"), setup="a_file"),
    Case("experiments", ["decode", "--repeats", "0"], ("--repeats", ">= 1")),
    Case("experiments", ["decode", "--threads", "0"], ("--threads", ">= 1")),
    Case("experiments", ["readme", "--results", "nowhere"], ("--results nowhere: no such directory",)),
    Case("experiments", ["readme", "--readme", "missing.md", "--results", "."], ("--readme missing.md: no such file",)),
    Case("experiments", ["mainjob", "--flags", "--train-iters 0"], ("--train-iters", ">= 1")),
    Case("experiments", ["mainjob", "--flags", "'unbalanced"], ("--flags", "not a shell word list")),
    Case("experiments", ["scaling", "--entities", "0"], ("--entities", ">= 1")),
    Case("experiments", ["quality", "--jobs", "0"], ("--jobs", ">= 1")),
    Case("experiments", ["capacity-evidence", "--jobs", "0"], ("--jobs", ">= 1")),
    Case("experiments", ["capacity-evidence", "--threads", "0"], ("--threads", ">= 1")),
    Case("experiments", ["capacity-evidence", "--work", "a_file/w"], ("--work a_file/w", "is not a directory"), setup="a_file"),
    # ------------------------------------------------------------ python -m megatron_ultramem.export_hf
    Case("export", ["--load", "nowhere", "--out", "o"], ("--load nowhere: no such directory",), sub=True),
    Case("export", ["--out", "o"], ("the following arguments are required: --load",)),
    Case("export", ["--load", "empty", "--out", "o"], ("--load empty", "no latest_checkpointed_iteration.txt and no metadata.json"), setup="empty_dir"),
    Case("export", ["--load", "a_file", "--out", "o"], ("--load a_file: not a directory",), setup="a_file"),
    Case("export", ["--load", "ck", "--out", "o"], ("says '7'", "the checkpoint is partial"), setup="ck_tracker_past"),
    Case("export", ["--load", "ck", "--out", "o", "--iteration", "9"], ("--iteration 9: ck holds no iter_0000009", "iter_0000001, iter_0000002"), setup="ck"),
    Case("export", ["--load", "ck", "--out", "o", "--iteration", "-1"], ("--iteration", ">= 0")),
    Case("export", ["--load", "ck", "--out", "o"], ("iter_0000002/.metadata is missing", "partial"), setup="ck_no_metadata"),
    Case("export", ["--load", "ck", "--out", "o"], ("iter_0000002/__0_0.distcp is 100 bytes", "--iteration N"), setup="ck_truncated_shard"),
    Case("export", ["--load", "ck", "--out", "o"], ("iter_0000002/__0_0.distcp does not match its SHA-256",), setup="ck_flipped"),
    Case("export", ["--load", "ck", "--out", "ck"], ("--out ck: exists and is not empty", "--force"), setup="ck"),
    Case("export", ["--load", "ck", "--out", "a_file/o"], ("--out a_file/o",), setup="a_file"),
    Case("export", ["--load", "ck", "--out", "o", "--max-shard-size", "lots"], ("--max-shard-size", "'lots' is not a size")),
    Case("export", ["--load", "ck", "--out", "o", "--dtype", "int8"], ("--dtype", "'bfloat16'")),
    Case("export", ["--load", "ck", "--out", "o"], ("--load ck", "no UltraMem memory layers"), setup="mlm_no_memory"),
    Case("export", ["--load", "ck", "--out", "o"], ("--num-experts",), setup="mlm_moe"),
    Case("export", ["--load", "ck", "--out", "o"], ("--squared-relu",), setup="mlm_squared_relu"),
    # ------------------------------------------------------------ python -m megatron_ultramem.import_hf
    Case("import", ["--hf", "hf", "--save", "hf"], ("--save hf: exists and is not empty", "--force"), setup="hf", sub=True),
    Case("import", ["--hf", "nowhere", "--save", "s"], ("--hf nowhere: no such directory",)),
    Case("import", ["--hf", "empty", "--save", "s"], ("--hf empty", "no config.json"), setup="empty_dir"),
    Case("import", ["--save", "s"], ("the following arguments are required: --hf",)),
    Case("import", ["--hf", "hf", "--save", "s", "--for", "cluster"], ("--for", "'pretrain'", "'megatron-lm'", "'main-job'")),
    Case("import", ["--hf", "hf", "--save", "s", "--for", "pretrain", "--", "--lr", "1"], ("flags after --", "need --for main-job"), setup="hf"),
    Case("import", ["--hf", "hf", "--save", "s", "--for", "main-job", "--", "--hidden-size", "64"], ("--hidden-size 64: the folder's model has 32",), setup="hf"),
    Case("import", ["--hf", "hf", "--save", "s", "--for", "main-job", "--", "--lr", "abc"], ("main job flags after --", "--lr", "'abc'"), setup="hf"),
    Case("import", ["--hf", "hf", "--save", "s", "--for", "main-job", "--", "--lr", "0.1", "--min-lr", "1"], ("--min-lr 1.0", "<= --lr"), setup="hf"),
    Case("import", ["--hf", "hf", "--save", "s", "--for", "main-job", "--", "--tensor-model-parallel-size", "3"], ("--num-attention-heads (2)", "--tensor-model-parallel-size (3)"), setup="hf"),
    Case("import", ["--hf", "hf", "--save", "s", "--for", "main-job", "--", "--expert-model-parallel-size", "128"], ("--ultramem-value-dim", "1 x 128"), setup="hf"),
    # ------------------------------------------------------------ launch/*.sh (real bash processes)
    Case("single", MOE, ("DRY_RUN=true", "allowed 1"), env={**LAUNCH, "DRY_RUN": "true"}, setup="checkout", issue=True),
    Case("single", MOE, ("NPROC_PER_NODE=abc", "integer >= 1"), env={**LAUNCH, "NPROC_PER_NODE": "abc"}, setup="checkout", issue=True),
    Case("single", MOE, ("NPROC_PER_NODE=0", "integer >= 1"), env={**LAUNCH, "NPROC_PER_NODE": "0"}, setup="checkout"),
    Case("single", MOE, ("MEGATRON_LM_PATH=nowhere", "no such directory"), env={**LAUNCH, "MEGATRON_LM_PATH": "nowhere"}, issue=True),
    Case("single", MOE, ("MEGATRON_LM_PATH=empty", "no pretrain_gpt.py"), env={**LAUNCH, "MEGATRON_LM_PATH": "empty"}, setup="empty_dir"),
    Case("single", MOE, ("MEGATRON_LM_PATH", "ULTRAMEM_ENTRY=plugin"), env={**LAUNCH, "MEGATRON_LM_PATH": ""}),
    Case("single", MOE, ("ULTRAMEM_ENTRY=bogus", "module, patched or plugin"), env={**LAUNCH, "ULTRAMEM_ENTRY": "bogus"}, setup="checkout"),
    Case("single", MOE, ("ULTRAMEM_MODE=skip", "parallel or replace"), env={**LAUNCH, "ULTRAMEM_MODE": "skip"}, setup="checkout"),
    Case("single", MOE, ("MASTER_PORT=99999", "1..65535"), env={**LAUNCH, "MASTER_PORT": "99999"}, setup="checkout"),
    Case("single", MOE, ("MASTER_PORT=abc", "1..65535"), env={**LAUNCH, "MASTER_PORT": "abc"}, setup="checkout"),
    Case("single", MOE, ("PYTHON=nopython", "no such command"), env={**LAUNCH, "PYTHON": "nopython"}, setup="checkout"),
    Case("single", [], ("no MoE arguments",), env=LAUNCH, setup="checkout"),
    Case("single", [*MOE, "--num-layers", "abc"], ("--num-layers 'abc'",), env=LAUNCH, setup="checkout"),
    Case("single", MOE, ("--ultramem-topm", ">= 1"), env={**LAUNCH, "ULTRAMEM_CONVERT_ARGS": "--ultramem-topm 0"}, setup="checkout"),
    Case("single", ["--hidden-size", "256", "--num-experts", "4", "--hybrid-layer-pattern", "M*EM*E"], ("ULTRAMEM_ENTRY=patched", "module or plugin"), env={**LAUNCH, "ULTRAMEM_ENTRY": "patched"}, setup="checkout"),
    Case("multi", MOE, ("NNODES=abc", "integer >= 1"), env={**MULTI, "NNODES": "abc"}, setup="checkout"),
    Case("multi", MOE, ("NNODES=0", "integer >= 1"), env={**MULTI, "NNODES": "0"}, setup="checkout"),
    Case("multi", MOE, ("NODE_RANK=4", "0..3"), env={**MULTI, "NNODES": "4", "NODE_RANK": "4"}, setup="checkout"),
    Case("multi", MOE, ("NODE_RANK=", "0..1"), env={**MULTI, "NODE_RANK": ""}, setup="checkout"),
    Case("multi", MOE, ("NODE_RANK=-1", "0..1"), env={**MULTI, "NODE_RANK": "-1"}, setup="checkout"),
    Case("multi", MOE, ("MASTER_ADDR is empty",), env={**MULTI, "MASTER_ADDR": ""}, setup="checkout"),
    Case("multi", MOE, ("DRY_RUN=yes", "allowed 1"), env={**MULTI, "DRY_RUN": "yes"}, setup="checkout"),
    Case("slurm", MOE, ("NNODES=abc", "SLURM_NNODES", "integer >= 1"), env={**LAUNCH, "SLURM_NNODES": "abc"}, setup="checkout"),
    Case("slurm", MOE, ("DRY_RUN=yes", "allowed 1"), env={**LAUNCH, "DRY_RUN": "yes"}, setup="checkout"),
    Case("slurm", MOE, ("NPROC_PER_NODE=x", "integer >= 1"), env={**LAUNCH, "NPROC_PER_NODE": "x"}, setup="checkout"),
]  # fmt: skip


def test_table_size_and_coverage():
    """At least 120 rows, every entry point present, and the issue's cases in it."""
    assert len(CASES) >= 120
    assert {c.entry for c in CASES} == set(ENTRIES)
    assert sum(c.issue for c in CASES) >= 21  # the 21 the issue names (of its 31; the rest unnamed)
    assert all(ENTRIES[c.entry].module for c in CASES if c.sub)
    assert len({c.id() for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------- running a row
def _snapshot(root) -> Dict[str, int]:
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = -1 if os.path.isdir(path) else os.path.getsize(path)
    return out


def _megatron_training() -> bool:
    try:
        importlib.import_module("megatron.training.arguments")
        importlib.import_module("megatron.training.argument_utils")
    except ImportError:
        return False
    return True


def _expected(case: Case) -> Tuple[str, ...]:
    if case.expect_016 is not None and not _megatron_training():
        return case.expect_016
    return case.expect


def _clean_env(monkeypatch, env: Dict[str, str]) -> Dict[str, str]:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "MEGATRON_LM_PATH",
                 "DRY_RUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "SLURM_NNODES", "ULTRAMEM_ENTRY",
                 "ULTRAMEM_MODE", "ULTRAMEM_CONVERT_ARGS", "PYTHON"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return dict(os.environ)


def _run_inprocess(case: Case) -> Tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved_argv = list(sys.argv)
        try:
            code = ENTRIES[case.entry].call(list(case.argv))
        except SystemExit as exit_:
            code = exit_.code
        finally:
            sys.argv = saved_argv
    return code, err.getvalue()


def _run_subprocess(case: Case, env: Dict[str, str], cwd) -> Tuple[int, str]:
    entry = ENTRIES[case.entry]
    env = dict(env, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    if entry.script:
        # the launchers run `$PYTHON` and `torchrun`: this interpreter's (a bare `python` from PATH
        # may be one without megatron-core, which warns on import), unless the case sets PYTHON
        env.setdefault("PYTHON", sys.executable)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        cmd = ["bash", os.path.join(ROOT, entry.script), *case.argv]
    else:
        cmd = [sys.executable, "-m", entry.module, *case.argv]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stderr


def _check(case: Case, code, stderr: str, how: str) -> None:
    # the converter's `note:` lines (what the plan decided) come before a launcher's later error
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note: ")]
    assert code == 2, f"{how}: exit status {code!r}, stderr {stderr[-2000:]!r}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, f"{how}: expected one line, got {lines}"
    for part in _expected(case):
        assert part in lines[0], f"{how}: {part!r} not in {lines[0]!r}"


TIMES: Dict[str, float] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, request):
    if case.setup:
        setup = SETUPS[case.setup]
        fixture = getattr(setup, "fixture", None)
        if fixture == "tiny_checkpoint":
            setup(tmp_path, request.getfixturevalue(fixture)[0])
        elif fixture is not None:
            setup(tmp_path, request.getfixturevalue(fixture))
        else:
            setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = _clean_env(monkeypatch, case.env)
    before = _snapshot(tmp_path)
    start = time.perf_counter()
    entry = ENTRIES[case.entry]
    if entry.call is not None:
        code, stderr = _run_inprocess(case)
        _check(case, code, stderr, "in-process")
        assert _snapshot(tmp_path) == before, "files were left behind"
    if entry.call is None or case.sub:
        code, stderr = _run_subprocess(case, env, tmp_path)
        _check(case, code, stderr, "subprocess")
        assert _snapshot(tmp_path) == before, "files were left behind"
    TIMES[case.entry] = TIMES.get(case.entry, 0.0) + time.perf_counter() - start


def test_help_strings_that_argparse_cannot_format_are_repaired(capsys):
    """A foreign parser's bare '%' (megatron-core 0.19.2 has one) would make --help fail."""
    import argparse

    from megatron_ultramem.cli import repair_help_strings

    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--a", help="headroom (e.g. 1.10 = 10%).")
    p.add_argument("--b", default=3, help="kept as is (default: %(default)s)")
    with pytest.raises(ValueError):
        p.format_help()
    help_text = repair_help_strings(p).format_help()
    assert "10%)" in help_text and "(default: 3)" in help_text
