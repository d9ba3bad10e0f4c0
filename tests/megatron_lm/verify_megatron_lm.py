"""Verification against real Megatron-LM on CPU (outside CI; skipped unless MEGATRON_LM_PATH is set).

Runs Megatron-LM's own `pretrain_gpt.py` (core_r0.16.0 or core_v0.19.0; `pretrain_hybrid.py` with
the HybridModel spec on core_v0.19.0) up to the model: the script's `pretrain` is
replaced by `cpu_pretrain` below, which does what Megatron's `pretrain` does before training, in
the CPU-capable way MEGATRON_NOTES.md describes: Megatron-LM's `parse_args` (with the
extra_args_provider the script passes) and `validate_args`, `set_global_variables(args,
build_tokenizer=False)`, gloo process groups, `initialize_model_parallel`, then the script's own
model provider (`gpt_builders.gpt_builder` driven by `--spec` and the `--ultramem-*` flags). Then one
forward and backward, and the plugin's Megatron-LM hooks: the value param group through Megatron's
`_get_param_groups`, Megatron-LM's `get_optimizer_param_scheduler` (wrapped into
UltraMemParamScheduler), the Tucker refresh after an optimizer step, and the cross-rank statistics.

Two variants:
  entry    unmodified pretrain_gpt.py through `python -m megatron_ultramem.megatron_lm.pretrain_gpt`
           (parse_args wrapped to add the flags; no patch);
  patched  pretrain_gpt.py with patches/megatron-lm-pretrain_gpt-ultramem.patch applied (it passes
           extra_args_provider=add_ultramem_args and installs the hooks itself).

Usage (see docs/megatron_lm.md):
  MEGATRON_LM_PATH=/tmp/mlm torchrun --nproc_per_node 2 tests/megatron_lm/verify_megatron_lm.py \
      --variant entry --tp 2 --case parallel
  MEGATRON_LM_PATH=/tmp/mlm-patched torchrun --nproc_per_node 2 \
      tests/megatron_lm/verify_megatron_lm.py --variant patched --tp 2 --case replace
  MEGATRON_LM_PATH=/tmp/mlm19 torchrun --nproc_per_node 2 tests/megatron_lm/verify_megatron_lm.py \
      --variant entry --tp 2 --case hybrid-replace --builder builders
  MEGATRON_LM_PATH=/tmp/mlm python -m pytest -q tests/megatron_lm/verify_megatron_lm.py
Each rank prints one JSON line starting with "VERIFY ".
"""

import argparse
import json
import os
import runpy
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

BASE_ARGS = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "128", "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "10",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "linear", "--weight-decay", "0.1",
    "--transformer-impl", "local", "--use-cpu-initialization", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--mock-data", "--tokenizer-type",
    "NullTokenizer", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64",
    "--distributed-backend", "gloo",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "1234",
    "--spec", "megatron_ultramem.megatron_lm", "ultramem_block_spec",
    "--ultramem-num-keys", "8", "--ultramem-key-dim", "16", "--ultramem-topm", "4",
    "--ultramem-value-dim", "32",
]  # fmt: skip

CASES = {
    # UltraMemV2 placement: memory beside the dense MLP of layers 1 and 3.
    "parallel": ["--ultramem-mode", "parallel", "--ultramem-layers", "[0,1,0,1]"],
    # Dense model whose MLPs in layers 1 and 3 are replaced by memories.
    "replace": ["--ultramem-mode", "replace", "--ultramem-layers", "[0,1,0,1]"],
    # MoE model whose MoE blocks in layers 1 and 3 are swapped for memories (0 and 2 stay MoE).
    # Megatron refuses MoE with TP > 1 without sequence parallelism, which its torch LayerNorm
    # (no apex/TE on CPU) refuses: this case runs at TP=1, with expert parallelism instead.
    "moe-replace": [
        "--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "allgather",
        "--disable-bias-linear", "--ultramem-mode", "replace", "--ultramem-layers", "[0,1,0,1]",
    ],
}  # fmt: skip
# Every MoE block swapped: --num-experts stays (Megatron-LM needs it for expert parallelism), and
# expert parallelism then splits only the memories' tables.
CASES["moe-replace-all"] = CASES["moe-replace"][:-1] + ["1"]
HYBRID_SPEC = ["--spec", "megatron_ultramem.megatron_lm", "ultramem_hybrid_stack_spec"]
# core_v0.19 pretrain_hybrid.py (the later --spec wins): attention + memory layers
CASES["hybrid-replace"] = HYBRID_SPEC + [
    "--hybrid-layer-pattern", "*E*E", "--ultramem-mode", "replace", "--disable-bias-linear",
]  # fmt: skip
CASES["hybrid-parallel"] = HYBRID_SPEC + [
    "--hybrid-layer-pattern", "*-*-", "--ultramem-mode", "parallel", "--disable-bias-linear",
]  # fmt: skip
EXPECTED_MEMORY_LAYERS = {
    "parallel": [2, 4], "replace": [2, 4], "moe-replace": [2, 4], "moe-replace-all": [1, 2, 3, 4],
    "hybrid-replace": [2, 4], "hybrid-parallel": [2, 4],
}  # fmt: skip


