"""Hugging Face export / import (issue 19): the HF model equals the Megatron model, the round trip
is bitwise, lm-eval-harness runs on an export, and bad input is refused before anything is written.

Multi-rank saves (TP=2 x EP=2, TP=2 x PP=2, each placement, HybridModel on 0.19) run in
tests/distributed/hf_worker.py under torchrun.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
pytest.importorskip("safetensors", reason="pip install -e '.[hf]'")

from megatron_ultramem import reference  # noqa: E402
from megatron_ultramem.hf.configuration_ultramem import UltraMemGPTConfig  # noqa: E402
from megatron_ultramem.hf.modeling_ultramem import UltraMemMemory  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed", "hf_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
           HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")  # fmt: skip
MAIN = ["--train-iters", "4", "--warmup-iters", "1", "--eval-interval", "4", "--eval-iters", "1",
        "--micro-batch-size", "4", "--seq-length", "48", "--no-progress", "--threads", "1"]  # fmt: skip


def _run(module, args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=ENV)  # fmt: skip


# ----------------------------------------------------------------------------- the memory math
@pytest.mark.parametrize("softmax", [False, True])
def test_memory_equals_the_reference_path(softmax):
    """The HF memory (its own copy of the math) == reference.py's functions composed as
    UltraMemLayer's reference path: same indices (exact; ties included: duplicated keys make
    phase-1 projections and grid cells tie) and the same output (fp64, bitwise up to the
    summation order of the einsums: 1e-12)."""
    cfg = UltraMemGPTConfig(hidden_size=20, ultramem_num_keys=5, ultramem_key_dim=6,
                            ultramem_value_dim=12, ultramem_num_heads=3, ultramem_num_cores=3,
                            ultramem_topm=7, ultramem_tucker_rank=2,
                            ultramem_score_activation="softmax" if softmax else "none")  # fmt: skip
    mem = UltraMemMemory(cfg).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in mem.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        mem.keys_row[:, 1] = mem.keys_row[:, 0]  # tied rows / columns: tie-breaking is exercised
        mem.keys_col[:, 3] = mem.keys_col[:, 2]
        mem.permutation.copy_(torch.randperm(mem.permutation.numel(), generator=g).to(mem.permutation.dtype))
        u, v, _ = reference.leading_singular_vectors(mem.cores.sum(1))
        mem.tucker_u.copy_(u)
        mem.tucker_v.copy_(v)
    x = torch.randn(33, 20, generator=g, dtype=torch.float64)
    with torch.no_grad():
        q = torch.nn.functional.linear(x, mem.query_weight)
        q_row, q_col = mem.query_norm_row(q[:, :6]), mem.query_norm_col(q[:, 6:])
        k_row = mem.key_norm_row(mem.keys_row.transpose(-1, -2)).transpose(-1, -2)
        k_col = mem.key_norm_col(mem.keys_col.transpose(-1, -2)).transpose(-1, -2)
        s_row, s_col = reference.row_col_scores(q_row, k_row), reference.row_col_scores(q_col, k_col)
        virtual, scores = reference.tucker_topm(s_row, s_col, mem.cores, mem.tucker_u, mem.tucker_v, 7)
        if softmax:
            scores = torch.softmax(scores, dim=2)
        virtual, scores = virtual.reshape(33, -1), scores.reshape(33, 21, 3)
        pooled = reference.ive_aggregate(virtual, scores, mem.permutation, mem.values, 4)
        want = torch.nn.functional.linear(pooled.transpose(1, 2).reshape(33, -1), mem.out_proj.weight)
        got_virtual, got_scores = mem.retrieve(x)
        got = mem(x)
    assert torch.equal(got_virtual, virtual)
    assert torch.allclose(got_scores, scores, rtol=0, atol=1e-12)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # chunked over tokens (the HF module's memory bound) == one pass (same selections; the GEMMs'
    # blocking may round differently with the batch size: 1e-12 in fp64)
    mem.TOKEN_BUDGET = 1
    with torch.no_grad():
        assert torch.equal(mem.retrieve(x[:5])[0], got_virtual[:5])
        assert torch.allclose(mem(x), got, rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------- the main job
@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """A 4-step main-job run with a checkpoint, and its export (the CLI, timed)."""
    import time

    tmp = tmp_path_factory.mktemp("main_job")
    proc = _run("megatron_ultramem", MAIN + ["--save", "ck", "--save-interval", "4"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t0 = time.perf_counter()
    proc = _run("megatron_ultramem.export_hf", ["--load", "ck", "--out", "hf"], tmp)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote hf:" in proc.stdout
    return tmp, seconds


def _megatron_main_job_model(ckpt_iter_dir):
    from megatron.core import dist_checkpointing

    from megatron_ultramem import train
    from megatron_ultramem.hf.checkpoint import main_job_args

    with open(os.path.join(ckpt_iter_dir, "ultramem_state.json")) as f:
        args = main_job_args(json.load(f)["run_config"])
    model = train.build_model(train.make_config(args), 256, args.seq_length)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_iter_dir)
    state.pop("optimizer", None)
    model.load_state_dict(state)
    return model.eval()


def _logits(model, ids):
    s = ids.shape[1]
    with torch.no_grad():
        return model(ids, torch.arange(s)[None].expand_as(ids), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1))


def test_main_job_export_equals_megatron_and_generates(main_job, megatron_world):
    """Logits of the exported main-job model (AutoModelForCausalLM, trust_remote_code; text through
    the exported byte tokenizer) == the Megatron model loaded from the checkpoint, fp32, 1e-4: the
    two differ only in summation order (attention by baddbmm vs matmul), measured 6e-7 at |logits|
    ~ 2; greedy generate() for 32 tokens == greedy decoding with the Megatron model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, _ = main_job
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp / "hf")
    text = "The color of Kalo is red.\nAsk anyone: the city of"
    ids = torch.tensor([tok(text)["input_ids"], tok(text[::-1])["input_ids"]])
    assert ids[0].tolist() == list(text.encode()) and tok.decode(ids[0]) == text
    megatron = _megatron_main_job_model(tmp / "ck" / "iter_0000004")
    want = _logits(megatron, ids)
    with torch.no_grad():
        got = hf(ids, attention_mask=torch.ones_like(ids)).logits
    assert (got - want).abs().max() < 1e-4
    assert (want[:, 1:] - want[:, :-1]).abs().max() > 1e-2  # not a constant model
    seq = ids
    for _ in range(32):
        seq = torch.cat([seq, _logits(megatron, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    with torch.no_grad():
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                          min_new_tokens=32, do_sample=False)  # fmt: skip
    assert torch.equal(gen, seq)


def test_round_trip_is_bitwise_and_the_main_job_loads_the_import(main_job):
    """export -> import (pretrain's release checkpoint; the main job's iteration-0 checkpoint) ->
    export gives the same safetensors bytes, and the main job resumes from its import (with the
    command import prints) and trains."""
    tmp, _ = main_job
    want = (tmp / "hf" / "model.safetensors").read_bytes()
    for target, extra in (("pretrain", []), ("main-job", ["--", "--train-iters", "6"])):
        proc = _run("megatron_ultramem.import_hf", ["--hf", "hf", "--save", f"ck_{target}", "--for", target, *extra], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = _run("megatron_ultramem.export_hf", ["--load", f"ck_{target}", "--out", f"hf_{target}"], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp / f"hf_{target}" / "model.safetensors").read_bytes() == want, target
    flags = proc_flags = None
    proc = _run("megatron_ultramem.import_hf", ["--hf", "hf", "--save", "ck_again", "--for", "main-job", "--", "--train-iters", "6"], tmp)
    proc_flags = proc.stdout.split("load it with: python -m megatron_ultramem ")[1].split()
    flags = [f if f != "ck_again" else "ck_main-job" for f in proc_flags]
    run = _run("megatron_ultramem", flags + ["--no-progress", "--eval-interval", "3", "--eval-iters", "1",
                                             "--output-dir", "resumed"], tmp)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp / "resumed" / "metrics.json").read_text())
    assert metrics["resumed_from_iteration"] == 0 and len(metrics["train_loss"]) == 6
    # it starts from the trained weights (4 steps: ~4.8), not from a fresh init (ln 256 = 5.55)
    assert metrics["initial_train_loss"] < 5.3


def test_export_shards_and_dtype(main_job):
    tmp, _ = main_job
    proc = _run("megatron_ultramem.export_hf", ["--load", "ck", "--out", "hf_bf16", "--dtype", "bfloat16",
                                                "--max-shard-size", "300KB"], tmp)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((tmp / "hf_bf16" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp / "hf_bf16" / f).exists() for f in files)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp / "hf_bf16", trust_remote_code=True, dtype=torch.bfloat16)
    perm = [b for n, b in m.named_buffers() if n.endswith("permutation")]
    assert perm and all(b.dtype == torch.int32 for b in perm)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- multi-rank saves
