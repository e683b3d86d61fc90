"""Handing the run's current state to a peer that is behind: θ, the outer momentum and the outer-step index.

The receiver first asks every candidate donor for a manifest: outer step, the hash of θ, and one hash per chunk.
Donors that agree on the newest (step, hash) form the source; chunks are then fetched from all of them at once, each
chunk checked against its hash on arrival. A donor that dies, stalls, moves on to another step or sends a bad chunk
is dropped and its chunks go to the others; the assembled θ is checked against the full hash at the end.

Protocol (one stream per request, frames from `swarm.wire`):
  receiver -> donor: {"type": "manifest", "schema": s, "chunk": n}
  donor -> receiver: {"type": "manifest", "step": t, "params_sha256": h, "numel": N, "has_momentum": b,
                      "chunk_sha256": [h0, h1, ...]}
  receiver -> donor: {"type": "chunk", "schema": s, "chunk": n, "index": i, "step": t}
  donor -> receiver: {"type": "chunk", "step": t, "index": i} + θ[i*n:(i+1)*n] (+ momentum[i*n:(i+1)*n]) as fp32
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.p2p import PeerID

from swarm import records
from swarm.flat import all_finite, flatten
from swarm.node import SwarmNode
from swarm.wire import ProtocolError, close_writer, read_frame, require, write_frame

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_VALUES = 1 << 20  # 4 MB of θ (plus 4 MB of momentum) per request


@dataclass
class RunState:
    outer_step: int
    params: torch.Tensor
    """θ, flat float32."""
    momentum: torch.Tensor | None
    """Outer Nesterov momentum, flat float32; None before the run's first outer step."""
    holders: tuple = ()
    """Peers of the run known to hold this state (set by whoever found the donors): the group a newcomer would have
    averaged with."""

    def sha256(self) -> str:
        return hashlib.sha256(self.params.numpy().astype("<f4", copy=False)).hexdigest()  # the buffer, no copy

    @property
    def numel(self) -> int:
        return self.params.numel()

    @property
    def key(self) -> tuple:
        return (self.outer_step, id(self))

    def payload(self, lo: int, hi: int) -> bytes:
        """θ[lo:hi], then the momentum's [lo:hi] if there is one, as little-endian fp32."""
        payload = _bytes(self.params[lo:hi])
        if self.momentum is not None:
            payload += _bytes(self.momentum[lo:hi])
        return payload


