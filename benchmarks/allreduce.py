"""All-reduce of one large fp32 tensor across N processes on 127.0.0.1, three ways side by side in one run.

    python benchmarks/allreduce.py [--peers 4] [--numel 25000000] [--rounds 3]

- swarm int8 (and none): this project's butterfly all-reduce, group formed by its matchmaking, bytes over direct TCP
  connections between the members (swarm.direct); "int8-relayed" and "none-relayed" send them through the p2p
  daemons' libp2p streams instead. Every reducer reduces robustly, as peers do by default (swarm.robust); a
  "-plain" suffix ("int8-plain", "none-relayed-plain") takes the plain weighted mean instead, and when both of a
  pair ran, the robust one's time is printed as a ratio to the plain one's (the peers are honest: no contribution
  is ever clipped, so the ratio is what judging costs). Bytes go as the codec wrote them; a "-coded" suffix
  ("int8-coded") Huffman codes every payload (swarm.entropy, `--entropy-coding on`), and when int8 ran too, its
  time and bytes are printed as ratios to int8's: what coding costs on this link, and what it saves;
- hivemind: the stock `DecentralizedAverager` with no compression (its own matchmaking and all-reduce);
- gloo: `torch.distributed.all_reduce` in fp32, the data-parallel baseline.

Each system runs in its own N processes; a barrier starts every round on all processes at once. Prints the median
wall time of the all-reduce over the rounds (after one warm-up round), its ratio to gloo, the bytes each swarm peer
sent, and the CPU seconds one peer's all-reduce took (all its threads; on a shared machine the N peers' CPU together
bounds the wall time from below).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import resource
import socket
import statistics
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu() -> float:
    """CPU seconds this process used so far, all its threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tensor(numel: int, rank: int):
    import torch

    return torch.randn(numel, generator=torch.Generator().manual_seed(rank))


def gloo_worker(rank, peers, numel, rounds, port, barrier, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=peers)
    x = _tensor(numel, rank)
    times, cpus = [], []
    for _ in range(rounds + 1):
        y = x.clone()
        barrier.wait()
        started, cpu = time.perf_counter(), _cpu()
        dist.all_reduce(y)
        times.append(time.perf_counter() - started)
        cpus.append(_cpu() - cpu)
    dist.destroy_process_group()
    out.put((rank, times[1:], 0, cpus[1:]))


def hivemind_worker(rank, peers, numel, rounds, maddrs, barrier, out):
    import hivemind
    import torch

    # hivemind's DHT and averager are processes that it forks; a spawned worker would try to pickle them.
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dht = hivemind.DHT(initial_peers=maddrs, start=True)
    averager = hivemind.averaging.DecentralizedAverager(
        [_tensor(numel, rank)], dht, prefix="bench", target_group_size=peers, min_group_size=peers,
        min_matchmaking_time=2.0, request_timeout=1.0, start=True,
    )  # fmt: skip
    times = []
    for _ in range(rounds + 1):
        barrier.wait()
        started = time.perf_counter()
        control = averager.step(wait=False, require_trigger=False)
        result = control.result(timeout=600)
        times.append(time.perf_counter() - started)
        assert result is not None and len(result) == peers, f"group of {result}"
    averager.shutdown()
    dht.shutdown()
    # Its all-reduce runs in a process of its own: the CPU it takes is not counted here.
    out.put((rank, times[1:], 0, []))


def swarm_worker(rank, peers, numel, rounds, maddrs, system, barrier, out):
    import torch

    from swarm.allreduce import Averager
    from swarm.codec import make_codec
    from swarm.matchmaking import Matchmaker, MatchmakingConfig
    from swarm.node import NodeConfig, SwarmNode

    torch.set_num_threads(1)

    async def main():
        node = await SwarmNode.create(NodeConfig(initial_peers=maddrs))
        run = f"bench-{system}"
        codec_name, *options = system.split("-")
        matchmaker = Matchmaker(node, run, "bench", MatchmakingConfig(min_group_size=peers, timeout_seconds=60))
        averager = Averager(
            node, run, make_codec(codec_name), timeout_seconds=600, direct="relayed" not in options,
            robust="plain" not in options, entropy_coding="on" if "coded" in options else "off",
        )  # fmt: skip
        await averager.start()
        matchmaker.direct_endpoints = averager.direct_endpoints
        matchmaker.direct_key = averager.direct_public_key()
        await matchmaker.start()
        x = _tensor(numel, rank)
        average = torch.empty(numel)
        times, sent, cpus = [], [], []
        for step in range(rounds + 1):
            group = await matchmaker.form_group(step)
            assert group is not None and group.size == peers, group
            await asyncio.to_thread(barrier.wait)
            started, cpu = time.perf_counter(), _cpu()
            # The same output vector every round, as swarm.Swarm passes it (and as gloo reduces in place).
            result = await averager.all_reduce(group, x, 1.0, out=average)
            times.append(time.perf_counter() - started)
            cpus.append(_cpu() - cpu)
            sent.append(result.bytes_sent)
            matchmaker.set_outer_step(step + 1)
        await matchmaker.close()
        await averager.close()
        await node.close()
        out.put((rank, times[1:], statistics.mean(sent[1:]), cpus[1:]))

    asyncio.run(main())


