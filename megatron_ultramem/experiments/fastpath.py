"""Prototype of a faster CPU reference path for UltraMemLayer (measured here, not wired in).

The two functions below are exactly the proposed changes to reference.py (the diff is in the
decode report); `fast_slot` runs UltraMemSlot with them so they can be checked against the layer
and timed beside it:

1. `tucker_topm_nograd` (for reference.tucker_topm): the selection - phase-1 projections, their
   top-m (unsorted: the candidates' order does not matter), the m x m rescoring grid and the final
   top-m - only produces indices, so it runs under torch.no_grad(); the winners' per-core scores
   are gathered straight from S_row / S_col with autograd. The reference tracks the whole
   selection, saving the grid's inputs for a backward that never reaches them.
2. `weighted_gather_pool_bag` (a CPU path beside reference.weighted_gather_pool, which stays the
   oracle): one `F.embedding_bag(mode="sum", per_sample_weights=...)` over the table viewed as
   [N*h, Dv/h] (core slice i of row phi is row phi*h + i), one bag per (token, core, virtual
   block) after a stable sort of each token's winners by block. No [T, H*m, Dv] gathered copy, no
   weighted copy, no scatter_add_; the table's gradient comes from embedding_bag's backward
   instead of index_put_(accumulate=True), the largest single op of the reference's training step.

Also tried and left out (no gain measured beyond noise): the row/column scores as one
[T, K] @ [K, H*n'*r] GEMM instead of the einsum, u folded into the keys for phase 1, the m x m grid
and the per-core scores as broadcast products instead of small batched matmuls (slower).
"""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .. import reference


