"""Butterfly all-reduce of one flat float32 vector across a group, over libp2p binary streams.

The vector is cut into `group.size` contiguous parts; member i reduces part i. Every member sends its encoded part i
to member i on one stream; member i takes the weighted mean of the contributions in float32 in member order (its
own exactly, the others as they decode), encodes that mean once, and sends the same bytes back on every stream.
Every member (member i too) decodes those same bytes, so the whole group ends with bit-identical averages, whatever
the codec.

When a member dies mid-round, the others lose as little as possible and never apply a partial average:
- a reducer that already holds every contribution finishes and serves its part whatever happens to the rest;
- a reducer that lacks the contribution of a member it lost fails its part at once (nobody waits out the bound);
- a member that misses an averaged part asks the other members for it: whoever received it holds the reducer's exact
  bytes, so the whole group still ends identical. Only if nobody holds some part does `all_reduce` raise
  AllReduceError (naming the members it lost, so a retry leaves them out), and then its caller applies nothing.

A reducer may also lie. Every member judges each averaged part against its own contribution to it, with its own
honestly reduced part as the reference (swarm.audit: three dot products per part); a part that cannot be an average
fails the round for that member, and its reducer is caught (`Averager.caught`) and named as a suspect.

Protocol (one binary stream per request, frames from `swarm.wire`):
  member -> reducer: {"type": "part", "group_id", "sender", "weight", "numel", "codec"} + encoded contribution
  reducer -> member: {"type": "averaged"} + encoded mean | {"type": "error", "reason"}
  member -> reducer: {"type": "ack"}
  member -> member:  {"type": "fetch", "group_id", "parts": [i, ...]}
  member -> member:  {"type": "parts", "indices": [i, ...]}, then {"type": "part", "index": i} + encoded mean, each
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

from swarm import audit, direct, records
from swarm.codec import Codec, CodecError
from swarm.direct import HELLO_TIMEOUT, DirectKey, DirectServer
from swarm.entropy import EntropyCoding, Packed, pack
from swarm.flat import all_finite
from swarm.matchmaking import Group
from swarm.node import SwarmNode
from swarm.robust import bound_weights, reduce_pass, robust_weights, sums_in_pass
from swarm.wire import ByteCounter, ProtocolError, close_writer, read_frame, require, write_frame

logger = logging.getLogger(__name__)

# Encoding or decoding more elements than this goes to a worker thread so the event loop keeps serving the DHT.
_OFFLOAD_NUMEL = 1 << 18


class AllReduceError(RuntimeError):
    """The all-reduce did not complete for this member; no average may be applied from it.

    `suspects` are the members this peer lost contact with (a broken stream, silence past the bound, garbage): a
    retry of the round leaves them out.
    """

    def __init__(self, message: str, suspects=()):
        super().__init__(message)
        self.suspects: frozenset[PeerID] = frozenset(suspects)


class _MemberLost(Exception):
    """Contact with one member was lost: its stream broke or it sent something we cannot use."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index = index


@dataclass
class AllReduceResult:
    averaged: torch.Tensor
    total_weight: float
    bytes_sent: int
    bytes_received: int
    seconds: float
    recovered_parts: int = 0
    """Averaged parts this member got from another member because their reducer's own delivery failed."""


