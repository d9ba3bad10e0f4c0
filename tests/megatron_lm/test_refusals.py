"""Megatron-LM switches that would build and train a memory layer wrongly without an error are
refused before any work, naming the flag and what is allowed (arguments._refuse_switches...).

Where megatron-core ships megatron.training (0.17+) the flags are parsed by Megatron's own parser
(so each refused flag is one the installed Megatron-LM really has); on 0.16 the namespace carries
the same names. One test runs the entry point itself: exit code 2 and one line on stderr.
"""

import os
import subprocess
import sys

import pytest

from megatron_ultramem import compat
from megatron_ultramem.megatron_lm.arguments import add_ultramem_args, validate_ultramem_args

HAS_TRAINING = compat._minor(compat.megatron_core_version()) >= (0, 19)
SPEC = ["--spec", "megatron_ultramem.megatron_lm", "ultramem_block_spec"]
BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--transformer-impl", "local", "--ultramem-num-keys", "8", "--ultramem-key-dim", "16",
        "--ultramem-topm", "4"]  # fmt: skip


def parsed(argv, monkeypatch):
    """The namespace Megatron-LM's parser makes of argv (+ the --ultramem-* flags)."""
    if not HAS_TRAINING:
        from tests.megatron_lm.test_arguments import megatron_like

        names = {"--tensor-model-parallel-size": ("tensor_model_parallel_size", int),
                 "--tensor-parallel-num-weight-shards": ("tensor_parallel_num_weight_shards", int),
                 "--expert-tensor-parallel-num-weight-shards":
                     ("expert_tensor_parallel_num_weight_shards", int),
                 "--optimizer": ("optimizer", str),
                 "--transformer-impl": ("transformer_impl", str)}  # fmt: skip
        fields, i = {}, 0
        while i < len(argv):
            if argv[i] == "--inference-fuse-tp-communication":
                fields["inference_fuse_tp_communication"] = True
            elif argv[i] in names:
                name, cast = names[argv[i]]
                fields[name] = cast(argv[i + 1])
                i += 1
            i += 1
        return megatron_like(**fields)
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *BASE, *SPEC, *argv])
    return parse_args(add_ultramem_args)


REFUSED = [
    # the fused inference layer hands the residual to mlp.linear_fc2 and skips the MLP's BDA
    (["--inference-fuse-tp-communication"], r"^--inference-fuse-tp-communication cannot be .*"
     r"allowed: leave it off$"),
    # Megatron's builders swap --spec for their inference layer spec: no memory left
    (["--transformer-impl", "inference_optimized"], r"^--transformer-impl inference_optimized is "
     r"not supported with --spec .*allowed: transformer_engine, local .*drop --spec"),
    # generalized TP would shard the memory's output projection over a group it does not know
    (["--tensor-model-parallel-size", "2", "--tensor-parallel-num-weight-shards", "4"],
     r"^--tensor-parallel-num-weight-shards 4 cannot .*allowed: leave it unset or equal to "
     r"--tensor-model-parallel-size \(2\)$"),
    (["--expert-tensor-parallel-num-weight-shards", "2"],
     r"^--expert-tensor-parallel-num-weight-shards 2 cannot .*--expert-tensor-parallel-size \(1\)$"),
    # a matrix preconditioner per 2-D parameter: an N x N one for the value table
    (["--optimizer", "soap"], r"^--optimizer soap cannot be combined .*preconditions .*allowed: "
     r"adam, sgd, lion"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", REFUSED, ids=[r[0][-2] if len(r[0]) > 1 else r[0][0] for r in REFUSED])
def test_switch_is_refused_naming_the_flag(argv, message, monkeypatch):
    args = parsed(argv, monkeypatch)
    with pytest.raises(ValueError, match=message):
        validate_ultramem_args(args)


def test_muon_only_where_the_table_stays_out_of_it(monkeypatch):
    args = parsed(["--optimizer", "muon"] if HAS_TRAINING else [], monkeypatch)
    args.optimizer = "muon"  # 0.16's namespace: the flag value (0.16 has no emerging optimizers)
    if compat.muon_honours_use_muon():  # 0.20+: use_muon=False keeps the table with Adam
        validate_ultramem_args(args)
    else:
        with pytest.raises(ValueError, match=r"^--optimizer muon cannot .*`use_muon = False`.*"
                           r"allowed: adam, sgd, lion$"):  # fmt: skip
            validate_ultramem_args(args)
    # faked both ways: the rule follows the shim, not the version number
    for honours, refused in ((True, False), (False, True)):
        monkeypatch.setattr(compat, "muon_honours_use_muon", lambda h=honours: h)
        if refused:
            with pytest.raises(ValueError, match="--optimizer muon"):
                validate_ultramem_args(args)
        else:
            validate_ultramem_args(args)


def test_equal_weight_shards_and_defaults_pass(monkeypatch):
    validate_ultramem_args(parsed([], monkeypatch))
    validate_ultramem_args(
        parsed(["--tensor-model-parallel-size", "2", "--tensor-parallel-num-weight-shards", "2"],
               monkeypatch)  # fmt: skip
    )


def test_other_models_are_not_refused(monkeypatch):
    """Without the UltraMem spec the plugin says nothing about these switches."""
    args = parsed(["--optimizer", "soap"] if HAS_TRAINING else [], monkeypatch)
    args.spec, args.optimizer = None, "soap"
    validate_ultramem_args(args)


@pytest.mark.skipif(not HAS_TRAINING, reason="megatron-core < 0.19: no megatron.training entry")
def test_entry_point_exits_2_with_one_line(tmp_path):
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    save = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ultramem.pretrain", *BASE, "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--seq-length", "16",
         "--max-position-embeddings", "16", "--micro-batch-size", "1", "--train-iters", "1",
         "--lr", "1e-3", "--save", str(save), "--save-interval", "1",
         "--inference-fuse-tp-communication"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--inference-fuse-tp-communication" in errors[0]
    assert not save.exists()  # nothing started