@pytest.mark.parametrize("scenario", ["gpt", "hybrid"])
def test_export_of_multi_rank_checkpoints(scenario):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
         WORKER, scenario], capture_output=True, text=True, timeout=900, env=ENV,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    print("\n".join(l for l in out.splitlines() if l.startswith(("ok ", "PASSED"))))
    assert proc.returncode == 0 and f"PASSED {scenario}" in out, out[-6000:]


# ----------------------------------------------------------------------------- lm-eval-harness
def test_lm_eval_runs_on_an_export(main_job):
    """lm-eval's CLI on the repo's local task (examples/lm_eval, no downloads) scores the export;
    its accuracy equals an independent ranking of the choices by the HF model's summed
    log-likelihood."""
    pytest.importorskip("lm_eval", reason="pip install -e '.[eval]'")
    tmp, _ = main_job
    task_dir = os.path.join(ROOT, "examples", "lm_eval")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={tmp / 'hf'},trust_remote_code=True,dtype=float32", "--include_path", task_dir,
         "--tasks", "ultramem_facts", "--device", "cpu", "--batch_size", "8", "--limit", "30",
         "--output_path", str(tmp / "lm_eval")],
        cwd=task_dir, capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [os.path.join(d, f) for d, _, fs in os.walk(tmp / "lm_eval") for f in fs if f.startswith("results")]
    acc = json.load(open(results[0]))["results"]["ultramem_facts"]["acc,none"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True).eval()
    rows = [json.loads(l) for l in open(os.path.join(task_dir, "ultramem_facts.jsonl"))][:30]
    right = 0
    for r in rows:
        ctx = list(r["context"].encode())
        scores = []
        for c in r["choices"]:
            ids = torch.tensor([ctx + list(c.encode())])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            scores.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(c.encode())))
        right += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    assert acc == pytest.approx(right / len(rows))


