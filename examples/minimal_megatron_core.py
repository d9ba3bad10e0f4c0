"""Minimal use of UltraMem with Megatron-Core alone: GPT with memory layers, one forward + backward.

    python examples/minimal_megatron_core.py            # CPU (gloo, world size 1) or one GPU

Steps: CPU compatibility layer (no-op on CUDA) -> torch.distributed + Megatron's parallel state ->
UltraMemConfig (a TransformerConfig with ultramem_* fields) -> block spec -> GPTModel -> forward
with labels (per-token loss) -> backward. The same config object goes to the spec and to GPTModel.
"""

import os
import socket

import torch
from megatron_ultramem.cpu_compat import CPU_CONFIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ultramem import cpu_compat
    from megatron_ultramem.config import UltraMemConfig
    from megatron_ultramem.layer import UltraMemLayer
    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    on_cpu = cpu_compat.enable()  # patches Megatron-Core's CUDA-only spots; False on a GPU machine
    device = "cpu" if on_cpu else "cuda"
    if not on_cpu:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(
        "gloo" if on_cpu else "nccl",
        init_method=f"tcp://127.0.0.1:{os.environ.get('MASTER_PORT', free_port())}",
        rank=0,
        world_size=1,
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)

    config = UltraMemConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=256,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_CONFIG,  # CPU init, fused CUDA/apex kernels off
        # UltraMemV2 placement: a memory beside the MLP of every second layer.
        ultramem_mode="parallel",
        ultramem_layers="[0,1,0,1]",
        ultramem_num_keys=16,  # n: N = 256 value rows
        ultramem_key_dim=32,  # K
        ultramem_topm=8,  # m <= sqrt(E) * n = 32
        ultramem_value_dim=32,  # Dv (default hidden_size // 2)
    )
    spec = get_ultramem_decoder_block_spec(config, use_transformer_engine=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=128,
        max_sequence_length=32,
        position_embedding_type="rope",
    ).to(device)
    memories = [m for m in model.modules() if isinstance(m, UltraMemLayer)]

    torch.manual_seed(0)
    batch, seq = 2, 32
    tokens = torch.randint(0, 128, (batch, seq + 1), device=device)
    position_ids = torch.arange(seq, device=device).expand(batch, seq)
    losses = model(
        tokens[:, :-1], position_ids, attention_mask=None, labels=tokens[:, 1:]
    )  # [b, s]
    loss = losses.float().mean()
    loss.backward()
    for m in memories:  # once per optimizer step in training (here: after the backward)
        m.refresh_tucker_vectors()

    params = sum(p.numel() for p in model.parameters())
    table = sum(m.values.numel() for m in memories)
    numbers = [m.layer_number for m in memories]
    grad_norm = torch.stack([m.values.grad.norm() for m in memories]).norm()
    print(f"GPTModel: {params:,} parameters, memory layers {numbers}, value tables {table:,}")
    print(f"loss {loss.item():.4f}; value-table grad norm {grad_norm:.4e}")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