def part_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal parts, the same on every member."""
    edges = [numel * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


async def _maybe_in_thread(fn, *args):
    numel = next((a.numel() for a in args if isinstance(a, torch.Tensor)), None)
    if numel is None:
        numel = max((len(a) for a in args if isinstance(a, (bytes, bytearray, memoryview))), default=0)
    if numel >= _OFFLOAD_NUMEL:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


# Stream failures that mean "this member is gone" rather than "this member said no".
_LOST = (ConnectionError, OSError, EOFError, asyncio.IncompleteReadError, P2PDaemonError, P2PHandlerError)


@dataclass
class _Round:
    """One group's all-reduce as seen by this member: the part it reduces, and the averaged parts it holds."""

    group: Group | None = None
    part_numel: int = -1
    bounds: list[tuple[int, int]] = field(default_factory=list)
    contributions: dict[int, tuple[float, torch.Tensor | bytes]] = field(default_factory=dict)
    """What each member sent us for our part, until the reduction has used it (then only `weights` remain)."""
    weights: dict[int, float] = field(default_factory=dict)
    configured: asyncio.Event = field(default_factory=asyncio.Event)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    counter: ByteCounter = field(default_factory=ByteCounter)
    served: int = 0
    all_served: asyncio.Event = field(default_factory=asyncio.Event)
    created: float = field(default_factory=time.monotonic)
    payloads: dict[int, bytes] = field(default_factory=dict)
    """Encoded averaged parts this member holds, exactly as their reducers sent them (the same bytes everywhere)."""
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    """The same parts, decoded (views into `output`)."""
    output: torch.Tensor | None = None
    """The averaged vector, filled part by part as averaged parts are decoded into it."""
    figures: dict[int, audit.Figures | None] = field(default_factory=dict)
    """How each averaged part we received relates to our contribution to it (swarm.audit), taken as it was decoded;
    robust mode only."""
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """This member's own attempt is over: it holds every averaged part it will ever get from the reducers."""
    reducer: asyncio.Task | None = None

    def add(self, sender: int, weight: float, values: torch.Tensor | bytes) -> None:
        if sender in self.weights:
            raise ProtocolError(f"member {sender} sent its part twice")
        self.weights[sender] = weight
        self.contributions[sender] = (weight, values)
        if self.group is not None and len(self.weights) == self.group.size:
            self.complete.set()

    def release(self) -> None:
        """Drop the bulk data of a round whose member is done with it: later fetches for it find nothing."""
        self.contributions.clear()
        self.payloads.clear()
        self.values.clear()
        self.output = None
        if self.result.done() and not self.result.cancelled() and self.result.exception() is None:
            # The future held our reduced part's bytes until the round was forgotten (a timeout later): a round per
            # outer step, each a model-size / group-size payload, crept up. A late sender now finds a failed round.
            released = asyncio.get_running_loop().create_future()
            released.set_exception(AllReduceError("round released"))
            released.exception()  # mark retrieved: nobody may ask
            self.result = released

    def fail(self, reason: str) -> None:
        if not self.result.done():
            self.result.set_exception(AllReduceError(reason))
            self.result.exception()  # mark retrieved: senders may all be gone already

    def forget(self) -> None:
        self.fail("round forgotten")
        if self.reducer is not None:
            self.reducer.cancel()


