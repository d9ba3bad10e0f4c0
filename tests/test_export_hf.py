"""Hugging Face export / import (issue 19): the HF model equals the Megatron model, the round trip
is bitwise, imports load where they are meant to, lm-eval-harness runs on an export. (Bad input of
both commands: rows of tests/test_bad_inputs.py.)

The commands run in this process (`export_hf.main`, `import_hf.import_hf`; one `python -m` each
checks the real entry's exit code) except the main job, which runs as its users run it. Saves at
TP=2 x EP=2, TP=2 x PP=2 and TP=1 (each placement; HybridModel on 0.19) and loads of imports by
megatron.training at TP=1 and TP=2 (0.19) run in tests/distributed/hf_worker.py under torchrun.
"""

import argparse
import copy
import importlib.util
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
MAIN = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--ultramem-layers", "[0,1]",
        "--ultramem-num-keys", "16", "--ultramem-key-dim", "16", "--ultramem-topm", "8",
        "--train-iters", "4", "--warmup-iters", "1", "--eval-interval", "4", "--eval-iters", "1",
        "--micro-batch-size", "4", "--seq-length", "48", "--no-progress", "--threads", "1"]  # fmt: skip
"""The main job, smaller (2 layers, 64 wide, a 16 x 16-key memory in layer 1): 4 steps."""


def _run(module, args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=ENV)  # fmt: skip


def _worker():
    """tests/distributed/hf_worker.py as a module (its model builders and save helpers)."""
    spec = importlib.util.spec_from_file_location("hf_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _export(*argv):
    from megatron_ultramem import export_hf

    assert export_hf.main([str(a) for a in argv]) == 0


def _same_weights(a, b):
    from megatron_ultramem.hf.folder import read_weights

    wa, wb = read_weights(str(a)), read_weights(str(b))
    assert wa.keys() == wb.keys()
    return all(torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)) for k in wa)


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
    # fp64: 1e-12 of the output's scale (|output| up to ~10 here: random weights, no norm)
    tol = 1e-12 * want.abs().max().item()
    assert torch.allclose(got, want, rtol=0, atol=tol)
    # chunked over tokens (the HF module's memory bound) == one pass (same selections; the GEMMs'
    # blocking may round differently with the batch size: the same 1e-12 of the scale)
    mem.TOKEN_BUDGET = 1
    with torch.no_grad():
        assert torch.equal(mem.retrieve(x[:5])[0], got_virtual[:5])
        assert torch.allclose(mem(x), got, rtol=0, atol=tol)


# ----------------------------------------------------------------------------- the main job
@pytest.fixture(scope="module")
def main_job(tmp_path_factory, megatron_world):
    """A 4-step main-job run (the one main-job process of this file) that saves its checkpoint and
    exports itself (--export-hf), and the export of that checkpoint by the command (in this
    process)."""
    tmp = tmp_path_factory.mktemp("main_job")
    proc = _run("megatron_ultramem", MAIN + ["--save", "ck", "--save-interval", "4", "--export-hf", "hf_job"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _export("--load", tmp / "ck", "--out", tmp / "hf")
    return tmp


def _main_job_model(ckpt_iter_dir):
    from megatron.core import dist_checkpointing

    from megatron_ultramem import train
    from megatron_ultramem.hf.checkpoint import main_job_args

    with open(os.path.join(ckpt_iter_dir, "ultramem_state.json")) as f:
        args = main_job_args(json.load(f)["run_config"])
    model = train.build_model(train.make_config(args), 256, args.seq_length)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_iter_dir)
    state.pop("optimizer", None)  # the checkpoint's common state (param groups) comes back too
    model.load_state_dict(state)
    return model.eval()


def _logits(model, ids):
    s = ids.shape[1]
    with torch.no_grad():
        return model(ids, torch.arange(s)[None].expand_as(ids), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1))


