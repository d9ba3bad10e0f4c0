"""Selective activation recompute of the memory, through Megatron's TransformerLayer: 'mlp'
(Megatron recomputes the whole MLP slot) and 'moe' (the memory recomputes itself, like the MoE
block it replaces) give the loss and every gradient of the run without recompute (fp64)."""

import pytest
import torch

from tests.helpers import small_config

VOCAB, SEQ, BATCH = 32, 8, 2


def loss_and_grads(mode, layers, **recompute):
    from megatron.core.models.gpt import GPTModel

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    # add_bias_linear=False: Megatron's own 'mlp' recompute of a dense MLP with a bias recurses
    # forever in backward (the checkpoint returns the fc2 bias Parameter; seen on 0.16 and 0.19)
    cfg = small_config(torch.float64, num_layers=2, ultramem_mode=mode, ultramem_layers=layers,
                       ultramem_aux_loss_alpha=0.01, add_bias_linear=False, **recompute)  # fmt: skip
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_ultramem_decoder_block_spec(cfg, False),
                     vocab_size=VOCAB, max_sequence_length=SEQ).double()  # fmt: skip
    model.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    from megatron_ultramem.aux_loss import set_aux_loss_scale

    set_aux_loss_scale(1.0)
    loss = model(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).double().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,layers", [("replace", "[1,0]"), ("parallel", "[0,1]")])
@pytest.mark.parametrize("modules", [["mlp"], ["moe"], ["mlp", "moe"]])
def test_recompute_gives_the_same_gradients(megatron_world, mode, layers, modules):
    from megatron_ultramem.layer import UltraMemLayer

    calls = []
    original = UltraMemLayer._memory_output

    def counting(self, x):
        calls.append(torch.is_grad_enabled())
        return original(self, x)

    want_loss, want = loss_and_grads(mode, layers)
    UltraMemLayer._memory_output = counting
    try:
        loss, got = loss_and_grads(
            mode, layers, recompute_granularity="selective", recompute_modules=modules
        )
    finally:
        UltraMemLayer._memory_output = original
    # the memory really ran twice: once without graph (forward), once to recompute (backward)
    assert calls == [False, True], calls
    assert loss == want_loss
    assert got.keys() == want.keys()
    for name in want:  # fp64; recompute runs the same ops on the same inputs: rounding only
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)
