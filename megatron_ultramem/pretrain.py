"""`python -m megatron_ultramem.pretrain`: Megatron-LM's pretraining job for an UltraMem GPT or
HybridModel, on the `megatron.training` that megatron-core ships from 0.17 on (no Megatron-LM
checkout needed). `megatron-ultramem-pretrain` is the same as a console script.

    torchrun --nproc_per_node 8 -m megatron_ultramem.pretrain <pretrain_gpt.py arguments> \
        --ultramem-mode parallel --ultramem-layers 1 --ultramem-num-keys 1024 ...
    torchrun ... -m megatron_ultramem.pretrain <pretrain_hybrid.py arguments> \
        --hybrid-layer-pattern "*E*E*E*E" --ultramem-mode replace ...

It does what Megatron-LM's `pretrain_gpt.py` / `pretrain_hybrid.py` do for plain pretraining:
 - arguments: Megatron's `parse_and_validate_args` with the `--ultramem-*` flags
   (`extra_args_provider`); `--spec` defaults to the plugin's GPT block spec, or its HybridModel
   stack spec when `--hybrid-layer-pattern` is given;
 - model: `gpt_config_from_args` / `hybrid_config_from_args` with an UltraMemConfig as the
   transformer config, built by Megatron's model builders (`model_provider` builds one stage the
   same way, for callers of `megatron.training.get_model`);
 - data: Megatron's GPTDataset from `--data-path` / `--train-data-path` ... (indexed data written
   by Megatron's preprocessing tool) or MockGPTDataset with `--mock-data`;
 - forward step and loss: next-token cross entropy summed over `loss_mask`, returned with the token
   count so the schedules average per token across micro-batches and data-parallel ranks;
 - the plugin's hooks (hooks.py): the value table's own param group and LR schedule, the Tucker
   refresh after every optimizer step, UltraMem metrics in the logs.
Not covered (use Megatron-LM's scripts for them): SFT / packed sequences, FIM data, context
parallelism, ModelOpt, knowledge distillation.

On a machine without CUDA the entry enables `cpu_compat` (gloo, CPU tensors; pretrain()'s own CUDA
calls included): tests/megatron_lm/test_pretrain_loop.py runs the whole loop that way, with a
checkpoint, a resume and two "nodes"; tests/megatron_lm/test_pretrain.py tests its pieces.
"""

import sys
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch

from .cli import bad_input_exits, repair_help_strings
from .megatron_lm.arguments import (
    HYBRID_SPEC_NAME,
    SPEC_MODULE,
    SPEC_NAME,
    add_ultramem_args,
    validate_ultramem_args,
)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def require_megatron_training():
    """megatron.training as packaged with megatron-core >= 0.17 (clear error otherwise)."""
    try:
        from megatron.training import argument_utils  # noqa: F401  (0.19's config builders)
        from megatron.training.arguments import parse_and_validate_args  # noqa: F401
    except ImportError as err:
        from .cli import fail
        from .compat import megatron_core_version

        fail(
            "python -m megatron_ultramem.pretrain needs megatron.training from megatron-core "
            f">= 0.19 (installed: megatron-core {megatron_core_version()}: {err}). With 0.16, run "
            "Megatron-LM's pretrain_gpt.py through `python -m megatron_ultramem.megatron_lm."
            "pretrain_gpt --megatron-lm PATH ...` (docs/megatron_lm.md)"
        )


# ---------------------------------------------------------------------- arguments
def with_default_spec(argv: Sequence[str]) -> List[str]:
    """argv with `--spec` added when absent: the hybrid stack spec if --hybrid-layer-pattern is
    given, else the GPT block spec."""
    argv = list(argv)
    if "--spec" in argv:
        return argv
    hybrid = any(a == "--hybrid-layer-pattern" or a.startswith("--hybrid-layer-pattern=") for a in argv)
    return argv + ["--spec", SPEC_MODULE, HYBRID_SPEC_NAME if hybrid else SPEC_NAME]


def is_hybrid(args) -> bool:
    return list(args.spec or [])[-1:] == [HYBRID_SPEC_NAME]


def parse_args(argv: Optional[Sequence[str]] = None, args_defaults: Optional[Dict] = None):
    """Megatron's parse_and_validate_args with the --ultramem-* flags; sets the global args."""
    require_megatron_training()
    from megatron.training.arguments import parse_and_validate_args

    argv = with_default_spec(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "megatron_ultramem.pretrain", *argv]
    from megatron.training import arguments as mlm_arguments

    megatron_validate = mlm_arguments.validate_args

    def validate_args(args, defaults={}):  # the plugin's checks before any global state is set
        result = megatron_validate(args, defaults)
        validate_ultramem_args(args)
        return result

    mlm_arguments.validate_args = validate_args  # looked up at call time by parse_and_validate_args
    try:  # bad flags: one line naming them, exit status 2 (cli.bad_input_exits)
        with bad_input_exits("python -m megatron_ultramem.pretrain"):
            args = parse_and_validate_args(
                extra_args_provider=lambda parser: repair_help_strings(add_ultramem_args(parser)),
                args_defaults={"tokenizer_type": "GPT2BPETokenizer", **(args_defaults or {})},
            )
            validate_ultramem_args(args)  # --yaml-cfg validates without validate_args
    finally:
        mlm_arguments.validate_args = megatron_validate
        sys.argv = saved
    return args


