"""The real training loop, end to end on CPU/gloo: `python -m megatron_ultramem.pretrain` (Megatron's
own `pretrain()`: optimizer and scheduler wrapping, the per-step Tucker refresh, `training_log`,
Megatron's dist-checkpoint save and load) and `launch/train_multi_node.sh` on two "nodes".

One MoE argument list (CPU flags, mock data) is converted the way the launchers convert it
(`moe_to_ultramem_argv`), then run twice at TP=2 (world size 2):
  1. `torchrun --standalone --nproc_per_node 2 -m megatron_ultramem.pretrain`: 10 iterations, a
     checkpoint at iteration 5, TensorBoard at every iteration;
  2. `launch/train_multi_node.sh` run twice on localhost (NNODES=2, NODE_RANK 0 and 1,
     NPROC_PER_NODE=1, MASTER_ADDR=127.0.0.1, ULTRAMEM_ENTRY=plugin): two torchrun agents, one rank
     each, the same world of 2 ranks, resuming from run 1's iteration-5 checkpoint. Iterations 6-10
     must repeat run 1's exactly (loss, grad norm, the UltraMem metrics, bit for bit: same data,
     same state, same reduction order), which holds only if the resume is exact AND two nodes
     compute what one node does. (One launch checks both: each launch costs ~30 s of CI.)
Run 1's TensorBoard event file must hold Megatron's scalars and the plugin's `ultramem/*` ones,
with the value-table LR equal to Megatron's LR times the value-LR multiplier computed here.

megatron-core 0.16 has no megatron.training (and so no pretrain() without a Megatron-LM
checkout): skipped there. The dry run of the launchers is tested by what it does not launch.
"""

import glob
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from megatron_ultramem import compat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_TRAINING = compat._minor(compat.megatron_core_version()) >= (0, 19)

# A small MoE model as a user's launch script would spell it, plus Megatron's CPU switches.
MOE_ARGS = shlex.split(
    "--num-layers 4 --hidden-size 48 --num-attention-heads 4 --ffn-hidden-size 96 "
    "--num-experts 4 --moe-router-topk 2 --moe-layer-freq [0,1,0,1] "
    "--seq-length 16 --max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4 "
    "--train-iters 10 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 0 "
    "--weight-decay 0.1 --disable-bias-linear --position-embedding-type rope "
    "--hidden-dropout 0 --attention-dropout 0 --seed 1234 --mock-data "
    "--tokenizer-type NullTokenizer --vocab-size 256 --make-vocab-size-divisible-by 64 "
    "--tensor-model-parallel-size 2 --log-interval 1 --tensorboard-log-interval 1 "
    "--eval-iters 0 --eval-interval 1000 "
    # CPU: gloo, parameters created on the CPU, Megatron's fused CUDA/apex kernels off
    "--distributed-backend gloo --transformer-impl local --use-cpu-initialization "
    "--no-persist-layer-norm --no-gradient-accumulation-fusion --no-masked-softmax-fusion "
    "--no-bias-gelu-fusion --no-bias-dropout-fusion --no-rope-fusion "
    # the memory knobs pinned small, H = 2 heads as the checks below expect (the converter sizes
    # the rest: 25 keys per side)
    "--ultramem-key-dim 16 --ultramem-topm 4 --ultramem-value-dim 24 --ultramem-num-heads 2"
)
ITERS, SAVE_AT = 10, 5


