"""Every piece `megatron.training.pretrain()` calls from `megatron_ultramem.pretrain`, on CPU/gloo.

    torchrun --standalone --nproc_per_node 2 tests/megatron_lm/pretrain_worker.py --model gpt --tp 2 --out /tmp/r
    torchrun --standalone --nproc_per_node 1 tests/megatron_lm/pretrain_worker.py --model hybrid \
        --data-path /tmp/corpus/train --out /tmp/r

In the order pretrain() uses them: Megatron's argument parsing with the plugin's flags
(`pretrain.parse_args`), the model provider (GPTModel / HybridModel from the UltraMem spec), the
dataset provider (MockGPTDataset or GPTDataset over an indexed prefix), Megatron's DDP, optimizer
and scheduler factories from megatron.training.training (wrapped by the plugin's hooks), and
training steps through Megatron's forward-backward schedule with `pretrain.forward_step`.
`pretrain()` itself needs CUDA. Each rank writes OUT/rank{r}.json.
"""

import argparse
import json
import os
import sys
import warnings

import torch

BASE = [
    "--num-layers", "4", "--hidden-size", "48", "--num-attention-heads", "4",
    "--ffn-hidden-size", "96", "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--train-iters", "20", "--lr", "3e-3",
    "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "0", "--weight-decay", "0.1",
    "--transformer-impl", "local", "--use-cpu-initialization", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--position-embedding-type", "rope",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
    "--distributed-backend", "gloo", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--seed", "1234", "--split", "90,5,5", "--disable-bias-linear",
    "--ultramem-num-keys", "8", "--ultramem-key-dim", "16", "--ultramem-topm", "4",
    "--ultramem-value-dim", "24",
]  # fmt: skip
MODELS = {
    # GPT, memory beside the dense MLP of layers 1 and 3
    "gpt": ["--ultramem-mode", "parallel", "--ultramem-layers", "[0,1,0,1]"],
    # HybridModel: attention / MoE-slot pattern, every E replaced by a memory
    "hybrid": ["--hybrid-layer-pattern", "*E*E", "--ultramem-mode", "replace"],
}
MICRO_BATCHES = 2


def report(out_dir, **fields):
    """One JSON file per rank (ranks share stdout, where lines can interleave)."""
    with open(os.path.join(out_dir, f"rank{fields['rank']}.json"), "w") as f:
        json.dump(fields, f, sort_keys=True)


