"""Handing the run's current state to a peer that is behind: θ, the outer momentum and the outer-step index.

A peer that starts (or falls behind) asks a live peer of the run that is further ahead. The donor answers on one
stream with a header and the raw float32 bytes; the receiver checks the bytes against the hash in the header and, where
other peers published their θ hash for that step in the DHT, against the hash most of them agree on. A donor that
fails, lies or dies mid-transfer is skipped and the next one is asked.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.p2p import PeerID

from swarm import records
from swarm.flat import flatten
from swarm.node import SwarmNode
from swarm.wire import ProtocolError, close_writer, read_frame, require, write_frame

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    outer_step: int
    params: torch.Tensor
    """θ, flat float32."""
    momentum: torch.Tensor | None
    """Outer Nesterov momentum, flat float32; None before the run's first outer step."""

    def sha256(self) -> str:
        return hashlib.sha256(self.params.numpy().astype("<f4", copy=False).tobytes()).hexdigest()


class StateServer:
    """Serves this peer's current state to peers of the same run that ask for it."""

    def __init__(self, node: SwarmNode, run_id: str, schema: str, snapshot):
        self.node, self.schema, self._snapshot = node, schema, snapshot
        self.protocol = f"swarm/{run_id}/state/1"

    async def start(self) -> None:
        await self.node.p2p.add_binary_stream_handler(self.protocol, self._handle)

    async def close(self) -> None:
        try:
            await self.node.p2p.remove_binary_stream_handler(self.protocol)
        except Exception as e:  # the daemon may already be gone
            logger.debug(f"removing the state handler failed: {e!r}")

    async def _handle(self, stream_info, reader, writer) -> None:
        try:
            request, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), 10)
            if request.get("type") != "get_state" or request.get("schema") != self.schema:
                await write_frame(writer, {"type": "error", "reason": "incompatible schema or bad request"})
                return
            # One consistent snapshot: the outer step mutates θ only between awaits, never during this copy.
            state: RunState = self._snapshot()
            params = state.params.numpy().astype("<f4", copy=False).tobytes()
            momentum = b"" if state.momentum is None else state.momentum.numpy().astype("<f4", copy=False).tobytes()
            header = {
                "type": "state",
                "step": state.outer_step,
                "params_sha256": state.sha256(),
                "numel": state.params.numel(),
                "has_momentum": state.momentum is not None,
            }
            await write_frame(writer, header, params + momentum)
        except Exception as e:
            logger.debug(f"serving state to {stream_info.peer_id} failed: {e!r}")
        finally:
            close_writer(writer)


async def fetch_state(
    node: SwarmNode, protocol: str, schema: str, donor: PeerID, numel: int, timeout: float
) -> RunState:
    """Download and check one donor's state. Raises ProtocolError or asyncio errors."""
    _, reader, writer = await asyncio.wait_for(node.p2p.call_binary_stream_handler(donor, protocol), timeout)
    try:
        await write_frame(writer, {"type": "get_state", "schema": schema})
        header, payload = await asyncio.wait_for(read_frame(reader, max_payload=8 * numel), timeout)
    finally:
        close_writer(writer)
    if header.get("type") != "state":
        raise ProtocolError(f"donor refused: {header.get('reason')}")
    step, digest = require(header, "step", int), require(header, "params_sha256", str)
    has_momentum = require(header, "has_momentum", bool)
    if require(header, "numel", int) != numel or len(payload) != (8 if has_momentum else 4) * numel:
        raise ProtocolError("state has the wrong size for this model")
    params = torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=numel).astype(np.float32))
    momentum = None
    if has_momentum:
        momentum = torch.from_numpy(np.frombuffer(payload, dtype="<f4", offset=4 * numel).astype(np.float32))
    state = RunState(step, params, momentum)
    if state.sha256() != digest:
        raise ProtocolError("θ does not match the hash the donor announced")
    if not bool(torch.isfinite(params).all()) or (momentum is not None and not bool(torch.isfinite(momentum).all())):
        raise ProtocolError("state holds NaN or inf")
    return state


async def majority_hash(node: SwarmNode, run_id: str, outer_step: int) -> str | None:
    """The θ hash most peers published for `outer_step`, if any did."""
    found = await node.dht.get(records.hash_key(run_id, outer_step), latest=True)
    counts = collections.Counter(records.parse_hashes(found).values())
    return counts.most_common(1)[0][0] if counts else None


def snapshot_of(outer_step: int, params, momentum) -> RunState:
    return RunState(outer_step, flatten(params), None if momentum is None else flatten(momentum))
