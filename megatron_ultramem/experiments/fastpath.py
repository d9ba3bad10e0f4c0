"""Prototype of a faster CPU reference path for UltraMemLayer (measured here, not wired in).

Same math as `UltraMemLayer.forward` with the reference backend (reference.py), reorganised for the
CPU; each change is a candidate diff for layer.py / reference.py (see the decode report):

1. Keys as one [K, H*n'*r] matrix per side: the row/column scores are one GEMM each, written
   straight into [T, H, n', r] (reference: einsum "tk,hakr->thar", which permutes its operands).
2. Selection without autograd: phase-1 projections, the m x m rescoring grid and its top-m only
   produce indices, so they run under torch.no_grad() (reference: tracked by autograd, which saves
   the [T, H, m, m] grid's inputs for a backward that never reaches them).
3. Phase-1 projections s_row . u = q_row . (keys u): u folded into the keys once per call, then
   one [T, K] @ [K, H*n'] GEMM per side (the reference's einsum "thar,hr->tha" runs as T*H tiny
   products over r), and the phase-1 top-m unsorted (their order does not matter; the final top-m
   stays sorted).
4. Pooling with `F.embedding_bag(mode="sum", per_sample_weights=...)`: the table viewed as
   [N*h, Dv/h] (core slice i of row phi is row phi*h + i), one bag per (token, core, virtual block)
   after a stable sort of each token's winners by block. No [T, H*m, Dv] gathered copy, no
   [T, H*m, Dv] weighted copy, no scatter_add; its backward accumulates the table's gradient with
   embedding_bag's backward instead of index_put_(accumulate=True) (reference: values[rows] ->
   multiply -> scatter_add_).
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .. import reference


def fast_retrieve(mem, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> virtual [T, H*m], scores [T, H*m, h] (same as UltraMemLayer.retrieve)."""
    T = x.shape[0]
    H, n_side, K, r, m = mem.H, mem.n_side, mem.K, mem.r, mem.m
    q = F.linear(x, mem.query_weight)  # [T, 2K]
    q_row = mem.query_norm_row(q[:, :K])
    q_col = mem.query_norm_col(q[:, K:])
    k_row, k_col = mem.normalized_keys()  # [H, n', K, r]
    # 1. one GEMM per side: [T, K] @ [K, H*n'*r] -> [T, H, n', r]
    s_row = (q_row @ k_row.permute(2, 0, 1, 3).reshape(K, -1)).view(T, H, n_side, r)
    s_col = (q_col @ k_col.permute(2, 0, 1, 3).reshape(K, -1)).view(T, H, n_side, r)
    with torch.no_grad():  # 2. indices only
        # phase 1: s_row . u = q_row . (keys u): fold u into the keys and do one [T, K] @ [K, H*n']
        # GEMM per side; the order of the m candidates is irrelevant (sorted=False)
        ku_row = torch.einsum("hakr,hr->kha", k_row, mem.tucker_u).reshape(K, H * n_side)
        kv_col = torch.einsum("hakr,hr->kha", k_col, mem.tucker_v).reshape(K, H * n_side)
        p_row = (q_row @ ku_row).view(T, H, n_side)  # [T, H, n']
        p_col = (q_col @ kv_col).view(T, H, n_side)
        i_row = torch.topk(p_row, m, dim=-1, sorted=False).indices  # [T, H, m]
        i_col = torch.topk(p_col, m, dim=-1, sorted=False).indices
        sr = torch.gather(s_row, 2, i_row[..., None].expand(T, H, m, r))  # [T, H, m, r]
        sc = torch.gather(s_col, 2, i_col[..., None].expand(T, H, m, r))
        # phase 2: [T, H, m, m] grid, selection only
        grid = torch.matmul(torch.matmul(sr, mem.cores.sum(1)), sc.transpose(-1, -2))
        top = torch.topk(grid.view(T, H, m * m), m, dim=-1).indices  # [T, H, m], sorted
        a, b = top // m, top % m
        win_row = torch.gather(i_row, 2, a)  # [T, H, m] rows of the virtual grid
        win_col = torch.gather(i_col, 2, b)
        virtual = win_row * n_side + win_col
    # winners' per-core scores, with gradient (the only path autograd sees): [T, H, m, h]
    sr_w = torch.gather(s_row, 2, win_row[..., None].expand(T, H, m, r))  # [T, H, m, r]
    sc_w = torch.gather(s_col, 2, win_col[..., None].expand(T, H, m, r))
    scores = torch.einsum("thmr,hirs,thms->thmi", sr_w, mem.cores, sc_w)
    if mem.config.ultramem_score_activation == "softmax":
        scores = torch.softmax(scores, dim=2)
    return virtual.reshape(T, H * m), scores.reshape(T, H * m, mem.h)


