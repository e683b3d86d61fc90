"""The outer step of a peer whose model is sharded over several local workers (FSDP), without gathering the model.

Worker i of a peer holds θ and the outer momentum of its own shard only (the rows FSDP gives it), and runs a
`Swarm` over them in its own namespace (`{run}.shard{i}of{n}`; worker 0 uses the run itself). One outer step:

1. Each worker computes the pseudo-gradient of its shard and checks it is finite; the workers agree on the result.
2. Worker 0 finds the group for the peer, as a one-worker peer does; its join request names the nodes of its other
   workers, and the leader hands every member the nodes of every member's workers.
3. Every worker averages its shard with the same-index workers of the group's members: n all-reduces in parallel,
   each with a group id and secret derived from the peer-level group's.
4. The workers agree on the outcome before anyone applies it: all averaged, or nobody applies anything (a member
   lost in one shard's round is excluded, and worker 0 forms a new group for the same step). A peer's θ is never a
   mix of averaged and unaveraged shards.

Peers average only with peers sharded over the same number of workers: shard i of one layout holds other rows than
shard i of another, so their vectors cannot be added. The worker count is part of the schema, and a peer of another
layout is refused at matchmaking with a message that names both layouts.

The steps above are swarm.sequence's, the same sequence a one-worker peer runs (blocking or overlapped), with the
peer's workers as partners. Taking over the run's state (a newcomer, a peer that fell behind) works per shard:
worker i downloads its shard from the workers i of peers ahead, and the workers adopt only if all of them took the
same step.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from hivemind.p2p import PeerID

from swarm import records
from swarm.diloco import Swarm, SwarmConfig
from swarm.local import LocalGroup
from swarm.node import SwarmNode
from swarm.sequence import OuterSequence, SequenceMethods


def describe_layout(index: int, count: int, full_shapes: Sequence[Sequence[int]]) -> str:
    """The layout string of shard `index` of `count`: it enters the schema, so only equal layouts average."""
    digest = hashlib.sha256(";".join(",".join(str(int(d)) for d in s) for s in full_shapes).encode()).hexdigest()
    numel = sum(math.prod(s) for s in full_shapes)
    return f"sharded over {count} workers (this is shard {index}) of a model of {numel:,} parameters [{digest[:8]}]"


class ShardedSwarm(SequenceMethods):
    """Worker `local.rank`'s part of a sharded peer. Every worker calls every method, in the same order.

    Use `await ShardedSwarm.create(node, shard_params, config, local, full_shapes)` and `await close()`.
    """

    def __init__(self, swarm: Swarm, local: LocalGroup):
        self.swarm, self.local = swarm, local
        # The one outer-step sequence, with the other workers as partners: it replaces the one-worker one.
        self.sequence = swarm.sequence = OuterSequence(swarm, local)

    @classmethod
    async def create(
        cls,
        node: SwarmNode,
        params: Sequence[torch.Tensor],
        config: SwarmConfig,
        local: LocalGroup,
        full_shapes: Sequence[Sequence[int]],
    ) -> ShardedSwarm:
        if local.size < 2:
            raise ValueError("a sharded peer needs at least two workers; use Swarm for one")
        shard_config = replace(config, shard=(local.rank, local.size))
        layout = describe_layout(local.rank, local.size, full_shapes)
        swarm = await Swarm.create(node, params, shard_config, layout=layout)
        self = cls(swarm, local)
        # Worker 0 names the other workers' nodes when it joins a group, so members know where each shard goes.
        me = (node.peer_id.to_base58(), swarm.averager.direct_endpoints, swarm.averager.direct_public_key())
        nodes = await local.all_gather(me)
        if local.rank == 0:
            swarm.matchmaker.shard_nodes = [(PeerID.from_base58(b), list(eps), key) for b, eps, key in nodes[1:]]
        return self

    async def close(self) -> None:
        await self.swarm.close()  # closes the sequence too

    @property
    def global_step(self) -> int:
        return self.swarm.global_step

    @property
    def params(self) -> list[torch.Tensor]:
        """θ of this worker's shard."""
        return self.swarm.params

    @property
    def next_round(self) -> int:
        return self.swarm.next_round

    @property
    def round_called(self):
        """Set on worker 0 when a leader waits for the peer (see Swarm.round_called); the peer's inner loop agrees
        on it with the other workers (peers.sharded)."""
        return self.swarm.round_called

    async def theta_sha256(self, shard: Sequence[torch.Tensor] | None = None) -> str:
        """The layout-independent hash of the peer's full θ (records.theta_sha256), on every worker; `shard` is this
        worker's copy of its θ shard to hash instead of its live one."""
        params = self.swarm.params
        live = shard is None or shard is params
        read = self.swarm.reading_state if live else asyncio.to_thread  # θ: whole, not while a round lands
        rows = await self.local.all_gather(
            await read(lambda: [records.row_digests(p) for p in (params if live else shard)])
        )
        return records.theta_sha256([b"".join(worker[i] for worker in rows) for i in range(len(self.swarm.params))])

    async def reading_state(self, read, *args):
        """See Swarm.reading_state: this worker's θ shard and momentum stay unchanged while `read` runs."""
        return await self.swarm.reading_state(read, *args)

    def state_dict(self) -> dict:
        return self.swarm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.swarm.load_state_dict(state)
