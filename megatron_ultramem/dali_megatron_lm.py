"""Megatron-LM `--dataloader-type external` provider: Megatron-LM's own datasets (GPTDataset from
pretrain_gpt's provider) read through this package's DALI (or torch) iterators, in the order and
DP sharding of `--dataloader-type single`, resumable from the checkpoint's consumed samples.

Launcher (next to Megatron-LM's pretrain_gpt.py; core_r0.16.0 layout; pretrain() needs CUDA):

    # pretrain_gpt_dali.py
    from functools import partial

    import pretrain_gpt
    from gpt_builders import gpt_builder
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron_ultramem.dali_megatron_lm import make_dataloaders_provider

    if __name__ == "__main__":  # required: DALI's spawned workers import this module
        provider = make_dataloaders_provider(
            pretrain_gpt.train_valid_test_datasets_provider, backend="dali", prefetch=2)
        provider.is_distributed = True  # as pretrain_gpt's __main__ sets on its own provider
        pretrain(provider, partial(pretrain_gpt.model_provider, gpt_builder),
                 ModelType.encoder_or_decoder, pretrain_gpt.forward_step,
                 args_defaults={"tokenizer_type": "GPT2BPETokenizer"})

    torchrun ... pretrain_gpt_dali.py <usual pretrain_gpt flags> --dataloader-type external
        [--num-workers N   # DALI Python workers (parallel external source); 0 = in-pipeline]

The contract this follows (Megatron-LM megatron/training/training.py and
megatron/training/datasets/data_samplers.py, core_r0.16.0 and main, read 2026-11):

1. `pretrain(provider, ...)` calls `build_train_valid_test_data_iterators(provider)` after the
   checkpoint is loaded; `build_train_valid_test_data_loaders` first sets
   `args.consumed_train_samples` (from the checkpoint, or `iteration * global_batch_size` for old
   ones) and `args.consumed_valid_samples`, then calls the provider. The provider does not get
   the consumed counts as arguments: it reads them from `get_args()`.
2. The provider is called as `provider(train_val_test_num_samples)`, or with `vp_stage=` under
   virtual pipeline parallelism (then `vp_stage` must be a parameter, checked with
   inspect.signature), on every rank when `provider.is_distributed` is True, else on
   tensor-parallel rank 0 only. `train_val_test_num_samples` = [train samples of the run (or of
   the current phase), eval samples over the run, test samples].
3. It returns (train, valid, test). For `external`, `build_pretraining_data_loader(obj, consumed)`
   returns each object unchanged (None stays None; main calls `len(obj)` in a try first and
   drops a length-0 object, so these iterators define no `__len__`). With
   --multiple-validation-sets, valid may be a list.
4. Each object is wrapped as `RerunDataIterator(obj)`, which calls `next(obj)`: the objects must
   be iterators, not just iterables. They are not cycled (the `single` valid iterator isn't
   either: it continues from `consumed_valid_samples` across evaluations).
5. `pretrain_gpt.get_batch -> get_batch_on_this_tp_rank` calls `next()` on TP rank 0 only and
   reads `tokens`, `labels`, `loss_mask`, `position_ids` and, only if the key exists,
   `attention_mask`, calling `.cuda(non_blocking=True)` on each: a missing mask must be absent,
   not None (GPU tensors from DALI pass through `.cuda()` unchanged).
6. The train loop takes `num_microbatches` micro-batches of `args.micro_batch_size` per step and
   adds `global_batch_size` to `consumed_train_samples`: the `single` sampler's arithmetic, so
   these iterators start at `args.consumed_train_samples` and shard over
   `mpu.get_data_parallel_rank() / get_data_parallel_world_size()` like it does.
Not supported (raise): --full-validation (Megatron-LM needs `len()` of the valid loader),
--phase-transition-iterations.
"""

from typing import Callable, Optional, Sequence

from .data_pipeline import DataIterator, build_train_iterator


