"""Multi-rank checks of the TP x EP partitioning, run under torchrun (gloo, CPU).

    torchrun --nproc_per_node 2 tests/distributed/worker.py layouts2
    torchrun --nproc_per_node 4 tests/distributed/worker.py layouts4
    torchrun --nproc_per_node 4 tests/distributed/worker.py checkpoint
    torchrun --nproc_per_node 2 tests/distributed/worker.py train2
    torchrun --nproc_per_node 4 tests/distributed/worker.py hybrid
    torchrun --nproc_per_node 2 tests/distributed/worker.py pipeline
    torchrun --nproc_per_node 2 tests/distributed/worker.py optimizer
    torchrun --nproc_per_node 2 tests/distributed/worker.py gradnorm
    torchrun --nproc_per_node 2 tests/distributed/worker.py tpsync

Each scenario builds the single-rank layer (TP=1, EP=1) on the global batch first and compares every
rank's slice of the parallel run against it. Layout checks run in float64 so that no top-m tie flips
between layouts; their tolerance (1e-10 relative) only absorbs the different summation order of the
reductions. Exits non-zero with the first mismatch.
"""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_ultramem import cpu_compat  # noqa: E402
from megatron_ultramem.layer import UltraMemLayer  # noqa: E402

from helpers import small_config  # noqa: E402

RTOL, ATOL = 1e-10, 1e-12


def log(*a):
    if torch.distributed.get_rank() == 0:
        print(*a, flush=True)


def setup(tp=1, ep=1):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)


def layer_config(tp=1, ep=1, sp=False, **kw):
    kw.setdefault("ultramem_value_dim", 12)  # divisible by t*e up to 4, h=2
    return small_config(
        torch.float64, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        sequence_parallel=sp, **kw,
    )


def inputs(s=6, b=4, D=24):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(s, b, D, generator=g, dtype=torch.float64)
    weight = torch.randn(s, b, D, generator=g, dtype=torch.float64)  # loss = sum(out * weight)
    return x, weight


def run(layer, x, weight):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


class CommCounter:
    """Counts the bytes of every collective buffer (the gathered / unreduced side) while active."""

    def __init__(self):
        import torch.distributed as dist
        from megatron.core.tensor_parallel import mappings

        self.targets = [
            (dist, "all_reduce", lambda t, *a, **k: t),
            (dist, "all_gather_into_tensor", lambda out, inp, *a, **k: out),
            (dist, "reduce_scatter_tensor", lambda out, inp, *a, **k: inp),
            (mappings, "dist_all_gather_func", lambda out, inp, *a, **k: out),
            (mappings, "dist_reduce_scatter_func", lambda out, inp, *a, **k: inp),
        ]
        self.bytes = 0

    def __enter__(self):
        self.saved = []
        for owner, name, pick in self.targets:
            orig = getattr(owner, name)
            self.saved.append((owner, name, orig))

            def wrapped(*a, _orig=orig, _pick=pick, **k):
                t = _pick(*a, **k)
                self.bytes += t.numel() * t.element_size()
                return _orig(*a, **k)

            setattr(owner, name, wrapped)
        return self

    def __exit__(self, *exc):
        for owner, name, orig in self.saved:
            setattr(owner, name, orig)


def expected_comm_bytes(tp, ep, sp, T, D, M, h, b=8):
    """Bytes of collective buffers for one forward + backward on T local tokens (parallel.py)."""
    total = 0
    if tp > 1:
        total += M * h * b * T  # backward all-reduce of score grads (before the EP dispatch)
        total += 2 * D * b * T if sp else D * b * T  # SP: reduce-scatter + all-gather; else all-reduce
        total += D * b * T if sp else 0  # SP: all-gather of the input
    if ep > 1:
        total += ep * T * M * 8  # all-gather of indices
        total += 2 * ep * T * M * h * b  # scores: all-gather, backward reduce-scatter
        total += 2 * ep * T * D * b  # outputs: reduce-scatter, backward all-gather
    return total


