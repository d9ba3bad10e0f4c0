"""MoE -> UltraMem argument rewriting (convert.py) and the launch scripts' dry runs.

python -m pytest -q tests/test_launch.py
"""

import os
import shlex
import subprocess

import pytest

from megatron_ultramem.cli import BadInput
from megatron_ultramem.megatron_lm.convert import moe_to_ultramem_argv, split_flags
from megatron_ultramem.sizing import MoEShape, NoMatch, size_ultramem_like_moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Megatron-LM examples/mixtral/train_mixtral_8x7b_distributed.sh (core_r0.16.0), data paths made up.
MIXTRAL = shlex.split(
    "--use-mcore-models --disable-bias-linear --seq-length 4096 --max-position-embeddings 32768 "
    "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
    "--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm "
    "--position-embedding-type rope --swiglu --untie-embeddings-and-output-weights "
    "--group-query-attention --num-query-groups 8 --no-masked-softmax-fusion --no-position-embedding "
    "--rotary-base 1000000 "
    "--num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss "
    "--moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall "
    "--overlap-param-gather --overlap-grad-reduce "
    "--tokenizer-type Llama2Tokenizer --tokenizer-model /data/tok.model --data-path /data/text "
    "--split 99990,8,2 --micro-batch-size 1 --global-batch-size 256 --lr 1e-4 --train-iters 500000 "
    "--lr-decay-iters 320000 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1 "
    "--lr-warmup-iters 500 --clip-grad 1.0 --bf16 --tensor-model-parallel-size 1 "
    "--pipeline-model-parallel-size 4 --expert-model-parallel-size 8 --use-distributed-optimizer "
    "--sequence-parallel --log-interval 1 --save /ckpt --load /ckpt --tensorboard-dir /ckpt/tb"
)
MIXTRAL_SHAPE = MoEShape(4096, 8, 2, 14336, 32, gated=True)
SPEC = ["--spec", "megatron_ultramem.megatron_lm", "ultramem_block_spec"]


def flag_value(argv, flag):
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def test_mixtral_conversion():
    out, sizing = moe_to_ultramem_argv(MIXTRAL)
    # MoE-only flags are gone, with their values
    for gone in (
        "--num-experts",
        "--moe-router-topk",
        "--moe-grouped-gemm",
        "--moe-aux-loss-coeff",
        "--moe-token-dispatcher-type",
        "--moe-router-load-balancing-type",
        "--expert-model-parallel-size",
        "aux_loss",
        "alltoall",
        "1e-2",
    ):
        assert gone not in out, gone
    # everything else is kept in order
    kept = [t for t in MIXTRAL if t not in ("--ffn-hidden-size", "14336")]
    kept_flags = [f for f, _ in split_flags(kept) if not f.startswith("--moe-")]
    kept_flags = [
        f for f in kept_flags if f not in ("--num-experts", "--expert-model-parallel-size")
    ]
    assert [f for f, _ in split_flags(out) if f in kept_flags] == kept_flags
    assert (
        "--overlap-param-gather" in out and flag_value(out, "--pipeline-model-parallel-size") == "4"
    )
    # the UltraMem part equals the sizing of the same MoE computed directly
    expected = size_ultramem_like_moe(MIXTRAL_SHAPE, "parallel")
    assert sizing.ultramem == expected.ultramem
    assert out[-(len(SPEC) + len(expected.megatron_args())) :] == SPEC + expected.megatron_args()
    assert flag_value(out, "--ffn-hidden-size") == str(expected.ultramem.dense_ffn_hidden_size)
    assert out.count("--ffn-hidden-size") == 1


def test_user_knobs_pin_the_sizing_and_stay_single():
    argv = MIXTRAL + ["--ultramem-topm", "64", "--ultramem-aux-loss-alpha", "0", "--spec", "a", "b"]
    out, sizing = moe_to_ultramem_argv(argv)
    assert sizing.ultramem.topm == 64 and out.count("--ultramem-topm") == 1
    assert flag_value(out, "--ultramem-topm") == "64"
    assert flag_value(out, "--ultramem-aux-loss-alpha") == "0"  # passed through
    assert out.count("--spec") == 1 and "a" not in out
    out, sizing = moe_to_ultramem_argv(MIXTRAL, mode="replace", overrides={"num_heads": 128})
    assert sizing.ultramem.num_heads == 128 and flag_value(out, "--ultramem-mode") == "replace"
    assert sizing.ultramem.topm <= 1024  # the Triton kernels' limit
    assert flag_value(out, "--ffn-hidden-size") == "14336"  # replace: dense layers keep theirs
    # replace keeps the experts' flags and EP (the table's columns split over TP x EP)
    assert flag_value(out, "--num-experts") == "8" and flag_value(out, "--expert-model-parallel-size") == "8"
    # H pinned too low for m <= 1024: refused with the layouts that fit, not a silent fallback
    with pytest.raises(NoMatch, match="Triton kernels' limit 1024"):
        moe_to_ultramem_argv(MIXTRAL, mode="replace", overrides={"num_heads": 96})


