"""The workers of one peer, as seen by the swarm side: small object collectives over torch.distributed (gloo).

A peer sharded over N local workers runs one asyncio loop per worker process. Whenever a decision must be the same
on every worker (the group to average in, whether everyone's all-reduce succeeded, which state to take over), the
workers meet through this group. Collectives block, so they run in a thread and leave the event loop free to serve
other peers meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime

import torch
import torch.distributed as dist


class LocalGroup:
    """Object collectives among one peer's workers. Every worker must call the same collectives in the same order."""

    def __init__(self, timeout_seconds: float = 1800.0):
        """Needs an initialized default process group; makes a gloo group of its own for control messages.

        `timeout_seconds` bounds one collective: worker 0 may look for a group and average for minutes while the
        others wait for its word. A worker that dies is caught sooner by the launcher, which stops the others.
        """
        if not dist.is_initialized():
            raise RuntimeError("LocalGroup needs torch.distributed to be initialized")
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._source = dist.get_global_rank(self.group, 0)

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

    def any_blocking(self, flag: bool) -> bool:
        """Whether any worker's flag is set; for the inner loop's thread, which already runs outside the loop."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())
