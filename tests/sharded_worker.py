"""One worker of a sharded peer, for tests/test_sharded.py (not a test module itself).

Real FSDP2 inner steps on the embedded model, real ShardedSwarm outer steps over real nodes; after every outer step
worker 0 saves the peer's full θ before and after it (gathered only for the test's check).

    python tests/sharded_worker.py --peer P --steps S --bootstrap MADDR --out DIR  (with RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT in the environment)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from peers.model import load_model  # noqa: E402
from peers.parallelize import local_shards, shard_model  # noqa: E402
from swarm import MatchmakingConfig, NodeConfig, SwarmConfig, SwarmNode  # noqa: E402
from swarm.local import LocalGroup  # noqa: E402
from swarm.sharded import ShardedSwarm  # noqa: E402


def full(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


async def train(args, model: torch.nn.Module, local: LocalGroup) -> None:
    node = await SwarmNode.create(NodeConfig(initial_peers=[args.bootstrap]))
    config = SwarmConfig(
        run_id="fsdp-ref",
        compression=args.compression,
        matchmaking=MatchmakingConfig(min_group_size=2, timeout_seconds=args.matchmaking_timeout),
    )
    shapes = [tuple(p.shape) for p in model.parameters()]
    swarm = await ShardedSwarm.create(node, [t.detach() for t in local_shards(model)], config, local, shapes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1000 * args.peer + local.rank)  # every worker its own batches
    try:
        for step in range(args.steps):
            for _ in range(2):
                batch = torch.randint(0, 256, (2, 16), generator=data)
                loss = model(input_ids=batch, labels=batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if step == args.nan_step and local.rank == args.nan_rank:
                with torch.no_grad():
                    local_shards(model)[3].view(-1)[0] = float("nan")  # one worker's shard only
            before = await asyncio.to_thread(full, model)
            report = await swarm.outer_step([t.detach() for t in local_shards(model)], tokens=64)
            with torch.no_grad():
                for shard, theta in zip(local_shards(model), swarm.params, strict=True):
                    shard.copy_(theta)
            after = await asyncio.to_thread(full, model)
            theta = await swarm.theta_sha256()
            if local.rank == 0:
                record = {"local": before, "after": after, "status": report.status.value, "theta": theta}
                record["group_size"] = report.group_size
                record["streams"] = dict(swarm.swarm.averager.streams)
                torch.save(record, os.path.join(args.out, f"peer{args.peer}-step{step}.pt"))
    finally:
        await swarm.close()
        await node.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--matchmaking-timeout", type=float, default=60.0)
    parser.add_argument("--nan-step", type=int, default=-1, help="put a NaN into one worker's shard at this step")
    parser.add_argument("--nan-rank", type=int, default=1)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        local = LocalGroup(timeout_seconds=120)
        model = load_model("embedded", 0).model
        if local.rank == 0:
            torch.save(full_unsharded(model), os.path.join(args.out, f"peer{args.peer}-initial.pt"))
        shard_model(model)
        asyncio.run(train(args, model, local))
    finally:
        dist.destroy_process_group()


def full_unsharded(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


if __name__ == "__main__":
    main()