def run_workers(target, peers, args) -> tuple[float, float, float | None]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(peers), ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, peers, *args, barrier, out)) for rank in range(peers)]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + 900
    while len(results) < peers:
        try:
            results.append(out.get(timeout=5))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a worker failed (exit codes {failed}) or timed out; see above") from None
    for p in procs:
        p.join(60)
    # A round takes as long as its slowest member.
    per_round = [max(r[1][i] for r in results) for i in range(len(results[0][1]))]
    # CPU seconds of one peer's all-reduce: the median over rounds, averaged over peers.
    cpu = statistics.mean(statistics.median(r[3]) for r in results) if results[0][3] else None
    return statistics.median(per_round), statistics.mean(r[2] for r in results), cpu


def bootstrap_maddrs():
    """A bootstrap DHT node in this process, for the systems that need one."""
    import hivemind

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    return dht, [str(m) for m in dht.get_visible_maddrs()]


def capped(rate: str) -> None:
    """Re-run this script inside a private network namespace whose loopback is shaped to `rate` (tbf)."""
    # MTU 1500 and a 1 MB burst: with loopback's 64 KB MTU and a small burst, TCP collapses and the figure measures
    # the qdisc rather than the program (../shared/DESIGN.md section 4).
    shaping = (
        f"ip link set lo up && ip link set lo mtu 1500 && "
        f'tc qdisc add dev lo root tbf rate {rate} burst 1mb limit 8mb && exec "$@"'
    )
    args = [a for a in sys.argv[1:]]
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", shaping, "sh", sys.executable, __file__, *args, "--shaped"])


SWARM_SYSTEMS = [
    f"{codec}{plane}{mode}" for codec in ("int8", "none") for plane in ("", "-relayed") for mode in ("", "-plain")
] + ["int8-coded"]


@click.command()
@click.option("--peers", type=click.IntRange(min=2), default=4)
@click.option("--numel", type=click.IntRange(min=1), default=25_000_000)
@click.option("--rounds", type=click.IntRange(min=1), default=3)
@click.option("--bandwidth", default=None, help="Cap loopback to this rate (tc syntax, e.g. 200mbit); needs root.")
@click.option(
    "--systems",
    default="gloo,int8,int8-plain,none,int8-relayed,hivemind",
    help="Comma-separated, from gloo, int8, none, int8-relayed, none-relayed (each also with -plain), int8-coded, "
    "hivemind.",
)
@click.option("--shaped", is_flag=True, hidden=True)
def main(peers: int, numel: int, rounds: int, bandwidth: str | None, systems: str, shaped: bool) -> None:
    if bandwidth and not shaped:
        capped(bandwidth)
    chosen = systems.split(",")
    results = {}
    results["gloo fp32"] = run_workers(gloo_worker, peers, (numel, rounds, _free_port()))
    dht, maddrs = bootstrap_maddrs()
    try:
        for system in SWARM_SYSTEMS:
            if system in chosen:
                results[f"swarm {system}"] = run_workers(swarm_worker, peers, (numel, rounds, maddrs, system))
        if "hivemind" in chosen:
            results["hivemind none"] = run_workers(hivemind_worker, peers, (numel, rounds, maddrs))
    finally:
        dht.shutdown()
    gloo = results["gloo fp32"][0]
    where = f"loopback capped at {bandwidth} (tbf)" if bandwidth else "127.0.0.1"
    print(f"{peers} processes, {numel:,} float32 ({4 * numel / 1e6:.0f} MB) each, median of {rounds} rounds, {where}")
    print(f"{'system':<19} {'wall s':>8} {'x gloo':>7} {'MB sent/peer':>13} {'CPU s/peer':>11}")
    for name, (wall, sent, cpu) in results.items():
        sent_text = f"{sent / 1e6:13.1f}" if sent else f"{'-':>13}"
        cpu_text = f"{cpu:11.2f}" if cpu is not None else f"{'-':>11}"
        print(f"{name:<19} {wall:8.2f} {wall / gloo:7.2f} {sent_text} {cpu_text}", flush=True)
    for system in SWARM_SYSTEMS:
        robust, plain = results.get(f"swarm {system}"), results.get(f"swarm {system}-plain")
        if robust is not None and plain is not None:
            cpu = f", CPU {robust[2] / plain[2]:.2f}x" if robust[2] and plain[2] else ""
            print(f"robust / plain, {system}: wall {robust[0] / plain[0]:.2f}x{cpu}", flush=True)
    coded, int8 = results.get("swarm int8-coded"), results.get("swarm int8")
    if coded is not None and int8 is not None:
        print(f"coded / int8: wall {coded[0] / int8[0]:.2f}x, bytes sent {coded[1] / int8[1]:.4f}x", flush=True)


if __name__ == "__main__":
    main()
