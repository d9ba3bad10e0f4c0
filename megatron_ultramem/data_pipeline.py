"""Input pipeline on Megatron indexed datasets: Megatron's GPTDataset, read in Megatron's sampler
order by a torch DataLoader (backend "torch") or by an NVIDIA DALI pipeline (backend "dali",
optional extra `pip install megatron-ultramem[dali]`).

Design: the dataset, the sample order and the DP sharding are Megatron's; a backend only decides
who calls `GPTDataset.__getitem__` and where the batch lands. Both backends yield, for one
data-parallel rank, the same micro-batches element for element (tests/test_dali.py), so switching
backends never changes training. The order is Megatron-LM's `--dataloader-type single`: global
batch g of `micro_batch_size * dp_size` consecutive sample indices starting at `consumed_samples`,
rank r taking the contiguous slice `[r * mbs, (r + 1) * mbs)`; the last partial global batch is
dropped. Resuming is passing the consumed-samples count of the checkpoint.

Layers, in order of use:
    write_indexed_corpus(tokens, prefix)        -> prefix.bin / prefix.idx (IndexedDatasetBuilder)
    build_gpt_dataset(prefix, seq_length, ...)  -> GPTDataset (BlendedMegatronDatasetBuilder)
    PretrainingSampler                          -> Megatron-LM's MegatronPretrainingSampler order
    build_train_iterator(backend, dataset, ...) -> DataIterator of batch dicts

The torch backend is Megatron-LM's `build_pretraining_data_loader` for `--dataloader-type single`
(megatron-core has no sampler; `PretrainingSampler` reimplements Megatron-LM's
`MegatronPretrainingSampler` with the same arguments and order). The DALI backend feeds the same
indices through `fn.external_source` in batch mode, one call per micro-batch (`parallel=True`
runs the calls in `py_num_workers` Python worker processes), prefetches `prefetch_queue_depth`
batches and, when CUDA exists, copies them to the GPU inside the pipeline so the training thread
gets device tensors.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy
import torch

VOCAB_SIZE = 256
EOD_TOKEN = 10
"""End-of-document token: the newline byte. Documents of the embedded corpus are its lines, so the
newline that ends each line already is the document separator (the byte stream is unchanged)."""

PAD_TOKEN = -1
"""No byte is padding; -1 never occurs in the data (Megatron's own `_PAD_TOKEN_ID` fallback), so
GPTDataset masks nothing as padding."""

BACKENDS = ("torch", "dali")



def _have_dali() -> bool:
    """nvidia.dali is installed (found without importing it: the import takes seconds)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no `nvidia` namespace package at all
        return False


HAVE_DALI = _have_dali()

DALI_INSTALL_HINT = (
    "pip install 'megatron-ultramem[dali]' (installs nvidia-dali-cuda130, the CUDA 13 build; "
    "for a CUDA 12 driver install nvidia-dali-cuda120 instead)"
)


# --------------------------------------------------------------------------------------------
# Tokenizer and C++ helpers
# --------------------------------------------------------------------------------------------


class IdTokenizer:
    """A tokenizer as GPTDataset sees it, for token ids that are already in the data.

    GPTDatasetConfig and GPTDataset read only `vocab_size` (picks the token dtype), `eod` (masks
    and position ids, used only with Megatron's reset/eod-mask options, which are off here),
    `pad` (loss masking) and `unique_identifiers` (part of the dataset cache key); Megatron's
    `MegatronTokenizerBase` is an abstract text API this pipeline never calls.
    """

    def __init__(self, vocab_size: int, eod: int = EOD_TOKEN, pad: int = PAD_TOKEN):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", f"megatron_ultramem.{type(self).__name__}"), ("vocab_size", self.vocab_size),
             ("eod", self.eod)]
        )