class Averager:
    """Serves the reduce side of all-reduces for one run on one node, and runs all-reduces for its owner."""

    def __init__(
        self,
        node: SwarmNode,
        run_id: str,
        codec: Codec,
        timeout_seconds: float = 60.0,
        direct: bool = True,
        robust: bool = True,
        entropy_coding: str = "auto",
    ):
        """`robust`: reduce our part robustly (swarm.robust: bounded weights, CenteredClip, garbage dropped) rather
        than with the plain token-weighted mean; the two agree bit for bit while nobody is out of line.
        `entropy_coding`: whether what this member sends is Huffman coded (swarm.entropy: auto, on or off)."""
        self.node, self.run_id, self.codec = node, records.validate_namespace(run_id), codec
        self.timeout_seconds = timeout_seconds
        self.robust = robust
        self.coding = EntropyCoding(entropy_coding)
        self.caught: dict[PeerID, str] = {}
        """Members whose contribution to a part we reduced was garbage (a lied weight, undecodable or non-finite
        values, values far outside the others'), with the reason; robust mode only."""
        self._protocol = f"swarm/{run_id}/reduce/1"
        self._rounds: dict[bytes, _Round] = {}
        self._direct = DirectServer(self._handle_direct) if direct else None
        self.direct_key = DirectKey()
        self.streams = {"direct": 0, "relayed": 0}
        """Contributions this member sent over each data plane (direct TCP, or the p2p daemons' relayed streams)."""
        self._unreachable: set[PeerID] = set()

    def direct_public_key(self) -> bytes:
        """What members need to authenticate our direct connections; empty without a direct data plane."""
        return b"" if self._direct is None else self.direct_key.public

    @property
    def direct_endpoints(self) -> list[tuple[str, int]]:
        """Where group members can reach this averager directly; to be announced in matchmaking."""
        return [] if self._direct is None else self._direct.endpoints

    async def start(self) -> None:
        await self.node.add_stream_handler(self._protocol, self._handle)
        if self._direct is not None:
            try:
                await self._direct.start(self.node.config.host_maddrs, await self.node.visible_maddrs())
            except OSError as e:  # the relayed streams still work
                logger.warning(f"no direct data plane ({e}); all-reduces go through the p2p daemon")

    async def close(self) -> None:
        for rnd in self._rounds.values():
            rnd.forget()
        self._rounds.clear()
        if self._direct is not None:
            await self._direct.close()
        with contextlib.suppress(Exception):
            await self.node.remove_stream_handler(self._protocol)

    def _round(self, group_id: bytes) -> _Round:
        self._expire_stale_rounds()
        if group_id not in self._rounds:
            self._rounds[group_id] = _Round()
        return self._rounds[group_id]

    def _expire_stale_rounds(self) -> None:
        horizon = time.monotonic() - 3 * self.timeout_seconds
        for gid in [gid for gid, rnd in self._rounds.items() if rnd.created < horizon]:
            self._rounds.pop(gid).forget()

    def _release_settled(self, current: _Round) -> None:
        """A new round starts: the averaged parts of our earlier rounds go, rather than wait out their timeout.

        They are kept only so that a member that missed one can fetch it from us (see `_recover`). That happens
        right as a round ends, while our next round needs a new group first, so at worst such a late member now
        finds nothing and its round fails cleanly. Meanwhile an outer step every few seconds no longer holds tens of
        rounds of parts in memory, and the next round reuses the memory this one frees.
        """
        for rnd in self._rounds.values():
            if rnd is not current and rnd.settled.is_set():
                rnd.release()

    def _forget_later(self, group_id: bytes, rnd: _Round) -> None:
        def forget():
            if self._rounds.get(group_id) is rnd:
                del self._rounds[group_id]
            rnd.forget()

        asyncio.get_running_loop().call_later(self.timeout_seconds, forget)

    # ---- the member's side ----------------------------------------------------------------------------------------

    async def all_reduce(
        self,
        group: Group,
        flat: torch.Tensor,
        weight: float,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        judged: torch.Tensor | None = None,
    ) -> AllReduceResult:
        """Weighted mean of `flat` across `group`, identical on every member. Raises AllReduceError.

        If a member is lost mid-round, the others still finish every part that does not need it, and a member that
        misses an averaged part asks the other members for it (all members received the same bytes from its
        reducer). Only if nobody holds it does the round fail, and then for everyone alike.

        If `residual` (same size as `flat`) is given, it receives what the codec lost of our contribution:
        `flat` minus what the reducers decoded. Error feedback adds it to the next step's contribution.

        The average is written into `out` when given (same size as `flat`, not `flat` itself), else into a new
        tensor. A caller that averages every outer step saves the page faults of a fresh vector by passing the same
        buffer each time, as gloo's in-place all-reduce does.

        `judged` (same size as `flat`): what the averaged parts are judged against (swarm.audit), if not `flat`
        itself. Overlapped, `flat` with the direction of our guess's error taken out, along which the others'
        contributions cancel ours by construction (swarm.sequence).
        """
        if group.size < 2:
            raise ValueError("an all-reduce needs at least two members")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and positive, got {weight}")
        flat = flat.detach().to(torch.float32).reshape(-1).contiguous()
        if out is not None and (
            out.numel() != flat.numel() or out.dtype != torch.float32 or not out.is_contiguous() or not out.is_cpu
        ):
            raise ValueError("out must be a contiguous float32 CPU tensor of the contribution's size")
        if out is not None and out.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
            raise ValueError("out must not share memory with the contribution: parts of it are still being sent")
        own = flat if judged is None else judged.detach().to(torch.float32).reshape(-1).contiguous()
        if own.numel() != flat.numel():
            raise ValueError("judged must be of the contribution's size")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_seconds
        bounds = part_bounds(flat.numel(), group.size)
        rnd = self._round(group.group_id)
        self._release_settled(rnd)
        lo, hi = bounds[group.my_index]
        rnd.group, rnd.part_numel, rnd.bounds = group, hi - lo, bounds
        rnd.output = torch.empty(flat.numel(), dtype=torch.float32) if out is None else out.reshape(-1)
        rnd.configured.set()  # others may send us their parts (and open direct connections) from now on
        tasks = {}
        try:
            # Contributions go out first: the other reducers wait for them, while our own part waits for theirs.
            for i, (a, b) in enumerate(bounds):
                if i != group.my_index:
                    part_residual = None if residual is None else residual[a:b]
                    exchange = self._exchange(group, i, rnd, flat[a:b], float(weight), part_residual, own[a:b])
                    task = asyncio.create_task(exchange)
                    tasks[task] = i
            exact = await _maybe_in_thread(
                self._own_contribution, flat[lo:hi], None if residual is None else residual[lo:hi]
            )
            rnd.add(group.my_index, float(weight), exact)
            rnd.reducer = asyncio.create_task(self._reduce(rnd))
            tasks[asyncio.create_task(self._own_result(rnd, own[lo:hi]))] = group.my_index
            lost, errors = await self._settle(rnd, tasks, deadline)
            # Every averaged part a reducer sent us is judged against our own contribution to it (swarm.audit): one
            # that cannot be an average fails the round for us, and its reducer is caught, so the retry leaves it out.
            judge, liars = await _maybe_in_thread(self._audit, rnd, own, float(weight))
            for i, reason in liars.items():
                del rnd.payloads[i], rnd.values[i]  # not passed on to a member that asks us for it
                self._catch(group.peer_ids[i], f"its averaged part {i} cannot be an average of the group's: {reason}")
            missing = [i for i in range(group.size) if i not in rnd.values]
            recovered, doubted = 0, set()
            # Nobody holds a better copy of a part whose reducer sent garbage: every member got the same bytes.
            garbage = set(liars) | {i for i in lost if group.peer_ids[i] in self.caught}
            if missing and not garbage:
                rnd.settled.set()  # we hold all we will get: other members may ask us now
                reachable = [i for i in range(group.size) if i != group.my_index and i not in lost]
                recovery_deadline = max(deadline, loop.time() + min(10.0, self.timeout_seconds))
                recovered = await self._recover(group, rnd, missing, reachable, recovery_deadline, judge, doubted)
                missing = [i for i in range(group.size) if i not in rnd.values]
            suspects = [group.peer_ids[i] for i in sorted(lost | doubted | set(liars))]
            if liars:
                raise AllReduceError(
                    f"all-reduce of group {group.group_id.hex()}: members {sorted(liars)} returned averaged parts that"
                    " cannot be averages of the group's contributions",
                    suspects,
                )
            if missing:
                reasons = "; ".join(errors[:3]) or "timed out"
                raise AllReduceError(
                    f"all-reduce of group {group.group_id.hex()} is missing averaged parts {missing} ({reasons})",
                    suspects,
                )
            if not lost:
                # Our averaged part has gone out to every member: then the byte counts are complete, and nobody
                # is left waiting on us when we return.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(rnd.all_served.wait(), max(0.0, deadline - loop.time()))
        finally:
            for task in tasks:
                if not task.done():  # only after an error before the exchanges settled
                    task.cancel()
            rnd.settled.set()
            self._forget_later(group.group_id, rnd)
        averaged = rnd.output  # every part was decoded into its place: no concatenation
        # The caller owns the average from here; the round keeps only the encoded parts, for members that missed one.
        rnd.output, rnd.values = None, {}
        total = sum(rnd.weights.values())
        seconds = time.perf_counter() - started
        self.coding.observe(rnd.counter.sent, seconds)
        return AllReduceResult(averaged, total, rnd.counter.sent, rnd.counter.received, seconds, recovered)

    async def _settle(self, rnd: _Round, tasks: dict[asyncio.Task, int], deadline: float) -> tuple[set[int], list]:
        """Run the exchanges to their end or the deadline. Returns the members lost and the other errors seen."""
        loop = asyncio.get_running_loop()
        lost: set[int] = set()
        errors: list[str] = []
        pending = set(tasks)
        try:
            while pending and loop.time() < deadline:
                done, pending = await asyncio.wait(
                    pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    error = task.exception()
                    if isinstance(error, _MemberLost):
                        lost.add(error.index)
                        errors.append(f"member {error.index}: {error}")
                        # A reduction that still lacks a lost member's contribution can never finish: say so now,
                        # so the members waiting for it do not wait out the bound.
                        if error.index not in rnd.weights:
                            rnd.fail(f"member {error.index} was lost before it contributed")
                    elif error is not None:
                        errors.append(str(error))
        finally:
            for task in pending:
                task.cancel()
        if pending:  # the deadline passed: whoever we still wait for is silent
            group = rnd.group
            # A member that never sent us its contribution is silent. Waiting for another member's averaged part
            # proves nothing while our own part is incomplete: that member may be waiting for the same silent one.
            silent = {i for i in range(group.size) if i not in rnd.weights}
            if not silent:
                silent = {tasks[t] for t in pending if tasks[t] != group.my_index}
            lost |= silent
            rnd.fail(f"timed out after {self.timeout_seconds}s waiting for members {sorted(silent)}")
            errors.append(f"timed out waiting for members {sorted(silent)}")
        return lost, errors

    async def _recover(
        self, group: Group, rnd: _Round, missing: list[int], members: list[int], deadline, judge=None, doubted=None
    ) -> int:
        """Ask the other members for averaged parts we lack; returns how many we got.

        `judge` (from `_audit`) vets every part we get: a member that passes on one that cannot be an average goes
        into `doubted` (a suspect of this round, no more: it may only have relayed its reducer's lie)."""
        loop = asyncio.get_running_loop()
        before = len(rnd.values)

        async def ask(index: int) -> None:
            peer = group.peer_ids[index]
            reader, writer = await self.node.open_stream(peer, self._protocol)
            try:
                wanted = [i for i in missing if i not in rnd.values]
                request = {"type": "fetch", "group_id": group.group_id, "parts": wanted}
                await write_frame(writer, request, b"", rnd.counter)
                reply, _ = await read_frame(reader, rnd.counter, max_payload=0)
                indices = require(reply, "indices", list)
                for i in indices:
                    header, payload = await read_frame(reader, rnd.counter)
                    if header.get("index") != i or i not in wanted:
                        raise ProtocolError(f"member {index} sent part {header.get('index')} out of order")
                    if i in rnd.values:
                        continue
                    lo, hi = rnd.bounds[i]
                    # A fresh tensor first: the reducer's own answer may still be decoding into the output.
                    values = await _maybe_in_thread(self.codec.decode, payload, hi - lo)
                    if not all_finite(values):
                        raise ProtocolError(f"member {index} sent a non-finite averaged part {i}")
                    reason = None if judge is None else await _maybe_in_thread(judge, i, values)
                    if reason is not None:
                        doubted.add(index)
                        raise ProtocolError(f"member {index} sent an averaged part {i} that cannot be one: {reason}")
                    if i not in rnd.values:
                        rnd.output[lo:hi] = values
                        rnd.payloads[i], rnd.values[i] = payload, rnd.output[lo:hi]
            finally:
                close_writer(writer)

        tasks = [asyncio.create_task(ask(i)) for i in members]
        try:
            pending = set(tasks)
            while pending and any(i not in rnd.values for i in missing) and loop.time() < deadline:
                done, pending = await asyncio.wait(
                    pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task.exception() is not None:
                        logger.debug(f"recovering averaged parts failed: {task.exception()!r}")
        finally:
            for task in tasks:
                task.cancel()
        got = len(rnd.values) - before
        if got:
            logger.info(f"got {got} averaged parts of group {group.group_id.hex()} from other members")
        return got

    def _audit(self, rnd: _Round, own: torch.Tensor, weight: float):
        """(a judge of this round's averaged parts, the parts we hold that cannot be averages, with the reason).
        `own`: our contribution as it is judged (all_reduce's `judged`, or the contribution itself).

        Our own averaged part is the reference (swarm.audit); without it, or without robust averaging, nothing is
        judged and the judge is None. Three dot products per part, most of them taken as the parts were decoded."""
        me = rnd.group.my_index
        if not self.robust or me not in rnd.values:
            return None, {}
        lo, hi = rnd.bounds[me]
        reference = rnd.figures.get(me) or audit.figures(rnd.values[me], own[lo:hi])
        share = audit.our_share(weight, [w for w in rnd.weights.values() if w > 0], rnd.group.size)

        def judge(i: int, values: torch.Tensor, found: audit.Figures | None = None) -> str | None:
            if found is None:
                a, b = rnd.bounds[i]
                found = audit.figures(values, own[a:b])
            return None if found is None else audit.judge(found, reference, share)

        verdicts = {i: judge(i, values, rnd.figures.get(i)) for i, values in list(rnd.values.items()) if i != me}
        return judge, {i: reason for i, reason in verdicts.items() if reason is not None}

    @staticmethod
    def _own_contribution(part: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Our part as the reducer adds it: exact. It never crosses the network, so the codec would only add error
        (and an encode and a decode of CPU) to it; the average is still encoded once and decoded alike everywhere."""
        if not all_finite(part):  # the caller checks first; a non-finite value must never reach an average
            raise ValueError("our own contribution to the all-reduce is not finite")
        if residual is not None:
            residual.zero_()  # nothing of it was lost
        return part

    async def _own_result(self, rnd: _Round, own: torch.Tensor) -> None:
        # Shielded: cancelling this task must not cancel the result that the handlers still serve to the others.
        payload = (await asyncio.shield(rnd.result)).raw
        values = await self._decode_part(rnd, rnd.group.my_index, payload, own)
        rnd.payloads[rnd.group.my_index], rnd.values[rnd.group.my_index] = payload, values

    async def _decode_part(self, rnd: _Round, index: int, payload, own: torch.Tensor) -> torch.Tensor:
        """Decode averaged part `index` into its place in the output; robust, also take its audit figures against
        `own`, our contribution to it as it is judged (swarm.audit), while decoding. CodecError if it does not
        decode."""
        lo, hi = rnd.bounds[index]
        if not self.robust:
            return await _maybe_in_thread(self.codec.decode_into, payload, rnd.output[lo:hi])
        decode = audit.decode_with_figures
        values, rnd.figures[index] = await _maybe_in_thread(decode, self.codec, payload, rnd.output[lo:hi], own)
        return values

    async def _exchange(
        self,
        group: Group,
        index: int,
        rnd: _Round,
        part: torch.Tensor,
        weight: float,
        residual: torch.Tensor | None,
        judged: torch.Tensor,
    ) -> None:
        """Send our contribution `part` to member `index` and receive the averaged part it reduced, judged against
        `judged` (`part` itself, or what all_reduce was given to judge by)."""
        peer: PeerID = group.peer_ids[index]
        payload = await _maybe_in_thread(self.codec.encode, part)
        if residual is not None:
            sent = await _maybe_in_thread(self.codec.decode, payload, part.numel())
            torch.sub(part, sent, out=residual)
        writer = None
        try:
            reader, writer = await self._open(group, index)
            header = {
                "type": "part",
                "group_id": group.group_id,
                "sender": group.my_index,
                "weight": weight,
                "numel": part.numel(),
                "codec": self.codec.tag,
            }
            await write_frame(writer, header, await pack(payload) if self.coding.active else payload, rnd.counter)
            reply, averaged = await read_frame(reader, rnd.counter)
        except direct.NotAMember as e:
            raise _MemberLost(index, f"{peer} is not averaging in this group (it never learned of it)") from e
        except _LOST as e:
            raise _MemberLost(index, f"lost contact with {peer}: {e!r}") from e
        except ProtocolError as e:
            raise _MemberLost(index, f"{peer} broke the protocol: {e}") from e
        except BaseException:
            if writer is not None:
                close_writer(writer)
            raise
        try:
            if reply.get("type") == "not-a-member":
                # It never learned of this group (see _serve_part): lost to this round, alive for the next.
                raise _MemberLost(index, f"{peer} is not averaging in this group (it never learned of it)")
            if reply.get("type") != "averaged":
                # The member is alive but its reduction failed (e.g. it lost someone else): not a suspect.
                raise AllReduceError(f"member {index} ({peer}) could not reduce its part: {reply.get('reason')}")
            try:
                values = await self._decode_part(rnd, index, averaged, judged)
            except CodecError as e:
                raise self._garbage(index, peer, f"an averaged part we cannot decode ({e})") from e
            if not self.codec.decodes_finite and not all_finite(values):
                raise self._garbage(index, peer, "a non-finite averaged part")
            rnd.payloads[index], rnd.values[index] = averaged, values
            # Acknowledge: the reducer may shut down once every member has its part, and not before. We hold the
            # part already, so a reducer that vanished right after sending it costs us nothing.
            with contextlib.suppress(Exception):
                await write_frame(writer, {"type": "ack"}, counter=rnd.counter)
        finally:
            close_writer(writer)

    def _garbage(self, index: int, peer: PeerID, what: str) -> _MemberLost:
        """A reducer sent `what`: a suspect of this round, and caught where reducers are robust (a robust reduction
        of finite contributions is finite and decodes; a plain one may not be, when someone else sent garbage)."""
        if self.robust:
            self._catch(peer, f"it sent back {what}")
        return _MemberLost(index, f"{peer} sent back {what}")

    async def _open(self, group: Group, index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to member `index`: direct if it announced endpoints we can reach, else relayed by the daemons."""
        peer = group.peer_ids[index]
        endpoints = group.direct.get(peer)
        key = group.keys.get(peer)
        if group.secret and endpoints and key and self._direct is not None and peer not in self._unreachable:
            try:
                secret = self.node.access.direct_secret(self.direct_key.pair_secret(group.secret, key))
                opened = await direct.connect(
                    endpoints, group.group_id, group.my_index, index, secret, min(5.0, self.timeout_seconds), key
                )
                self.streams["direct"] += 1
                return opened
            except direct.NotAMember:
                raise  # it answered: reachable, just not in this group
            except (ConnectionError, OSError, ValueError) as e:  # ValueError: a key no secret can be made with
                self._unreachable.add(peer)  # behind a NAT or a firewall: no use trying every round
                logger.info(f"cannot reach {peer} directly ({e}); its all-reduce bytes go through the p2p daemons")
        reader, writer = await self.node.open_stream(peer, self._protocol)
        self.streams["relayed"] += 1
        return reader, writer

    async def _reduce(self, rnd: _Round) -> None:
        try:
            await rnd.complete.wait()
            # The sum is built where our averaged part will land: it is encoded before anyone decodes over it.
            lo, hi = rnd.bounds[rnd.group.my_index]
            if self.robust:
                acc = await self._robust_mean(rnd, rnd.output[lo:hi])
            else:
                acc = await _maybe_in_thread(self._weighted_mean, rnd.contributions, rnd.output[lo:hi])
            rnd.contributions.clear()  # summed: only their weights are needed from here on
            payload = await _maybe_in_thread(self.codec.encode, acc)
            # Coded once, whichever members it goes to (each decodes it to the same raw bytes).
            packed = await pack(payload) if self.coding.active else Packed(payload)
            if not rnd.result.done():
                rnd.result.set_result(packed)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            rnd.fail(f"reduction failed: {e!r}")

    def _weighted_mean(self, contributions: dict, acc: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        """Σ w_i x_i / Σ w_i in member order (the same float sums on any machine with the same kernels).

        A contribution is a decoded tensor, or a payload the codec checked and adds straight from its bytes.
        `weights` replaces the declared weights (the robust ones); a weight of 0 leaves its contribution out."""
        order, alphas = self._alphas(contributions, weights)
        # Left out: weight 0 (refused contributions hold no values, dropped ones add nothing).
        alphas, values = zip(*[(alpha, contributions[i][1]) for i, alpha in zip(order, alphas) if alpha != 0])
        if reduce_pass(self.codec, values, acc.numel(), alphas, acc, with_gram=False)[1]:
            return acc  # one native pass over every contribution
        acc.zero_()
        for alpha, x in zip(alphas, values):
            if isinstance(x, torch.Tensor):
                acc.add_(x, alpha=alpha)
            else:
                self.codec.accumulate(x, acc, alpha)
        return acc

    @staticmethod
    def _alphas(contributions: dict, weights: dict | None = None) -> tuple[list[int], list[float]]:
        """(members in order, the factor w_i / Σ w of each contribution): the declared weights, or `weights`."""
        order = sorted(contributions)
        if weights is None:
            weights = {i: contributions[i][0] for i in order}
        total = sum(weights[i] for i in order)
        if not total > 0:
            raise ValueError("no contribution left to average")
        return order, [weights[i] / total for i in order]

    async def _robust_mean(self, rnd: _Round, acc: torch.Tensor) -> torch.Tensor:
        """The robust mean of our part (see swarm.robust), written into `acc`; names the members caught.

        The plain sum is taken with the judging (in the same native pass over the contributions for int8, else side
        by side), and when the judging finds nobody out of line (and no weight to bound) it is the answer, bit for
        bit what the plain reduction returns. Otherwise the sum is taken again with the weights the judging gave."""
        contributions = rnd.contributions
        plain = None
        if not sums_in_pass(self.codec):  # the judging only reads the contributions: the sum runs on another core
            plain = asyncio.ensure_future(_maybe_in_thread(self._weighted_mean, contributions, acc))
        try:
            weights, caught, summed = await _maybe_in_thread(self._judge, contributions, acc)
        finally:
            if plain is not None:
                await asyncio.wait([plain])  # it writes `acc`: nothing else may until it is done
        summed = summed or (plain is not None and plain.exception() is None)
        for i, reason in caught.items():
            if i != rnd.group.my_index:  # our own exact part is never garbage; we may be the minority
                self._catch(rnd.group.peer_ids[i], reason)
        if all(weights[i] == contributions[i][0] for i in contributions):
            return acc if summed else await _maybe_in_thread(self._weighted_mean, contributions, acc)
        return await _maybe_in_thread(self._weighted_mean, contributions, acc, weights)

    def _judge(self, contributions: dict, acc: torch.Tensor) -> tuple[dict[int, float], dict[int, str], bool]:
        """(the weight to sum each contribution with, the contributions caught as garbage with the reason, whether the
        plain mean is in `acc` already).

        Bounding the weights needs no values. Judging the values needs their Gram matrix, one pass over them as they
        are held (see swarm.robust.reduce_pass, which takes the plain sum in the same pass where it can), and only
        where there are three or more to judge."""
        order, alphas = self._alphas(contributions)
        bounded, lied = bound_weights([contributions[i][0] for i in order])
        caught = {order[j]: reason for j, reason in lied.items()}
        live = [j for j, w in enumerate(bounded) if w > 0]
        weights = dict(zip(order, bounded))
        if len(live) < 3:
            return weights, caught, False
        # The pass takes the plain sum too, so it reads every contribution that has values (refused ones have none).
        held = [j for j, i in enumerate(order) if contributions[i][0] > 0]
        values = [contributions[order[j]][1] for j in held]
        g, summed = reduce_pass(self.codec, values, acc.numel(), [alphas[j] for j in held], acc)
        rows = [held.index(j) for j in live]
        verdict = robust_weights(g[rows][:, rows], [bounded[j] for j in live])
        weights.update((order[j], w) for j, w in zip(live, verdict.weights))
        caught.update({order[live[j]]: reason for j, reason in verdict.caught.items()})
        return weights, caught, summed

    def _catch(self, peer: PeerID, reason: str) -> None:
        """Record a member caught sending garbage; the log names it."""
        self.caught[peer] = reason
        logger.warning(f"caught {peer} sending garbage to the all-reduce of run {self.run_id}: {reason}")

    # ---- serving other members: contributions to our part, and averaged parts they missed ------------------------

    async def _handle_direct(self, group_id: bytes, sender: int, mac: bytes, reader, writer) -> None:
        """A direct connection that introduced itself as member `sender` of group `group_id`: check, then serve."""
        # Its sender may have left matchmaking a moment before us; an unknown group is not kept for long. Until we
        # know it, the sender hears that we are here (and who: our key), then whether we ever learned of it, as a
        # relayed part does (_serve_part).
        rnd = self._round(group_id)
        if not rnd.configured.is_set():
            await write_frame(writer, {"type": "pending", "key": self.direct_key.public})
            try:
                await asyncio.wait_for(rnd.configured.wait(), min(HELLO_TIMEOUT, self.timeout_seconds))
            except asyncio.TimeoutError:
                logger.info(f"member {sender} of group {group_id.hex()}, which this peer is not averaging in, called")
                await write_frame(writer, {"type": "not-a-member", "group_id": group_id})
                return
        group = rnd.group
        if not group.secret or not 0 <= sender < group.size or sender == group.my_index:
            raise ProtocolError(f"no direct data plane in group {group_id.hex()} for member {sender}")
        key = group.keys.get(group.peer_ids[sender])
        if not key:
            raise ProtocolError(f"member {sender} of group {group_id.hex()} announced no direct key")
        # Only that member and we can compute this secret: the connection proves who opened it.
        try:
            secret = self.node.access.direct_secret(self.direct_key.pair_secret(group.secret, key))
        except ValueError as e:
            raise ProtocolError(f"member {sender} announced an unusable direct key: {e}") from None
        if not hmac.compare_digest(mac, direct.group_mac(secret, group_id, sender, group.my_index)):
            raise ProtocolError(f"direct connection for group {group_id.hex()} failed authentication")
        await write_frame(writer, {"type": "welcome"})
        await self._serve(group.peer_ids[sender], reader, writer)

    async def _handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(stream_info.peer_id, reader, writer)

    async def _serve(self, peer: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        incoming = ByteCounter()
        try:
            header, payload = await asyncio.wait_for(read_frame(reader, incoming), self.timeout_seconds)
            if header.get("type") == "fetch":
                await self._serve_fetch(peer, header, writer)
            else:
                await self._serve_part(peer, header, payload, incoming.received, reader, writer)
        except (ProtocolError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            logger.debug(f"bad request from {peer}: {e!r}")
            with contextlib.suppress(Exception):
                await write_frame(writer, {"type": "error", "reason": f"malformed request: {e}"})
        except Exception as e:
            logger.debug(f"reduce stream from {peer} failed: {e!r}")
        finally:
            close_writer(writer)

    async def _serve_fetch(self, peer: PeerID, header: dict, writer: asyncio.StreamWriter) -> None:
        group_id = require(header, "group_id", bytes)
        wanted = require(header, "parts", list)
        rnd = self._rounds.get(group_id)
        if rnd is None or rnd.group is None or peer not in rnd.group.peer_ids:
            await write_frame(writer, {"type": "parts", "indices": []})
            return
        if not all(isinstance(i, int) for i in wanted):
            raise ProtocolError("part indices must be integers")
        if not all(i in rnd.payloads for i in wanted):
            # We may still be receiving them: answer once our own attempt is over.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(rnd.settled.wait(), self.timeout_seconds)
        have = [i for i in dict.fromkeys(wanted) if i in rnd.payloads]
        await write_frame(writer, {"type": "parts", "indices": have})
        for i in have:
            await write_frame(writer, {"type": "part", "index": i}, rnd.payloads[i])

    async def _serve_part(self, peer, header, payload, nbytes: int, reader, writer) -> None:
        rnd = None
        try:
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
            # The sender may have left matchmaking a moment before us: wait until we know the group, but not for the
            # whole round. A leader cannot know that a follower got the group it sent (the follower may have given
            # up on it a moment before): such a "member" never joins, and its reducers must not wait out the round's
            # bound for it while it averages elsewhere or alone.
            try:
                await asyncio.wait_for(rnd.configured.wait(), min(HELLO_TIMEOUT, self.timeout_seconds))
            except asyncio.TimeoutError:
                logger.info(f"{peer} sent a part for group {group_id.hex()}, which this peer is not averaging in")
                with contextlib.suppress(Exception):
                    await write_frame(writer, {"type": "not-a-member", "group_id": group_id})
                return
            group = rnd.group
            if not 0 <= sender < group.size or group.peer_ids[sender] != peer:
                raise ProtocolError(f"{peer} is not member {sender} of group {group_id.hex()}")
            if numel != rnd.part_numel:
                raise ProtocolError(f"part has {numel} values, expected {rnd.part_numel}")
            rnd.counter.received += nbytes
            # Checked before it counts; codecs that can check without decoding keep the bytes until the reduction.
            try:
                values = await _maybe_in_thread(self.codec.check_finite, payload, numel)
            except CodecError as e:
                if not self.robust:
                    raise
                # A member, speaking the protocol, sent values nobody can use: it counts for nothing, and the
                # round goes on for everyone else (it still gets the average, so the whole group stays identical).
                self._catch(peer, f"undecodable or non-finite contribution ({e})")
                rnd.add(sender, 0.0, None)
            else:
                rnd.add(sender, weight, payload if values is None else values)
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
                await write_frame(writer, {"type": "error", "reason": f"round failed: {e}"})
