"""`python -m megatron_ultramem.pretrain` (megatron-core 0.19+): every piece pretrain() calls.

The pieces run in tests/megatron_lm/pretrain_worker.py under torchrun (gloo, CPU): Megatron's
argument parsing with the plugin's flags, the model provider (GPT and HybridModel), the dataset
provider (mock and indexed data), forward_step + loss_func against an independent cross entropy,
Megatron's optimizer / scheduler factories with the plugin's hooks, and training steps through
Megatron's forward-backward schedule. On 0.16 the entry refuses with a clear error instead.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_ultramem import compat

WORKER = os.path.join(os.path.dirname(__file__), "pretrain_worker.py")
HAS_TRAINING = compat._minor(compat.megatron_core_version()) >= (0, 19)


def run_worker(model, tp, nproc, *extra, timeout=600):
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_DEVICE_MAX_CONNECTIONS="1")
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(nproc), WORKER, "--model", model, "--tp", str(tp), "--out", out, *extra],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        reports = []
        for rank in range(nproc):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                reports.append(json.load(f))
    return reports


def check_report(r, model):
    assert r["model"] == model and r["memory_layers"] == [2, 4]
    assert r["hooks"] and r["hook_steps"] == len(r["losses"]) and all(r["refreshed"])
    assert r["scheduler"] == "UltraMemParamScheduler" and r["value_lr_mult"] == 4.0
    assert r["value_group_ok"] and r["report_keys"] == ["lm loss"]
    # the loss function's sum equals an independent fp64 cross entropy of the model's logits
    # (the model computes its per-token losses in fp32: relative 1e-6)
    assert r["loss_sum"] == pytest.approx(r["ref_loss_sum"], rel=1e-6)
    assert r["num_tokens"] == r["mask_tokens"] == 32
    # the value table's group runs at a multiple of the base LR (the decaying value-LR multiplier)
    (_, base), (_, value) = r["lrs"]
    assert 1.0 < value / base <= 4.0
    assert r["losses"][-1] < r["losses"][0]  # it learns


def assert_entry_refuses_old_megatron():
    """megatron-core < 0.19 has no megatron.training: the entry says so and names the way out."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ultramem.pretrain", "--mock-data"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "needs megatron.training from megatron-core >= 0.19" in proc.stderr
    assert "megatron_ultramem.megatron_lm.pretrain_gpt" in proc.stderr  # the way out on 0.16


def test_default_spec_follows_the_model_family():
    from megatron_ultramem.pretrain import with_default_spec

    gpt = with_default_spec(["--num-layers", "2"])
    assert gpt[-3:] == ["--spec", "megatron_ultramem.megatron_lm", "ultramem_block_spec"]
    hybrid = with_default_spec(["--hybrid-layer-pattern", "*E"])
    assert hybrid[-1] == "ultramem_hybrid_stack_spec"
    mine = ["--spec", "my.module", "my_spec"]
    assert with_default_spec(mine) == mine


def test_gpt_tp2_equals_tp1_and_trains():
    if not HAS_TRAINING:
        return assert_entry_refuses_old_megatron()
    tp1 = run_worker("gpt", 1, 1)
    tp2 = run_worker("gpt", 2, 2)
    for r in tp1 + tp2:
        check_report(r, "GPTModel")
    assert tp2[0]["values_shape"][1] * 2 == tp1[0]["values_shape"][1]  # columns split over TP
    # same global weights (CPU init, per-column seeded table) and data: same losses; fp32 model
    for a, b in zip(tp2[0]["losses"], tp1[0]["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert tp2[0]["losses"] == tp2[1]["losses"]


def test_hybrid_tp2_on_indexed_data_trains(tmp_path):
    if not HAS_TRAINING:
        return assert_entry_refuses_old_megatron()
    from megatron_ultramem import data, data_pipeline

    prefix = str(tmp_path / "corpus")
    data_pipeline.write_indexed_corpus(data.make_corpus(num_train_docs=400, seed=3).train, prefix)
    for r in run_worker("hybrid", 2, 2, "--data-path", prefix):
        check_report(r, "HybridModel")
