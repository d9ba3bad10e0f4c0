"""Input-pipeline benchmark: Megatron's GPTDataset read by the torch DataLoader backend vs the
NVIDIA DALI backend (megatron_ultramem.data_pipeline), on the main job's embedded corpus.

    python benchmarks/bench_data.py                 # full run (~5 min on 2 CPU cores)
    python benchmarks/bench_data.py --smoke         # < 30 s, a few configs
    python benchmarks/bench_data.py --out benchmarks/results/data_pipeline_cpu.md

Per backend and worker count it reports, in steady state (after the first batch):
  samples/s   micro-batches * micro_batch_size / wall time of the loop
  wait ms     mean time the consumer blocks in next() per micro-batch (0 = data always ready)
  first ms    building the iterator + the first batch (worker start-up, pipeline build)
for three consumers: "none" (pure loader throughput), "sleep" (a step that leaves the CPU idle,
like a GPU-bound step), "busy" (a step that keeps one CPU core busy in torch, like this CPU job).
Floor: "direct" is GPTDataset.__getitem__ + torch.stack in the consumer thread, the work any
backend has to do; a backend can only beat it by overlapping it with the consumer's step.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ultramem import data, data_pipeline  # noqa: E402

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _consumer(kind: str, ms: float):
    if kind == "none":
        return lambda: None
    if kind == "sleep":
        return lambda: time.sleep(ms / 1e3)
    a = torch.randn(128, 128)

    def busy():
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            a @ a
    return busy


def _direct(dataset, mbs, n, consume):
    """The floor: read and stack in the consumer thread (no loader)."""
    waits, t0 = [], time.perf_counter()
    for b in range(n):
        w = time.perf_counter()
        samples = [dataset[i] for i in range(b * mbs, (b + 1) * mbs)]
        {k: torch.stack([s[k] for s in samples]) for k in KEYS}
        waits.append(time.perf_counter() - w)
        consume()
    return n * mbs / (time.perf_counter() - t0), 1e3 * sum(waits) / n, 0.0


def _loader(backend, dataset, mbs, n, consume, workers, prefetch):
    t0 = time.perf_counter()
    it = data_pipeline.build_train_iterator(backend, dataset, mbs, 0, 0, 1, workers, prefetch,
                                            device="cpu")
    next(it)
    first = time.perf_counter() - t0
    consume()
    waits, t1 = [], time.perf_counter()
    for _ in range(n):
        w = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - w)
        consume()
    rate = n * mbs / (time.perf_counter() - t1)
    it.close()
    return rate, 1e3 * sum(waits) / n, 1e3 * first


def _median(runs):
    """Per-column median over repeated runs of (samples/s, wait ms, first ms)."""
    return tuple(sorted(col)[len(col) // 2] for col in zip(*runs))


def _versions():
    import megatron.core

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "megatron-core": getattr(megatron.core, "__version__", "?")}
    try:
        import nvidia.dali

        out["nvidia-dali"] = nvidia.dali.__version__
    except ImportError:
        out["nvidia-dali"] = "not installed"
    return out


def _machine():
    try:
        lscpu = subprocess.run("lscpu | head", shell=True, capture_output=True, text=True).stdout
    except OSError:
        lscpu = platform.processor()
    return lscpu.rstrip(), os.cpu_count()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="few batches and configs (< 30 s)")
    p.add_argument("--batches", type=int, default=200, help="steady-state micro-batches per run")
    p.add_argument("--micro-batch-size", type=int, default=16)  # the main job's defaults
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--workers", default="0,1,2", help="worker counts to try")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--consumers", default="none,sleep,busy")
    p.add_argument("--step-ms", type=float, default=20.0, help="consumer step time (sleep/busy)")
    p.add_argument("--backends", default="torch,dali")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    p.add_argument("--out", default=None, help="also write a markdown report here")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.workers, args.consumers, args.repeats = 30, "0,2", "none,sleep", 1
    backends = [b for b in args.backends.split(",") if b != "dali" or data_pipeline.HAVE_DALI]
    workers = [int(w) for w in args.workers.split(",")]

    if "dali" in backends:
        data_pipeline._import_dali()  # import cost (seconds) is not part of "first batch"
    load_before = os.getloadavg()
    torch.set_num_threads(1)  # the consumer's torch work uses one core; the loader gets the rest
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    corpus = data.make_corpus(seed=0)
    data_pipeline.write_indexed_corpus(corpus.train, os.path.join(tmp, "train"))
    need = (args.batches + 1) * args.micro_batch_size
    dataset = data_pipeline.build_gpt_dataset(os.path.join(tmp, "train"), args.seq_length, need, 0)

    rows = []
    for kind in args.consumers.split(","):
        consume = _consumer(kind, args.step_ms)
        r = _median([_direct(dataset, args.micro_batch_size, args.batches, consume)
                     for _ in range(args.repeats)])
        rows.append(("direct (floor)", "-", kind, *r))
        for backend in backends:
            for w in workers:
                r = _median([_loader(backend, dataset, args.micro_batch_size, args.batches,
                                     consume, w, args.prefetch) for _ in range(args.repeats)])
                rows.append((backend, w, kind, *r))
                print(f"{backend:6s} workers={w} consumer={kind:5s} {r[0]:9.0f} samples/s "
                      f"wait {r[1]:7.3f} ms  first {r[2]:7.1f} ms", flush=True)

    header = ("| backend | workers | consumer | samples/s | wait ms / batch | first batch ms |\n"
              "|---|---|---|---|---|---|")
    table = "\n".join([header] + [f"| {b} | {w} | {k} | {r:,.0f} | {wt:.3f} | {f:.0f} |"
                                  for b, w, k, r, wt, f in rows])
    load_after = os.getloadavg()
    print(table)
    if args.out:
        lscpu, ncpu = _machine()
        versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
        cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))
        text = (
            f"# Input pipeline on CPU: torch DataLoader vs DALI\n\n"
            f"Date: {datetime.date.today().isoformat()}\n\n"
            f"Machine (`lscpu | head`, nproc = {ncpu}, no GPU):\n\n```\n{lscpu}\n```\n\n"
            f"Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load_before)}, "
            f"after: {' / '.join(f'{x:.2f}' for x in load_after)} (the machine is shared)\n\n"
            f"Versions: {versions}\n\n"
            f"Command: `{cmd}`\n\n"
            f"Data: the main job's embedded corpus (seed 0, {corpus.train.numel():,} bytes) as a "
            f"Megatron indexed dataset; GPTDataset, seq {args.seq_length}, micro-batch "
            f"{args.micro_batch_size}, {args.batches} steady-state micro-batches per run, median "
            f"of {args.repeats} runs per row, "
            f"prefetch {args.prefetch}, consumer step {args.step_ms} ms (sleep: CPU idle; busy: "
            f"one core in torch matmuls), torch threads 1, device CPU.\n\n{table}\n"
        )
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