def test_mixed_pattern_keeps_ffn_and_places_memory_on_moe_layers():
    argv = shlex.split(
        "--num-layers 4 --hidden-size 1024 --ffn-hidden-size 2816 --swiglu --num-experts 8 "
        "--moe-ffn-hidden-size 2048 --moe-layer-freq ([0]+[1])*2 --moe-router-topk=2"
    )
    out, sizing = moe_to_ultramem_argv(argv)
    assert sizing.moe.expert_ffn_hidden_size == 2048 and sizing.moe.topk == 2
    assert flag_value(out, "--ultramem-layers") == "([0]+[1])*2"
    assert flag_value(out, "--ffn-hidden-size") == "2816"  # the dense layers' size, shared
    assert "--moe-router-topk=2" not in out
    assert out.count("--ultramem-layers") == 1
    # a placement other than the one the counts assume is refused, naming the flag
    with pytest.raises(BadInput, match="--ultramem-layers"):
        moe_to_ultramem_argv(argv + ["--ultramem-layers", "[0,0,0,1]"])


def test_flag_values_parsing():
    items = split_flags(["x", "--a", "-1e-3", "--b=2", "--c", "1", "2", "--d"])
    assert items == [
        ("", ["x"]),
        ("--a", ["-1e-3"]),
        ("--b", ["2"]),
        ("--c", ["1", "2"]),
        ("--d", []),
    ]
    with pytest.raises(ValueError, match="--num-experts"):
        moe_to_ultramem_argv(["--num-layers", "2", "--hidden-size", "64"])


# ---------------------------------------------------------------------- shell scripts
SMALL = shlex.split(
    "--num-layers 4 --hidden-size 1024 --ffn-hidden-size 2816 --num-experts 8 --moe-router-topk 2 "
    "--swiglu --lr 1e-3 --moe-grouped-gemm --expert-model-parallel-size 4"
)


@pytest.fixture
def checkout(tmp_path):
    """A stand-in Megatron-LM checkout: the launchers check that pretrain_gpt.py is there."""
    root = tmp_path / "Megatron-LM"
    root.mkdir()
    (root / "pretrain_gpt.py").write_text("")
    return str(root)


def dry_run(script, args, **env):
    full_env = dict(os.environ, NPROC_PER_NODE="8")
    full_env.pop("DRY_RUN", None)
    full_env.update(env)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc


def torchrun_line(text):
    lines = [shlex.split(line) for line in text.splitlines() if line.startswith("torchrun ")]
    assert len(lines) == 1, text
    return lines[0]


