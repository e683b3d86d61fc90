"""Wall time and wire bytes of one swarm outer step, per codec, side by side in one run.

    python benchmarks/outer_step.py [--peers 4] [--numel 5000000] [--rounds 3]

N peers in one process on 127.0.0.1 (real p2p daemons and DHT) each hold the same θ of `numel` float32 values and a
different local θ; every round is a full `Swarm.outer_step`: matchmaking, butterfly all-reduce, Nesterov step. Prints
the median wall time over the rounds and the bytes each peer sent, with ratios against `none`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swarm import MatchmakingConfig, NodeConfig, Swarm, SwarmConfig, SwarmNode  # noqa: E402


async def measure(nodes, numel: int, compression: str, rounds: int) -> tuple[float, float, float]:
    theta = [torch.randn(numel, generator=torch.Generator().manual_seed(0))]
    config = SwarmConfig(
        run_id=f"bench-{compression}",
        compression=compression,
        matchmaking=MatchmakingConfig(min_group_size=len(nodes), timeout_seconds=60),
        allreduce_timeout_seconds=300,
    )
    swarms = [await Swarm.create(node, theta, config) for node in nodes]
    try:
        times, sent, comm = [], [], []
        for _ in range(rounds):
            locals_ = [[s.params[0] - 0.01 * torch.randn(numel)] for s in swarms]
            started = time.perf_counter()
            reports = await asyncio.gather(*[s.outer_step(loc, 1000) for s, loc in zip(swarms, locals_)])
            times.append(time.perf_counter() - started)
            assert all(rep.group_size == len(nodes) for rep in reports), [rep.status for rep in reports]
            assert len({rep.params_sha256 for rep in reports}) == 1, "θ differs across the group"
            sent.append(statistics.mean(rep.bytes_sent for rep in reports))
            comm.append(statistics.mean(rep.comm_seconds for rep in reports))
        return statistics.median(times), statistics.median(sent), statistics.median(comm)
    finally:
        for s in swarms:
            await s.close()


async def main_async(peers: int, numel: int, rounds: int, codecs: list[str]) -> None:
    bootstrap = await SwarmNode.create(NodeConfig())
    maddrs = await bootstrap.visible_maddrs()
    nodes = [await SwarmNode.create(NodeConfig(initial_peers=maddrs)) for _ in range(peers)]
    try:
        results = {c: await measure(nodes, numel, c, rounds) for c in codecs}
    finally:
        for node in nodes:
            await node.close()
        await bootstrap.close()
    base_time, base_sent, _ = results.get("none", next(iter(results.values())))
    print(f"{peers} peers, {numel:,} float32 ({4 * numel / 1e6:.0f} MB), median of {rounds} outer steps, 127.0.0.1")
    print(f"{'codec':<6} {'wall s':>8} {'x none':>7} {'MB sent/peer':>13} {'x none':>7}")
    for codec, (wall, sent, _) in results.items():
        print(f"{codec:<6} {wall:8.2f} {wall / base_time:7.2f} {sent / 1e6:13.2f} {sent / base_sent:7.3f}")


@click.command()
@click.option("--peers", type=click.IntRange(min=2), default=4)
@click.option("--numel", type=click.IntRange(min=1), default=5_000_000)
@click.option("--rounds", type=click.IntRange(min=1), default=3)
@click.option("--codecs", default="none,fp16,int8")
def main(peers: int, numel: int, rounds: int, codecs: str) -> None:
    asyncio.run(main_async(peers, numel, rounds, codecs.split(",")))


if __name__ == "__main__":
    main()
