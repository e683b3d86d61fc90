"""The workers of one peer, as seen by the swarm side: small object collectives over torch.distributed (gloo).

A peer sharded over N local workers runs one asyncio loop per worker process. Whenever a decision must be the same
on every worker (the group to average in, whether everyone's all-reduce succeeded, which state to take over), the
workers meet through this group. Collectives block, so they run in a thread and leave the event loop free to serve
other peers meanwhile.

A peer of one worker meets nobody: `SoloGroup` answers the same calls at once, so that one outer-step sequence
(swarm.sequence) serves both kinds of peers.
"""

from __future__ import annotations

import asyncio
import datetime

import torch
import torch.distributed as dist


class _Collectives:
    """Object collectives over one process group. Every worker must call them in the same order on that group."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._source = dist.get_global_rank(group, 0)

    async def all_gather(self, value) -> list:
        """Every worker's `value`, in worker order, on every worker."""
        out = [None] * self.size
        await asyncio.to_thread(dist.all_gather_object, out, value, group=self.group)
        return out

    async def broadcast(self, value=None):
        """Worker 0's `value` on every worker (the others' arguments are ignored)."""
        box = [value]
        await asyncio.to_thread(dist.broadcast_object_list, box, src=self._source, group=self.group)
        return box[0]

    def any_blocking(self, *flags: bool) -> tuple[bool, ...] | bool:
        """Whether any worker's flag is set, per flag (one flag: a bool); for the inner loop's thread, which already
        runs outside the event loop. One collective for all the flags."""
        value = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        out = tuple(bool(v) for v in value.tolist())
        return out[0] if len(out) == 1 else out


class LocalGroup(_Collectives):
    """Object collectives among one peer's workers. Every worker must call the same collectives in the same order."""

    def __init__(self, timeout_seconds: float = 1800.0):
        """Needs an initialized default process group; makes gloo groups of its own for control messages.

        `timeout_seconds` bounds one collective: worker 0 may look for a group and average for minutes while the
        others wait for its word. A worker that dies is caught sooner by the launcher, which stops the others.
        """
        if not dist.is_initialized():
            raise RuntimeError("LocalGroup needs torch.distributed to be initialized")
        timeout = datetime.timedelta(seconds=timeout_seconds)
        super().__init__(dist.new_group(backend="gloo", timeout=timeout))
        self.rounds = _Collectives(dist.new_group(backend="gloo", timeout=timeout))
        """A channel of its own for the round in flight: an overlapped round runs in the background while the
        peer's main flow (and its inner loop) use this group, and two coroutines sharing one group could call their
        collectives in different orders on different workers."""


class SoloGroup:
    """The `LocalGroup` of a peer that has one worker: every collective returns at once with this worker's value."""

    rank, size = 0, 1

    @property
    def rounds(self) -> SoloGroup:
        return self

    async def all_gather(self, value) -> list:
        return [value]

    async def broadcast(self, value=None):
        return value

    def any_blocking(self, *flags: bool) -> tuple[bool, ...] | bool:
        return flags[0] if len(flags) == 1 else tuple(flags)