def test_single_node_dry_run(checkout):
    proc = dry_run("train_single_node.sh", ["--dry-run", *SMALL], MASTER_PORT="6001",
                   MEGATRON_LM_PATH=checkout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmd = torchrun_line(proc.stdout)
    converted, _ = moe_to_ultramem_argv(SMALL)
    entry = [
        "-m",
        "megatron_ultramem.megatron_lm.pretrain_gpt",
        "--megatron-lm",
        checkout,
    ]
    assert cmd == [
        "torchrun",
        "--nproc_per_node",
        "8",
        "--nnodes",
        "1",
        "--master_addr",
        "localhost",
        "--master_port",
        "6001",
        *entry,
        *converted,
    ]
    # the patched-script entry and the converter options
    proc = dry_run(
        "train_single_node.sh",
        SMALL,
        DRY_RUN="1",
        ULTRAMEM_ENTRY="patched",
        ULTRAMEM_CONVERT_ARGS="--ultramem-topm 48",
        MEGATRON_LM_PATH=checkout,
    )
    cmd = torchrun_line(proc.stdout)
    assert f"{checkout}/pretrain_gpt.py" in cmd and flag_value(cmd, "--ultramem-topm") == "48"
    # megatron-core 0.19: the plugin's own pretrain entry, no checkout needed
    proc = dry_run("train_single_node.sh", SMALL, DRY_RUN="1", ULTRAMEM_ENTRY="plugin",
                   MEGATRON_LM_PATH="")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmd = torchrun_line(proc.stdout)
    assert cmd[cmd.index("-m") + 1] == "megatron_ultramem.pretrain" and "--megatron-lm" not in cmd


def test_multi_node_dry_run(checkout):
    env = dict(NNODES="4", NODE_RANK="2", MASTER_ADDR="node0", MASTER_PORT="29555", DRY_RUN="1",
               MEGATRON_LM_PATH=checkout)  # fmt: skip
    proc = dry_run("train_multi_node.sh", SMALL, **env)
    assert proc.returncode == 0, proc.stderr
    cmd = torchrun_line(proc.stdout)
    for flag, value in (
        ("--nnodes", "4"),
        ("--node_rank", "2"),
        ("--master_addr", "node0"),
        ("--master_port", "29555"),
        ("--nproc_per_node", "8"),
    ):
        assert flag_value(cmd, flag) == value
    converted, _ = moe_to_ultramem_argv(SMALL)
    assert cmd[-len(converted) :] == converted
    missing = dry_run("train_multi_node.sh", SMALL, DRY_RUN="1", NODE_RANK="0", MASTER_ADDR="x",
                      MEGATRON_LM_PATH=checkout, NNODES="")  # fmt: skip
    assert missing.returncode == 2 and "NNODES" in missing.stderr


def test_slurm_dry_run(checkout):
    env = dict(SLURM_NNODES="3", MASTER_ADDR="node7", DRY_RUN="1", SLURM_GPUS_ON_NODE="4",
               MEGATRON_LM_PATH=checkout)  # fmt: skip
    env.pop("NPROC_PER_NODE", None)
    proc = dry_run("train_slurm.sbatch", SMALL, **env, NPROC_PER_NODE="")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    srun = shlex.split(lines[0])
    assert srun[:4] == ["srun", "--nodes", "3", "--ntasks-per-node"]
    assert srun[-len(SMALL) - 2 :] == [
        "bash",
        os.path.join(ROOT, "launch", "train_multi_node.sh"),
        *SMALL,
    ]
    cmd = torchrun_line(proc.stdout)
    assert flag_value(cmd, "--nnodes") == "3" and flag_value(cmd, "--node_rank") == "0"
    assert (
        flag_value(cmd, "--master_addr") == "node7" and flag_value(cmd, "--nproc_per_node") == "4"
    )


def test_hybrid_model_runs_pretrain_hybrid(checkout):
    """A --hybrid-layer-pattern model converts to the hybrid stack spec, which the unpatched entry
    runs through Megatron-LM's pretrain_hybrid.py."""
    hybrid = shlex.split("--hidden-size 256 --num-experts 4 --moe-router-topk 2 --ffn-hidden-size 512 "
                         "--hybrid-layer-pattern M*EM*E")  # fmt: skip
    proc = dry_run("train_single_node.sh", ["--dry-run", *hybrid], MEGATRON_LM_PATH=checkout)
    assert proc.returncode == 2 and "pretrain_hybrid.py" in proc.stderr  # not in this checkout
    open(os.path.join(checkout, "pretrain_hybrid.py"), "w").close()
    proc = dry_run("train_single_node.sh", ["--dry-run", *hybrid], MEGATRON_LM_PATH=checkout)
    assert proc.returncode == 0, proc.stderr
    cmd = torchrun_line(proc.stdout)
    assert flag_value(cmd, "--megatron-lm-script") == "pretrain_hybrid.py"
    assert flag_value(cmd, "--hybrid-layer-pattern") == "M*-M*-"  # parallel: E -> dense + memory
    assert cmd[cmd.index("--spec") + 2] == "ultramem_hybrid_stack_spec"


def test_missing_megatron_lm_path_is_an_error():
    proc = dry_run("train_single_node.sh", ["--dry-run", *SMALL], MEGATRON_LM_PATH="")
    assert proc.returncode == 2 and "MEGATRON_LM_PATH" in proc.stderr


# ---------------------------------------------------------------------- no-patch entry point
def test_entry_point_takes_out_the_checkout_path(monkeypatch, tmp_path, capsys):
    from megatron_ultramem.megatron_lm import pretrain_gpt as entry

    monkeypatch.delenv("MEGATRON_LM_PATH", raising=False)
    assert entry.split_megatron_lm_path(["--a", "--megatron-lm", "/x", "--b", "1"]) == (
        "/x",
        ["--a", "--b", "1"],
    )
    assert entry.split_megatron_lm_path(["--megatron-lm=/y", "--c"]) == ("/y", ["--c"])
    monkeypatch.setenv("MEGATRON_LM_PATH", "/env")
    assert entry.split_megatron_lm_path(["--c"]) == ("/env", ["--c"])
    with pytest.raises(SystemExit) as exit_info:
        entry.resolve_script(str(tmp_path))
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err
    (tmp_path / "pretrain_gpt.py").write_text("")
    assert entry.resolve_script(str(tmp_path)) == str(tmp_path / "pretrain_gpt.py")
    with pytest.raises(SystemExit) as exit_info:
        entry.resolve_script(None)
    assert exit_info.value.code == 2 and "--megatron-lm PATH" in capsys.readouterr().err