class ByteTokenizer(IdTokenizer):
    """The byte tokenizer of the embedded corpus (vocabulary 256, newline ends a document)."""

    def __init__(self):
        super().__init__(VOCAB_SIZE, EOD_TOKEN, PAD_TOKEN)

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def ensure_dataset_helpers() -> None:
    """Make `megatron.core.datasets.helpers_cpp` importable (GPTDataset builds its sample index
    with it).

    The PyPI megatron-core wheels (manylinux x86_64/aarch64) ship it compiled; a source install
    has only helpers.cpp. Megatron's own `compile_helpers()` runs `make` on a Makefile that is not
    in the wheel and calls `python3` from PATH; here we run the same compiler line with this
    interpreter: `g++ -O3 -Wall -shared -std=c++17 -fPIC $(python -m pybind11 --includes)`.
    Needs g++ and pybind11 (`pip install pybind11`) and write access to the package folder;
    the result is written under a temporary name and renamed, so concurrent ranks are safe.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401

        return
    except ImportError:
        pass
    import megatron.core.datasets as mcd

    folder = os.path.dirname(os.path.abspath(mcd.__file__))
    src = os.path.join(folder, "helpers.cpp")
    target = os.path.join(folder, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    compile_helpers_into(src, target)
    from megatron.core.datasets import helpers_cpp  # noqa: F401,F811


def compile_helpers_into(src: str, target: str) -> None:
    """Compile Megatron's helpers.cpp into the extension module `target` (see
    `ensure_dataset_helpers`). Raises RuntimeError naming what is missing."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError(
            "megatron.core.datasets.helpers_cpp is missing and no C++ compiler was found to build "
            "it (install g++, or a megatron-core wheel that ships the compiled helpers)"
        )
    if importlib.util.find_spec("pybind11") is None:
        raise RuntimeError(
            "megatron.core.datasets.helpers_cpp is missing; building it needs pybind11: "
            "pip install pybind11"
        )
    import pybind11

    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    tmp = f"{target}.tmp{os.getpid()}"
    cmd = [cxx, "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC", *includes, src, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {src} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, target)


# --------------------------------------------------------------------------------------------
# Indexed dataset (.bin/.idx)
# --------------------------------------------------------------------------------------------