# ---------------------------------------------------------------------- worker (under torchrun)
def _report(**fields):
    """One line per rank, printed in rank order (ranks share stdout, where lines can interleave)."""
    import torch.distributed as dist

    for rank in range(dist.get_world_size()):
        if rank == dist.get_rank():
            print("VERIFY " + json.dumps(fields, sort_keys=True), flush=True)
        dist.barrier()


_BUILDER = {"name": "script"}  # which model-building path cpu_pretrain takes (worker --builder)


def cpu_pretrain(*pretrain_args, extra_args_provider=None, args_defaults=None, **unused_kw):
    """Stand-in for megatron.training.pretrain: everything up to the model, then the checks.

    core_r0.16: pretrain(datasets_provider, model_provider, model_type, forward_step, ...,
    extra_args_provider=, args_defaults=): parse and validate the arguments as
    initialize_megatron does, build with the script's model_provider (gpt_builders).
    core_v0.19: the script parsed and validated them already (parse_and_validate_args) and calls
    pretrain(cfg_container, datasets_provider, model_type, forward_step, ...): build with the
    container's model builder (megatron.training.models, the script's own path), or with
    `model_provider(gpt_builder | hybrid_builder)` from the checkout (worker --builder builders).
    """
    import torch.distributed as dist

    from megatron.core import mpu, tensor_parallel
    from megatron.training import get_args
    from megatron.training import initialize as megatron_initialize

    container = pretrain_args[0] if hasattr(pretrain_args[0], "model") else None
    if container is None:  # core_r0.16
        from megatron.training.global_vars import set_global_variables

        args = megatron_initialize.parse_args(extra_args_provider, False)
        megatron_initialize.validate_args(args, args_defaults or {})
        set_global_variables(args, build_tokenizer=False)
        multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
        args.padded_vocab_size = -(-args.vocab_size // multiple) * multiple
    else:
        args = get_args()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mpu.initialize_model_parallel(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )
    megatron_initialize._set_random_seed(args.seed, args.data_parallel_random_init)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)  # skipped above without a GPU

    if container is None:
        model = pretrain_args[1](pre_process=True, post_process=True)  # the script's provider
        builder = "gpt_builders.gpt_builder (pretrain_gpt.py's model_provider)"
    elif _BUILDER["name"] == "builders":
        from model_provider import model_provider  # the checkout's

        hybrid = type(container.model).__name__.startswith("Hybrid")
        if hybrid:
            from hybrid_builders import hybrid_builder as build
        else:
            from gpt_builders import gpt_builder as build
        model = model_provider(build, True, True)
        builder = f"model_provider({build.__module__}.{build.__name__})"
    else:
        from megatron.core.process_groups_config import ProcessGroupCollection

        cfg = container.model
        model = cfg.get_builder_cls()(cfg).build_model(
            ProcessGroupCollection.use_mpu_process_groups(), True, True
        )
        builder = f"{type(cfg).__name__} -> {cfg.get_builder_cls().__name__} (megatron.training.models)"
    _checks(args, model, builder)