def test_main_job_export_equals_megatron_and_generates(main_job):
    """Logits of the exported main-job model (AutoModelForCausalLM, trust_remote_code; text through
    the exported byte tokenizer) == the Megatron model loaded from the checkpoint, fp32, 1e-4: the
    two differ only in summation order (attention by baddbmm vs matmul), measured 6e-7 at |logits|
    ~ 2; greedy generate() for 32 tokens == greedy decoding with the Megatron model. The main job's
    own --export-hf folder holds the same tensors, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = main_job
    assert _same_weights(tmp / "hf_job", tmp / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp / "hf")
    text = "The color of Kalo is red.\nAsk anyone: the city of"
    ids = torch.tensor([tok(text)["input_ids"], tok(text[::-1])["input_ids"]])
    assert ids[0].tolist() == list(text.encode()) and tok.decode(ids[0]) == text
    megatron = _main_job_model(tmp / "ck" / "iter_0000004")
    want = _logits(megatron, ids)
    with torch.no_grad():
        got = hf(ids, attention_mask=torch.ones_like(ids)).logits
    assert (got - want).abs().max() < 1e-4
    assert (want[:, 1:] - want[:, :-1]).abs().max() > 1e-2  # not a constant model
    with torch.no_grad():
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                          min_new_tokens=32, do_sample=False)  # fmt: skip
    # greedy decoding with the Megatron model gives the same 32 tokens: its argmax after every
    # prefix of `gen` is gen's next token (one forward; by induction the token-by-token loop's)
    assert gen.shape[1] == ids.shape[1] + 32
    assert torch.equal(_logits(megatron, gen)[:, ids.shape[1] - 1 : -1].argmax(-1), gen[:, ids.shape[1] :])


def test_export_shards_and_dtype(main_job):
    tmp = main_job
    _export("--load", tmp / "ck", "--out", tmp / "hf_bf16", "--dtype", "bfloat16", "--max-shard-size", "100KB")
    index = json.loads((tmp / "hf_bf16" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp / "hf_bf16" / f).exists() for f in files)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp / "hf_bf16", trust_remote_code=True, dtype=torch.bfloat16)
    perm = [b for n, b in m.named_buffers() if n.endswith("permutation")]
    assert perm and all(b.dtype == torch.int32 for b in perm)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    fp32 = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True)
    assert torch.equal(m.model.embed_tokens.weight, fp32.model.embed_tokens.weight.bfloat16())


def test_round_trip_is_bitwise(main_job):
    """export -> import (pretrain's and Megatron-LM's release checkpoints; the main job's
    iteration-0 checkpoint) -> export gives the same safetensors bytes."""
    from megatron_ultramem.import_hf import import_hf

    tmp = main_job
    want = (tmp / "hf" / "model.safetensors").read_bytes()
    for target in ("pretrain", "megatron-lm", "main-job"):
        import_hf(str(tmp / "hf"), str(tmp / f"ck_{target}"), target, quiet=True)
        _export("--load", tmp / f"ck_{target}", "--out", tmp / f"hf_{target}")
        assert (tmp / f"hf_{target}" / "model.safetensors").read_bytes() == want, target


def _main_job_stack(args):
    """The main job's model, DDP, optimizer and scheduler for its flags (train.train's build)."""
    from megatron_ultramem import train

    torch.manual_seed(args.seed)
    config = train.make_config(args)
    return train.wrap_for_training(args, config, train.build_model(config, 256, args.seq_length))


def test_main_job_import_is_a_fresh_start(main_job, tmp_path):
    """import --for main-job writes a fresh Adam state (zero moments, step = float32's smallest
    normal, see write_main_job): loaded by the main job's own loader, the first optimizer step from
    it is bit for bit a fresh optimizer's first step (a saved step of 1 would change Adam's bias
    correction; one of 0 is not written by Megatron and the load fails). The main job's end-of-run
    export without --save (through a temporary checkpoint) gives the folder's tensors back."""
    from megatron_ultramem import checkpointing
    from megatron_ultramem.export_hf import export_after_training
    from megatron_ultramem.hf.checkpoint import main_job_args
    from megatron_ultramem.import_hf import import_hf

    tmp = main_job
    ck = str(tmp_path / "ck")
    import_hf(str(tmp / "hf"), ck, "main-job", extra=["--train-iters", "6"], quiet=True)
    args = main_job_args(checkpointing.read_state(ck, 0)["run_config"])
    args.train_iters = 6  # not in run_config (it may grow on resume): the resuming run's flag
    model, ddp, optimizer, scheduler = _main_job_stack(args)
    checkpointing.load_checkpoint(ck, 0, model, optimizer, scheduler)
    end = copy.copy(args)
    end.save, end.export_hf = None, str(tmp_path / "hf_end")
    export_after_training(end, 0, model, optimizer, scheduler)
    assert _same_weights(tmp / "hf", end.export_hf)
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf_end"]  # the temporary checkpoint is gone

    model2, ddp2, optimizer2, scheduler2 = _main_job_stack(args)
    with torch.no_grad():
        for p, q in zip(model.parameters(), model2.parameters()):
            q.copy_(p)
    for s in (scheduler, scheduler2):  # past the warm-up's LR of 0 at step 0
        s.step(1)
    g = torch.Generator().manual_seed(0)
    for p, q in zip(ddp.module.parameters(), ddp2.module.parameters()):
        grad = torch.randn(p.shape, generator=g)
        p.main_grad.copy_(grad)
        q.main_grad.copy_(grad)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    optimizer2.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_main_job_accepts_an_import(main_job):
    """The command import_hf prints for --for main-job passes the main job's own checks as
    `python -m megatron_ultramem` makes them before any work (parse, validate: the checkpoint's
    manifest verified, its run_config equal to the flags'): it resumes at iteration 0. (Loading it
    and the first step from it: test_main_job_import_is_a_fresh_start.)"""
    from megatron_ultramem import train
    from megatron_ultramem.import_hf import import_hf

    tmp = main_job
    flags = import_hf(str(tmp / "hf"), str(tmp / "ck_resume"), "main-job", extra=["--train-iters", "2"], quiet=True)
    assert flags[-2:] == ["--load", str(tmp / "ck_resume")]
    assert flags[flags.index("--train-iters") + 1] == "2"  # the user's flags after -- are in it
    args = train.parse_args(flags + ["--output-dir", str(tmp / "resumed")])
    train.validate_args(args)
    assert args.resume_iteration == 0 and args.train_iters == 2 and args.hidden_size == 64


