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

Taking over the run's state (a newcomer, a peer that fell behind) works per shard: worker i downloads its shard from
the workers i of peers ahead, and the workers adopt only if all of them took the same step.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from hivemind.p2p import PeerID

from swarm import records
from swarm.allreduce import AllReduceError
from swarm.diloco import OuterStepReport, StepStatus, Swarm, SwarmConfig
from swarm.flat import all_finite, difference
from swarm.local import LocalGroup
from swarm.node import SwarmNode
from swarm.wire import ProtocolError

logger = logging.getLogger(__name__)


def describe_layout(index: int, count: int, full_shapes: Sequence[Sequence[int]]) -> str:
    """The layout string of shard `index` of `count`: it enters the schema, so only equal layouts average."""
    digest = hashlib.sha256(";".join(",".join(str(int(d)) for d in s) for s in full_shapes).encode()).hexdigest()
    numel = sum(math.prod(s) for s in full_shapes)
    return f"sharded over {count} workers (this is shard {index}) of a model of {numel:,} parameters [{digest[:8]}]"


class ShardedSwarm:
    """Worker `local.rank`'s part of a sharded peer. Every worker calls every method, in the same order.

    Use `await ShardedSwarm.create(node, shard_params, config, local, full_shapes)` and `await close()`.
    """

    def __init__(self, swarm: Swarm, local: LocalGroup):
        self.swarm, self.local = swarm, local

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
        await self.swarm.close()

    @property
    def global_step(self) -> int:
        return self.swarm.global_step

    @property
    def params(self) -> list[torch.Tensor]:
        """θ of this worker's shard."""
        return self.swarm.params

    # ---- agreeing on state ----------------------------------------------------------------------------------------

    async def catch_up(self, timeout_seconds: float = 60.0) -> bool:
        """If the run is ahead, every worker takes over its shard of the same newer state, or none does."""
        for _ in range(3):
            ahead, state = await self.swarm.newer_state(timeout_seconds)
            seen = await self.local.all_gather((ahead, None if state is None else state.outer_step))
            if not any(a for a, _ in seen):
                return False
            steps = {s for _, s in seen}
            if len(steps) == 1 and None not in steps:
                logger.info(f"caught up with the run: outer step {self.swarm.global_step} -> {state.outer_step}")
                await self.swarm._adopt(state)
                return True
            # Workers got different steps (the run moved on mid-transfer) or some got none: try again.
            logger.info(f"workers took different states of the run ({[s for _, s in seen]}); trying again")
        return False

    async def join_run(self, timeout_seconds: float = 60.0) -> bool:
        """On start: take over the run's state if it is ahead, and line up with its next round. True if taken."""
        if not await self.catch_up(timeout_seconds):
            return False
        await self._rejoin()
        return True

    async def _rejoin(self, wait_for_round: bool = False) -> None:
        step = self.swarm.global_step
        under_way = await self.swarm.round_under_way(wait_for_round) if self.local.rank == 0 else None
        if not await self.local.broadcast(under_way):
            return
        await self.swarm.matchmaker.sit_out(step)
        mm = self.swarm.config.matchmaking
        deadline = time.monotonic() + mm.timeout_seconds + self.swarm.config.allreduce_timeout_seconds
        while True:
            if await self.catch_up():
                return
            # Worker 0's clock decides, so every worker runs the same number of rounds of collectives.
            if not await self.local.broadcast(time.monotonic() < deadline):
                break
            await asyncio.sleep(mm.poll_interval_seconds)
        logger.warning(f"round {step} did not finish within the bound; training on from outer step {step}")

    async def _repair_drift(self) -> bool:
        # Each worker checks its own shard against its shard group; only θ of the same step is taken, so the workers
        # stay at one step whatever each finds.
        repaired = await self.swarm.repair_drift(same_step=True)
        return any(await self.local.all_gather(repaired))

    # ---- the outer step -------------------------------------------------------------------------------------------

    async def outer_step(
        self, local: Sequence[torch.Tensor], tokens: int, delta: torch.Tensor | None = None
    ) -> OuterStepReport:
        """One DiLoCo outer step from this worker's shard after the inner loop; `tokens` is the whole peer's count.
        `delta`: this shard's Δ = θ - local when the caller computed it (see Swarm.outer_step)."""
        swarm = self.swarm
        if len(local) != len(swarm.params):
            raise ValueError(f"got {len(local)} local tensors for {len(swarm.params)} global parameters")
        if tokens <= 0 or not math.isfinite(tokens):
            raise ValueError(f"tokens must be positive, got {tokens}")
        step = swarm.global_step
        started = time.perf_counter()
        if delta is None:
            delta = await asyncio.to_thread(difference, swarm.params, local)
        bad = await asyncio.to_thread(lambda: 0 if all_finite(delta) else int((~torch.isfinite(delta)).sum()))
        bad_per_worker = await self.local.all_gather(bad)
        if any(bad_per_worker):
            where = ", ".join(f"worker {i}: {n}" for i, n in enumerate(bad_per_worker) if n)
            error = f"pseudo-gradient of outer step {step} has NaN/inf ({where}): not sent, sitting this round out"
            logger.error(error)
            await self._rejoin(wait_for_round=True)
            return await swarm._advance(
                StepStatus.NONFINITE, 0, started, error=error, next_step=swarm.global_step == step
            )

        if await self.catch_up() or await self._repair_drift():
            await self._rejoin()
            return await swarm._advance(StepStatus.RESYNCED, 0, started, next_step=False)
        contribution, residual = delta, None
        if swarm.residual is not None:
            contribution, residual = delta + swarm.residual, torch.empty_like(delta)
        excluded: set = set()
        known = set(swarm._last_group[1]) if swarm._last_group is not None else set()
        attempt = 0
        while True:
            group = None
            if self.local.rank == 0:
                group = await swarm.matchmaker.form_group(step, exclude=excluded, known=known)
            group = await self.local.broadcast(group)
            if group is None or group.size == 1:
                timeout = swarm.config.matchmaking.timeout_seconds
                why = f"no group within {timeout:.0f}s" if group is None else "no other peer"
                logger.info(f"outer step {step + 1}: {why}, applying this peer's own pseudo-gradient")
                await swarm._apply_off_loop(delta, alone=True)
                return await swarm._advance(StepStatus.ALONE, 1, started, attempts=attempt)
            attempt += 1
            outcome, result, shard_group = await self._average_shard(group, contribution, float(tokens), residual)
            outcomes = await self.local.all_gather(outcome)
            if self.local.rank == 0:  # it finds our groups: caught in any shard's round, a peer shares none again
                swarm.ban(group, {i: reason for *_, caught in outcomes for i, reason in caught.items()})
            if all(ok for ok, *_ in outcomes):
                break
            suspects = {group.peer_ids[i] for _, lost, *_ in outcomes for i in lost}
            errors = "; ".join(f"shard {i}: {err}" for i, (ok, _, err, _) in enumerate(outcomes) if not ok)
            if attempt > swarm.config.allreduce_retries:
                error = f"outer step {step}: all-reduce with {group.size} peers failed ({errors}); θ unchanged"
                logger.warning(f"{error}, work carried into the next step")
                return await swarm._advance(
                    StepStatus.ALLREDUCE_FAILED, group.size, started, error=error, attempts=attempt
                )
            excluded |= suspects
            known = set(group.peer_ids) - excluded
            logger.warning(f"outer step {step}: all-reduce with {group.size} peers failed ({errors}); new group next")
        await swarm._apply_off_loop(result.averaged)
        swarm._last_group = (step + 1, shard_group.peer_ids)
        if residual is not None:
            swarm.residual = residual
        traffic = await self.local.all_gather((result.bytes_sent, result.bytes_received))
        return await swarm._advance(
            StepStatus.AVERAGED,
            group.size,
            started,
            sum(s for s, _ in traffic),
            sum(r for _, r in traffic),
            group_id=group.group_id.hex(),
            attempts=attempt,
            members=[p.to_base58() for p in group.peer_ids],  # the peers (their worker 0), not our shard's nodes
        )

    async def _average_shard(self, group, contribution, weight, residual):
        """(ok, indices of lost members, error, {index: why} of members caught sending garbage) and the result of
        this worker's shard round. Indices are the members' in `group`: a shard group lists the same peers' nodes."""
        try:
            shard_group = group.for_shard(self.local.rank)
        except ProtocolError as e:
            return (False, [], str(e), {}), None, None
        try:
            out = self.swarm.average_buffer(contribution.numel())
            result = await self.swarm.averager.all_reduce(shard_group, contribution, weight, residual, out)
            return (True, [], "", self.swarm.caught_in(shard_group)), result, shard_group
        except AllReduceError as e:
            self.swarm._average = None  # a failed round's decoder threads may still write into it
            lost = [shard_group.peer_ids.index(p) for p in e.suspects if p in shard_group.peer_ids]
            return (False, lost, str(e), self.swarm.caught_in(shard_group)), None, shard_group

    async def publish_hash(self, report: OuterStepReport) -> None:
        """Each worker records its shard's hash in its namespace (newcomers check the shards they take against it)."""
        await self.swarm.publish_hash(report)

    async def theta_sha256(self) -> str:
        """The layout-independent hash of the peer's full θ (records.theta_sha256), on every worker."""
        rows = await self.local.all_gather([records.row_digests(p) for p in self.swarm.params])
        return records.theta_sha256([b"".join(worker[i] for worker in rows) for i in range(len(self.swarm.params))])

    def state_dict(self) -> dict:
        return self.swarm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.swarm.load_state_dict(state)
