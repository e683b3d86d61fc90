"""A swarm on emulated wide-area links: every peer in a network namespace of its own, behind a link of its own capped
with tbf. Compute utilization, tokens/s and loss per peer, blocking against overlapped, equal against uneven peers.

    python benchmarks/wan.py [--peers 3] [--rate 50mbit] [--model benchmarks/models/llama-5m.json]
        [--inner-steps 10] [--outer-steps 12] [--batch-size 4] [--seq-len 64] [--slow 1] [--slow-factor 4]
        [--arms blocking-equal,overlap-equal,blocking-uneven,overlap-uneven] [--compression int8] [--delay-ms 0]
        [--max-lag 1]

Needs root (network namespaces, veth pairs, tc), except with `--rate none` (every node on 127.0.0.1, uncapped).
Each node (the bootstrap node and every peer) sits in a network namespace of its own behind a link capped both ways,
so a peer's cap limits that peer alone (benchmarks/links.py); `--delay-ms D` adds D ms to every packet a node sends
(a user-space delay line: netem is not available here), so the round trip between any two nodes is 2D.

The uneven swarm: the last `--slow` peers run `--slow-factor` times the batch, so each of their inner steps takes
that much longer. Per peer, over the steady outer steps (the first two and the last are left out: start-up, and
the round in flight at the end):
- utilization: inner-loop seconds over wall seconds between metrics records;
- tokens/s; inner steps per outer step; statuses of its rounds;
- wait: seconds the peer's compute waited for the swarm, between inner loops or (overlapped, at `--max-lag`) in one;
- landed: overlapped, the mean share of the next inner loop trained when a round landed (what its quality costs
  depends on: README, Overlap).
And per arm: the training loss against the swarm's tokens, whether θ hashes agree within every group, and traffic
per token against data-parallel fp32 (a ring all-reduce of every step's gradient, 2(k-1)/k x 4 bytes per parameter
per worker).
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import tempfile
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from links import Links, Loopback  # noqa: E402  (beside this script)

from peers.launch import read_metrics, run_to_end  # noqa: E402
from peers.metrics import groups_agree, peer_figures  # noqa: E402

ARMS = ("blocking-equal", "overlap-equal", "blocking-uneven", "overlap-uneven")


def run_arm(opts: dict, arm: str, workdir: str) -> list[list[dict]]:
    """One swarm to its end; the metrics records of every peer."""
    mode, kind = arm.split("-")
    k = opts["peers"]
    slow = set(range(k - opts["slow"], k)) if kind == "uneven" else set()
    rundir = os.path.join(workdir, arm)
    # Node 0 is the bootstrap node (uncapped: it only introduces), nodes 1..k the peers.
    links = Loopback() if opts["rate"] == "none" else Links(k + 1, [None] + [opts["rate"]] * k, opts["delay_ms"])
    args = []
    for i in range(k):
        batch = opts["batch_size"] * (opts["slow_factor"] if i in slow else 1)
        args.append([
            "--run-id", "wan", "--model", opts["model"], "--seed", "0",
            "--inner-steps", str(opts["inner_steps"]), "--outer-steps", str(opts["outer_steps"]),
            "--batch-size", str(batch), "--seq-len", str(opts["seq_len"]),
            "--compression", opts["compression"], "--min-group-size", "2",
            "--eval-dataset", "none", "--metrics-file", os.path.join(rundir, f"peer{i}.jsonl"),
            *(["--overlap", "--overlap-max-lag", str(opts["max_lag"])] if mode == "overlap" else ["--no-overlap"]),
            *opts["peer_args"],
        ])  # fmt: skip
    with links:
        run_to_end(rundir, args, opts["timeout"], place=links.place)
    return [read_metrics(os.path.join(rundir, f"peer{i}.jsonl")) for i in range(k)]


def loss_curve(peers: list[list[dict]]) -> list[tuple[int, float]]:
    """Mean training loss of the peers at each outer step, against the swarm's tokens so far."""
    by_step: dict[int, list] = collections.defaultdict(list)
    for records in peers:
        for r in records:
            by_step[r["outer_step"]].append(r)
    curve, tokens = [], 0
    for step in sorted(by_step):
        rows = by_step[step]
        tokens += sum(r["tokens"] for r in rows)
        losses = [r["loss"] for r in rows if r["loss"] is not None]
        if losses:
            curve.append((tokens, statistics.mean(losses)))
    return curve


def numel_of(model: str, seed: int = 0) -> int:
    from peers.model import load_model

    return sum(p.numel() for p in load_model(model, seed).model.parameters())