def _documents(tokens: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[numpy.ndarray]:
    """Split into documents, each ending with EOD_TOKEN (appended where missing)."""
    if isinstance(tokens, torch.Tensor):
        stream = tokens.detach().cpu().numpy().reshape(-1)
        if stream.size and stream[-1] != EOD_TOKEN:
            stream = numpy.append(stream, EOD_TOKEN)
        ends = numpy.flatnonzero(stream == EOD_TOKEN) + 1
        docs = numpy.split(stream, ends)[:-1]  # the piece after the last EOD is empty
    else:
        docs = []
        for doc in tokens:
            doc = numpy.asarray(doc, dtype=numpy.int64).reshape(-1)
            if doc.size == 0 or doc[-1] != EOD_TOKEN:
                doc = numpy.append(doc, EOD_TOKEN)
            docs.append(doc)
    if not docs:
        raise ValueError("write_indexed_corpus: no tokens given")
    lo = min(int(d.min()) for d in docs)
    hi = max(int(d.max()) for d in docs)
    if lo < 0 or hi >= VOCAB_SIZE:
        raise ValueError(
            f"write_indexed_corpus: token ids must be in [0, {VOCAB_SIZE}), got [{lo}, {hi}]"
        )
    return [d.astype(numpy.uint16) for d in docs]


def _content_hash(docs: List[numpy.ndarray]) -> str:
    h = hashlib.sha256(b"megatron_ultramem indexed corpus v1 uint16\n")
    h.update(numpy.asarray([d.size for d in docs], dtype=numpy.int64).tobytes())
    for d in docs:
        h.update(d.tobytes())
    return h.hexdigest()


def write_indexed_corpus(tokens: Union[torch.Tensor, Sequence[Sequence[int]]], prefix: str) -> str:
    """Write `prefix.bin` / `prefix.idx`, a Megatron indexed dataset with one document per line.

    tokens: a 1-D byte-token stream (documents end at each EOD_TOKEN = newline byte 10; a trailing
    piece without one gets one), or a list of documents (EOD_TOKEN appended where missing).
    Tokens are stored as uint16 (Megatron's `DType.optimal_dtype` for a 256-token vocabulary,
    and the dtype GPTDatasetConfig expects for it), one sequence per document.

    Atomic: written under temporary names and renamed; `prefix.sha256` (the content hash) is
    written last and marks a complete dataset. Skipped when the three files exist and the hash
    matches. Returns the content hash.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = _documents(tokens)
    digest = _content_hash(docs)
    bin_path, idx_path, hash_path = f"{prefix}.bin", f"{prefix}.idx", f"{prefix}.sha256"
    if all(os.path.exists(p) for p in (bin_path, idx_path, hash_path)):
        with open(hash_path) as f:
            if f.read().strip() == digest:
                return digest
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=numpy.uint16)
    for doc in docs:
        builder.add_document(doc, [doc.size])
    builder.finalize(f"{tmp}.idx")
    with open(f"{tmp}.sha256", "w") as f:
        f.write(digest + "\n")
    os.replace(f"{tmp}.bin", bin_path)
    os.replace(f"{tmp}.idx", idx_path)
    os.replace(f"{tmp}.sha256", hash_path)
    return digest


def inspect_indexed_prefix(prefix: str, flag: str = "--data-path") -> Dict[str, int]:
    """Check that `prefix` is a readable Megatron indexed dataset; {'documents', 'tokens',
    'max_token_id'}. Raises ValueError naming `flag`, the prefix and what is wrong (missing file,
    unreadable index, .bin shorter than the index says, no tokens)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    what = (
        "a Megatron indexed dataset is PREFIX.bin + PREFIX.idx (written by Megatron-LM's "
        "tools/preprocess_data.py or megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder)"
    )
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise ValueError(f"{flag} {prefix}: {prefix}{suffix} not found; {what}")
    with open(prefix + ".idx", "rb") as f:
        header = f.read(len(_INDEX_HEADER))
    if header != _INDEX_HEADER:  # checked here: IndexedDataset fails noisily (also in __del__)
        raise ValueError(
            f"{flag} {prefix}: {prefix}.idx does not start with Megatron's index header "
            f"{_INDEX_HEADER!r}: not a readable Megatron indexed dataset; {what}"
        )
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        lengths = numpy.asarray(dataset.sequence_lengths, dtype=numpy.int64)
        dtype = numpy.dtype(dataset.index.dtype)
    except Exception as err:  # Megatron asserts on a bad header, numpy raises on a short file
        raise ValueError(
            f"{flag} {prefix}: not a readable Megatron indexed dataset "
            f"({type(err).__name__}: {err}); {what}"
        ) from None
    tokens = int(lengths.sum())
    if tokens == 0:
        raise ValueError(f"{flag} {prefix}: the dataset has no tokens")
    expected = tokens * dtype.itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual < expected:
        raise ValueError(
            f"{flag} {prefix}: {prefix}.bin has {actual} bytes but its index describes {expected} "
            "(a truncated or mismatched .bin/.idx pair)"
        )
    data = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(tokens,))
    chunk = 1 << 24
    max_id = max(int(data[i : i + chunk].max()) for i in range(0, tokens, chunk))
    return {"documents": int(lengths.size), "tokens": tokens, "max_token_id": max_id}


