"""The main job: a bootstrap node and several peers on 127.0.0.1 train the embedded model together.

    python examples/local_swarm.py [--peers 3] [--outer-steps 6] [--inner-steps 30]

Prints the loss per outer step for every peer, the group sizes, and whether the peers' parameters agree.
"""

from __future__ import annotations

import os
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.launch import read_metrics, start_bootstrap, start_peer, stop  # noqa: E402


@click.command()
@click.option("--peers", type=click.IntRange(min=1), default=3)
@click.option("--outer-steps", type=click.IntRange(min=1), default=6)
@click.option("--inner-steps", type=click.IntRange(min=1), default=30)
@click.option("--compression", type=click.Choice(["int8", "fp16", "none"]), default="int8")
@click.option("--workdir", default=None, help="Where logs, metrics and checkpoints go; default runs/local-<time>.")
def main(peers: int, outer_steps: int, inner_steps: int, compression: str, workdir: str | None) -> None:
    workdir = workdir or os.path.join("runs", time.strftime("local-%Y%m%d-%H%M%S"))
    print(f"workdir: {workdir}", flush=True)
    boot = start_bootstrap(workdir, "--run-id", "local", "--health-interval", "10")
    print(f"bootstrap node: {boot.maddrs[0]}", flush=True)
    procs = []
    try:
        for i in range(peers):
            args = ["--run-id", "local", "--outer-steps", str(outer_steps), "--inner-steps", str(inner_steps),
                    "--compression", compression, "--min-group-size", str(min(2, peers)),
                    "--metrics-file", os.path.join(workdir, f"peer{i}.jsonl"),
                    "--checkpoint-dir", os.path.join(workdir, f"peer{i}-ckpt")]  # fmt: skip
            procs.append(start_peer(workdir, f"peer{i}", boot.maddrs, *args))
        print(f"{peers} peers training ({outer_steps} outer steps of {inner_steps} inner steps); logs in {workdir}")
        shown = 0
        while any(p.poll() is None for p in procs):
            shown = _show_new_steps(workdir, peers, shown)
            time.sleep(1)
        _show_new_steps(workdir, peers, shown)
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            stop(p)
        stop(boot.process)
    records = [read_metrics(os.path.join(workdir, f"peer{i}.jsonl")) for i in range(peers)]
    first, last = records[0][0]["loss"], records[0][-1]["loss"]
    print(f"loss of peer0: {first:.3f} -> {last:.3f}; exit codes {codes}")
    sys.exit(0 if all(c == 0 for c in codes) else 1)


def _show_new_steps(workdir: str, peers: int, shown: int) -> int:
    records = [read_metrics(os.path.join(workdir, f"peer{i}.jsonl")) for i in range(peers)]
    while all(len(r) > shown for r in records):
        row = [r[shown] for r in records]
        losses = " ".join(f"{x['loss']:.3f}" if x["loss"] is not None else "nan" for x in row)
        hashes = {x["params_sha256"] for x in row}
        agree = "θ equal on all peers" if len(hashes) == 1 else f"{len(hashes)} distinct θ"
        print(
            f"outer step {row[0]['outer_step']:3d} | loss per peer {losses} | group sizes "
            f"{[x['group_size'] for x in row]} | {agree}",
            flush=True,
        )
        shown += 1
    return shown


if __name__ == "__main__":
    main()
