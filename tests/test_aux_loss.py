"""The Tucker aux loss's gradient through Megatron's own schedule, in a model without MoE.

Megatron's get_forward_backward_func runs the micro-batches; the aux contribution to the cores'
gradient is isolated as grad(alpha > 0) - grad(alpha = 0) on the same data and weights, and
compared with the aux loss's own autograd gradient (reference.tucker_aux_loss of the summed cores'
singular values): averaged over micro-batches (4 micro-batches == 1), multiplied by the loss scale,
and not averaged with calculate_per_token_loss (Megatron's MoE convention).
"""

import pytest
import torch

from megatron_ultramem import aux_loss, reference
from megatron_ultramem.layer import UltraMemLayer

from tests.helpers import small_config

VOCAB, SEQ, BATCH = 32, 8, 2
TOL = dict(rtol=1e-5, atol=1e-9)  # fp32 SVD in the layer; a wrong scale is off by 4x or 8x


def build(alpha, **overrides):
    from megatron.core.models.gpt import GPTModel

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    cfg = small_config(
        torch.float64, num_layers=2, ultramem_mode="parallel", ultramem_layers="[0,1]",
        ultramem_aux_loss_alpha=alpha, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_ultramem_decoder_block_spec(cfg, False),
        vocab_size=VOCAB, max_sequence_length=SEQ,
    ).double()  # fmt: skip
    memory = next(m for m in model.modules() if isinstance(m, UltraMemLayer))
    with torch.no_grad():  # well above tau in both singular values: the hinge is active
        memory.cores.copy_(torch.tensor([[[2.0, 0.3], [0.1, 1.5]]] * memory.h).expand_as(memory.cores))
    memory.refresh_tucker_vectors()
    return model, memory


def cores_grad(alpha, num_microbatches, grad_scale=None, per_token=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, memory = build(alpha, calculate_per_token_loss=per_token)
    model.config.grad_scale_func = grad_scale
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)

    def forward_step(data_iterator, m):
        t = next(data_iterator)
        out = m(t[:, :-1], pos, mask, labels=t[:, 1:])

        def loss_func(output):
            loss = output.double().sum()
            n = torch.tensor(output.numel(), dtype=torch.int)
            return loss, n, {"lm loss": torch.stack([loss.detach(), n.double()])}

        return out, loss_func

    model.train()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens] * num_microbatches),
        model=[model], num_microbatches=num_microbatches, seq_length=SEQ,
        micro_batch_size=BATCH, forward_only=False,
    )  # fmt: skip
    return memory.cores.grad.clone(), memory


def expected_aux_grad(memory, alpha):
    cores = memory.cores.detach().clone().requires_grad_(True)
    loss = reference.tucker_aux_loss(
        torch.linalg.svdvals(cores.sum(1)), alpha, memory.config.ultramem_aux_loss_tau
    )
    loss.backward()
    return cores.grad


@pytest.mark.parametrize("num_microbatches", [1, 4])
def test_aux_gradient_is_averaged_over_micro_batches(megatron_world, num_microbatches):
    alpha = 0.05
    with_aux, memory = cores_grad(alpha, num_microbatches)
    without, _ = cores_grad(0.0, num_microbatches)
    want = expected_aux_grad(memory, alpha)
    assert want.abs().max() > 1e-3  # the hinge is active: the check has something to see
    # the layer takes the singular values in fp32 (svdvals of the summed cores): fp32 rounding
    torch.testing.assert_close(with_aux - without, want, **TOL)


def test_aux_gradient_follows_the_loss_scale(megatron_world):
    alpha = 0.05
    scale = lambda x: x * 8.0  # noqa: E731  (Megatron's grad_scale_func: the fp16 loss scale)
    with_aux, memory = cores_grad(alpha, 4, grad_scale=scale)
    without, _ = cores_grad(0.0, 4, grad_scale=scale)
    torch.testing.assert_close(with_aux - without, 8.0 * expected_aux_grad(memory, alpha),
                               **TOL)  # fmt: skip


def test_aux_gradient_with_per_token_loss_is_not_averaged(megatron_world):
    # calculate_per_token_loss: the schedule does not divide the main loss by the micro-batch
    # count (finalize_model_grads divides all grads by the token count later); Megatron gives MoE
    # aux losses the loss scale alone, and so does the hook.
    alpha = 0.05
    with_aux, memory = cores_grad(alpha, 4, per_token=True)
    without, _ = cores_grad(0.0, 4, per_token=True)
    torch.testing.assert_close(with_aux - without, 4 * expected_aux_grad(memory, alpha),
                               **TOL)  # fmt: skip


def test_logged_aux_loss_is_per_step(megatron_world):
    from megatron_ultramem.megatron_lm.hooks import UltraMemTrainingHooks

    values = []
    for num_microbatches in (1, 4):
        _, memory = cores_grad(0.05, num_microbatches)
        hooks = UltraMemTrainingHooks(log_stats=False).attach([memory])
        values.append(next(iter(hooks.collect().values()))["aux"])
    assert values[0] == pytest.approx(values[1], rel=1e-12) and values[0] > 0


def test_hook_is_installed_once_and_reversible(megatron_world):
    from megatron.core.pipeline_parallel import schedules

    aux_loss.install_schedule_hook()
    wrapped = schedules.forward_step_calc_loss
    aux_loss.install_schedule_hook()
    assert schedules.forward_step_calc_loss is wrapped
    aux_loss.uninstall_schedule_hook()
    assert schedules.forward_step_calc_loss is wrapped.__wrapped__
    aux_loss.install_schedule_hook()
