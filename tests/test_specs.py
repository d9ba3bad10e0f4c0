"""GPTModel built from each spec variant: forward/backward on CPU (gloo), placement checked by hooks."""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_ultramem.layer import UltraMemLayer
from megatron_ultramem.specs import UltraMemSlot, get_ultramem_decoder_block_spec

from helpers import small_config

VOCAB, SEQ = 37, 9


def _model(**overrides):
    cfg = small_config(num_layers=4, **overrides)
    spec = get_ultramem_decoder_block_spec(cfg, use_transformer_engine=False)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ)
    # float64 so that exact-equality checks below are not at the mercy of rounding
    return model.double()


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(3, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    return tokens, pos, mask


def _layers(model):
    return [m for m in model.modules() if isinstance(m, TransformerLayer)]


VARIANTS = [
    dict(ultramem_mode="replace", ultramem_layers="[0,1,0,1]"),
    dict(ultramem_mode="parallel", ultramem_layers=2),
    dict(ultramem_mode="skip", ultramem_skip_units="0:2,1:1"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v["ultramem_mode"])
def test_gpt_forward_backward(megatron_world, variant):
    model = _model(**variant)
    mems = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
    assert len(mems) == 2
    tokens, pos, mask = _batch()
    loss = model(tokens, pos, mask, labels=tokens)
    assert loss.shape == (3, SEQ) and torch.isfinite(loss).all()
    loss.mean().backward()
    for mem in mems:
        assert mem.values.grad is not None and mem.values.grad.abs().sum() > 0
        assert mem.cores.grad is not None and torch.isfinite(mem.cores.grad).all()


def test_replace_puts_memory_in_the_mlp_slot(megatron_world):
    model = _model(**VARIANTS[0])
    layers = _layers(model)
    assert [isinstance(l.mlp, UltraMemLayer) for l in layers] == [False, True, False, True]
    # the memory needs its own pre-MLP norm (the dense layers' may be fused)
    assert not type(layers[1].pre_mlp_layernorm).__name__ == "IdentityOp"
    assert [l.mlp.layer_number for l in layers if isinstance(l.mlp, UltraMemLayer)] == [2, 4]


def _outputs_with_memory_zeroed(model, zero: bool):
    """Each block's output, optionally with every memory's output replaced by zeros."""
    outs, mem_outs, hooks = [], [], []
    for layer in _layers(model):
        hooks.append(layer.register_forward_hook(lambda mod, inp, out: outs.append(out[0].detach().clone())))
    for mem in (m for m in model.modules() if isinstance(m, UltraMemLayer)):
        def hook(mod, inp, out):
            mem_outs.append(out[0].detach().clone())
            if zero:
                return (torch.zeros_like(out[0]), out[1])
        hooks.append(mem.register_forward_hook(hook))
    tokens, pos, mask = _batch()
    with torch.no_grad():
        model(tokens, pos, mask)
    for h in hooks:
        h.remove()
    return outs, mem_outs


@pytest.mark.parametrize(
    "variant,source,sink",
    [
        (dict(ultramem_mode="skip", ultramem_skip_units="0:2"), 0, 2),
        (dict(ultramem_mode="skip", ultramem_skip_units="1:1"), 1, 1),
        (dict(ultramem_mode="parallel", ultramem_layers="[0,0,1,0]"), 2, 2),
    ],
)
def test_memory_output_lands_after_the_right_block(megatron_world, variant, source, sink):
    model = _model(**variant)
    model.eval()
    layers = _layers(model)
    # the memory's parameters live in the source block
    assert isinstance(layers[source].mlp, UltraMemSlot) and layers[source].mlp.memory is not None
    with_mem, (mem_out,) = _outputs_with_memory_zeroed(model, zero=False)
    without, _ = _outputs_with_memory_zeroed(model, zero=True)
    for k in range(sink):
        assert torch.equal(with_mem[k], without[k]), f"block {k} saw the memory before block {sink}"
    # dropout 0: the residual after block `sink` differs by exactly the memory output
    torch.testing.assert_close(with_mem[sink] - without[sink], mem_out, rtol=1e-12, atol=1e-12)
    assert mem_out.abs().max() > 0
    if sink + 1 < len(layers):
        assert not torch.equal(with_mem[sink + 1], without[sink + 1])


def test_parallel_on_moe_layer_is_refused(megatron_world):
    cfg = small_config(num_layers=2, num_moe_experts=4, moe_layer_freq=1, ultramem_mode="parallel")
    with pytest.raises(ValueError, match="MoE layer .* ultramem_mode='replace'"):
        get_ultramem_decoder_block_spec(cfg, use_transformer_engine=False)


def test_replace_swaps_moe_layers(megatron_world):
    cfg = small_config(
        num_layers=2, num_moe_experts=4, moe_layer_freq=1, moe_router_topk=2,
        ultramem_mode="replace", ultramem_layers="[1,0]", add_bias_linear=False,
    )
    spec = get_ultramem_decoder_block_spec(cfg, use_transformer_engine=False)
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ultramem.compat import mlp_spec_class

    assert spec.layer_specs[0].submodules.mlp.module is UltraMemLayer
    # 0.16: ModuleSpec(MoELayer); 0.18+: functools.partial(MoELayer, ...)
    assert mlp_spec_class(spec.layer_specs[1].submodules.mlp) is MoELayer


def test_te_requested_without_te_is_a_clear_error(megatron_world):
    from megatron_ultramem import specs

    if specs.HAVE_TE:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ImportError, match="transformer_engine"):
        get_ultramem_decoder_block_spec(small_config(), use_transformer_engine=True)