# ----------------------------------------------------------------------------- Megatron-LM's form
def prepare_load_dir(d):
    """DIR/load for the worker's load checks, in this process: the worker's LOAD model built as
    Megatron-LM's pretrain_gpt.py builds it with the plugin's --spec (a memory in every layer:
    the block stacks the layers' checkpoint keys), saved as pretrain_gpt.py saves it; its export
    (logits == the model's); `import_hf --for megatron-lm` (stacked keys) and `--for pretrain`
    (per-layer keys), each exported again bit for bit."""
    from megatron.core import dist_checkpointing

    from megatron_ultramem.hf.checkpoint import tensor_metadata
    from megatron_ultramem.import_hf import build_target_model, import_hf

    W = _worker()
    ns = argparse.Namespace(**W.LOAD_ARGS)
    model = build_target_model(ns, megatron_lm=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    W.perturb(model)  # refreshes the Tucker vectors from the cores
    src = W.save_megatron_lm(model.eval(), os.path.join(d, "src"), ns)
    assert "decoder.layers.mlp.memory.values" in tensor_metadata(src)  # stacked: [4, N, Dv]
    _export("--load", os.path.join(d, "src"), "--out", os.path.join(d, "hf"))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), trust_remote_code=True).eval()
    ids = W.tokens(vocab=47)
    want = W.megatron_logits(model, ids)
    assert W.check("Megatron-LM's form, TP=1", W.hf_logits(hf, ids), want) < W.ATOL
    for target, folder, stacked in (("megatron-lm", "megatron_lm", True), ("pretrain", "pretrain", False)):
        ck = os.path.join(d, folder)
        import_hf(os.path.join(d, "hf"), ck, target, quiet=True)
        keys = tensor_metadata(os.path.join(ck, "release"))
        assert ("decoder.layers.mlp.memory.values" in keys) == stacked, target
        assert ("decoder.layers.3.mlp.memory.values" in keys) == (not stacked), target
        args = dist_checkpointing.load_common_state_dict(os.path.join(ck, "release"))["args"]
        # recorded at export: what Megatron-LM's load_checkpoint compares with the loading run
        assert (args.make_vocab_size_divisible_by, args.tokenizer_type, args.add_position_embedding) == (
            8, "NullTokenizer", True)
        _export("--load", ck, "--out", os.path.join(d, f"hf_{folder}"))
        assert _same_weights(os.path.join(d, "hf"), os.path.join(d, f"hf_{folder}")), target