def close(name, got, want):
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        err = (got - want).abs().max().item()
        raise AssertionError(f"rank {torch.distributed.get_rank()}: {name} differs (max abs err {err:.3e})")


def check_layout(tp, ep, sp=False):
    """Forward output, input grad and every parameter grad of one layout vs the single-rank layer."""
    name = f"TP={tp} EP={ep}{' SP' if sp else ''}"
    x, weight = inputs()
    setup(1, 1)
    ref = UltraMemLayer(layer_config(), layer_index=3)
    ref.eval()
    ref_out, ref_dx, ref_grads = run(ref, x, weight)

    setup(tp, ep)
    layer = UltraMemLayer(layer_config(tp, ep, sp), layer_index=3)
    layer.eval()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    # data parallel ranks (EP ranks among them) take different micro-batch columns
    b_sl = slice(dp_rank * x.shape[1] // dp_size, (dp_rank + 1) * x.shape[1] // dp_size)
    xs, ws, out_ref, dx_ref = x[:, b_sl], weight[:, b_sl], ref_out[:, b_sl], ref_dx[:, b_sl]
    if sp:  # sequence parallel: TP ranks take different sequence chunks
        s_sl = slice(tp_rank * x.shape[0] // tp, (tp_rank + 1) * x.shape[0] // tp)
        xs, ws, out_ref, dx_ref = xs[s_sl], ws[s_sl], out_ref[s_sl], dx_ref[s_sl]
    with CommCounter() as comm:
        out, dx, grads = run(layer, xs, ws)
    T = xs.shape[0] * xs.shape[1] * (tp if sp else 1)  # tokens whose memory output this rank owns
    want_bytes = expected_comm_bytes(tp, ep, sp, T, 24, layer.H * layer.m, layer.h)
    if comm.bytes != want_bytes:
        raise AssertionError(f"{name}: {comm.bytes} bytes of collectives, formula says {want_bytes}")
    close(f"{name} output", out, out_ref)
    close(f"{name} input grad", dx, dx_ref)

    c0, c1 = layer.col_lo, layer.col_hi
    E = layer.E
    for pname, g in grads.items():
        want = ref_grads[pname]
        if pname == "values":
            want = want[:, c0:c1]
        elif pname == "linear_out.weight":
            want = want[:, c0 * E : c1 * E]
        else:
            # replicated params: each data-parallel rank holds the gradient of its own tokens;
            # DDP's all-reduce over the DP group sums them.
            g = g.clone()
            torch.distributed.all_reduce(g, group=ps.get_data_parallel_group())
        if pname in ("values", "linear_out.weight") and dp_size > 1 and ep == 1:
            g = g.clone()
            torch.distributed.all_reduce(g, group=ps.get_data_parallel_group())
        close(f"{name} grad {pname}", g, want)
    # the shard is a slice of the same global tensors
    close(f"{name} values init", layer.values.detach(), ref.values.detach()[:, c0:c1])
    log(
        f"ok {name}: output, input grad and {len(grads)} parameter grads match the single-rank layer; "
        f"collectives {comm.bytes / T:.0f} B/token (fp64, D=24, H*m={layer.H * layer.m}, h={layer.h})"
    )


def scenario_layouts2():
    check_layout(2, 1)
    check_layout(1, 2)
    check_layout(2, 1, sp=True)


def scenario_layouts4():
    check_layout(2, 2)
    check_layout(2, 2, sp=True)
    check_layout(1, 4)


def scenario_checkpoint():
    """Save at one (TP, EP) layout, load at another: identical outputs."""
    from megatron.core import dist_checkpointing

    x, _ = inputs()
    root = tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None
    holder = [root]
    torch.distributed.broadcast_object_list(holder, src=0)
    root = holder[0]
    for src, dst in (((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (1, 2))):
        path = os.path.join(root, f"{src}_{dst}")
        if torch.distributed.get_rank() == 0:
            os.makedirs(path)
        torch.distributed.barrier()
        setup(*src)
        saved = UltraMemLayer(layer_config(*src, ultramem_seed=11), layer_index=0)
        with torch.no_grad():  # train-like drift so the checkpoint is not just the seeded init
            saved.values.add_(0.1)
            saved.cores.mul_(1.5)
            saved.refresh_tucker_vectors()
        dist_checkpointing.save(saved.sharded_state_dict(prefix="mem."), path)
        torch.distributed.barrier()
        setup(1, 1)
        want = UltraMemLayer(layer_config(ultramem_seed=11), layer_index=0)
        with torch.no_grad():
            want.values.add_(0.1)
            want.cores.mul_(1.5)
            want.refresh_tucker_vectors()
        want.eval()
        want_out = want(x)[0]

        setup(*dst)
        loaded = UltraMemLayer(layer_config(*dst, ultramem_seed=99), layer_index=0)  # other weights
        state = dist_checkpointing.load(loaded.sharded_state_dict(prefix="mem."), path)
        loaded.load_state_dict({k[len("mem."):]: v for k, v in state.items()})
        loaded.eval()
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        b_sl = slice(dp_rank * x.shape[1] // dp_size, (dp_rank + 1) * x.shape[1] // dp_size)
        out = loaded(x[:, b_sl])[0]
        close(f"checkpoint {src}->{dst} output", out, want_out[:, b_sl])
        assert torch.equal(loaded.permutation, want.permutation)
        log(f"ok checkpoint saved at (TP, EP)={src} loads at {dst} with identical outputs")


def scenario_train2():
    """A GPTModel with UltraMem trains through Megatron's DDP at TP=2 and at EP=2 with the same
    losses as the single-rank model (the TP=1 weights are loaded into each layout through a
    distributed checkpoint)."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    vocab, seq, batch, steps = 40, 8, 4, 3
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(steps)]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    pos = torch.arange(seq).unsqueeze(0)

    def build(tp, ep):
        cfg = small_config(
            num_layers=2, ultramem_mode="parallel", ultramem_layers="[0,1]", ultramem_value_dim=12,
            tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        )
        spec = get_ultramem_decoder_block_spec(cfg, use_transformer_engine=False)
        torch.manual_seed(0)
        model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq)
        # float64: Adam divides by sqrt(v), which turns rounding-level gradient differences of
        # near-zero gradients into visible update differences in fp32 after a couple of steps.
        return cfg, model.double()

    def train(model, params, rows):
        opt = torch.optim.Adam(params, lr=1e-2)
        losses = []
        for tokens in data:
            t = tokens[rows]
            loss = model(t[:, :-1], pos.expand(t.shape[0], seq), mask, labels=t[:, 1:]).mean()
            yield_loss = loss.detach().clone()
            if isinstance(model, DistributedDataParallel):
                model.zero_grad_buffer()
                opt.zero_grad(set_to_none=True)  # autograd must not accumulate onto last step's copy
                loss.backward()
                model.finish_grad_sync()  # DP all-reduce / expert-DP all-reduce of main_grad
                for p in params:
                    p.grad = p.main_grad.clone()
                # mean over data-parallel ranks = the global batch's loss
                torch.distributed.all_reduce(yield_loss, group=ps.get_data_parallel_group())
                yield_loss /= ps.get_data_parallel_world_size()
            else:
                opt.zero_grad()
                loss.backward()
            opt.step()
            losses.append(yield_loss.item())
        return losses

    root = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root, src=0)
    setup(1, 1)
    _, ref = build(1, 1)
    path = os.path.join(root[0], "gpt_tp1")
    if torch.distributed.get_rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    dist_checkpointing.save(ref.sharded_state_dict(), path)
    ref_losses = train(ref, list(ref.parameters()), slice(None))
    for tp, ep in ((2, 1), (1, 2)):
        setup(tp, ep)
        cfg, model = build(tp, ep)
        state = dist_checkpointing.load(model.sharded_state_dict(), path)
        model.load_state_dict(state)
        ddp = DistributedDataParallel(
            cfg, DistributedDataParallelConfig(average_in_collective=True), model
        )
        values = [p for p in model.parameters() if getattr(p, "is_ultramem_value", False)]
        assert values and all(p.allreduce == (ep == 1) for p in values)
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        rows = slice(dp_rank * batch // dp_size, (dp_rank + 1) * batch // dp_size)
        losses = train(ddp, list(model.parameters()), rows)
        # Parameters and gradients are float64, but Megatron's cross entropy returns fp32 losses,
        # and with DP the global loss is a mean of per-rank fp32 means: fp32 rounding, 1e-6.
        for a, b in zip(losses, ref_losses):
            if abs(a - b) > 1e-6 * abs(b):
                raise AssertionError(f"TP={tp} EP={ep} losses {losses} vs single rank {ref_losses}")
        log(f"ok GPT + Megatron DDP at TP={tp} EP={ep}: losses {[round(l, 6) for l in losses]} == single rank")


def scenario_hybrid():
    """HybridModel (megatron-core 0.19+) with attention + memory layers: logits and the memories'
    gradients at TP=2 and TP=2 x EP=2 equal the single-rank model's (fp64, the single-rank weights
    loaded through a distributed checkpoint), and a checkpoint saved at TP=2 x EP=2 loads at
    TP=1 x EP=2 with identical logits. On older releases: the spec refuses with a clear error."""
    from megatron.core import dist_checkpointing

    from megatron_ultramem import compat
    from megatron_ultramem.hybrid import get_ultramem_hybrid_stack_spec

    if compat._minor(compat.megatron_core_version()) < (0, 19):
        try:
            get_ultramem_hybrid_stack_spec(False)
        except ImportError as err:
            assert "megatron-core >= 0.19" in str(err), err
            log(f"ok HybridModel refused on megatron-core {compat.megatron_core_version()}: {err}")
            return
        raise AssertionError("the hybrid spec built on a release without HybridModel")
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    vocab, seq, batch = 40, 6, 4
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    weight = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    cases = {  # mode -> (pattern, ultramem_layers): memories on layers 1 and 3
        "replace": ("*E*E", 1),
        "parallel": ("*-*-", "[0,1,0,1]"),
    }
    root = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root, src=0)

    def build(mode, tp, ep, seed=0):
        pattern, layers = cases[mode]
        cfg = small_config(
            torch.float64, num_layers=4, ultramem_mode=mode, ultramem_layers=layers,
            ultramem_value_dim=12, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = HybridModel(
            config=cfg, hybrid_stack_spec=get_ultramem_hybrid_stack_spec(False), vocab_size=vocab,
            max_sequence_length=seq, hybrid_layer_pattern=pattern, parallel_output=False,
            position_embedding_type="rope",
        ).double()  # fp64 everywhere (Megatron's norms and embeddings are built in fp32)
        memories = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
        assert [m.layer_index for m in memories] == [1, 3], [m.layer_index for m in memories]
        return model.eval(), memories

    def rows():
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        return slice(dp_rank * batch // dp_size, (dp_rank + 1) * batch // dp_size)

    def forward_backward(model, memories, sl):
        logits = model(tokens[sl], pos[sl], mask)  # [b, s, vocab], gathered over TP
        (logits * weight[sl]).sum().backward()
        return logits.detach(), [m.values.grad.clone() for m in memories]

    def save(model, name):
        path = os.path.join(root[0], name)
        if torch.distributed.get_rank() == 0:
            os.makedirs(path)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), path)
        torch.distributed.barrier()
        return path

    def load(model, path):
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))

    for mode in cases:
        setup(1, 1)
        ref, ref_mem = build(mode, 1, 1)
        ref_logits, ref_grads = forward_backward(ref, ref_mem, slice(None))
        path = save(ref, f"{mode}_tp1")
        for tp, ep in ((2, 1), (2, 2)):
            setup(tp, ep)
            model, memories = build(mode, tp, ep, seed=1)  # other weights until loaded
            load(model, path)
            sl = rows()
            logits, grads = forward_backward(model, memories, sl)
            close(f"hybrid {mode} TP={tp} EP={ep} logits", logits, ref_logits[sl])
            for m, gr, want in zip(memories, grads, ref_grads):
                want = want[:, m.col_lo : m.col_hi]
                if ep == 1 and ps.get_data_parallel_world_size() > 1:  # DDP would sum over DP
                    gr = gr.clone()
                    torch.distributed.all_reduce(gr, group=ps.get_data_parallel_group())
                close(f"hybrid {mode} TP={tp} EP={ep} value grad", gr, want)
            log(f"ok HybridModel {mode} ({cases[mode][0]}) at TP={tp} EP={ep}: logits and value "
                "grads == single rank")  # fmt: skip
        # checkpoint saved at TP=2 x EP=2 (weights moved off the init) -> TP=1 x EP=2
        setup(2, 2)
        model, _ = build(mode, 2, 2, seed=2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
        sl = rows()
        want = model(tokens, pos, mask).detach()  # the whole batch on every rank
        path = save(model, f"{mode}_tp2ep2")
        setup(1, 2)
        other, _ = build(mode, 1, 2, seed=3)
        load(other, path)
        close(f"hybrid {mode} checkpoint (2,2)->(1,2) logits", other(tokens, pos, mask).detach(), want)
        log(f"ok HybridModel {mode} checkpoint saved at (TP, EP)=(2, 2) loads at (1, 2), identical logits")


def scenario_pipeline():
    """Replace, parallel and skip-unit models at PP=2 (and PP=2 x virtual PP=2) through Megatron's
    pipeline schedules: per-micro-batch losses and every parameter's gradient equal the PP=1
    model's (fp64; the PP=1 weights loaded through a distributed checkpoint)."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    vocab, seq, mbs, n_micro = 40, 6, 2, 4
    g = torch.Generator().manual_seed(9)
    data = [torch.randint(0, vocab, (mbs, seq + 1), generator=g) for _ in range(n_micro)]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    pos = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
    cases = {
        "replace": dict(ultramem_mode="replace", ultramem_layers="[0,1,0,1]"),
        "parallel": dict(ultramem_mode="parallel", ultramem_layers="[1,0,0,1]"),
        "skip": dict(ultramem_mode="skip", ultramem_skip_units="0:1,2:3"),  # inside each stage
    }
    # with virtual stages every block is its own stage chunk: units i:i (beside block i's MLP)
    skip_vpp = dict(ultramem_skip_units="0:0,3:3")
    root = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root, src=0)

    def config(case, pp, vpp=None, layout_vpp=None):
        # batch_p2p_comm=False: with PP=2 the previous and next stage are the same peer, and the
        # interleaved schedule posts an activation and a gradient to it at once; gloo matches
        # batched sends by order only (NCCL by group), so unbatched ordered ops are used here.
        return small_config(
            torch.float64, num_layers=4, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, pipeline_dtype=torch.float64,
            batch_p2p_comm=False,
            **{**cases[case], **(skip_vpp if case == "skip" and (vpp or layout_vpp) else {})},
        )  # fmt: skip

    def chunk(cfg, vp_stage, pre, post):
        spec = get_ultramem_decoder_block_spec(cfg, use_transformer_engine=False, vp_stage=vp_stage)
        torch.manual_seed(0)  # the same reference weights on every rank
        return GPTModel(
            config=cfg, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq,
            pre_process=pre, post_process=post, share_embeddings_and_output_weights=False,
            vp_stage=vp_stage,
        ).double()  # fmt: skip

    def run(chunks):
        def forward_step(data_iterator, model):
            t = next(data_iterator)
            out = model(t[:, :-1], pos, mask, labels=t[:, 1:])

            def loss_func(output):
                loss = output.double().mean()
                return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

            return out, loss_func

        for c in chunks:
            c.zero_grad(set_to_none=True)
        iters = [iter(data) for _ in chunks]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks, num_microbatches=n_micro, seq_length=seq, micro_batch_size=mbs,
            forward_only=False,
        )  # fmt: skip
        return [float(l["loss"]) for l in losses]

    def global_grads(chunks):
        """{checkpoint key: gradient} of this rank's parameters (keys are layout-independent)."""
        out = {}
        for c in chunks:
            params = {id(p): p for p in c.parameters()}
            for key, sh in c.sharded_state_dict().items():
                data = getattr(sh, "data", None)
                if isinstance(data, torch.Tensor):
                    for p in params.values():
                        if p.data_ptr() == data.data_ptr() and p.grad is not None and p.shape == data.shape:
                            out[sh.key] = p.grad.detach().clone()
        return out

    for case in cases:
        for pp, vpp in ((2, None), (2, 2)):
            setup(1, 1)
            ref = chunk(config(case, 1, layout_vpp=vpp), None, True, True)  # the same units
            ref_losses = run([ref])
            ref_grads = global_grads([ref])
            path = os.path.join(root[0], f"{case}_{vpp}")
            if torch.distributed.get_rank() == 0:
                os.makedirs(path)
            torch.distributed.barrier()
            dist_checkpointing.save(ref.sharded_state_dict(), path)
            torch.distributed.barrier()

            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(1, pp, virtual_pipeline_model_parallel_size=vpp)
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(1234)
            cfg = config(case, pp, vpp)
            rank = ps.get_pipeline_model_parallel_rank()
            n_chunks = vpp or 1
            chunks = []
            for vp in range(n_chunks):
                vp_stage = vp if vpp else None
                pre = rank == 0 and vp == 0
                post = rank == pp - 1 and vp == n_chunks - 1
                chunks.append(chunk(cfg, vp_stage, pre, post))
            for c in chunks:
                c.load_state_dict(dist_checkpointing.load(c.sharded_state_dict(), path))
            losses = run(chunks)
            grads = global_grads(chunks)
            assert grads, "no gradients on this stage"
            for key, gr in grads.items():
                close(f"{case} PP={pp} VPP={vpp} grad {key}", gr, ref_grads[key])
            if ps.is_pipeline_last_stage(ignore_virtual=True):
                for a, b in zip(losses, ref_losses):
                    if abs(a - b) > 1e-12 * abs(b):
                        raise AssertionError(f"{case} PP={pp} VPP={vpp}: losses {losses} vs {ref_losses}")
            log(f"ok {case} at PP={pp}{f' x VPP={vpp}' if vpp else ''}: micro-batch losses and "
                f"{len(grads)} parameter gradients on this stage == PP=1")  # fmt: skip


def scenario_optimizer():
    """Megatron's DistributedOptimizer with the value table's own param group (LR multiplier) gives
    the parameters of plain Megatron DDP + Adam after a few steps, with data parallelism alone and
    with EP=2 (the values then sit in the expert-parallel optimizer). fp32 parameters and Megatron's
    fp32 main grads (grad_reduce_in_fp32): both optimizers do the same arithmetic on the same
    gradients, up to the order of the DP reduction (reduce-scatter vs all-reduce), i.e. fp32
    rounding of one addition per step, 1e-6 after Adam's normalisation."""
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )  # fmt: skip
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ultramem.optim import UltraMemParamScheduler, add_value_config_overrides, is_value_group
    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    vocab, seq, mbs, steps = 40, 8, 2, 3
    g = torch.Generator().manual_seed(4)
    data = [torch.randint(0, vocab, (2 * mbs, seq + 1), generator=g) for _ in range(steps)]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    pos = torch.arange(seq).unsqueeze(0).expand(mbs, seq)

    def train(ep, distributed):
        setup(1, ep)
        cfg = small_config(
            num_layers=2, ultramem_mode="parallel", ultramem_layers="[0,1]", ultramem_value_dim=12,
            expert_model_parallel_size=ep,
        )  # fmt: skip
        torch.manual_seed(0)
        model = GPTModel(config=cfg, transformer_layer_spec=get_ultramem_decoder_block_spec(cfg, False),
                         vocab_size=vocab, max_sequence_length=seq)  # fmt: skip
        ddp = DistributedDataParallel(
            cfg, DistributedDataParallelConfig(
                use_distributed_optimizer=distributed, grad_reduce_in_fp32=True,
                average_in_collective=True,
            ), model,
        )  # fmt: skip
        oc = OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.1,
                             use_distributed_optimizer=distributed, clip_grad=0.0)  # fmt: skip
        opt = get_megatron_optimizer(oc, [ddp], config_overrides=add_value_config_overrides(None, oc, 4.0))
        sched = UltraMemParamScheduler(
            opt, init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=0, lr_decay_steps=10,
            lr_decay_style="linear", start_wd=0.1, end_wd=0.1, wd_incr_steps=10,
            wd_incr_style="constant", value_lr_mult=4.0,
        )  # fmt: skip
        value_groups = [gr for gr in opt.param_groups if is_value_group(gr)]
        assert value_groups, "no value-table param group"
        other = [gr for gr in opt.param_groups if not is_value_group(gr)]
        assert abs(value_groups[0]["lr"] - 4.0 * other[0]["lr"]) < 1e-12, (value_groups[0]["lr"], other[0]["lr"])
        cfg.finalize_model_grads_func = finalize_model_grads
        rank = ps.get_data_parallel_rank()

        def forward_step(data_iterator, m):
            t = next(data_iterator)
            out = m(t[:, :-1], pos, mask, labels=t[:, 1:])
            return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

        for tokens in data:
            ddp.zero_grad_buffer()
            opt.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([tokens[rank * mbs : (rank + 1) * mbs]]), model=[ddp],
                num_microbatches=1, seq_length=seq, micro_batch_size=mbs, forward_only=False,
            )  # fmt: skip
            ok, _, _ = opt.step()
            assert ok
            sched.step(1)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    for ep in (1, 2):
        plain = train(ep, False)
        dist = train(ep, True)
        for name, p in plain.items():
            if not torch.allclose(dist[name], p, rtol=1e-5, atol=1e-6):
                err = (dist[name] - p).abs().max().item()
                raise AssertionError(f"EP={ep}: {name} differs after {steps} steps ({err:.2e})")
        log(f"ok DistributedOptimizer == Megatron DDP + Adam after {steps} steps at DP=2, EP={ep} "
            f"({len(plain)} parameters, value table in its own param group at 4x LR)")  # fmt: skip