def reference_loss_sum(model, batch) -> float:
    """Masked next-token cross entropy summed over tokens, from the model's logits (fp64)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])  # [b, s, V/t]
        logits = gather_from_tensor_model_parallel_region(logits).double()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none"
        )
    return float((nll * batch["loss_mask"].reshape(-1).double()).sum())


def _batches(dataset, i, stride, mbs):
    while True:
        items = [dataset[j] for j in range(i, i + mbs)]
        yield {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        i += stride


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--data-path", default=None, help="indexed prefix; default --mock-data")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True, help="directory for the per-rank JSON reports")
    opts = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron asserts it with TP > 1

    from megatron_ultramem import cpu_compat

    cpu_compat.enable()
    from megatron.core import mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training import training

    from megatron_ultramem import pretrain as P
    from megatron_ultramem.layer import UltraMemLayer
    from megatron_ultramem.megatron_lm.hooks import active_hooks, install_megatron_lm_hooks
    from megatron_ultramem.optim import UltraMemParamScheduler, is_value_group
    from megatron_ultramem.reference import leading_singular_vectors

    install_megatron_lm_hooks()
    world = int(os.environ["WORLD_SIZE"])
    data = ["--data-path", opts.data_path] if opts.data_path else ["--mock-data"]
    argv = BASE + MODELS[opts.model] + data + [
        "--tensor-model-parallel-size", str(opts.tp),
        "--global-batch-size", str(2 * MICRO_BATCHES * world // opts.tp),
    ]  # fmt: skip
    # 1. arguments: Megatron's parse_and_validate_args + the --ultramem-* flags; --spec defaulted
    args = P.parse_args(argv)
    torch.distributed.init_process_group("gloo")
    mpu.initialize_model_parallel(args.tensor_model_parallel_size)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)

    # 2. model provider
    model = P.model_provider()
    memories = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
    memory_layers = sorted(m.layer_number for m in memories)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )

    # 3. dataset provider (what pretrain's build_train_valid_test_data_iterators calls)
    samples = args.global_batch_size * (opts.steps + 1)
    train_ds, valid_ds, _ = P.train_valid_test_datasets_provider([samples, 4, 4])
    built = train_ds is not None  # only TP rank 0 reads data; get_batch broadcasts it
    assert built == (mpu.get_tensor_model_parallel_rank() == 0)
    assert not built or (len(train_ds) >= samples and valid_ds is not None)
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

    def loader(start):
        if not built:
            return iter(())
        # every DP rank takes its own micro-batches, as Megatron's pretraining sampler does
        mbs = args.micro_batch_size
        return _batches(train_ds, start + dp_rank * mbs, dp_size * mbs, mbs)

    # 4. forward_step + loss_func against an independent cross entropy of the logits
    batch = P.get_batch(loader(0))
    output, loss_fn = P.forward_step(loader(0), model)
    loss_sum, num_tokens, rep = loss_fn(output)
    ref_sum = reference_loss_sum(model, batch)

    # 5. Megatron's optimizer and scheduler factories (wrapped by the hooks)
    opt_config, overrides = training.get_megatron_optimizer_config(args)
    optimizer = training.get_megatron_optimizer(opt_config, [ddp], config_overrides=overrides)
    scheduler = training.get_optimizer_param_scheduler(optimizer)
    groups = optimizer.param_groups
    value_groups = [g for g in groups if is_value_group(g)]
    value_ids = {id(m.values) for m in memories}

    def lrs():
        return sorted({(is_value_group(g), round(g["lr"], 10)) for g in optimizer.param_groups})

    # 6. training steps through Megatron's schedule
    forward_backward = get_forward_backward_func()
    it = loader(0)
    losses, refreshed = [], []
    for _ in range(opts.steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(
            forward_step_func=P.forward_step, data_iterator=it, model=[ddp],
            num_microbatches=MICRO_BATCHES, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )  # fmt: skip
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=args.global_batch_size)
        refreshed.append(all(
            torch.allclose(m.tucker_u.abs(), leading_singular_vectors(m.cores.detach().sum(1))[0].abs())
            for m in memories
        ))  # fmt: skip
        step_loss = torch.stack([o["lm loss"] for o in out]).sum(0)  # [sum, tokens]
        torch.distributed.all_reduce(step_loss, group=mpu.get_data_parallel_group())
        losses.append(float(step_loss[0] / step_loss[1]))
    report(
        opts.out, rank=torch.distributed.get_rank(), tp=opts.tp, model=type(model).__name__,
        spec=args.spec, memory_layers=memory_layers, values_shape=list(memories[0].values.shape),
        loss_sum=float(loss_sum), ref_loss_sum=ref_sum, num_tokens=int(num_tokens),
        mask_tokens=int(batch["loss_mask"].sum()), report_keys=sorted(rep),
        optimizer=type(optimizer).__name__, scheduler=type(scheduler).__name__,
        value_group_ok=len(value_groups) == 1 and {id(p) for p in value_groups[0]["params"]} == value_ids,
        value_lr_mult=scheduler.value_lr_mult if isinstance(scheduler, UltraMemParamScheduler) else None,
        lrs=lrs(), losses=losses, refreshed=refreshed, hooks=active_hooks() is not None,
        hook_steps=active_hooks().steps if active_hooks() else 0,
    )  # fmt: skip
    torch.distributed.barrier()


if __name__ == "__main__":
    sys.exit(main())