def _checks(args, model, builder):
    """Forward/backward, the value param group, the scheduler, the Tucker refresh, statistics."""
    import torch
    import torch.distributed as dist

    from megatron.training import training as megatron_training

    from megatron_ultramem.layer import UltraMemLayer
    from megatron_ultramem.megatron_lm.hooks import UltraMemTrainingHooks, active_hooks
    from megatron_ultramem.optim import add_value_config_overrides, is_value_group

    layers = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
    numbers = sorted(layer.layer_number for layer in layers)
    rank = dist.get_rank()
    values_shape = list(layers[0].values.shape) if layers else None

    # 3. Forward and backward on the same tokens on every rank.
    torch.manual_seed(0)
    b, s = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, args.vocab_size, (b, s + 1))
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    hooks = UltraMemTrainingHooks(log_stats=True).attach(model)
    model.train()
    loss = model(tokens[:, :-1], position_ids, mask, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    value_grad_sq = sum(float(layer.values.grad.float().pow(2).sum()) for layer in layers)
    finite = all(
        bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
    )

    # 4. The value group through Megatron's own param-group builder.
    from megatron.core.optimizer import _get_param_groups

    opt_config, overrides = megatron_training.get_megatron_optimizer_config(args)
    groups = _get_param_groups(
        [model],
        opt_config,
        add_value_config_overrides(
            overrides, opt_config, args.ultramem_value_lr_mult, args.ultramem_value_weight_decay
        ),
    )
    value_groups = [g for g in groups if is_value_group(g)]
    value_ids = {id(layer.values) for layer in layers}
    value_group_ok = (not layers and not value_groups) or (
        len(value_groups) == 1 and {id(p) for p in value_groups[0]["params"]} == value_ids
    )

    # 5. Megatron-LM's scheduler factory (wrapped by the hooks) on a torch optimizer over those
    #    groups, and the Tucker refresh after a step.
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items()} for g in groups if g["params"]], lr=args.lr
    )
    scheduler = megatron_training.get_optimizer_param_scheduler(optimizer)
    hooks.wrap_optimizer(optimizer)
    optimizer.step()
    refreshed_calls = hooks.steps
    # After the step every layer's phase-1 vectors are the leading pair of its updated cores.
    from megatron_ultramem.reference import leading_singular_vectors

    refresh_consistent = all(
        torch.allclose(
            layer.tucker_u.abs(),
            leading_singular_vectors(layer.cores.detach().sum(1))[0].abs(),
            atol=1e-5,
        )
        for layer in layers
    )
    scheduler.step(increment=args.global_batch_size)
    lr_by_group = sorted(
        {
            ("value" if is_value_group(g) else "other", round(g["lr"], 12))
            for g in optimizer.param_groups
        }
    )

    # 6. Cross-rank statistics (all_gather_object + MAX/SUM all-reduces over gloo).
    metrics = hooks.collect()
    scalars = hooks.scalars(metrics)
    _report(
        rank=rank,
        tp=args.tensor_model_parallel_size,
        loss=round(float(loss), 6),
        memory_layers=numbers,
        values_shape=values_shape,
        value_grad_sq=value_grad_sq,
        grads_finite=finite,
        value_group_ok=value_group_ok,
        scheduler=type(scheduler).__name__,
        value_lr_mult=getattr(scheduler, "value_lr_mult", None),
        lr_by_group=lr_by_group,
        refresh_calls=refreshed_calls,
        refresh_consistent=refresh_consistent,
        hooks_installed=active_hooks() is not None,
        touched_fraction={n: round(m.get("touched_fraction", -1), 4) for n, m in metrics.items()},
        scalar_names=sorted(k for k in scalars if "singular_values" not in k),
        spec=args.spec,
        ultramem_mode=args.ultramem_mode,
        builder=builder,
        model=type(model).__name__,
    )
    dist.barrier()


def _install_cpu_support():
    """CPU bits of MEGATRON_NOTES.md, applied before the script imports `pretrain`."""
    import megatron.training
    import megatron.training.training as training

    from megatron_ultramem import cpu_compat

    cpu_compat.enable()  # also answers validate_args' GPU-architecture query (patch 8)
    megatron.training.pretrain = cpu_pretrain
    training.pretrain = cpu_pretrain