class MegatronLMIterator:
    """A `DataIterator` in the shape `get_batch_on_this_tp_rank` reads: keys whose value is None
    (no attention mask) are left out. `consumed_samples` and `close()` pass through."""

    def __init__(self, inner: DataIterator):
        self.inner = inner

    @property
    def consumed_samples(self) -> int:
        return self.inner.consumed_samples

    def __iter__(self) -> "MegatronLMIterator":
        return self

    def __next__(self):
        return {k: v for k, v in next(self.inner).items() if v is not None}

    def close(self) -> None:
        self.inner.close()


def external_iterators(datasets: Sequence, args, dp_rank: int, dp_size: int,
                       backend: str = "dali", num_workers: Optional[int] = None,
                       prefetch: int = 2, **options):
    """(train, valid, test) datasets -> (train, valid, test) iterators for
    `--dataloader-type external`.

    Reads from `args` (Megatron-LM's parsed arguments): dataloader_type (must be "external"),
    micro_batch_size, eval_micro_batch_size (if present, for valid/test), consumed_train_samples,
    consumed_valid_samples, num_workers (default for `num_workers`), full_validation and
    phase_transition_iterations (unsupported when set). None datasets stay None; a list of valid
    datasets gives a list of iterators. `options` go to `build_train_iterator`."""
    if getattr(args, "dataloader_type", None) != "external":
        raise ValueError(
            "megatron_ultramem.dali_megatron_lm needs --dataloader-type external "
            f"(got {getattr(args, 'dataloader_type', None)!r}); with 'single' or 'cyclic' "
            "Megatron-LM would wrap these iterators in its own DataLoader"
        )
    if getattr(args, "full_validation", False):
        raise NotImplementedError("--full-validation needs len() of the valid loader; not "
                                  "supported with the external DALI provider")
    if getattr(args, "phase_transition_iterations", None):
        raise NotImplementedError("--phase-transition-iterations is not supported by the external "
                                  "DALI provider")
    workers = args.num_workers if num_workers is None else num_workers
    eval_mbs = getattr(args, "eval_micro_batch_size", None) or args.micro_batch_size
    train, valid, test = datasets

    def wrap(dataset, mbs, consumed):
        if dataset is None:
            return None
        return MegatronLMIterator(build_train_iterator(
            backend, dataset, mbs, consumed, dp_rank, dp_size, workers, prefetch, **options))

    train_it = wrap(train, args.micro_batch_size, args.consumed_train_samples)
    consumed_valid = getattr(args, "consumed_valid_samples", 0)
    if isinstance(valid, list):
        valid_it = [wrap(v, eval_mbs, consumed_valid) for v in valid]
    else:
        valid_it = wrap(valid, eval_mbs, consumed_valid)
    test_it = wrap(test, eval_mbs, 0)
    return train_it, valid_it, test_it


def make_dataloaders_provider(datasets_provider: Callable, backend: str = "dali",
                              num_workers: Optional[int] = None, prefetch: int = 2,
                              **options) -> Callable:
    """Wrap a Megatron-LM datasets provider (e.g. `pretrain_gpt.train_valid_test_datasets_provider`)
    into a provider for `pretrain(...)` with `--dataloader-type external` (contract in the module
    docstring). The wrapper keeps the wrapped provider's `is_distributed` flag and takes
    `vp_stage`; datasets a rank does not build (None) give None. DP rank and size come from
    megatron.core.parallel_state, the rest from `megatron.training.get_args()`."""

    def provider(train_val_test_num_samples, vp_stage=None):
        from megatron.core import parallel_state
        from megatron.training import get_args

        kwargs = {} if vp_stage is None else {"vp_stage": vp_stage}
        datasets = datasets_provider(train_val_test_num_samples, **kwargs)
        return external_iterators(
            datasets, get_args(), parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(), backend, num_workers, prefetch,
            **options,
        )

    provider.is_distributed = getattr(datasets_provider, "is_distributed", False)
    provider.__wrapped__ = datasets_provider
    return provider