@click.command()
@click.option("--peers", type=click.IntRange(min=2), default=3)
@click.option("--rate", default="50mbit", help="Each peer's cap, both ways (tc syntax); none: 127.0.0.1, uncapped.")
@click.option("--model", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "llama-5m.json"))
@click.option("--inner-steps", type=click.IntRange(min=1), default=10)
@click.option("--outer-steps", type=click.IntRange(min=4), default=12)
@click.option("--batch-size", type=click.IntRange(min=1), default=4)
@click.option("--seq-len", type=click.IntRange(min=8), default=64)
@click.option("--slow", type=click.IntRange(min=1), default=1, help="Slow peers in the uneven swarm.")
@click.option("--slow-factor", type=click.IntRange(min=2), default=4, help="Their batch, and step time, multiple.")
@click.option("--compression", default="int8")
@click.option(
    "--delay-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Latency added to every packet each node sends (a user-space delay line): round trip 2x this.",
)
@click.option(
    "--max-lag",
    type=click.FloatRange(0, 1),
    default=1.0,
    help="The overlapped arms' --overlap-max-lag (1, swarm-peer's default: the round may take a whole inner loop).",
)
@click.option("--arms", default=",".join(ARMS), help=f"Comma-separated subset of {', '.join(ARMS)}.")
@click.option("--peer-args", default="", help="More swarm-peer flags for every peer.")
@click.option("--timeout", type=float, default=1800.0, help="Seconds one arm may run.")
@click.option("--json-out", default=None, help="Write every figure here as JSON.")
def main(**opts) -> None:
    if os.geteuid() != 0 and opts["rate"] != "none":
        raise click.UsageError("needs root: network namespaces, veth pairs and tc (or --rate none)")
    if opts["rate"] == "none" and opts["delay_ms"] > 0:
        raise click.UsageError("--delay-ms needs the namespaces: give a --rate")
    import shlex

    opts["peer_args"] = shlex.split(opts["peer_args"])
    arms = opts.pop("arms").split(",")
    if set(arms) - set(ARMS):
        raise click.BadParameter(f"unknown arms {sorted(set(arms) - set(ARMS))}", param_hint="'--arms'")
    k, numel = opts["peers"], numel_of(opts["model"])
    workdir = tempfile.mkdtemp(prefix="swarm-wan-")
    # Data-parallel fp32: every step, a ring all-reduce of the gradient: 2(k-1)/k x 4 bytes per parameter sent per
    # worker, for batch x seq-len tokens of that worker.
    dp_bytes_per_token = 2 * (k - 1) / k * 4 * numel / (opts["batch_size"] * opts["seq_len"])
    print(
        f"{k} peers, {numel:,} parameters, links capped at {opts['rate']} each way (tbf), "
        f"round trip between nodes {2 * opts['delay_ms']:.0f} ms added (delay line), "
        f"H={opts['inner_steps']}, {opts['outer_steps']} outer steps, batch {opts['batch_size']} x {opts['seq_len']}, "
        f"{opts['compression']}; uneven: {opts['slow']} peer(s) with {opts['slow_factor']}x the batch; logs {workdir}",
        flush=True,
    )
    results = {}
    for arm in arms:
        started = time.perf_counter()
        peers = run_arm(opts, arm, workdir)
        figures = [peer_figures(records) for records in peers]
        curve = loss_curve(peers)
        results[arm] = {"peers": figures, "groups_agree": groups_agree(peers), "curve": curve}
        print(f"\n{arm} ({time.perf_counter() - started:.0f} s); θ hashes agree within every group: "
              f"{results[arm]['groups_agree']}")  # fmt: skip
        print(
            f"  {'peer':<6}{'util':>7}{'tok/s':>9}{'step s':>8}{'wait s':>8}{'H':>6}{'landed':>8}{'traffic x':>11}"
            "  statuses"
        )
        for i, f in enumerate(figures):
            ratio = dp_bytes_per_token / f["bytes_per_token"] if f["bytes_per_token"] else float("inf")
            f["traffic_reduction"] = ratio
            print(
                f"  {i:<6}{f['utilization']:>7.3f}{f['tokens_per_second']:>9.0f}{f['step_seconds']:>8.2f}"
                f"{f['wait_seconds']:>8.2f}{f['inner_steps']:>6.1f}{f['landed_at']:>8.2f}{ratio:>10.0f}x"
                f"  {f['statuses']} {f['group_sizes']}"
            )
        # The same bytes per round carry H x batch tokens: per token, against data-parallel fp32, at H = 100.
        per_round = statistics.mean(f["bytes_per_round"] for f in figures)
        at_100 = 100 * 2 * (k - 1) / k * 4 * numel / per_round
        results[arm]["traffic_reduction_at_h100"] = at_100
        sent = f"{per_round / 1e6:.2f} MB"
        print(f"  bytes sent per round and peer {sent}: at H=100, {at_100:.0f}x less than data-parallel fp32")
        marks = [curve[max(0, round(x * len(curve)) - 1)] for x in (0.25, 0.5, 0.75, 1.0)] if curve else []
        print("  training loss at swarm tokens: " + ", ".join(f"{t:.0f}: {loss:.4f}" for t, loss in marks))
    for kind in ("equal", "uneven"):
        a, b = results.get(f"blocking-{kind}"), results.get(f"overlap-{kind}")
        if a and b and a["curve"] and b["curve"]:
            # One outer step's loss varies by 10% and more with the documents its batches drew (the embedded corpus
            # mixes easy and hard ones): compare the mean over the last third of the steps both arms reached.
            tokens = min(a["curve"][-1][0], b["curve"][-1][0])
            tail = [statistics.mean(loss for t, loss in c["curve"] if 2 * tokens / 3 < t <= tokens) for c in (a, b)]
            change = 100 * (tail[1] / tail[0] - 1)
            print(
                f"{kind}: mean training loss over the last third of {tokens:.0f} tokens, overlap {tail[1]:.4f} against"
                f" blocking {tail[0]:.4f}: {change:+.2f}%"
            )
    if opts["json_out"]:
        with open(opts["json_out"], "w") as f:
            json.dump({"options": opts, "numel": numel, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
