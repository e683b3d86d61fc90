"""Butterfly all-reduce of one flat float32 vector across a group, over libp2p binary streams.

The vector is cut into `group.size` contiguous parts; member i reduces part i. Every member sends its encoded part i
to member i on one stream; member i decodes the contributions, takes their weighted mean in float32 in member order,
encodes that mean once, and sends the same bytes back on every stream. Every member (member i too) decodes those same
bytes, so the whole group ends with bit-identical averages, whatever the codec.

Nothing partial passes as complete: if any contribution or any averaged part is missing, malformed, non-finite or late,
`all_reduce` raises AllReduceError on that member and its caller applies no average at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from swarm import records
from swarm.codec import Codec, CodecError
from swarm.matchmaking import Group
from swarm.node import SwarmNode
from swarm.wire import ByteCounter, ProtocolError, close_writer, read_frame, require, write_frame

logger = logging.getLogger(__name__)

# Encoding or decoding more elements than this goes to a worker thread so the event loop keeps serving the DHT.
_OFFLOAD_NUMEL = 1 << 18


class AllReduceError(RuntimeError):
    """The all-reduce did not complete for this member; no average may be applied from it."""


@dataclass
class AllReduceResult:
    averaged: torch.Tensor
    total_weight: float
    bytes_sent: int
    bytes_received: int
    seconds: float


def part_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal parts, the same on every member."""
    edges = [numel * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


async def _maybe_in_thread(fn, *args):
    numel = next((a.numel() for a in args if isinstance(a, torch.Tensor)), None)
    if numel is None:
        numel = max((len(a) for a in args if isinstance(a, (bytes, memoryview))), default=0)
    if numel >= _OFFLOAD_NUMEL:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


@dataclass
class _Round:
    """One group's reduction of the part this member owns."""

    group: Group | None = None
    part_numel: int = -1
    contributions: dict[int, tuple[float, torch.Tensor]] = field(default_factory=dict)
    configured: asyncio.Event = field(default_factory=asyncio.Event)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    counter: ByteCounter = field(default_factory=ByteCounter)
    served: int = 0
    all_served: asyncio.Event = field(default_factory=asyncio.Event)
    created: float = field(default_factory=time.monotonic)

    def add(self, sender: int, weight: float, values: torch.Tensor) -> None:
        if sender in self.contributions:
            raise ProtocolError(f"member {sender} sent its part twice")
        self.contributions[sender] = (weight, values)
        if self.group is not None and len(self.contributions) == self.group.size:
            self.complete.set()

    def fail(self, reason: str) -> None:
        if not self.result.done():
            self.result.set_exception(AllReduceError(reason))
            self.result.exception()  # mark retrieved: senders may all be gone already


class Averager:
    """Serves the reduce side of all-reduces for one run on one node, and runs all-reduces for its owner."""

    def __init__(self, node: SwarmNode, run_id: str, codec: Codec, timeout_seconds: float = 60.0):
        self.node, self.run_id, self.codec = node, records.validate_run_id(run_id), codec
        self.timeout_seconds = timeout_seconds
        self._protocol = f"swarm/{run_id}/reduce/1"
        self._rounds: dict[bytes, _Round] = {}

    async def start(self) -> None:
        await self.node.p2p.add_binary_stream_handler(self._protocol, self._handle_part)

    async def close(self) -> None:
        for rnd in self._rounds.values():
            rnd.fail("averager closed")
        self._rounds.clear()
        with contextlib.suppress(Exception):
            await self.node.p2p.remove_binary_stream_handler(self._protocol)

    def _round(self, group_id: bytes) -> _Round:
        self._expire_stale_rounds()
        if group_id not in self._rounds:
            self._rounds[group_id] = _Round()
        return self._rounds[group_id]

    def _expire_stale_rounds(self) -> None:
        horizon = time.monotonic() - 2 * self.timeout_seconds
        for gid in [gid for gid, rnd in self._rounds.items() if rnd.created < horizon]:
            self._rounds.pop(gid).fail("round expired")

    # ---- the member's side ----------------------------------------------------------------------------------------

    async def all_reduce(
        self, group: Group, flat: torch.Tensor, weight: float, residual: torch.Tensor | None = None
    ) -> AllReduceResult:
        """Weighted mean of `flat` across `group`, identical on every member. Raises AllReduceError.

        If `residual` (same size as `flat`) is given, it receives what the codec lost of our contribution:
        `flat` minus what the reducers decoded. Error feedback adds it to the next step's contribution.
        """
        if group.size < 2:
            raise ValueError("an all-reduce needs at least two members")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and positive, got {weight}")
        flat = flat.detach().to(torch.float32).reshape(-1).contiguous()
        started = time.perf_counter()
        bounds = part_bounds(flat.numel(), group.size)
        rnd = self._round(group.group_id)
        lo, hi = bounds[group.my_index]
        rnd.group, rnd.part_numel = group, hi - lo
        # Our own contribution goes through the codec too, so every contribution carries the same kind of error.
        own = await _maybe_in_thread(self._roundtrip, flat[lo:hi])
        if residual is not None:
            torch.sub(flat[lo:hi], own, out=residual[lo:hi])
        rnd.add(group.my_index, float(weight), own)
        rnd.configured.set()
        reducer = asyncio.create_task(self._reduce(rnd))
        tasks = [asyncio.create_task(self._own_result(rnd))] + [
            asyncio.create_task(
                self._exchange(
                    group, i, flat[a:b], float(weight), rnd.counter, None if residual is None else residual[a:b]
                )
            )
            for i, (a, b) in enumerate(bounds)
            if i != group.my_index
        ]
        # We also wait until our averaged part went out to every member: then the byte counts are complete,
        # and nobody is left waiting on us when we return.
        tasks.append(asyncio.create_task(rnd.all_served.wait()))
        try:
            *parts, _ = await asyncio.wait_for(asyncio.gather(*tasks), timeout=self.timeout_seconds)
        except asyncio.TimeoutError:
            rnd.fail("timed out")
            raise AllReduceError(
                f"all-reduce of group {group.group_id.hex()} timed out after {self.timeout_seconds}s"
            ) from None
        except Exception as e:  # any failure to reach or hear from a member (daemon errors included) fails the round
            rnd.fail(str(e))
            raise AllReduceError(f"all-reduce of group {group.group_id.hex()} failed: {e!r}") from e
        finally:
            for task in [reducer, *tasks]:
                task.cancel()  # gather leaves the others running when one fails
            # Keep the round a little for late replies in flight, then forget it.
            asyncio.get_running_loop().call_later(
                self.timeout_seconds, lambda gid=group.group_id: self._rounds.pop(gid, None)
            )
        own_result, *others = parts
        others.insert(group.my_index, own_result)
        averaged = torch.cat(others)
        total = sum(w for w, _ in rnd.contributions.values())
        return AllReduceResult(averaged, total, rnd.counter.sent, rnd.counter.received, time.perf_counter() - started)

    def _roundtrip(self, part: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.codec.encode(part), part.numel())

    async def _own_result(self, rnd: _Round) -> torch.Tensor:
        payload = await rnd.result
        return await _maybe_in_thread(self.codec.decode, payload, rnd.part_numel)

    async def _exchange(
        self,
        group: Group,
        index: int,
        part: torch.Tensor,
        weight: float,
        counter: ByteCounter,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        peer: PeerID = group.peer_ids[index]
        payload = await _maybe_in_thread(self.codec.encode, part)
        if residual is not None:
            sent = await _maybe_in_thread(self.codec.decode, payload, part.numel())
            torch.sub(part, sent, out=residual)
        _, reader, writer = await self.node.p2p.call_binary_stream_handler(peer, self._protocol)
        try:
            header = {
                "type": "part",
                "group_id": group.group_id,
                "sender": group.my_index,
                "weight": weight,
                "numel": part.numel(),
                "codec": self.codec.tag,
            }
            await write_frame(writer, header, payload, counter)
            reply, averaged = await read_frame(reader, counter)
            if reply.get("type") != "averaged":
                raise AllReduceError(f"member {index} ({peer}) could not reduce its part: {reply.get('reason')}")
            # Acknowledge: the reducer may shut down once every member has its part, and not before.
            await write_frame(writer, {"type": "ack"}, counter=counter)
            values = await _maybe_in_thread(self.codec.decode, averaged, part.numel())
            if not torch.isfinite(values).all():
                raise AllReduceError(f"member {index} ({peer}) sent back a non-finite average")
            return values
        finally:
            close_writer(writer)

    async def _reduce(self, rnd: _Round) -> None:
        try:
            await rnd.complete.wait()
            order = sorted(rnd.contributions)
            total = sum(rnd.contributions[i][0] for i in order)
            acc = torch.zeros(rnd.part_numel, dtype=torch.float32)
            for i in order:  # fixed order: the same float sums on any machine
                w, values = rnd.contributions[i]
                acc.add_(values, alpha=w / total)
            payload = await _maybe_in_thread(self.codec.encode, acc)
            if not rnd.result.done():
                rnd.result.set_result(payload)
        except Exception as e:
            rnd.fail(f"reduction failed: {e!r}")

    # ---- the reducer's side: one stream per sender ----------------------------------------------------------------

    async def _handle_part(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id
        rnd = None
        incoming = ByteCounter()
        try:
            header, payload = await asyncio.wait_for(read_frame(reader, incoming), self.timeout_seconds)
            group_id = require(header, "group_id", bytes)
            sender = require(header, "sender", int)
            weight = float(require(header, "weight", (int, float)))
            numel = require(header, "numel", int)
            if header.get("type") != "part":
                raise ProtocolError(f"unexpected message type {header.get('type')!r}")
            if header.get("codec") != self.codec.tag:
                raise ProtocolError(f"codec {header.get('codec')!r} differs from this peer's {self.codec.tag!r}")
            if not (math.isfinite(weight) and weight > 0):
                raise ProtocolError(f"weight {weight} is not finite and positive")
            rnd = self._round(group_id)
            # The sender may have left matchmaking a moment before us: wait until we know the group.
            await asyncio.wait_for(rnd.configured.wait(), self.timeout_seconds)
            group = rnd.group
            if not 0 <= sender < group.size or group.peer_ids[sender] != peer:
                raise ProtocolError(f"{peer} is not member {sender} of group {group_id.hex()}")
            if numel != rnd.part_numel:
                raise ProtocolError(f"part has {numel} values, expected {rnd.part_numel}")
            rnd.counter.received += incoming.received
            values = await _maybe_in_thread(self.codec.decode, payload, numel)
            if not torch.isfinite(values).all():
                raise ProtocolError("contribution holds NaN or inf")
            rnd.add(sender, weight, values)
            averaged = await asyncio.wait_for(asyncio.shield(rnd.result), self.timeout_seconds)
            try:
                await write_frame(writer, {"type": "averaged"}, averaged, rnd.counter)
                await asyncio.wait_for(read_frame(reader, rnd.counter, max_payload=0), self.timeout_seconds)
            finally:
                # A sender that vanished before our reply does not make our own average any less complete.
                rnd.served += 1
                if rnd.served == group.size - 1:
                    rnd.all_served.set()
        except (ProtocolError, CodecError) as e:
            logger.warning(f"refused a contribution from {peer}: {e}")
            if rnd is not None:
                rnd.fail(f"bad contribution from {peer}: {e}")
            with contextlib.suppress(Exception):
                await write_frame(writer, {"type": "error", "reason": str(e)})
        except (AllReduceError, asyncio.TimeoutError) as e:
            with contextlib.suppress(Exception):
                await write_frame(writer, {"type": "error", "reason": f"round failed: {e!r}"})
        except Exception as e:
            logger.debug(f"reduce stream from {peer} failed: {e!r}")
        finally:
            close_writer(writer)