def scenario_gradnorm():
    """The global gradient norm Megatron's optimizer computes (and clips with) at TP=2 equals the
    single-rank model's: the TP-sharded value table and output projection count on every TP rank,
    the replicated retrieval parameters once (Megatron skips TP duplicates). A table shard not
    tagged tensor_model_parallel would be counted on TP rank 0 only: a smaller norm."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    vocab, seq, batch = 40, 8, 2
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    root = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root, src=0)

    def grad_norm(tp, load=None, save=None):
        setup(tp, 1)
        cfg = small_config(num_layers=2, ultramem_mode="parallel", ultramem_layers="[0,1]",
                           ultramem_value_dim=12, tensor_model_parallel_size=tp)  # fmt: skip
        torch.manual_seed(0)
        model = GPTModel(config=cfg, transformer_layer_spec=get_ultramem_decoder_block_spec(cfg, False),
                         vocab_size=vocab, max_sequence_length=seq)  # fmt: skip
        if load is not None:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), load))
        if save is not None:  # the weights before any update
            if torch.distributed.get_rank() == 0:
                os.makedirs(save)
            torch.distributed.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), save)
            torch.distributed.barrier()
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e9), [ddp])
        ddp.zero_grad_buffer()
        loss = ddp(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        _, norm, _ = opt.step()
        return float(norm)

    path = os.path.join(root[0], "tp1")
    ref_norm = grad_norm(1, save=path)
    # the TP=1 run has DP=2 over identical data: its norm is the single-model norm
    tp2_norm = grad_norm(2, load=path)
    # fp32 gradients summed in another order over TP: relative 1e-5
    if abs(tp2_norm - ref_norm) > 1e-5 * ref_norm:
        raise AssertionError(f"grad norm at TP=2 {tp2_norm} != TP=1 {ref_norm}")
    log(f"ok global grad norm at TP=2 ({tp2_norm:.6f}) == TP=1 ({ref_norm:.6f})")


def scenario_tpsync():
    """The replicated retrieval parameters stay bitwise identical on the TP ranks when the ranks'
    own gradients differ in the last bits (injected on TP rank 1, as GPU atomics would), through
    Megatron's DDP, schedule, finalize_model_grads and optimizer. Control: without the tag that
    has Megatron average those gradients over TP, the same injection makes the copies differ."""
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )  # fmt: skip
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    vocab, seq, mbs = 40, 8, 2
    g = torch.Generator().manual_seed(8)
    data = [torch.randint(0, vocab, (mbs, seq + 1), generator=g) for _ in range(3)]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    pos = torch.arange(seq).unsqueeze(0).expand(mbs, seq)

    def run(tagged):
        setup(2, 1)
        cfg = small_config(num_layers=2, ultramem_mode="parallel", ultramem_layers="[0,1]",
                           ultramem_value_dim=12, tensor_model_parallel_size=2)  # fmt: skip
        torch.manual_seed(0)
        model = GPTModel(config=cfg, transformer_layer_spec=get_ultramem_decoder_block_spec(cfg, False),
                         vocab_size=vocab, max_sequence_length=seq)  # fmt: skip
        layers = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
        replicated = [p for m in layers for p in m.replicated_parameters()]
        assert all(getattr(p, "average_gradients_across_tp_domain", False) for p in replicated)
        if not tagged:
            for p in replicated:
                del p.average_gradients_across_tp_domain
        if ps.get_tensor_model_parallel_rank() == 1:  # last-bit noise in this rank's gradients
            noise = torch.Generator().manual_seed(99)
            for p in replicated:
                p.register_hook(lambda grad, n=noise: grad * (1 + 1e-6 * torch.randn(grad.shape, generator=n)))
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2), [ddp])
        cfg.finalize_model_grads_func = finalize_model_grads

        def forward_step(data_iterator, m):
            t = next(data_iterator)
            out = m(t[:, :-1], pos, mask, labels=t[:, 1:])
            return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

        for tokens in data:
            ddp.zero_grad_buffer()
            opt.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([tokens]), model=[ddp],
                num_microbatches=1, seq_length=seq, micro_batch_size=mbs, forward_only=False,
            )  # fmt: skip
            opt.step()
            for m in layers:
                m.refresh_tucker_vectors()
        flat = torch.cat([p.detach().reshape(-1) for p in replicated])
        both = [torch.empty_like(flat) for _ in range(2)]
        torch.distributed.all_gather(both, flat, group=ps.get_tensor_model_parallel_group())
        return torch.equal(both[0], both[1]), flat.numel()

    same, n = run(tagged=True)
    if not same:
        raise AssertionError("replicated retrieval parameters differ across TP ranks")
    control, _ = run(tagged=False)
    if control:
        raise AssertionError("control: the injected noise left the copies equal (test is blind)")
    log(f"ok {n} replicated retrieval parameters bitwise equal on both TP ranks after 3 steps with "
        "rank-local gradient noise (and differ without the TP gradient averaging)")  # fmt: skip


def main():
    cpu_compat.enable()
    torch.distributed.init_process_group("gloo")
    scenario = sys.argv[1]
    globals()[f"scenario_{scenario}"]()
    torch.distributed.barrier()
    log(f"PASSED {scenario}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