def test_multi_rank_saves_and_loads(tmp_path, megatron_world):
    """The worker's checks (module doc of tests/distributed/hf_worker.py), after this process
    prepares the imports it loads."""
    prepare_load_dir(str(tmp_path / "load"))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
         WORKER, str(tmp_path)], capture_output=True, text=True, timeout=900, env=ENV,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    print("\n".join(l for l in out.splitlines() if l.startswith(("ok ", "time ", "PASSED"))))
    assert proc.returncode == 0 and "PASSED" in out, out[-6000:]
    from megatron_ultramem import compat

    lines = [l for l in out.splitlines() if l.startswith("ok ")]
    has_019 = compat._minor(compat.megatron_core_version()) >= (0, 19)
    loads = 2 if has_019 and _worker().training_loop_patch() else 1
    assert len(lines) == 3 * 3 + 1 + (3 * 2 if has_019 else 1) + loads, lines  # every check ran


# ----------------------------------------------------------------------------- lm-eval-harness
LM_EVAL_ROWS = 16  # of the task's 100 (8 choices each: 128 log-likelihoods); the check is per row
def _task_manager(TaskManager, task_dir):
    """The repo's task only: indexing lm-eval's thousands of built-in task files takes seconds
    (include_defaults=False where the installed lm-eval has it)."""
    import inspect

    if "include_defaults" in inspect.signature(TaskManager).parameters:
        return TaskManager(include_path=task_dir, include_defaults=False)
    return TaskManager(include_path=task_dir)


def test_lm_eval_runs_on_an_export(main_job, monkeypatch):
    """lm-eval (its Python API: the CLI's `lm-eval run --model hf --model_args ...` calls the
    same simple_evaluate) on the repo's local task (examples/lm_eval, no downloads) scores the
    export; its accuracy equals an independent ranking of the choices by the HF model's summed
    log-likelihood."""
    pytest.importorskip("lm_eval", reason="pip install -e '.[eval]'")
    pytest.importorskip("accelerate", reason="pip install -e '.[eval]'")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(k, ENV[k])
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = main_job
    task_dir = os.path.join(ROOT, "examples", "lm_eval")
    monkeypatch.chdir(task_dir)  # the task's data_files path is relative
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp / 'hf'},trust_remote_code=True,dtype=float32",
        tasks=["ultramem_facts"], task_manager=_task_manager(TaskManager, task_dir), device="cpu",
        batch_size=8, limit=LM_EVAL_ROWS,
    )  # fmt: skip
    acc = out["results"]["ultramem_facts"]["acc,none"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True).eval()
    rows = [json.loads(l) for l in open(os.path.join(task_dir, "ultramem_facts.jsonl"))][:LM_EVAL_ROWS]
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
