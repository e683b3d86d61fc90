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
import collections
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.p2p import PeerID

from swarm import records
from swarm.flat import flatten
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

    def sha256(self) -> str:
        return hashlib.sha256(_bytes(self.params)).hexdigest()


def _bytes(flat: torch.Tensor) -> bytes:
    return flat.numpy().astype("<f4", copy=False).tobytes()


def _chunk_payload(state: RunState, index: int, chunk: int) -> bytes:
    lo, hi = index * chunk, min((index + 1) * chunk, state.params.numel())
    payload = _bytes(state.params[lo:hi])
    if state.momentum is not None:
        payload += _bytes(state.momentum[lo:hi])
    return payload


class StateServer:
    """Serves this peer's current state to peers of the same run that ask for it."""

    KEEP_SECONDS = 30.0
    """How long a state that was served stays available after the peer moved on (for transfers in flight)."""

    def __init__(self, node: SwarmNode, run_id: str, schema: str, snapshot: Callable[[], RunState]):
        self.node, self.schema, self._snapshot = node, schema, snapshot
        self.protocol = f"swarm/{run_id}/state/2"
        self._manifests: dict[tuple[int, int, int], dict] = {}
        # Step -> (state, last time served). A transfer that takes longer than an outer step still completes:
        # the state it started on stays here (at most one besides the current one) while it is being fetched.
        self._served: dict[int, tuple[RunState, float]] = {}

    def _state_for(self, step: int | None) -> RunState | None:
        """The current state (step None or equal), or a recently served one of that step."""
        now = time.monotonic()
        current = self._snapshot()
        self._served = {s: (state, used) for s, (state, used) in self._served.items() if now - used < self.KEEP_SECONDS}
        if step is None or step == current.outer_step:
            self._served = {s: v for s, v in self._served.items() if s != current.outer_step}
            older = sorted(self._served)[-1:]  # at most one older state kept
            self._served = {s: self._served[s] for s in older}
            self._served[current.outer_step] = (current, now)
            return current
        if step in self._served:
            state, _ = self._served[step]
            self._served[step] = (state, now)
            return state
        return None

    async def start(self) -> None:
        await self.node.add_stream_handler(self.protocol, self._handle)

    async def close(self) -> None:
        try:
            await self.node.remove_stream_handler(self.protocol)
        except Exception as e:  # the daemon may already be gone
            logger.debug(f"removing the state handler failed: {e!r}")

    def _manifest(self, state: RunState, chunk: int) -> dict:
        key = (state.outer_step, id(state), chunk)
        if key not in self._manifests:
            n_chunks = -(-state.params.numel() // chunk)
            self._manifests = {key: {
                "type": "manifest",
                "step": state.outer_step,
                "params_sha256": state.sha256(),
                "numel": state.params.numel(),
                "has_momentum": state.momentum is not None,
                "chunk_sha256": [hashlib.sha256(_chunk_payload(state, i, chunk)).hexdigest() for i in range(n_chunks)],
            }}  # fmt: skip
        return self._manifests[key]

    async def _handle(self, stream_info, reader, writer) -> None:
        try:
            request, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), 10)
            chunk = require(request, "chunk", int)
            if request.get("schema") != self.schema or chunk <= 0:
                await write_frame(writer, {"type": "error", "reason": "incompatible schema or bad request"})
                return
            # The snapshot is consistent: the outer step changes θ only between awaits, never during this copy.
            if request.get("type") == "manifest":
                await write_frame(writer, self._manifest(self._state_for(None), chunk))
            elif request.get("type") == "chunk":
                index = require(request, "index", int)
                step = request.get("step")
                state = self._state_for(step) if isinstance(step, int) else None
                if state is None:
                    current = self._snapshot().outer_step
                    await write_frame(writer, {"type": "error", "reason": f"this peer is at step {current}"})
                    return
                if not 0 <= index * chunk < max(state.params.numel(), 1):
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
        if state is not None and state.sha256() == digest:
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
    params = torch.from_numpy(buffer[:numel].copy())
    momentum = torch.from_numpy(buffer[numel:].copy()) if has_momentum else None
    if not bool(torch.isfinite(params).all()) or (momentum is not None and not bool(torch.isfinite(momentum).all())):
        raise ProtocolError("state holds NaN or inf")
    return RunState(step, params, momentum)


async def majority_hash(node: SwarmNode, run_id: str, outer_step: int) -> str | None:
    """The θ hash most peers published for `outer_step`, if any did."""
    found = await node.dht.get(records.hash_key(run_id, outer_step), latest=True)
    counts = collections.Counter(records.parse_hashes(found).values())
    return counts.most_common(1)[0][0] if counts else None


def snapshot_of(outer_step: int, params, momentum) -> RunState:
    return RunState(outer_step, flatten(params), None if momentum is None else flatten(momentum))
