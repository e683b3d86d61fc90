"""Peak memory of the outer step per worker: a peer sharded over N workers against a one-worker peer.

    python benchmarks/outer_step_memory.py [--size 25m] [--workers 1,2,4] [--outer-steps 2]

For each N: a bootstrap node and two `swarm-peer --nproc-per-node N` processes (N = 1: the unsharded peer) train
the same model on 127.0.0.1 and average every outer step (int8, direct data plane). Every worker measures, around
its outer step, how much its resident memory rose above what it held before (Linux VmHWM after a reset of the peak,
minus VmRSS before): Δ, the pseudo-gradient's flat copies, codec buffers, received and averaged parts, the outer
momentum. The metrics record `outer_step_peak_mb` per worker; we print the largest over workers, steps and both
peers, and its ratio to the one-worker peer's. The target is about 1/N: each worker handles only its own rows.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.join import SIZES, model_spec  # noqa: E402
from peers.launch import read_metrics, start_bootstrap, start_peer, stop  # noqa: E402

FAST = ["--inner-steps", "2", "--batch-size", "2", "--seq-len", "32", "--matchmaking-timeout", "120"]


def measure(workdir: str, model: str, workers: int, outer_steps: int) -> tuple[float, list, int]:
    """(largest outer-step peak in MB over workers, steps and peers; all records; group sizes seen)."""
    boot = start_bootstrap(workdir, "--run-id", f"mem{workers}")
    peers = []
    try:
        for i in range(2):
            args = ["--run-id", f"mem{workers}", "--model", model, "--nproc-per-node", str(workers)]
            args += ["--outer-steps", str(outer_steps), "--metrics-file", f"{workdir}/m{i}.jsonl", *FAST]
            peers.append(start_peer(workdir, f"p{i}", boot.maddrs, *args, threads=None))
        codes = [p.wait(900) for p in peers]
        if codes != [0, 0]:
            raise RuntimeError(f"peers exited with {codes}; see {workdir}/p0.log")
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)
    records = [r for i in range(2) for r in read_metrics(f"{workdir}/m{i}.jsonl")]
    peaks = []
    for r in records:
        value = r["outer_step_peak_mb"]
        peaks += value if isinstance(value, list) else [value]
    return max(peaks), records, min(r["group_size"] for r in records)


@click.command()
@click.option("--size", type=click.Choice(sorted(SIZES)), default="25m", help="Model size (see benchmarks/join.py).")
@click.option("--workers", default="1,2,4", help="Worker counts to compare; 1 is the unsharded baseline.")
@click.option("--outer-steps", type=int, default=2)
def main(size: str, workers: str, outer_steps: int) -> None:
    counts = [int(n) for n in workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="swarm-mem-") as root:
        model = model_spec(root, size)
        results = {}
        for n in counts:
            workdir = os.path.join(root, f"n{n}")
            os.makedirs(workdir)
            started = time.monotonic()
            peak, records, group = measure(workdir, model, n, outer_steps)
            results[n] = peak
            params = records[0].get("bytes_sent", 0)
            per_step = [(r["outer_step"], r["outer_step_peak_mb"]) for r in records]
            print(
                f"workers {n}: outer-step peak {peak:8.1f} MB per worker (group of {group},"
                f" {params / 1e6:.1f} MB sent per peer per step, {time.monotonic() - started:.0f} s);"
                f" per step and worker: {per_step}",
                flush=True,
            )
        base = results.get(1)
        print(f"\nmodel {size}: outer-step peak memory per worker")
        print("| workers | peak per worker | vs one worker | target |")
        print("|---|---|---|---|")
        for n, peak in results.items():
            ratio = f"{peak / base:.2f}x" if base else "-"
            print(f"| {n} | {peak:.1f} MB | {ratio} | {1 / n:.2f}x |")


if __name__ == "__main__":
    main()