# ---------------------------------------------------------------------- model
def model_config_from_args(args, config=None):
    """GPTModelConfig or HybridModelConfig whose transformer config is an UltraMemConfig."""
    from megatron.training.argument_utils import gpt_config_from_args, hybrid_config_from_args
    from megatron.training.arguments import core_transformer_config_from_args

    from .config import UltraMemConfig

    if config is None:
        config = core_transformer_config_from_args(args, config_class=UltraMemConfig)
    build = hybrid_config_from_args if is_hybrid(args) else gpt_config_from_args
    return build(args, config=config)


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """One model stage (GPTModel or HybridModel with UltraMem) from the global args, built by
    Megatron's model builder exactly as `pretrain()`'s config-container path builds it."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import get_args

    model_cfg = model_config_from_args(get_args(), config)
    builder = model_cfg.get_builder_cls()(model_cfg)
    pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
    return builder.build_model(pg_collection, pre_process, post_process, vp_stage)


# ---------------------------------------------------------------------- data
def dataset_config_from_args(args, tokenizer=None):
    """GPTDatasetConfig from Megatron-LM's data arguments (--data-path, --split, --mock-data, ...)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer if tokenizer is not None else get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )


def _first_or_last_stage(vp_stage=None) -> bool:
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage)


def is_dataset_built_on_rank(vp_stage=None) -> bool:
    """TP rank 0 of the first and last pipeline stages reads data; get_batch broadcasts it."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank() == 0 and _first_or_last_stage(vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPTDataset (or MockGPTDataset with --mock-data) for train / valid / test."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args

    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        partial(is_dataset_built_on_rank, vp_stage=vp_stage),
        dataset_config_from_args(args),
    ).build()


train_valid_test_datasets_provider.is_distributed = True  # every rank calls it (Megatron-LM)


def get_batch(data_iterator, vp_stage=None) -> Dict[str, Optional[torch.Tensor]]:
    """The micro-batch on this rank: TP rank 0 reads it and broadcasts it over the TP group.

    Middle pipeline stages get no tensors (their input arrives from the previous stage); the
    attention mask is left to the model (causal) unless the dataloader creates one.
    """
    from megatron.core import parallel_state
    from megatron.training import get_args

    args = get_args()
    empty = {k: None for k in (*BATCH_KEYS, "attention_mask")}
    if not _first_or_last_stage(vp_stage):
        return empty
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    shape = (args.micro_batch_size, args.seq_length)
    dtypes = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
              "position_ids": torch.int64}  # fmt: skip
    with_mask = bool(args.create_attention_mask_in_dataloader)  # Megatron-LM's default: on
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        data = next(data_iterator)
        batch = {k: data[k].to(device=device, dtype=dtypes[k]) for k in BATCH_KEYS}
        batch["attention_mask"] = data["attention_mask"].to(device) if with_mask else None
    else:
        batch = {k: torch.empty(shape, dtype=dtypes[k], device=device) for k in BATCH_KEYS}
        batch["attention_mask"] = (
            torch.empty((shape[0], 1, shape[1], shape[1]), dtype=torch.bool, device=device)
            if with_mask
            else None
        )
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        src = parallel_state.get_tensor_model_parallel_src_rank()
        for k in BATCH_KEYS:
            torch.distributed.broadcast(batch[k], src, group=group)
        if with_mask:  # [b, 1, s, s] bool, sent as uint8 (not every backend sends bool)
            mask = batch["attention_mask"].to(torch.uint8)
            torch.distributed.broadcast(mask, src, group=group)
            batch["attention_mask"] = mask.bool()
    return batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses [b, s] -> (summed masked loss, token count, report for the logs)."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    """Megatron's forward_step_func: the model's per-token losses and the loss function."""
    from megatron.core.utils import get_attr_wrapped_model

    vp_stage = get_attr_wrapped_model(model, "vp_stage", allow_none=True)
    batch = get_batch(data_iterator, vp_stage)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(loss_func, batch["loss_mask"])


# ---------------------------------------------------------------------- the job
def use_prebuilt_dataset_helpers() -> bool:
    """Make `megatron.core.datasets.utils.compile_helpers` a no-op when the compiled
    `helpers_cpp` extension imports; returns True when it does.

    pretrain() (initialize_megatron's `_compile_dependencies`) runs `make` in megatron/core/datasets
    on rank 0, which a Megatron-LM checkout supports; an installed megatron-core package ships the
    extension prebuilt and no Makefile, so `make` fails and rank 0 exits. Idempotent; the original
    stays as `__wrapped__`.
    """
    from megatron.core.datasets import utils as dataset_utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False
    original = dataset_utils.compile_helpers
    if getattr(original, "__wrapped__", None) is None:

        def compile_helpers():
            """helpers_cpp is prebuilt (see megatron_ultramem.pretrain.use_prebuilt_dataset_helpers)."""

        compile_helpers.__wrapped__ = original
        dataset_utils.compile_helpers = compile_helpers
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    require_megatron_training()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from .megatron_lm.hooks import install_megatron_lm_hooks

    from . import cpu_compat

    cpu_compat.enable(training_loop=True)  # no-op with CUDA; CPU-only machines: gloo + CPU
    install_megatron_lm_hooks()  # value LR group + scheduler, Tucker refresh, metrics, validation
    use_prebuilt_dataset_helpers()
    args = parse_args(argv)  # bad input: one line naming the flag, exit status 2, before any work
    full_config = pretrain_cfg_container_from_args(args, model_config_from_args(args))
    pretrain(full_config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)


def console_main() -> int:
    main()
    return 0


if __name__ == "__main__":
    main()