def converted_args():
    from megatron_ultramem.megatron_lm.convert import moe_to_ultramem_argv

    return moe_to_ultramem_argv(MOE_ARGS)[0]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # the launchers call `torchrun` and `$PYTHON`: the ones of this interpreter
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(*extra, timeout=400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megatron_ultramem.pretrain", *converted_args(), *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def scalars(tb_dir):
    """{tag: {step: value}} from the one TensorBoard event file Megatron wrote (last rank)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(files[0], size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def two_node_launch(extra, timeout=400):
    """launch/train_multi_node.sh on two localhost 'nodes' (static rendezvous), one rank each."""
    env = _env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), ULTRAMEM_ENTRY="plugin")  # fmt: skip
    env.pop("DRY_RUN", None)
    script = os.path.join(ROOT, "launch", "train_multi_node.sh")
    args = MOE_ARGS + list(extra)
    nodes = [
        subprocess.Popen(["bash", script, *args], cwd=ROOT, env=dict(env, NODE_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=timeout)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-6000:]
    return outputs


@pytest.mark.skipif(
    not HAS_TRAINING,
    reason="megatron-core < 0.19 ships no megatron.training: pretrain() needs a Megatron-LM checkout",
)
def test_pretrain_loop_resumed_on_two_nodes_repeats_one_node(tmp_path):
    ckpt, tb1, tb2 = (str(tmp_path / d) for d in ("ckpt", "tb1", "tb2"))
    # 1. 10 iterations, Megatron's own checkpoint at 5 (and at the end)
    pretrain("--save", ckpt, "--save-interval", str(SAVE_AT), "--tensorboard-dir", tb1)
    run1 = scalars(tb1)
    # 2. two nodes, resuming from the iteration-5 checkpoint alone
    resume = str(tmp_path / "resume")
    os.makedirs(resume)
    shutil.copytree(os.path.join(ckpt, f"iter_{SAVE_AT:07d}"), os.path.join(resume, f"iter_{SAVE_AT:07d}"))
    with open(os.path.join(resume, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(SAVE_AT))
    two_node_launch(["--load", resume, "--tensorboard-dir", tb2])
    run2 = scalars(tb2)

    steps = list(range(1, ITERS + 1))
    assert sorted(run1["lm loss"]) == steps
    assert sorted(run2["lm loss"]) == list(range(SAVE_AT + 1, ITERS + 1))  # no iteration redone
    # Same state (model, optimizer, scheduler, Tucker buffers, RNG), same data position, same
    # reduction order: the resumed iterations are the same numbers, bit for bit.
    for tag in ("lm loss", "grad-norm", "learning-rate", "ultramem/tucker_aux_loss",
                "ultramem/touched_fraction", "ultramem/top1_score", "ultramem/value_learning_rate"):  # fmt: skip
        assert {s: run1[tag][s] for s in run2[tag]} == run2[tag], tag

    # The plugin's metrics went through training_log into Megatron's TensorBoard writer, each
    # iteration: the aux loss, the statistics, every memory layer's singular values (layers 2, 4,
    # H = 2 heads, r = 2), and the value table's LR = Megatron's LR x the value-LR multiplier
    # 1 + (rho0 - 1) * (1 - samples / (rate * total samples)) with rho0 = 4, rate = 1, computed here
    # from the step (global batch 4 samples); float32 in the event file: relative 1e-6.
    for n in (2, 4):
        for head in (0, 1):
            for k in (1, 2):
                values = run1[f"ultramem/singular_values/layer_{n}/head_{head}/sv_{k}"]
                assert sorted(values) == steps and all(v > 0 for v in values.values())
    for step in steps:
        assert 0 < run1["ultramem/touched_fraction"][step] <= 1
        assert 0 < run1["ultramem/tucker_aux_loss"][step] < 1
        assert run1["ultramem/top1_score"][step] >= run1["ultramem/topm_score"][step]
        # logged after the step's scheduler update: `step` steps of 4 samples done
        multiplier = 1 + 3 * max(0.0, 1 - step * 4 / (ITERS * 4))
        assert math.isclose(run1["ultramem/value_learning_rate"][step],
                            run1["learning-rate"][step] * multiplier, rel_tol=1e-6)  # fmt: skip
    assert run1["lm loss"][ITERS] < run1["lm loss"][1]  # it learns


def test_dry_run_launches_nothing(tmp_path):
    """DRY_RUN=1 prints the torchrun command and starts nothing: a `torchrun` that leaves a mark
    is first on PATH, and only the real run leaves it."""
    fake = tmp_path / "bin"
    fake.mkdir()
    mark = tmp_path / "launched"
    (fake / "torchrun").write_text(f'#!/bin/sh\necho "$@" > {shlex.quote(str(mark))}\n')
    (fake / "torchrun").chmod(0o755)
    env = _env(NNODES="2", NODE_RANK="1", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29511", ULTRAMEM_ENTRY="plugin")  # fmt: skip
    env["PATH"] = str(fake) + os.pathsep + env["PATH"]
    script = os.path.join(ROOT, "launch", "train_multi_node.sh")

    def launch(dry_run):
        return subprocess.run(["bash", script, *MOE_ARGS], cwd=ROOT, env=dict(env, DRY_RUN=dry_run),
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    dry = launch("1")
    assert dry.returncode == 0, dry.stderr
    assert not mark.exists()  # nothing launched
    printed = [shlex.split(line) for line in dry.stdout.splitlines() if line.startswith("torchrun ")]
    assert len(printed) == 1
    real = launch("0")
    assert real.returncode == 0, real.stderr
    # the real run launched exactly the command the dry run printed
    assert shlex.split(mark.read_text()) == printed[0][1:]
