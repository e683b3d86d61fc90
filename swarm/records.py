"""What peers of one run publish in the DHT, and how each record is checked when read back.

Three kinds of records, all keyed by the run id so runs sharing a DHT never see each other:
- `{run}.peers`: one subkey per live peer (a heartbeat): its outer step and schema. Expires unless renewed.
- `{run}.step{t}`: one subkey per peer that finished its inner loop of outer step t and is looking for a group.
- `{run}.hash{t}`: one subkey per peer: the hash of its global parameters after outer step t.

Anything else found under those keys (garbage, another schema, wrong types) is dropped with a debug log; the DHT is
open to anyone, so nothing read from it is trusted further than these checks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
"""2: all-reduce payloads may travel Huffman coded (swarm.entropy), which a peer of protocol 1 would misread."""
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}(\.shard[0-9]{1,4}of[0-9]{1,4})?$")


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run id {run_id!r} is invalid: use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return run_id


def validate_namespace(namespace: str) -> str:
    """A run id, or a run id with `.shard{i}of{n}`: where worker i of peers sharded over n workers meet."""
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace {namespace!r} is invalid: a run id, optionally followed by .shard<i>of<n>")
    return namespace


def shard_namespace(run_id: str, index: int, count: int) -> str:
    """Worker 0 of a sharded peer lives in the run itself (it matchmakes for the peer); the others in their own."""
    return run_id if index == 0 else f"{run_id}.shard{index}of{count}"


def schema_hash(run_id: str, shapes: Sequence[Sequence[int]], codec_tag: str, layout: str = "", outer: str = "") -> str:
    """What two peers must share to average together: protocol, run, parameter layout, wire codec, worker layout and
    outer optimizer settings (members apply the same average: with other settings their θ would part at once)."""
    h = hashlib.sha256()
    h.update(f"swarm-protocol/{PROTOCOL_VERSION}\0{run_id}\0{codec_tag}\0{layout}\0{outer}\0".encode())
    for shape in shapes:
        h.update((",".join(str(int(s)) for s in shape) + ";").encode())
    return h.hexdigest()[:32]


def describe_schema(shapes: Sequence[Sequence[int]], codec_tag: str, layout: str = "", outer: str = "") -> str:
    numel = sum(math.prod(shape) for shape in shapes)
    about = f"protocol {PROTOCOL_VERSION}, codec {codec_tag}, {numel:,} parameters in {len(shapes)} tensors"
    about = f"{about}, {layout}" if layout else f"{about}, one worker"
    return f"{about}, {outer}" if outer else about


def row_digests(tensor: torch.Tensor) -> bytes:
    """sha256 of each row (index along dim 0) of a tensor's float32 little-endian bytes, concatenated.

    FSDP shards parameters along dim 0, so every worker can hash its own rows: the digests of the full tensor are
    the workers' digests concatenated in worker order, whatever the number of workers.
    """
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    rows = data.reshape(1, 1) if data.dim() == 0 else data.reshape(data.shape[0], math.prod(data.shape[1:]))
    array = rows.numpy().astype("<f4", copy=False)
    return b"".join(hashlib.sha256(row.tobytes()).digest() for row in array)


def theta_sha256(per_tensor_rows: Sequence[bytes]) -> str:
    """Hash of a full θ from the row digests of each of its tensors (see row_digests): a two-level Merkle hash.

    It does not depend on how θ is sharded over a peer's workers, so peers of any layout can compare it.
    """
    h = hashlib.sha256()
    for rows in per_tensor_rows:
        h.update(hashlib.sha256(rows).digest())
    return h.hexdigest()


def params_sha256(tensors: Sequence[torch.Tensor]) -> str:
    """Hash of parameters as float32 little-endian bytes in order: equal parameters give equal hashes anywhere."""
    h = hashlib.sha256()
    for t in tensors:
        data = t.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        h.update(data.numpy().astype("<f4", copy=False))  # the buffer itself: no bytes copy of θ
    return h.hexdigest()


def peers_key(run_id: str) -> str:
    return f"{run_id}.peers"


def step_key(run_id: str, outer_step: int) -> str:
    return f"{run_id}.step{outer_step}"


def hash_key(run_id: str, outer_step: int) -> str:
    return f"{run_id}.hash{outer_step}"


@dataclass(frozen=True)
class Heartbeat:
    peer_id: PeerID
    outer_step: int
    schema: str
    expiration: float
    about: str = ""
    """What the schema stands for, in words (codec, parameter count): for messages about incompatible peers."""

    def to_value(self) -> dict:
        return {"step": self.outer_step, "schema": self.schema, "about": self.about}


@dataclass(frozen=True)
class Declaration:
    """A peer's statement that it is looking for a group for one outer step, until `deadline` (DHT time)."""

    peer_id: PeerID
    schema: str
    deadline: float
    looking: bool

    def to_value(self) -> dict:
        return {"schema": self.schema, "deadline": self.deadline, "looking": self.looking}


def _subkey_peer(subkey) -> PeerID | None:
    try:
        return PeerID(subkey) if isinstance(subkey, bytes) else PeerID.from_base58(subkey)
    except Exception:
        return None


def parse_heartbeats(found) -> list[Heartbeat]:
    """Heartbeats from a DHT `get` result (a ValueWithExpiration holding a dict of subkeys), malformed ones dropped."""
    out = []
    for subkey, item in _subkey_items(found):
        peer, value = _subkey_peer(subkey), item.value
        if peer is None or not isinstance(value, dict):
            logger.debug(f"dropping malformed heartbeat {subkey!r}: {value!r}")
            continue
        step, schema = value.get("step"), value.get("schema")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(schema, str):
            logger.debug(f"dropping malformed heartbeat of {peer}: {value!r}")
            continue
        about = value.get("about") if isinstance(value.get("about"), str) else ""
        out.append(Heartbeat(peer, step, schema, item.expiration_time, about[:200]))
    return out


def parse_declarations(found) -> list[Declaration]:
    out = []
    for subkey, item in _subkey_items(found):
        peer, value = _subkey_peer(subkey), item.value
        if peer is None or not isinstance(value, dict):
            logger.debug(f"dropping malformed declaration {subkey!r}: {value!r}")
            continue
        schema, deadline, looking = value.get("schema"), value.get("deadline"), value.get("looking")
        if not isinstance(schema, str) or not isinstance(deadline, (int, float)) or not isinstance(looking, bool):
            logger.debug(f"dropping malformed declaration of {peer}: {value!r}")
            continue
        out.append(Declaration(peer, schema, float(deadline), looking))
    return out


def parse_hashes(found) -> dict[PeerID, str]:
    out = {}
    for subkey, item in _subkey_items(found):
        peer, value = _subkey_peer(subkey), item.value
        if peer is not None and isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
            out[peer] = value
    return out


def _subkey_items(found):
    if found is None or not isinstance(found.value, dict):
        return []
    return list(found.value.items())