class StateView:
    """The state a peer holds right now, read in place: θ and the momentum as the swarm's own tensors, no copy.

    A flat copy of θ and the momentum per state served cost a donor 8 bytes per parameter: for a model of hundreds of
    millions of parameters, gigabytes more at the moment a newcomer arrives. Reading in place needs the holder to say
    when the tensors change (`version`, and `changing` while an outer step writes them in another thread): chunks of
    a state that changed are refused, and the receiver takes them from another donor or starts over."""

    def __init__(
        self,
        outer_step: int,
        version: int,
        params: Sequence[torch.Tensor],
        momentum: Sequence[torch.Tensor] | None,
        changing: bool = False,
    ):
        self.outer_step, self.version, self.changing = outer_step, version, changing
        self.params, self.momentum = list(params), None if momentum is None else list(momentum)
        self._ends = []
        total = 0
        for p in self.params:
            total += p.numel()
            self._ends.append(total)

    @property
    def numel(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def key(self) -> tuple:
        return (self.outer_step, self.version)

    def _read(self, tensors: Sequence[torch.Tensor], lo: int, hi: int) -> bytes:
        out, i = [], bisect.bisect_right(self._ends, lo)
        while lo < hi:
            start = self._ends[i] - tensors[i].numel()
            stop = min(hi, self._ends[i])
            out.append(_bytes(tensors[i].detach().reshape(-1)[lo - start : stop - start]))
            lo, i = stop, i + 1
        return b"".join(out)

    def payload(self, lo: int, hi: int) -> bytes:
        payload = self._read(self.params, lo, hi)
        if self.momentum is not None:
            payload += self._read(self.momentum, lo, hi)
        return payload

    def sha256(self) -> str:
        return records.params_sha256(self.params)

    def copy(self) -> RunState:
        """A flat copy that no longer changes with the peer's state."""
        return snapshot_of(self.outer_step, self.params, self.momentum)


def _bytes(flat: torch.Tensor) -> bytes:
    return flat.numpy().astype("<f4", copy=False).tobytes()


def _chunk_payload(state: RunState | StateView, index: int, chunk: int) -> bytes:
    lo, hi = index * chunk, min((index + 1) * chunk, state.numel)
    return state.payload(lo, hi)


class StateServer:
    """Serves this peer's current state to peers of the same run that ask for it, from its live tensors."""

    KEEP_SECONDS = 30.0
    """How long a state that changed under a transfer in flight stays available (when a copy of it is small)."""

    def __init__(
        self,
        node: SwarmNode,
        run_id: str,
        schema: str,
        snapshot: Callable[[], StateView],
        keep_copy_max_bytes: int = 256 << 20,
    ):
        """`snapshot()` returns the peer's state as it is now. `keep_copy_max_bytes` bounds the copy made of a
        state about to change while a transfer of it may be in flight (see `before_change`)."""
        self.node, self.schema, self._snapshot = node, schema, snapshot
        self.keep_copy_max_bytes = keep_copy_max_bytes
        self.protocol = f"swarm/{run_id}/state/2"
        self._manifests: dict[tuple, dict] = {}
        # Step -> (a copy of a state that changed while a transfer of it may have been in flight, last time served):
        # that transfer still completes. At most one, and only when small (keep_copy_max_bytes).
        self._kept: dict[int, tuple[RunState, float]] = {}
        self._last_served: tuple[tuple, float] | None = None  # key of the live state last served, and when
        self.archive: Callable[[int], RunState | StateView | None] | None = None
        """Reads this peer's state of an outer step without holding it in memory (a checkpoint file, mapped), or
        None; used for a state too large to copy when it changes under a transfer (see before_change)."""

    def before_change(self) -> None:
        """The peer is about to change its θ or momentum in place. If that state was served within KEEP_SECONDS (a
        transfer may be in flight), keep something to finish the transfer from: a copy when it costs at most
        `keep_copy_max_bytes`, else the state as `archive` reads it (e.g. from the peer's checkpoint of that step, in
        place). Without either, the transfer's next chunk request is refused and the receiver starts over from the
        new state."""
        now = time.monotonic()
        self._kept = {s: kept for s, kept in self._kept.items() if now - kept[1] < self.KEEP_SECONDS}
        current = self._snapshot()
        if (
            self._last_served is None
            or self._last_served[0] != current.key
            or now - self._last_served[1] > (self.KEEP_SECONDS)
        ):
            return
        if current.numel * (8 if current.momentum is not None else 4) <= self.keep_copy_max_bytes:
            self._kept = {current.outer_step: (current.copy(), now)}
            return
        kept = None if self.archive is None else self.archive(current.outer_step)
        if kept is None or kept.numel != current.numel or (kept.momentum is None) != (current.momentum is None):
            logger.debug(f"state of step {current.outer_step} changes under a transfer; too large to copy, no archive")
            return
        self._kept = {current.outer_step: (kept, now)}

    def _state_for(self, step: int | None) -> RunState | StateView | None:
        """The current state (step None or equal), or a kept copy of a state of that step; None while changing."""
        now = time.monotonic()
        current = self._snapshot()
        if (step is None or step == current.outer_step) and not current.changing:
            self._last_served = (current.key, now)
            return current
        if step in self._kept:
            state, _ = self._kept[step]
            self._kept[step] = (state, now)
            return state
        return None

    async def start(self) -> None:
        await self.node.add_stream_handler(self.protocol, self._handle)

    async def close(self) -> None:
        try:
            await self.node.remove_stream_handler(self.protocol)
        except Exception as e:  # the daemon may already be gone
            logger.debug(f"removing the state handler failed: {e!r}")

    async def _manifest(self, state: RunState | StateView, chunk: int) -> dict | None:
        """The manifest of `state`, hashed in a thread (seconds for a large model); None if it changed meanwhile."""
        key = (state.key, chunk)
        if key not in self._manifests:
            manifest = await asyncio.to_thread(_manifest_of, state, chunk)
            if self._snapshot().key != state.key or self._snapshot().changing:
                return None
            self._manifests = {key: manifest}
        return self._manifests[key]

    async def _handle(self, stream_info, reader, writer) -> None:
        try:
            request, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), 10)
            chunk = require(request, "chunk", int)
            if request.get("schema") != self.schema or chunk <= 0:
                await write_frame(writer, {"type": "error", "reason": "incompatible schema or bad request"})
                return
            # A chunk is read on the event loop, so no outer step starts during the read; one under way in a thread
            # marks the state as changing, and its chunks are refused until it is done.
            if request.get("type") == "manifest":
                state = self._state_for(None)
                manifest = None if state is None else await self._manifest(state, chunk)
                if manifest is None:
                    await write_frame(writer, {"type": "error", "reason": "this peer's state is changing"})
                    return
                await write_frame(writer, manifest)
            elif request.get("type") == "chunk":
                index = require(request, "index", int)
                step = request.get("step")
                state = self._state_for(step) if isinstance(step, int) else None
                if state is None:
                    current = self._snapshot().outer_step
                    await write_frame(writer, {"type": "error", "reason": f"this peer is at step {current}"})
                    return
                if not 0 <= index * chunk < max(state.numel, 1):
                    await write_frame(writer, {"type": "error", "reason": f"chunk {index} is out of range"})
                    return
                header = {"type": "chunk", "step": state.outer_step, "index": index}
                await write_frame(writer, header, _chunk_payload(state, index, chunk))
            else:
                await write_frame(writer, {"type": "error", "reason": "unknown request"})
        except Exception as e:
            logger.debug(f"serving state to {stream_info.peer_id} failed: {e!r}")
        finally:
            close_writer(writer)


