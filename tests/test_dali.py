"""The Megatron indexed-dataset input pipeline: .bin/.idx writing, GPTDataset, Megatron's sampler
order, and the DALI backend against the torch backend (element for element), with resume.

Data-parallel ranks are simulated in-process (dp_rank/dp_size arguments): the order and the
sharding are pure functions of (consumed_samples, micro_batch_size, dp_rank, dp_size), so no
torchrun is needed. DALI runs CPU-only here (device_id=None); CI installs the `dali` extra.
"""

import itertools
import os
from types import SimpleNamespace

import numpy
import pytest
import torch

from megatron_ultramem import data
from megatron_ultramem import data_pipeline as dp

needs_dali = pytest.mark.skipif(
    not dp.HAVE_DALI, reason="nvidia.dali is not installed: pip install 'megatron-ultramem[dali]'"
)

SEQ = 32
MBS = 3  # odd on purpose: global batches of 3 and 6 never align with anything else
KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _corpus(seed):
    # ~60 documents, ~12k bytes -> ~380 samples of 32 tokens: a whole epoch is ~60 global batches
    return data.make_corpus(num_entities=30, num_train_docs=60, num_valid_docs=8, seed=seed)


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def dataset(request, tmp_path_factory):
    seed = request.param
    prefix = str(tmp_path_factory.mktemp(f"corpus{seed}") / "train")
    dp.write_indexed_corpus(_corpus(seed).train, prefix)
    return dp.build_gpt_dataset(prefix, SEQ, num_samples=None, seed=seed)


def _expected_indices(total, consumed, mbs, rank, size):
    """The documented order, written independently of the sampler: global batch g covers
    consumed + g*mbs*size ... + (g+1)*mbs*size - 1; rank r takes the r-th slice of mbs."""
    out = []
    g = 0
    while consumed + (g + 1) * mbs * size <= total:
        base = consumed + g * mbs * size + rank * mbs
        out.append(list(range(base, base + mbs)))
        g += 1
    return out


def _stack(dataset, indices):
    samples = [dataset[i] for i in indices]
    return {k: torch.stack([s[k] for s in samples]) for k in KEYS}


def _take(it, n=None):
    batches = list(itertools.islice(it, n)) if n is not None else list(it)
    return [{k: b[k].cpu() for k in KEYS} for b in batches]


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for k in KEYS:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, (i, k)
            assert torch.equal(x[k], y[k]), f"batch {i} key {k} differs"


# ---------------------------------------------------------------------------------------------
# indexed dataset and GPTDataset