def gpt_cache_dir(prefix: str) -> str:
    """Where GPTDataset caches its index files for `prefix`: `{prefix}.gpt_cache/<idx hash>`.

    GPTDataset keys its cache by path, seed, sequence length and sample count, not by content;
    the .idx hash (document lengths, all the indices depend on) keeps a rewritten corpus from
    reusing a stale index."""
    h = hashlib.sha256()
    with open(f"{prefix}.idx", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return os.path.join(f"{prefix}.gpt_cache", h.hexdigest()[:16])


def build_gpt_dataset(
    prefix: str,
    seq_length: int,
    num_samples: Optional[int],
    seed: int,
    split: str = "train",
    *,
    create_attention_mask: bool = False,
    path_to_cache: Optional[str] = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
    tokenizer: Optional[IdTokenizer] = None,
    split_shares: Optional[str] = None,
):
    """Megatron's GPTDataset over the whole indexed dataset at `prefix` (or, with
    `split_shares` like "95,5,0", over that split's share of its documents, as Megatron-LM's
    --data-path with --split), built with BlendedMegatronDatasetBuilder and GPTDatasetConfig.

    split: which Megatron split the dataset is ("train", "valid" or "test"); the whole prefix goes
        to it (`blend_per_split`), as with Megatron-LM's --train-data-path/--valid-data-path.
        The split sets Megatron's end-of-data behavior (valid keeps the last partial sequence
        only if configured; train drops it).
    num_samples: at least this many samples (Megatron repeats epochs, each reshuffled); None: one
        epoch.
    create_attention_mask: False (the main job and fused attention build the causal mask);
        True is Megatron-LM's default and adds a [1, s, s] bool `attention_mask` to each sample.
    path_to_cache: GPTDataset's index cache; default `gpt_cache_dir(prefix)`.
    tokenizer: what GPTDataset reads of a tokenizer; default ByteTokenizer (the embedded corpus).
    is_built_on_rank: BlendedMegatronDatasetBuilder's hook (under torch.distributed, rank 0
        builds the cache first, then the others load it).
    Returns the GPTDataset, or None where `is_built_on_rank()` is False.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    if split not in Split.__members__:
        raise ValueError(f"split must be one of {list(Split.__members__)}, got {split!r}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    for suffix in (".bin", ".idx"):
        if not os.path.exists(prefix + suffix):
            raise FileNotFoundError(
                f"{prefix}{suffix} not found (write it with write_indexed_corpus)"
            )
    ensure_dataset_helpers()
    index = Split[split].value
    if split_shares is None:
        blend = {"blend_per_split": [([prefix], None) if i == index else None for i in range(len(Split))]}
    else:
        blend = {"blend": ([prefix], None), "split": split_shares}
    sizes = [None] * len(Split)
    sizes[index] = num_samples
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        **blend,
        path_to_cache=path_to_cache or gpt_cache_dir(prefix),
        tokenizer=tokenizer if tokenizer is not None else ByteTokenizer(),
        reset_position_ids=False,  # Megatron-LM defaults (--reset-position-ids etc. off)
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config).build()
    return datasets[index]


# --------------------------------------------------------------------------------------------
# Sample order (Megatron-LM --dataloader-type single)
# --------------------------------------------------------------------------------------------


def _check_shard(total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
    if total_samples <= 0:
        raise ValueError(f"no sample to consume: total_samples={total_samples}")
    if not 0 <= consumed_samples < total_samples:
        raise ValueError(
            f"consumed_samples must be in [0, total_samples={total_samples}), "
            f"got {consumed_samples}"
        )
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")


class PretrainingSampler:
    """Batch sampler with the semantics of Megatron-LM's `MegatronPretrainingSampler`
    (megatron/training/datasets/data_samplers.py; megatron-core has none): walk sample indices
    consumed_samples, consumed_samples + 1, ... < total_samples in global batches of
    `micro_batch_size * data_parallel_size`, and yield this rank's contiguous slice
    `[rank * mbs, (rank + 1) * mbs)` of each; the last partial global batch is dropped unless
    drop_last=False (then each rank gets its slice of it, possibly short or empty).
    `len()` is total_samples, as in Megatron-LM."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        _check_shard(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                     data_parallel_size)
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        end = start + self.micro_batch_size
        batch: List[int] = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.micro_batch_times_data_parallel_size:
                yield batch[start:end]
                batch = []
        if batch and not self.drop_last:
            yield batch[start:end]


def num_micro_batches(total_samples: int, consumed_samples: int, micro_batch_size: int,
                      dp_size: int) -> int:
    """Micro-batches each rank gets from consumed_samples on (last partial global batch dropped)."""
    return (total_samples - consumed_samples) // (micro_batch_size * dp_size)


# --------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------


class DataIterator:
    """Iterator of batch dicts for one data-parallel rank: `tokens`, `labels` [b, s] int64,
    `loss_mask` [b, s] float32, `position_ids` [b, s] int64 and `attention_mask` ([b, 1, s, s]
    bool, True = masked, when the dataset creates it; else None), plus any other keys the dataset
    returns. Stops after `num_batches` micro-batches.

    `consumed_samples` counts samples of all DP ranks (Megatron's `args.consumed_train_samples`
    arithmetic): pass it back to `build_train_iterator` to resume after the batches taken so far.
    """

    def __init__(self, batches: Iterator[Dict], backend: str, consumed_samples: int,
                 global_micro_batch: int, num_batches: int, device: torch.device,
                 owner=None):
        self.backend = backend
        self.consumed_samples = consumed_samples
        self.num_batches = num_batches
        self.device = device
        self._batches = batches
        self._global_micro_batch = global_micro_batch
        self._owner = owner  # the DataLoader / DALI pipeline, kept alive until close()
        self._taken = 0

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Dict[str, Optional[torch.Tensor]]:
        if self._taken >= self.num_batches:
            raise StopIteration
        batch = dict(next(self._batches))
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.device != self.device:
                batch[key] = value.to(self.device, non_blocking=True)
        batch.setdefault("attention_mask", None)
        self._taken += 1
        self.consumed_samples += self._global_micro_batch
        return batch

    def close(self) -> None:
        """Release workers (DataLoader worker processes, DALI pipeline and its Python workers)."""
        self._batches = iter(())
        self._owner = None
        self.num_batches = self._taken


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_train_iterator(
    backend: str,
    dataset,
    micro_batch_size: int,
    consumed_samples: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
    prefetch: int = 2,
    *,
    device: Union[str, torch.device, None] = None,
    num_threads: int = 1,
    start_method: Optional[str] = None,
) -> DataIterator:
    """Micro-batches of `dataset` (a GPTDataset or any map-style dataset of dicts of tensors) for
    data-parallel rank `dp_rank` of `dp_size`, in Megatron-LM's `--dataloader-type single` order,
    starting after `consumed_samples` samples (all ranks together).

    backend "torch": Megatron-LM's `build_pretraining_data_loader`: `PretrainingSampler` as the
        batch sampler of a torch DataLoader with `num_workers` worker processes (persistent),
        `prefetch` batches per worker (prefetch_factor; only with workers) and pinned memory when
        CUDA exists.
    backend "dali": a DALI pipeline whose `fn.external_source` (batch mode, one call per
        micro-batch) reads the same samples; `num_workers` > 0 runs the calls in that many
        Python worker processes (`parallel=True, py_num_workers`), `prefetch` is the pipeline's
        `prefetch_queue_depth` (and the parallel source's), `num_threads` its CPU thread
        count. With CUDA the pipeline copies each batch to the GPU itself (asynchronously,
        ahead of use); on CPU (`device_id=None`) it hands CPU tensors. `start_method`: the
        workers' start method, default "spawn" once CUDA is initialized in this process (fork
        is unsafe then), else "fork".
    device: where batches are returned; default CUDA when available, else CPU (torch batches are
        moved with non_blocking=True from pinned memory).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_workers < 0 or prefetch < 1:
        raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers}, {prefetch}")
    total = len(dataset)
    _check_shard(total, consumed_samples, micro_batch_size, dp_rank, dp_size)
    device = _resolve_device(device)
    n = num_micro_batches(total, consumed_samples, micro_batch_size, dp_size)
    step = micro_batch_size * dp_size
    if n == 0:
        return DataIterator(iter(()), backend, consumed_samples, step, 0, device)
    if backend == "torch":
        sampler = PretrainingSampler(total, consumed_samples, micro_batch_size, dp_rank, dp_size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
        )
        return DataIterator(iter(loader), backend, consumed_samples, step, n, device, loader)
    pipe, keys = _build_dali_pipeline(
        dataset, micro_batch_size, consumed_samples, dp_rank, dp_size, n, num_workers, prefetch,
        device, num_threads, start_method,
    )
    batches = _dali_batches(pipe, keys)
    return DataIterator(batches, backend, consumed_samples, step, n, device, pipe)


# --------------------------------------------------------------------------------------------
# DALI backend
# --------------------------------------------------------------------------------------------


def _import_dali():
    if not HAVE_DALI:
        raise ImportError(f"backend 'dali' needs NVIDIA DALI (nvidia.dali is not importable): "
                          f"{DALI_INSTALL_HINT}")
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as err:
        raise ImportError(f"backend 'dali': importing nvidia.dali failed ({err}); "
                          f"{DALI_INSTALL_HINT}") from err
    return dali


class DaliBatchSource:
    """`fn.external_source` callback in batch mode (`batch_info=True`): micro-batch b of this
    rank -> the samples the Megatron sampler gives it there, global indices
    consumed + b * mbs * dp_size + dp_rank * mbs + [0, mbs) (the `PretrainingSampler` order in
    closed form), stacked per key; StopIteration after `num_batches`. One call per micro-batch
    (not per sample) keeps DALI's per-call overhead off the hot path. Module-level and picklable,
    so spawned DALI workers can import it (the dataset is pickled with it)."""

    def __init__(self, dataset, keys: Sequence[str], consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_batches: int):
        self.dataset = dataset
        self.keys = tuple(keys)
        self.first = consumed_samples + dp_rank * micro_batch_size
        self.stride = micro_batch_size * dp_size
        self.micro_batch_size = micro_batch_size
        self.num_batches = num_batches

    def indices(self, b: int) -> range:
        start = self.first + b * self.stride
        return range(start, start + self.micro_batch_size)

    def __call__(self, batch_info):
        b = batch_info.iteration
        if b >= self.num_batches:
            raise StopIteration
        samples = [self.dataset[i] for i in self.indices(b)]
        # [mbs, ...] per key, the dataset's dtypes (int64 tokens, float32 loss_mask, bool mask)
        return tuple(numpy.stack([numpy.asarray(s[k]) for s in samples]) for k in self.keys)


def _build_dali_pipeline(dataset, micro_batch_size, consumed_samples, dp_rank, dp_size,
                         num_batches, num_workers, prefetch, device, num_threads, start_method):
    dali = _import_dali()
    fn = dali.fn
    keys = [k for k, v in dataset[consumed_samples].items() if v is not None]
    source = DaliBatchSource(dataset, keys, consumed_samples, micro_batch_size, dp_rank,
                             dp_size, num_batches)
    on_gpu = device.type == "cuda"
    if start_method is None:
        start_method = "spawn" if (torch.cuda.is_available() and torch.cuda.is_initialized()) \
            else "fork"
    parallel = num_workers > 0
    pipe = dali.Pipeline(
        batch_size=micro_batch_size,
        num_threads=num_threads,
        device_id=device.index if on_gpu else None,
        prefetch_queue_depth=prefetch,
        py_num_workers=max(num_workers, 1),
        py_start_method=start_method,
        seed=0,  # no random operators; fixed for reproducibility
    )
    with pipe:
        extra = {"prefetch_queue_depth": prefetch} if parallel else {}
        outs = fn.external_source(source=source, num_outputs=len(keys), batch=True,
                                  batch_info=True, parallel=parallel, **extra)
        if on_gpu:
            outs = [o.gpu() for o in outs]  # H2D copy inside the pipeline, ahead of use
        pipe.set_outputs(*outs)
    pipe.build()
    return pipe, keys


def _dali_batches(pipe, keys) -> Iterator[Dict[str, torch.Tensor]]:
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    # Epoch end comes from the source's StopIteration after the last micro-batch.
    for out in DALIGenericIterator(pipe, keys, auto_reset=False):
        yield out[0]
