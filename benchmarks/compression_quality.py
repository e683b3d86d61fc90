"""Does 8-bit or 4-bit compression cost quality? The same seeded local-swarm run with each codec, side by side.

    python benchmarks/compression_quality.py [--peers 3] [--outer-steps 8] [--inner-steps 30] [--settings none,int8]

Runs the real programs (a bootstrap node and N `swarm-peer` processes on 127.0.0.1) once per setting: `none`,
`int8`, `int8` with error feedback, and `int4`; `int8-plain` (not run by default) is `int8` with robust averaging
off (`--no-robust-averaging`; every other setting averages robustly, as peers do by default). Every run uses the
same peer identities and seed, so peers see the same data in the same order and start from the same θ: the settings
differ only in what travels on the wire and how it is averaged. Prints
the loss of the last outer steps (mean over peers and the last two steps), the bytes each peer sent per outer step,
and both as ratios against `none` (or the first setting run); with `int8` and `int8-plain`, the loss of robust
averaging against plain.
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
    "int8-plain": ["--compression", "int8", "--no-robust-averaging"],
}
DEFAULT_SETTINGS = "none,int8,int8+ef,int4"


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
@click.option(
    "--settings", default=DEFAULT_SETTINGS, help=f"Comma-separated, from {', '.join(SETTINGS)}.", show_default=True
)
def main(peers: int, outer_steps: int, inner_steps: int, settings: str) -> None:
    chosen = settings.split(",")
    unknown = [name for name in chosen if name not in SETTINGS]
    if unknown:
        choices = ", ".join(SETTINGS)
        raise click.BadParameter(f"unknown settings {unknown}; choose from {choices}", param_hint="--settings")
    workdir = tempfile.mkdtemp(prefix="swarm-quality-")
    results = {name: run_setting(workdir, name, peers, outer_steps, inner_steps) for name in chosen}
    base_loss, base_sent = results.get("none", results[chosen[0]])
    print(f"{peers} peers, {outer_steps} outer steps x {inner_steps} inner steps, embedded model and data")
    print(f"{'setting':<10} {'final loss':>10} {'x none':>7} {'KB sent/step/peer':>18} {'x none':>7}")
    for name, (loss, sent) in results.items():
        print(f"{name:<10} {loss:10.4f} {loss / base_loss:7.4f} {sent / 1e3:18.1f} {sent / base_sent:7.3f}")
    if "int8" in results and "int8-plain" in results:
        print(f"robust / plain averaging (int8): final loss {results['int8'][0] / results['int8-plain'][0]:.4f}x")
    print(f"logs: {workdir}")


if __name__ == "__main__":
    main()
