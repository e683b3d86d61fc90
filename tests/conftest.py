"""Fixtures: real swarm nodes (real p2p daemons, real DHT) on 127.0.0.1, built around a first node on port 0."""

from __future__ import annotations

import contextlib

from swarm import NodeConfig, SwarmNode


@contextlib.asynccontextmanager
async def swarm_of(n: int):
    """A bootstrap node plus `n` nodes that know only its address. Yields (bootstrap, nodes); closes them all."""
    bootstrap = await SwarmNode.create(NodeConfig())
    nodes = []
    try:
        maddrs = await bootstrap.visible_maddrs()
        for _ in range(n):
            nodes.append(await SwarmNode.create(NodeConfig(initial_peers=maddrs)))
        yield bootstrap, nodes
    finally:
        for node in nodes:
            await node.close()
        await bootstrap.close()