def _manifest_of(state: RunState | StateView, chunk: int) -> dict:
    n_chunks = -(-state.numel // chunk)
    return {
        "type": "manifest",
        "step": state.outer_step,
        "params_sha256": state.sha256(),
        "numel": state.numel,
        "has_momentum": state.momentum is not None,
        "chunk_sha256": [hashlib.sha256(_chunk_payload(state, i, chunk)).hexdigest() for i in range(n_chunks)],
    }


async def _request(node, protocol, donor, message, max_payload, timeout) -> tuple[dict, bytes]:
    reader, writer = await asyncio.wait_for(node.open_stream(donor, protocol), timeout)
    try:
        await write_frame(writer, message)
        header, payload = await asyncio.wait_for(read_frame(reader, max_payload=max_payload), timeout)
    finally:
        close_writer(writer)
    if header.get("type") == "error":
        raise ProtocolError(f"donor refused: {header.get('reason')}")
    return header, payload


async def download_state(
    node: SwarmNode,
    protocol: str,
    schema: str,
    donors: list[PeerID],
    numel: int,
    accept: Callable[[int, str], Awaitable[bool]],
    timeout: float = 30.0,
    chunk: int = DEFAULT_CHUNK_VALUES,
) -> RunState | None:
    """The newest acceptable state that the donors agree on, fetched from all of them in parallel; None if none."""

    async def manifest(donor):
        header, _ = await _request(node, protocol, donor, {"type": "manifest", "schema": schema, "chunk": chunk}, 0,
                                   timeout)  # fmt: skip
        if require(header, "numel", int) != numel:
            raise ProtocolError("state has the wrong size for this model")
        hashes = require(header, "chunk_sha256", list)
        if len(hashes) != -(-numel // chunk):
            raise ProtocolError("manifest lists the wrong number of chunks")
        key = (
            require(header, "step", int),
            require(header, "params_sha256", str),
            require(header, "has_momentum", bool),
        )
        return key, tuple(hashes)

    answers = await asyncio.gather(*(manifest(d) for d in donors), return_exceptions=True)
    sources: dict[tuple, list[PeerID]] = collections.defaultdict(list)
    for donor, answer in zip(donors, answers):
        if isinstance(answer, BaseException):
            logger.debug(f"no manifest from {donor}: {answer!r}")
        else:
            sources[answer].append(donor)
    # Newest step first; among equals, the state most donors hold.
    for (key, hashes), holders in sorted(sources.items(), key=lambda kv: (-kv[0][0][0], -len(kv[1]))):
        step, digest, has_momentum = key
        if not await accept(step, digest):
            continue
        state = await _fetch_chunks(node, protocol, schema, holders, numel, step, has_momentum, hashes, chunk, timeout)
        if state is not None and await asyncio.to_thread(state.sha256) == digest:
            return state
        logger.warning(f"could not assemble the state of step {step} from {len(holders)} donors")
    return None


async def _fetch_chunks(node, protocol, schema, holders, numel, step, has_momentum, hashes, chunk, timeout):
    width = 2 if has_momentum else 1
    buffer = np.empty(width * numel, dtype=np.float32)
    pending: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(hashes)):
        pending.put_nowait(index)
    done = set()

    async def worker(donor):
        while len(done) < len(hashes):
            try:
                index = pending.get_nowait()
            except asyncio.QueueEmpty:
                if len(done) == len(hashes):
                    return
                await asyncio.sleep(0.05)  # chunks held by other workers may come back if those donors fail
                continue
            try:
                message = {"type": "chunk", "schema": schema, "chunk": chunk, "index": index, "step": step}
                header, payload = await _request(node, protocol, donor, message, 8 * chunk, timeout)
                if header.get("step") != step or header.get("index") != index:
                    raise ProtocolError(f"donor sent chunk {header.get('index')} of step {header.get('step')}")
                if hashlib.sha256(payload).hexdigest() != hashes[index]:
                    raise ProtocolError(f"chunk {index} does not match its hash")
                lo, hi = index * chunk, min((index + 1) * chunk, numel)
                values = np.frombuffer(payload, dtype="<f4")
                if len(values) != width * (hi - lo):
                    raise ProtocolError(f"chunk {index} has the wrong size")
                buffer[lo:hi] = values[: hi - lo]
                if has_momentum:
                    buffer[numel + lo : numel + hi] = values[hi - lo :]
                done.add(index)
            except Exception as e:
                pending.put_nowait(index)
                logger.warning(f"state donor {donor} failed on chunk {index} ({e!r}); the other donors take over")
                return

    await asyncio.gather(*(worker(d) for d in holders))
    if len(done) < len(hashes):
        return None

    def assemble() -> RunState:
        # Views of the one buffer, no copies; checked in a thread, as gigabytes take a while.
        params = torch.from_numpy(buffer[:numel])
        momentum = torch.from_numpy(buffer[numel:]) if has_momentum else None
        if not all_finite(params) or (momentum is not None and not all_finite(momentum)):
            raise ProtocolError("state holds NaN or inf")
        return RunState(step, params, momentum)

    return await asyncio.to_thread(assemble)


async def majority_hash(node: SwarmNode, run_id: str, outer_step: int) -> str | None:
    """The θ hash most peers published for `outer_step`, if any did."""
    found = await node.dht.get(records.hash_key(run_id, outer_step), latest=True)
    counts = collections.Counter(records.parse_hashes(found).values())
    return counts.most_common(1)[0][0] if counts else None


def snapshot_of(outer_step: int, params, momentum) -> RunState:
    return RunState(outer_step, flatten(params), None if momentum is None else flatten(momentum))