def embedding_bag_pool(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor,
                       values: torch.Tensor, E: int) -> torch.Tensor:  # fmt: skip
    """Same result as reference.weighted_gather_pool: [T, M], [T, M], [T, M, h], [N, Dv] -> [T, E, Dv]."""
    T, M = rows.shape
    h = scores.shape[-1]
    N, Dv = values.shape
    c = Dv // h
    with torch.no_grad():
        order = torch.sort(blocks, dim=1, stable=True).indices  # [T, M]
        rows_s = torch.gather(rows, 1, order)
        counts = torch.zeros(T, E, dtype=torch.int64).scatter_add_(
            1, blocks, torch.ones_like(blocks)
        )  # [T, E]
        idx = rows_s[:, None, :] * h + torch.arange(h)[None, :, None]  # [T, h, M]
        sizes = counts[:, None, :].expand(T, h, E).reshape(-1)  # bags (t, i, p)
        offsets = torch.cumsum(sizes, 0) - sizes
    w = torch.gather(scores, 1, order[..., None].expand(T, M, h)).transpose(1, 2)  # [T, h, M]
    out = F.embedding_bag(
        idx.reshape(-1), values.view(N * h, c), offsets, mode="sum",
        per_sample_weights=w.reshape(-1).to(values.dtype),
    )  # [T*h*E, c]  # fmt: skip
    return out.view(T, h, E, c).transpose(1, 2).reshape(T, E, Dv)


def fast_memory(mem, hidden: torch.Tensor) -> torch.Tensor:
    """UltraMemLayer.forward (TP = EP = 1, reference math) on [s, b, D] -> [s, b, D]."""
    s, b, D = hidden.shape
    virtual, scores = fast_retrieve(mem, hidden.reshape(s * b, D))
    rows, blocks = reference.virtual_to_physical(virtual, mem.permutation, mem.N)
    pooled = embedding_bag_pool(rows, blocks, scores, mem.values, mem.E)  # [T, E, Dv]
    flat = pooled.transpose(1, 2).reshape(pooled.shape[0], -1)  # Dv-major, as the layer
    out, _ = mem.linear_out(flat)
    out = out.view(s, b, D)
    if mem.training and mem.config.ultramem_aux_loss_alpha > 0 and torch.is_grad_enabled():
        out = mem._attach_aux_loss(out)
    return out


def fast_slot(slot, hidden: torch.Tensor):
    """UltraMemSlot.forward (mode 'parallel') with the fast memory path."""
    out, bias = slot.mlp(hidden)
    if bias is not None:
        out = out + bias
    return out + fast_memory(slot.memory, hidden), None


# ---------------------------------------------------------------------- check + timing
def check_equal(slot, tokens: int = 512, seed: int = 0) -> Dict[str, float]:
    """Outputs and gradients of the fast path vs the layer's own forward on the same input."""
    gen = torch.Generator().manual_seed(seed)
    D = slot.memory.D
    x = torch.randn(tokens, 1, D, generator=gen)
    g = torch.randn(tokens, 1, D, generator=gen)
    slot.train()
    results = []
    for fn in (lambda h: slot(h), lambda h: fast_slot(slot, h)):
        xi = x.clone().requires_grad_(True)
        out, _ = fn(xi)
        out.backward(g)
        grads = {n: p.grad.clone() for n, p in slot.named_parameters() if p.grad is not None}
        grads["input"] = xi.grad.clone()
        for p in slot.parameters():
            p.grad = None
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    with torch.no_grad():
        v1, _ = slot.memory.retrieve(x.view(tokens, D))
        v2, _ = fast_retrieve(slot.memory, x.view(tokens, D))
        same_sel = (torch.sort(v1, 1).values == torch.sort(v2, 1).values).float().mean().item()

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    return {
        "selection_agreement": same_sel,
        "out_rel_err": rel(o2, o1),
        "max_grad_rel_err": max(rel(g2[k], g1[k]) for k in g1),
    }