# ----------------------------------------------------------------------------- bad input
BAD_EXPORT = [
    # (argv, expected fragment of the one-line error)
    (["--load", "nowhere", "--out", "o"], "--load nowhere: no such directory"),
    (["--load", "empty", "--out", "o"], "no latest_checkpointed_iteration.txt and no metadata.json"),
    (["--load", "broken_tracker", "--out", "o"], "the checkpoint is partial"),
    (["--load", "ck", "--out", "o", "--iteration", "9"], "--iteration 9: ck holds no iter_0000009"),
    (["--load", "no_meta", "--out", "o"], ".metadata is missing"),
    (["--load", "ck", "--out", "full"], "--out full: exists and is not empty (pass --force"),
    (["--load", "ck", "--out", "a_file/o"], "--out a_file/o"),
    (["--load", "ck", "--out", "o", "--max-shard-size", "lots"], "--max-shard-size"),
    (["--load", "ck", "--out", "o", "--dtype", "int8"], "--dtype"),
    (["--load", "no_memory", "--out", "o"], "no UltraMem memory layers"),
    (["--load", "moe", "--out", "o"], "--num-experts"),
    (["--load", "squared_relu", "--out", "o"], "--squared-relu"),
    (["--out", "o"], "--load"),
]


def _fake_megatron_lm(src_iter_dir, dst, **changes):
    """A copy of a checkpoint whose saved Megatron-LM arguments are changed."""
    import argparse
    import shutil

    shutil.copytree(src_iter_dir, dst / "iter_0000001")
    (dst / "latest_checkpointed_iteration.txt").write_text("1")
    common = torch.load(dst / "iter_0000001" / "common.pt", weights_only=False)
    args = argparse.Namespace(**{**vars(common["args"]), **changes})
    common["args"] = args
    torch.save(common, dst / "iter_0000001" / "common.pt")


