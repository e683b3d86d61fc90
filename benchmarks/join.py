"""How long does a newcomer take to contribute? From `swarm-peer` start to its first averaged outer step, by model size.

    python benchmarks/join.py [--sizes embedded,5m,25m] [--peers 2] [--inner-steps 10]

For each size: a bootstrap node and `--peers` `swarm-peer` processes train on 127.0.0.1 (same model, built from a
transformers Llama config with the byte tokenizer); once they have done two outer steps, a newcomer starts and we
time, from its process start:
- `up`: its node is up and it has taken over the run's state (its "caught up with the run" log line);
- `first`: the end of its first outer step in a group of two or more, i.e. its first contribution;
and check that its θ hash then equals the others'. The newcomer's start includes importing torch and transformers,
building the model and joining the DHT, which is the same for every size; the state transfer grows with the size.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import tempfile
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.launch import read_metrics, start_bootstrap, start_peer, stop  # noqa: E402
from peers.model import embedded_config, load_model  # noqa: E402

# hidden, intermediate, layers: Llama blocks with the byte vocabulary (257) and tied embeddings.
SIZES = {"embedded": None, "5m": (256, 688, 6), "25m": (512, 1376, 8), "100m": (768, 2048, 14)}
FAST = ["--batch-size", "2", "--seq-len", "32", "--matchmaking-timeout", "60", "--allreduce-timeout", "120"]


def model_spec(workdir: str, size: str) -> str:
    if SIZES[size] is None:
        return "embedded"
    hidden, intermediate, layers = SIZES[size]
    config = embedded_config().to_dict()
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=8)
    config.update(num_key_value_heads=8)
    path = os.path.join(workdir, f"{size}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def log_time(path: str, pattern: str) -> float | None:
    """Wall-clock time of the first log line matching `pattern` (the logging timestamp, milliseconds)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if re.search(pattern, line):
                found = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
                if found:
                    stamp = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")
                    return stamp.timestamp() + int(found.group(2)) / 1000
    return None


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def measure(workdir: str, size: str, peers: int, inner_steps: int) -> dict:
    rundir = os.path.join(workdir, size)
    os.makedirs(rundir, exist_ok=True)
    spec = model_spec(rundir, size)
    common = ["--run-id", f"join-{size}", "--model", spec, "--inner-steps", str(inner_steps), *FAST]
    boot = start_bootstrap(rundir)
    procs = []
    try:
        for i in range(peers):
            metrics = os.path.join(rundir, f"peer{i}.jsonl")
            procs.append(start_peer(rundir, f"peer{i}", boot.maddrs, *common, "--metrics-file", metrics))
        first = os.path.join(rundir, "peer0.jsonl")
        wait_for(lambda: len(read_metrics(first)) >= 2, 900, "two outer steps of the first peers")
        newcomer_metrics = os.path.join(rundir, "newcomer.jsonl")
        started = time.time()
        procs.append(start_peer(rundir, "newcomer", boot.maddrs, *common, "--metrics-file", newcomer_metrics))

        def contributed():
            return [r for r in read_metrics(newcomer_metrics) if r["group_size"] >= 2]

        wait_for(contributed, 900, "the newcomer's first averaged outer step")
        record = contributed()[0]

        def theirs():
            return {r["outer_step"]: r["params_sha256"] for r in read_metrics(first)}.get(record["outer_step"])

        wait_for(lambda: theirs() is not None, 120, "the first peer's record of the same step")
        up = log_time(os.path.join(rundir, "newcomer.log"), "caught up with the run")
        numel = sum(p.numel() for p in load_model(spec).model.parameters())
        return {
            "size": size,
            "params": numel,
            "up": None if up is None else up - started,
            "first": record["time"] - started,
            "same_hash": theirs() == record["params_sha256"],
            "outer_step_seconds": record["compute_seconds"] + record["comm_seconds"],
        }
    finally:
        for p in procs:
            stop(p)
        stop(boot.process)


@click.command()
@click.option("--sizes", default="embedded,5m,25m", help=f"Comma-separated, from {', '.join(SIZES)}.")
@click.option("--peers", default=2, type=click.IntRange(min=1), help="Peers already training when the newcomer starts.")
@click.option("--inner-steps", default=10, type=click.IntRange(min=1))
@click.option("--workdir", default=None, help="Keep logs and metrics here (default: a temporary directory).")
def main(sizes: str, peers: int, inner_steps: int, workdir: str | None) -> None:
    chosen = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SIZES]
    if unknown:
        raise click.BadParameter(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}", param_hint="--sizes")
    print(f"{peers} peers training, then a newcomer; times from the newcomer's process start")
    print(f"{'model':>9} {'params':>12} {'state MB':>9} {'up (s)':>8} {'first step (s)':>15} {'same θ':>7}")
    with tempfile.TemporaryDirectory(prefix="swarm-join-") as scratch:
        workdir = workdir or scratch
        for size in chosen:
            r = measure(workdir, size, peers, inner_steps)
            up = "-" if r["up"] is None else f"{r['up']:.1f}"
            state_mb = r["params"] * 8 / 1e6  # θ and outer momentum, fp32
            print(
                f"{size:>9} {r['params']:>12,} {state_mb:>9.1f} {up:>8} {r['first']:>15.1f} {str(r['same_hash']):>7}",
                flush=True,
            )


if __name__ == "__main__":
    main()