def worker(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=("entry", "patched"), required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--case", choices=sorted(CASES), default="parallel")
    parser.add_argument(
        "--builder", choices=("models", "builders"), default="models",
        help="core_v0.19: build with the config container's megatron.training.models builder (what "
        "the scripts do) or with the checkout's model_provider(gpt_builder | hybrid_builder)",
    )  # fmt: skip
    opts, extra = parser.parse_known_args(argv)
    _BUILDER["name"] = opts.builder
    script_name = "pretrain_hybrid.py" if opts.case.startswith("hybrid") else "pretrain_gpt.py"
    mlm = os.environ["MEGATRON_LM_PATH"]
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    megatron_args = BASE_ARGS + CASES[opts.case] + [
        "--tensor-model-parallel-size", str(opts.tp),
        "--expert-model-parallel-size", str(opts.ep),
        "--global-batch-size", str(2 * world // opts.tp),  # micro-batch 2 on every DP rank
    ]  # fmt: skip
    megatron_args += extra
    if opts.variant == "entry":
        from megatron_ultramem.megatron_lm import pretrain_gpt as entry

        # sys.path + hooks + flag registration, as `python -m` does
        script = entry.prepare(mlm, script_name)
        _install_cpu_support()
        sys.argv = [script, *megatron_args]
        runpy.run_path(script, run_name="__main__")
    else:
        script = os.path.join(mlm, script_name)
        with open(script) as f:
            if "add_ultramem_args" not in f.read():
                raise SystemExit(f"{script} is not patched: git apply patches/megatron-lm-*.patch")
        sys.path.insert(0, mlm)
        _install_cpu_support()
        sys.argv = [script, *megatron_args]
        runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------------- pytest driver
MLM = os.environ.get("MEGATRON_LM_PATH")
pytestmark = pytest.mark.skipif(not MLM, reason="set MEGATRON_LM_PATH to a Megatron-LM checkout")


def run_torchrun(variant, tp, case, nproc=2, mlm=None, ep=1, timeout=900, builder="models"):
    """Launch the worker; returns {rank: report dict}."""
    env = dict(os.environ, MEGATRON_LM_PATH=mlm or MLM, CUDA_DEVICE_MAX_CONNECTIONS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), __file__, "--variant", variant, "--tp", str(tp), "--ep", str(ep),
        "--case", case, "--builder", builder,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    reports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("VERIFY "):
            r = json.loads(line[len("VERIFY ") :])
            reports[r["rank"]] = r
    assert proc.returncode == 0 and len(reports) == nproc, proc.stdout[-4000:] + proc.stderr[-8000:]
    for rank, r in sorted(reports.items()):  # the numbers docs/megatron_lm.md records (pytest -rA)
        print(f"{case} {builder} tp={tp} ep={ep} rank={rank}: loss={r['loss']} "
              f"value_grad_sq={r['value_grad_sq']:.6f} values_shape={r['values_shape']} "
              f"memory_layers={r['memory_layers']} model={r['model']}")  # fmt: skip
    return reports


def _check(reports, case):
    for r in reports.values():
        assert r["memory_layers"] == EXPECTED_MEMORY_LAYERS[case]
        assert r["grads_finite"] and r["value_group_ok"] and r["refresh_calls"] == 1
        assert r["refresh_consistent"] and r["hooks_installed"]
        assert r["scheduler"] == "UltraMemParamScheduler"


def _is_v019():
    return os.path.isfile(os.path.join(MLM or "", "megatron", "training", "models", "gpt.py"))


# On a core_v0.19 checkout "models" is the scripts' own path (megatron.training.models builders)
# and "builders" the checkout's model_provider(gpt_builder | hybrid_builder); core_r0.16 has one.
BUILDERS = ["models", "builders"] if _is_v019() else ["models"]


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("case", ["parallel", "replace"] + (["hybrid-replace", "hybrid-parallel"] if _is_v019() else []))
def test_entry_point_tp2_matches_tp1(case, builder):
    tp2 = run_torchrun("entry", 2, case, builder=builder)
    tp1 = run_torchrun("entry", 1, case, nproc=1, builder=builder)
    _check(tp2, case)
    _check(tp1, case)
    # Same global weights (CPU init, per-column seeded table), so the same loss at TP=1 and TP=2.
    assert abs(tp2[0]["loss"] - tp1[0]["loss"]) < 1e-4
    assert tp2[0]["loss"] == tp2[1]["loss"]
    # The table is column-sharded over TP: the shards' squared gradient norms add up to TP=1's.
    total = tp2[0]["value_grad_sq"] + tp2[1]["value_grad_sq"]
    assert abs(total - tp1[0]["value_grad_sq"]) <= 1e-4 * tp1[0]["value_grad_sq"]


def test_moe_replace_ep2():
    # Layers 0 and 2 stay MoE. Megatron draws each EP rank's experts from its own RNG stream, so
    # the EP=2 model is not the single-rank model; both ranks must agree with each other.
    ep2 = run_torchrun("entry", 1, "moe-replace", ep=2)
    _check(ep2, "moe-replace")
    assert ep2[0]["loss"] == ep2[1]["loss"]


def test_all_moe_replaced_ep2_matches_single_rank():
    # No MoE layer left: EP=2 splits only the tables' columns; same tokens on every rank, so the
    # loss equals the single-rank one.
    ep2 = run_torchrun("entry", 1, "moe-replace-all", ep=2)
    one = run_torchrun("entry", 1, "moe-replace-all", nproc=1)
    _check(ep2, "moe-replace-all")
    _check(one, "moe-replace-all")
    assert abs(ep2[0]["loss"] - one[0]["loss"]) < 1e-5


def test_patched_script():
    patched = os.environ.get("MEGATRON_LM_PATCHED_PATH")
    if not patched:
        pytest.skip("set MEGATRON_LM_PATCHED_PATH to a checkout with the patch applied")
    reports = run_torchrun("patched", 2, "parallel", mlm=patched)
    assert reports[0]["memory_layers"] == EXPECTED_MEMORY_LAYERS["parallel"]


if __name__ == "__main__":
    worker()
