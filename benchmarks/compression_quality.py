"""Does 8-bit or 4-bit compression cost quality? The same seeded local-swarm run with each codec, side by side.

    python benchmarks/compression_quality.py [--peers 3] [--outer-steps 8] [--inner-steps 30]

Runs the real programs (a bootstrap node and N `swarm-peer` processes on 127.0.0.1) once per setting: `none`,
`int8`, `int8` with error feedback, and `int4`. Every run uses the same peer identities and seed, so peers see the
same data in the same order and start from the same θ: the settings differ only in what travels on the wire. Prints
the loss of the last outer steps (mean over peers and the last two steps), the bytes each peer sent per outer step,
and both as ratios against `none`.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.launch import read_metrics, run_to_end  # noqa: E402

SETTINGS = {
    "none": ["--compression", "none"],
    "int8": ["--compression", "int8"],
    "int8+ef": ["--compression", "int8", "--error-feedback"],
    "int4": ["--compression", "int4"],
}


def run_setting(workdir: str, name: str, peers: int, outer_steps: int, inner_steps: int) -> tuple[float, float]:
    rundir = os.path.join(workdir, name)
    peer_args = []
    for i in range(peers):
        peer_args.append([
            "--run-id", f"quality-{name.replace('+', '-')}", "--seed", "0",
            "--identity", os.path.join(workdir, f"peer{i}.id"),
            "--outer-steps", str(outer_steps), "--inner-steps", str(inner_steps),
            "--min-group-size", str(peers), "--metrics-file", os.path.join(rundir, f"peer{i}.jsonl"),
            *SETTINGS[name],
        ])  # fmt: skip
    run_to_end(rundir, peer_args, timeout=1800)
    records = [read_metrics(os.path.join(rundir, f"peer{i}.jsonl")) for i in range(peers)]
    if any(r["group_size"] != peers for rec in records for r in rec):
        print(f"warning: {name}: some outer steps averaged in smaller groups", file=sys.stderr)
    final = statistics.mean(r["loss"] for rec in records for r in rec[-2:])
    sent = statistics.mean(r["bytes_sent"] for rec in records for r in rec)
    return final, sent


@click.command()
@click.option("--peers", type=click.IntRange(min=2), default=3)
@click.option("--outer-steps", type=click.IntRange(min=2), default=8)
@click.option("--inner-steps", type=click.IntRange(min=1), default=30)
def main(peers: int, outer_steps: int, inner_steps: int) -> None:
    workdir = tempfile.mkdtemp(prefix="swarm-quality-")
    results = {name: run_setting(workdir, name, peers, outer_steps, inner_steps) for name in SETTINGS}
    base_loss, base_sent = results["none"]
    print(f"{peers} peers, {outer_steps} outer steps x {inner_steps} inner steps, embedded model and data")
    print(f"{'setting':<8} {'final loss':>10} {'x none':>7} {'KB sent/step/peer':>18} {'x none':>7}")
    for name, (loss, sent) in results.items():
        print(f"{name:<8} {loss:10.4f} {loss / base_loss:7.4f} {sent / 1e3:18.1f} {sent / base_sent:7.3f}")
    print(f"logs: {workdir}")


if __name__ == "__main__":
    main()