def tucker_topm_nograd(s_row, s_col, cores, u, v, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """reference.tucker_topm with the selection under no_grad (same arguments and results)."""
    T, H, n_side, r = s_row.shape
    with torch.no_grad():
        # Phase 1: rank-1 preselection. [T, H, n'] -> top-m indices [T, H, m] (order irrelevant)
        i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1, sorted=False).indices
        i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1, sorted=False).indices
        sr = torch.gather(s_row, 2, i_row[..., None].expand(T, H, m, r))  # [T, H, m, r]
        sc = torch.gather(s_col, 2, i_col[..., None].expand(T, H, m, r))  # [T, H, m, r]
        # Phase 2: exact rescoring of the m x m grid with the summed core. [T, H, m, m]
        grid = torch.einsum("thar,hrs,thbs->thab", sr, cores.sum(1), sc)
        top = torch.topk(grid.reshape(T, H, m * m), m, dim=-1).indices  # [T, H, m], sorted
        win_row = torch.gather(i_row, 2, top // m)  # [T, H, m] winners' rows of the virtual grid
        win_col = torch.gather(i_col, 2, top % m)
    sr_w = torch.gather(s_row, 2, win_row[..., None].expand(T, H, m, r))  # [T, H, m, r]
    sc_w = torch.gather(s_col, 2, win_col[..., None].expand(T, H, m, r))  # [T, H, m, r]
    # Per-core scores of the winners only (never the [.., h, m, m] grid). [T, H, m, h]
    core_scores = torch.einsum("thmr,hirs,thms->thmi", sr_w, cores, sc_w)
    return win_row * n_side + win_col, core_scores


def weighted_gather_pool_bag(rows, blocks, scores, values, E: int) -> torch.Tensor:
    """reference.weighted_gather_pool as one F.embedding_bag (same arguments and result):
    [T, M], [T, M], [T, M, h], [N, Dv] -> [T, E, Dv]. fp32/fp64 tables (embedding_bag accumulates
    in the table's dtype); other dtypes fall back to the reference."""
    if values.dtype not in (torch.float32, torch.float64):
        return reference.weighted_gather_pool(rows, blocks, scores, values, E)
    T, M = rows.shape
    h = scores.shape[-1]
    N, Dv = values.shape
    c = Dv // h
    with torch.no_grad():
        order = torch.sort(blocks, dim=1, stable=True).indices  # [T, M]
        counts = torch.zeros(T, E, dtype=torch.int64, device=rows.device)
        counts.scatter_add_(1, blocks, torch.ones_like(blocks))  # [T, E] winners per block
        core = torch.arange(h, device=rows.device)
        idx = torch.gather(rows, 1, order)[:, None, :] * h + core[None, :, None]  # [T, h, M]
        sizes = counts[:, None, :].expand(T, h, E).reshape(-1)  # bags ordered (t, i, p)
        offsets = torch.cumsum(sizes, 0) - sizes
    weights = torch.gather(scores, 1, order[..., None].expand(T, M, h)).transpose(1, 2)  # [T, h, M]
    pooled = F.embedding_bag(
        idx.reshape(-1),
        values.view(N * h, c),
        offsets,
        mode="sum",
        per_sample_weights=weights.reshape(-1).to(values.dtype),
    )  # [T*h*E, Dv/h]
    return pooled.view(T, h, E, c).transpose(1, 2).reshape(T, E, Dv)


def fast_retrieve(mem, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """UltraMemLayer.retrieve with tucker_topm_nograd: x [T, D] -> [T, H*m], [T, H*m, h]."""
    T = x.shape[0]
    s_row, s_col = mem.row_col_scores(x)  # [T, H, n', r] each
    virtual, scores = tucker_topm_nograd(s_row, s_col, mem.cores, mem.tucker_u, mem.tucker_v, mem.m)
    if mem.config.ultramem_score_activation == "softmax":
        scores = torch.softmax(scores, dim=2)
    return virtual.reshape(T, mem.H * mem.m), scores.reshape(T, mem.H * mem.m, mem.h)


def fast_memory(mem, hidden: torch.Tensor) -> torch.Tensor:
    """UltraMemLayer.forward (TP = EP = 1, reference math) on [s, b, D] -> [s, b, D]."""
    s, b, D = hidden.shape
    virtual, scores = fast_retrieve(mem, hidden.reshape(s * b, D))
    rows, blocks = reference.virtual_to_physical(virtual, mem.permutation, mem.N)
    pooled = weighted_gather_pool_bag(rows, blocks, scores, mem.values, mem.E)  # [T, E, Dv]
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
    from .decode import _Flusher, _median_ms, build_slots, time_interleaved

    lines = []
    chk = check_equal(build_slots(settings.train_size)["ultramem"][0])
    log(f"  fast path vs layer: {chk}", flush=True)

    def train_times(size, repeats):
        slots = build_slots(size)
        slot, moe = slots["ultramem"][0].train(), slots["moe"][0].train()
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

        t = time_interleaved(
            {
                "ultramem (layer)": step(lambda h: slot(h), slot),
                "ultramem (fast path)": step(lambda h: fast_slot(slot, h), slot),
                "moe": step(lambda h: moe(h), moe),
            },
            repeats,
            2,
        )
        return {k: _median_ms(v) for k, v in t.items()}

    train_q = train_times(settings.train_size, 3 * settings.train_repeats)
    train_d = train_times(settings.size, settings.train_repeats)
    log(f"  fast path train: {train_q} / {train_d}", flush=True)
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
    lines += [
        "## Prototype: faster CPU reference path (experiments/fastpath.py)",
        "",
        "The layer with the two proposed reference.py changes (fastpath.py's docstring; the diff "
        "is below): (1) TDQKR selection under no_grad, winners' scores gathered with autograd; "
        "(2) pooling with one `F.embedding_bag(per_sample_weights=...)` over the table viewed as "
        "[N*h, Dv/h] instead of gather -> multiply -> scatter_add_.",
        "",
        f"Check against the layer (512 tokens, train mode, quality-sweep size): selected indices "
        f"agree {100 * chk['selection_agreement']:.2f}%, output relative error "
        f"{chk['out_rel_err']:.1e}, worst gradient relative error {chk['max_grad_rel_err']:.1e}.",
        "",
        f"Training step of the slot (fwd+bwd, {settings.train_tokens} tokens, interleaved; median of "
        f"{3 * settings.train_repeats} at the quality-sweep size, {settings.train_repeats} at the "
        "decode size):",
        "",
        "| slot | quality size ms | vs MoE | decode size ms | vs MoE |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {train_q[k]:.1f} | {train_q[k] / train_q['moe']:.2f}x | {train_d[k]:.1f} "
            f"| {train_d[k] / train_d['moe']:.2f}x |"
            for k in train_q
        ],
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
    return {"check": chk, "train_ms": {"quality": train_q, "decode": train_d}, "decode_ms": dec,
            "lines": lines}  # fmt: skip