@pytest.fixture(scope="module")
def bad_inputs(main_job):
    import shutil

    tmp, _ = main_job
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "full").mkdir(exist_ok=True)
    (tmp / "full" / "keep.txt").write_text("x")
    (tmp / "a_file").write_text("not a directory")
    (tmp / "broken_tracker").mkdir(exist_ok=True)
    (tmp / "broken_tracker" / "latest_checkpointed_iteration.txt").write_text("12")
    if not (tmp / "no_meta").exists():
        shutil.copytree(tmp / "ck", tmp / "no_meta")
        os.remove(tmp / "no_meta" / "iter_0000004" / ".metadata")
    ck_pretrain = tmp / "ck_pre_bad"
    if not ck_pretrain.exists():
        proc = _run("megatron_ultramem.import_hf", ["--hf", "hf", "--save", str(ck_pretrain), "--for", "pretrain"], tmp)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for name, changes in (("no_memory", {"ultramem_mode": None}), ("moe", {"num_experts": 4}),
                              ("squared_relu", {"squared_relu": True})):  # fmt: skip
            (tmp / name).mkdir()
            _fake_megatron_lm(ck_pretrain / "release", tmp / name, **changes)
    return tmp


@pytest.mark.parametrize("argv,message", BAD_EXPORT, ids=[m for _, m in BAD_EXPORT])
def test_export_refuses_bad_input(bad_inputs, argv, message):
    tmp = bad_inputs
    before = sorted(os.listdir(tmp))
    proc = _run("megatron_ultramem.export_hf", argv, tmp)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert sorted(os.listdir(tmp)) == before  # nothing written, no temporary folder left
    assert sorted(os.listdir(tmp / "full")) == ["keep.txt"]


BAD_IMPORT = [
    (["--hf", "nowhere", "--save", "s"], "--hf nowhere: no such directory"),
    (["--hf", "empty", "--save", "s"], "no config.json"),
    (["--hf", "hf", "--save", "full"], "--save full: exists and is not empty"),
    (["--hf", "hf", "--save", "s", "--for", "pretrain", "--", "--lr", "1"], "need --for main-job"),
    (["--hf", "hf", "--save", "s", "--for", "main-job", "--", "--hidden-size", "64"], "--hidden-size 64: the folder's model has 128"),
    (["--hf", "hf", "--save", "s", "--for", "main-job", "--", "--lr", "abc"], "--lr"),
    (["--hf", "hf", "--save", "s", "--for", "cluster"], "--for"),
]


@pytest.mark.parametrize("argv,message", BAD_IMPORT, ids=[m for _, m in BAD_IMPORT])
def test_import_refuses_bad_input(bad_inputs, argv, message):
    tmp = bad_inputs
    before = sorted(os.listdir(tmp))
    proc = _run("megatron_ultramem.import_hf", argv, tmp)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert sorted(os.listdir(tmp)) == before