def test_write_indexed_corpus_roundtrip_and_skip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    stream = _corpus(0).train
    prefix = str(tmp_path / "c")
    h = dp.write_indexed_corpus(stream, prefix)
    ds = IndexedDataset(prefix)
    docs = [ds[i] for i in range(len(ds))]
    assert all(d[-1] == dp.EOD_TOKEN and (d[:-1] != dp.EOD_TOKEN).all() for d in docs)
    assert torch.equal(torch.from_numpy(numpy.concatenate(docs).astype(numpy.int64)), stream)
    assert len(docs) == 60

    mtime = os.stat(prefix + ".bin").st_mtime_ns
    cache = dp.gpt_cache_dir(prefix)
    assert dp.write_indexed_corpus(stream, prefix) == h  # same content: skipped
    assert os.stat(prefix + ".bin").st_mtime_ns == mtime
    h2 = dp.write_indexed_corpus(_corpus(1).train, prefix)  # new content: rewritten
    assert h2 != h and dp.gpt_cache_dir(prefix) != cache
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    # list-of-documents input; EOD appended where missing
    dp.write_indexed_corpus([[65, 66], [67, 10]], str(tmp_path / "l"))
    ds = IndexedDataset(str(tmp_path / "l"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[65, 66, 10], [67, 10]]
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        dp.write_indexed_corpus([[300]], str(tmp_path / "bad"))


def test_gpt_dataset_samples_are_corpus_windows(dataset):
    s = dataset[5]
    assert s["tokens"].shape == (SEQ,) and s["tokens"].dtype == torch.int64
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels are tokens shifted by one
    assert torch.equal(s["position_ids"], torch.arange(SEQ))
    assert torch.equal(s["loss_mask"], torch.ones(SEQ))  # no padding byte, no EOD masking
    assert "attention_mask" not in s
    assert os.path.isdir(dataset.config.path_to_cache)


def test_gpt_dataset_valid_split_and_mask(tmp_path):
    prefix = str(tmp_path / "valid")
    dp.write_indexed_corpus(_corpus(0).valid, prefix)
    ds = dp.build_gpt_dataset(prefix, SEQ, None, 0, split="valid", create_attention_mask=True)
    assert ds.index_split.name == "valid"
    mask = ds[0]["attention_mask"]  # Megatron's convention: True = masked (future positions)
    assert torch.equal(mask, torch.ones(1, SEQ, SEQ, dtype=torch.bool).triu(1))
    with pytest.raises(ValueError, match="split"):
        dp.build_gpt_dataset(prefix, SEQ, None, 0, split="dev")


# ---------------------------------------------------------------------------------------------
# sampler and torch loader


@pytest.mark.parametrize("total,consumed,mbs,size", [(20, 0, 3, 1), (20, 7, 3, 2), (25, 4, 2, 3),
                                                      (5, 0, 3, 2)])
def test_sampler_matches_documented_order(total, consumed, mbs, size):
    per_rank = []
    for rank in range(size):
        got = list(dp.PretrainingSampler(total, consumed, mbs, rank, size))
        assert got == _expected_indices(total, consumed, mbs, rank, size)
        per_rank.append(got)
    # the ranks of one step together cover one contiguous global batch
    for step in zip(*per_rank):
        flat = [i for b in step for i in b]
        assert flat == list(range(flat[0], flat[0] + mbs * size))
    # drop_last=False: each rank also gets its (possibly short or empty) slice of the tail
    tail = dp.PretrainingSampler(total, consumed, mbs, 0, size, drop_last=False)
    n_full = (total - consumed) // (mbs * size)
    assert len(list(tail)) == n_full + ((total - consumed) % (mbs * size) > 0)
    with pytest.raises(ValueError, match="consumed_samples"):
        dp.PretrainingSampler(total, total, mbs, 0, size)
    with pytest.raises(ValueError, match="dp_rank"):
        dp.PretrainingSampler(total, 0, mbs, size, size)


def test_sampler_equals_megatron_lm_if_installed():
    samplers = pytest.importorskip("megatron.training.datasets.data_samplers",
                                   reason="Megatron-LM (megatron.training) not installed")
    for total, consumed, mbs, size in [(20, 7, 3, 2), (50, 0, 4, 3)]:
        for rank in range(size):
            ref = samplers.MegatronPretrainingSampler(total, consumed, mbs, rank, size)
            assert list(dp.PretrainingSampler(total, consumed, mbs, rank, size)) == list(ref)


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("consumed", [0, 7])
def test_torch_loader_equals_dataset_in_sampler_order(dataset, size, consumed):
    for rank in range(size):
        expected = _expected_indices(len(dataset), consumed, MBS, rank, size)
        it = dp.build_train_iterator("torch", dataset, MBS, consumed, rank, size, device="cpu")
        got = _take(it)
        assert len(got) == len(expected) == it.num_batches > 0
        _assert_same(got, [_stack(dataset, idx) for idx in expected])
        assert it.consumed_samples == consumed + len(expected) * MBS * size


# ---------------------------------------------------------------------------------------------
# DALI backend


@needs_dali
@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("consumed", [0, 7, 300])
def test_dali_equals_torch_loader(dataset, size, consumed):
    for rank in range(size):
        ref = _take(dp.build_train_iterator("torch", dataset, MBS, consumed, rank, size,
                                            device="cpu"))
        it = dp.build_train_iterator("dali", dataset, MBS, consumed, rank, size, device="cpu")
        got = _take(it)
        assert got[0]["tokens"].shape == (MBS, SEQ)
        _assert_same(got, ref)
        it.close()


@needs_dali
def test_dali_parallel_workers_and_prefetch_equal_torch_workers(dataset):
    """The worker/prefetch options change who reads, never what is read."""
    ref = _take(dp.build_train_iterator("torch", dataset, MBS, 5, 1, 2, num_workers=2,
                                        prefetch=3, device="cpu"))
    it = dp.build_train_iterator("dali", dataset, MBS, 5, 1, 2, num_workers=2, prefetch=3,
                                 device="cpu")
    _assert_same(_take(it), ref)
    it.close()


@needs_dali
def test_dali_passes_attention_mask(tmp_path):
    prefix = str(tmp_path / "m")
    dp.write_indexed_corpus(_corpus(0).train, prefix)
    ds = dp.build_gpt_dataset(prefix, SEQ, None, 0, create_attention_mask=True)
    a = next(dp.build_train_iterator("torch", ds, MBS, 0, device="cpu"))
    b = next(dp.build_train_iterator("dali", ds, MBS, 0, device="cpu"))
    assert a["attention_mask"].shape == (MBS, 1, SEQ, SEQ)
    assert torch.equal(a["attention_mask"], b["attention_mask"].cpu())


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("size", [1, 2])
def test_resume_from_consumed_samples_continues_uninterrupted_run(dataset, backend, size):
    k = 4
    for rank in range(size):
        full = _take(dp.build_train_iterator(backend, dataset, MBS, 2, rank, size, device="cpu"))
        first = dp.build_train_iterator(backend, dataset, MBS, 2, rank, size, device="cpu")
        head = _take(first, k)
        first.close()
        assert first.consumed_samples == 2 + k * MBS * size  # what a checkpoint would store
        resumed = dp.build_train_iterator(backend, dataset, MBS, first.consumed_samples, rank,
                                          size, device="cpu")
        _assert_same(head + _take(resumed), full)


def test_dali_missing_names_the_package(dataset, monkeypatch):
    monkeypatch.setattr(dp, "HAVE_DALI", False)
    with pytest.raises(ImportError, match=r"megatron-ultramem\[dali\].*nvidia-dali-cuda130"):
        dp.build_train_iterator("dali", dataset, MBS, 0, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        dp.build_train_iterator("tf", dataset, MBS, 0)


# ---------------------------------------------------------------------------------------------
# Megatron-LM external provider


def _lm_args(**kw):
    fields = dict(dataloader_type="external", micro_batch_size=MBS, consumed_train_samples=6,
                  consumed_valid_samples=0, num_workers=0)
    fields.update(kw)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_megatron_lm_external_iterators(dataset, backend):
    from megatron_ultramem.dali_megatron_lm import external_iterators

    train, valid, test = external_iterators((dataset, None, dataset), _lm_args(), 1, 2,
                                            backend=backend, device="cpu")
    assert valid is None
    batch = next(train)  # an iterator, as RerunDataIterator needs: next(obj)
    assert "attention_mask" not in batch  # absent, not None: get_batch_on_this_tp_rank checks keys
    assert set(batch) == set(KEYS)
    expected = _expected_indices(len(dataset), 6, MBS, 1, 2)[0]
    _assert_same([{k: batch[k].cpu() for k in KEYS}], [_stack(dataset, expected)])
    assert train.consumed_samples == 6 + MBS * 2
    assert torch.equal(next(test)["tokens"].cpu(), _stack(dataset, [3, 4, 5])["tokens"])
    with pytest.raises(ValueError, match="dataloader-type external"):
        external_iterators((dataset, None, None), _lm_args(dataloader_type="single"), 0, 1)


def test_megatron_lm_provider_reads_args_and_parallel_state(dataset, monkeypatch):
    """make_dataloaders_provider with Megatron-LM's get_args and parallel_state stand-ins."""
    import sys
    import types

    from megatron.core import parallel_state

    from megatron_ultramem.dali_megatron_lm import make_dataloaders_provider

    fake = types.ModuleType("megatron.training")
    fake.get_args = lambda: _lm_args(consumed_train_samples=0)
    monkeypatch.setitem(sys.modules, "megatron.training", fake)
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 1)
    calls = []

    def datasets_provider(num_samples, vp_stage=None):
        calls.append((num_samples, vp_stage))
        return dataset, dataset, None

    datasets_provider.is_distributed = True
    provider = make_dataloaders_provider(datasets_provider, backend="torch", device="cpu")
    assert provider.is_distributed
    train, valid, test = provider([30, 9, 0], vp_stage=1)
    assert calls == [([30, 9, 0], 1)] and test is None
    assert torch.equal(next(train)["tokens"], _stack(dataset, [0, 1, 2])["tokens"])
    assert torch.equal(next(valid)["tokens"], _stack(dataset, [0, 1, 2])["tokens"])
