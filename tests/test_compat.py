"""Each version difference that compat.py hides, pinned on the installed megatron-core.

CI runs this file on 0.16.1 and on 0.19.2 (and it was run on Megatron-LM main, 0.20-dev): a shim whose premise stops being true on one of them
fails here, not somewhere deep in a model build.
"""

import functools
import warnings

import pytest
import torch

from megatron_ultramem import compat

VERSION = compat._minor(compat.megatron_core_version())
BUILDER_FORM = VERSION >= (0, 18)  # MLP/MoE specs as functools.partial builders from 0.18 on


def test_installed_version_is_a_tested_one():
    assert compat.check_version()


def test_untested_version_warns_once(monkeypatch):
    monkeypatch.setattr(compat, "_WARNED", [])
    with pytest.warns(UserWarning, match="0.16.1 and 0.19.2"):
        assert not compat.check_version("0.21.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("0.22.0")  # once per process


def test_import_of_the_package_warns_on_an_untested_version(tmp_path):
    import subprocess
    import sys

    code = (
        "import importlib.metadata as m; m.version = lambda name: '0.99.0'\n"
        "import warnings; warnings.simplefilter('always')\n"
        "import megatron_ultramem\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tested with megatron-core 0.16.1 and 0.19.2" in proc.stderr
    assert "0.99.0" in proc.stderr


def _dense_and_moe_specs():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    dense = get_gpt_layer_local_spec().submodules.mlp
    moe = get_gpt_layer_local_spec(num_experts=4).submodules.mlp
    return dense, moe


def test_mlp_spec_form_of_this_release():
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    dense, moe = _dense_and_moe_specs()
    expected = functools.partial if BUILDER_FORM else ModuleSpec
    assert isinstance(dense, expected) and isinstance(moe, expected)
    assert compat.mlp_spec_class(dense) is MLP
    assert compat.mlp_spec_class(moe) is MoELayer
    assert isinstance(compat.mlp_spec_submodules(dense), MLPSubmodules)
    # with_mlp_submodules keeps the form and the class, swaps only the submodules
    sub = compat.mlp_spec_submodules(dense)
    other = MLPSubmodules(linear_fc1=sub.linear_fc2, linear_fc2=sub.linear_fc2)
    swapped = compat.with_mlp_submodules(dense, other)
    assert isinstance(swapped, expected) and compat.mlp_spec_class(swapped) is MLP
    assert compat.mlp_spec_submodules(swapped) is other
    assert compat.mlp_spec_submodules(dense) is sub  # the original is untouched


def test_build_mlp_builds_a_working_dense_mlp_in_either_form(megatron_world):
    """The MLP built through the shim computes fc2(gelu(fc1(x))) (checked by hand, fp64)."""
    from tests.helpers import small_config

    dense, _ = _dense_and_moe_specs()
    cfg = small_config(torch.float64, add_bias_linear=False)
    mlp = compat.build_mlp(dense, cfg)
    x = torch.randn(3, 2, cfg.hidden_size, dtype=torch.float64)
    out, bias = mlp(x)
    w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    expected = torch.nn.functional.gelu(x @ w1.T) @ w2.T
    assert bias is None and torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_build_mlp_builds_a_moe_layer(megatron_world):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from tests.helpers import small_config

    _, moe = _dense_and_moe_specs()
    cfg = small_config(num_moe_experts=4, moe_router_topk=2, add_bias_linear=False)
    layer = compat.build_mlp(moe, cfg)
    assert isinstance(layer, MoELayer)
    out, _ = layer(torch.randn(5, 1, cfg.hidden_size))
    assert out.shape == (5, 1, cfg.hidden_size)


def test_process_groups_from_a_collection_or_mpu(megatron_world):
    from megatron.core import parallel_state

    pg = compat.default_pg_collection()
    assert compat.process_groups(pg)[0] is pg.tp
    tp, ep, edp = compat.process_groups(None)
    assert tp is parallel_state.get_tensor_model_parallel_group()
    assert ep is parallel_state.get_expert_model_parallel_group()


def test_aux_loss_tracker_record_and_discard(megatron_world):
    name = "ultramem_compat_probe"
    compat.record_aux_loss(name, torch.tensor(0.25), layer_number=2, num_layers=3)
    compat.record_aux_loss(name, torch.tensor(0.5), layer_number=2, num_layers=3)
    values = compat._entry_values(compat.aux_loss_entries()[name])
    assert values.tolist() == [0.0, 0.75, 0.0]  # accumulated per layer
    # a model with another layer count (same process) starts a fresh entry instead of failing
    compat.record_aux_loss(name, torch.tensor(1.0), layer_number=5, num_layers=5)
    assert compat._entry_values(compat.aux_loss_entries()[name]).tolist() == [0, 0, 0, 0, 1.0]
    if BUILDER_FORM:  # 0.18+: the legacy dict is a copy; the shim must reach the live tracker
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        assert name in get_moe_metrics_tracker().metrics
    compat.discard_aux_loss(name)
    assert name not in compat.aux_loss_entries()


def test_muon_exclusion_of_this_release(monkeypatch):
    """0.20+ route `use_muon = False` parameters to Muon's scalar optimizer and out of the
    layer-wise optimizer's buffers; before, a 2-D non-embedding parameter such as the value table is
    Muon's whatever its tags (so the Megatron-LM flags refuse Muon there)."""
    import sys
    import types

    table = torch.nn.Parameter(torch.zeros(6, 4))
    table.use_muon = False
    if compat.muon_honours_use_muon():
        from megatron.core.optimizer.emerging_optimizers import _is_muon_excluded
        from megatron.core.optimizer.layer_wise_optimizer import is_managed_by_layer_wise_optimizer

        assert _is_muon_excluded(table) and not is_managed_by_layer_wise_optimizer(table)
        assert not _is_muon_excluded(torch.nn.Parameter(torch.zeros(6, 4)))  # untagged: Muon's
    elif VERSION >= (0, 19):
        from megatron.core.optimizer import emerging_optimizers
        from megatron.core.optimizer.layer_wise_optimizer import is_managed_by_layer_wise_optimizer

        # the only exclusion is "non-linear or embedding": the tagged table would be orthogonalized
        assert not emerging_optimizers._is_nonlinear_or_embedding(table)
        assert is_managed_by_layer_wise_optimizer(table)
    else:
        with pytest.raises(ImportError):
            import megatron.core.optimizer.emerging_optimizers  # noqa: F401
    # faked both ways: the shim reads the registry's predicate, not the version number
    fake = types.ModuleType("megatron.core.optimizer.emerging_optimizers")
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    import megatron.core.optimizer as opt_pkg

    monkeypatch.setattr(opt_pkg, "emerging_optimizers", fake, raising=False)
    assert not compat.muon_honours_use_muon()
    fake._is_muon_excluded = lambda p: not getattr(p, "use_muon", True)
    assert compat.muon_honours_use_muon()