def compare(settings, log=print) -> Dict[str, object]:
    """Layer vs fast path: equality, training step and decode step timings; report lines."""
    from .decode import KINDS, _Flusher, _median_ms, build_slots, time_interleaved

    lines = []
    # training step at the quality sweep's size
    size = settings.train_size
    slots = build_slots(size)
    slot = slots["ultramem"][0]
    moe = slots["moe"][0]
    chk = check_equal(slot)
    log(f"  fast path vs layer: {chk}", flush=True)
    T = settings.train_tokens
    s = min(size.seq_length, T)
    x = torch.randn(s, T // s, size.hidden_size)
    g = torch.randn_like(x)

    def step(fn, module):
        def call(r):
            out, _ = fn(x.clone().requires_grad_(True))
            out.backward(g)
            for p in module.parameters():
                p.grad = None

        return call

    for m in (slot, moe):
        m.train()
    train_t = time_interleaved(
        {
            "ultramem (layer)": step(lambda h: slot(h), slot),
            "ultramem (fast path)": step(lambda h: fast_slot(slot, h), slot),
            "moe": step(lambda h: moe(h), moe),
        },
        settings.train_repeats,
        2,
    )
    # decode step at the decode size
    dslots = build_slots(settings.size)
    dslot, dmoe = dslots["ultramem"][0].eval(), dslots["moe"][0].eval()
    flush = _Flusher(settings.flush_mib)
    dec = {}
    with torch.no_grad():
        for B in settings.batches:
            gen = torch.Generator().manual_seed(B)
            xs = [torch.randn(1, B, settings.size.hidden_size, generator=gen)
                  for _ in range(settings.warmup + settings.repeats)]  # fmt: skip
            t = time_interleaved(
                {
                    "layer": lambda r: dslot(xs[r]),
                    "fast": lambda r: fast_slot(dslot, xs[r]),
                    "moe": lambda r: dmoe(xs[r]),
                },
                settings.repeats,
                settings.warmup,
                flush,
            )
            dec[B] = {k: _median_ms(v) for k, v in t.items()}
            log(f"  fast path decode B={B}: {dec[B]}", flush=True)
    tr = {k: _median_ms(v) for k, v in train_t.items()}
    lines += [
        "## Prototype: faster CPU reference path (experiments/fastpath.py)",
        "",
        "Same math as the layer's reference path, reorganised (module docstring of fastpath.py): "
        "(1) keys as one [K, H*n'*r] GEMM matrix, (2) selection (phase 1, the m x m grid, top-m) "
        "under no_grad, (3) u folded into the keys for phase 1 and the phase-1 top-m unsorted, "
        "(4) pooling with `F.embedding_bag(per_sample_weights=...)` over the table viewed as "
        "[N*h, Dv/h].",
        "",
        f"Check against the layer (512 tokens, train mode, quality-sweep size): selected indices "
        f"agree {100 * chk['selection_agreement']:.2f}%, output relative error "
        f"{chk['out_rel_err']:.1e}, worst gradient relative error {chk['max_grad_rel_err']:.1e}.",
        "",
        f"Training step of the slot (fwd+bwd, {T} tokens, quality-sweep size, median of "
        f"{settings.train_repeats}, interleaved):",
        "",
        "| slot | ms | vs MoE |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {v / tr['moe']:.2f}x |" for k, v in tr.items()],
        "",
        "Decode step of the slot (decode size, cold cache, as above):",
        "",
        "| B | layer ms | fast path ms | MoE ms | fast / MoE | fast / layer |",
        "|---|---|---|---|---|---|",
        *[
            f"| {B} | {t['layer']:.3f} | {t['fast']:.3f} | {t['moe']:.3f} | "
            f"{t['fast'] / t['moe']:.2f}x | {t['fast'] / t['layer']:.2f}x |"
            for B, t in dec.items()
        ],
        "",
    ]
    return {"check": chk, "train_ms": tr, "decode_ms": dec, "lines": lines}
