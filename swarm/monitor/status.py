"""Status records: what each peer tells the world about its progress, in the DHT, for dashboards and operators.

- `{run}.status`: one subkey per peer: its latest figures and its recent history (outer step, loss, held-out loss),
  so a dashboard that starts late, or misses a poll, still draws the whole recent curve.
- `_swarm.runs`: one subkey per run that has peers, so a bootstrap node can show runs nobody named on its command
  line. A run id never starts with "_", so this key cannot collide with a run's own records.

These records are for people, not for training: nothing in training reads them. They are parsed as strictly as the
run's other records (swarm.records) because anyone can write to the DHT.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

from hivemind.utils import get_dht_time

from swarm import records

logger = logging.getLogger(__name__)

RUNS_KEY = "_swarm.runs"
HISTORY_LENGTH = 64
"""Outer steps of history a status record carries (a few KB per peer)."""
STATUS_TTL_SECONDS = 3600.0
"""A status outlives its peer by this long, so a dashboard can still show who trained and when they left."""
_MAX_TEXT = 64


def status_key(run_id: str) -> str:
    return f"{run_id}.status"


@dataclass
class PeerStatus:
    """A peer's figures after its latest outer step. Field units are in their names."""

    outer_step: int
    loss: float | None
    eval_loss: float | None
    tokens_per_second: float
    tokens_total: int
    sent_bytes: int
    received_bytes: int
    group_size: int
    direct_streams: int
    """Contributions this peer sent over direct TCP connections so far; with relayed_streams: how it is reached."""
    relayed_streams: int
    version: str
    workers: int
    time: float
    """DHT time of the record."""
    history: list[list] = field(default_factory=list)
    """[outer_step, loss or None, eval_loss or None, tokens_total] per recent outer step, oldest first."""

    def to_value(self) -> dict:
        return asdict(self)


def _number(value, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _history(value) -> list[list] | None:
    if not isinstance(value, list) or len(value) > HISTORY_LENGTH:
        return None
    out = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 4):
            return None
        step, loss, eval_loss, tokens = item
        if not (_count(step) and _number(loss, True) and _number(eval_loss, True) and _count(tokens)):
            return None
        out.append([step, loss, eval_loss, tokens])
    return out


def parse_status(value) -> PeerStatus | None:
    """A PeerStatus from a DHT value, or None if anything in it is malformed."""
    if not isinstance(value, dict):
        return None
    counts = ("outer_step", "tokens_total", "sent_bytes", "received_bytes", "group_size", "direct_streams",
              "relayed_streams", "workers")  # fmt: skip
    if not all(_count(value.get(name)) for name in counts):
        return None
    if not (_number(value.get("loss"), True) and _number(value.get("eval_loss"), True)):
        return None
    if not (_number(value.get("tokens_per_second")) and value["tokens_per_second"] >= 0 and _number(value.get("time"))):
        return None
    history = _history(value.get("history", []))
    version = value.get("version")
    if history is None or not isinstance(version, str) or len(version) > _MAX_TEXT:
        return None
    return PeerStatus(
        outer_step=value["outer_step"],
        loss=value["loss"],
        eval_loss=value["eval_loss"],
        tokens_per_second=float(value["tokens_per_second"]),
        tokens_total=value["tokens_total"],
        sent_bytes=value["sent_bytes"],
        received_bytes=value["received_bytes"],
        group_size=value["group_size"],
        direct_streams=value["direct_streams"],
        relayed_streams=value["relayed_streams"],
        version=version,
        workers=value["workers"],
        time=float(value["time"]),
        history=history,
    )


def parse_statuses(found) -> dict[str, PeerStatus]:
    """Statuses by base58 peer id from a DHT `get` result; malformed ones dropped with a debug log."""
    out = {}
    if found is None or not isinstance(found.value, dict):
        return out
    for subkey, item in found.value.items():
        peer = records._subkey_peer(subkey)
        status = parse_status(item.value)
        if peer is None or status is None:
            logger.debug(f"dropping malformed status {subkey!r}")
            continue
        out[peer.to_base58()] = status
    return out


def parse_runs(found) -> list[str]:
    """Run ids listed under RUNS_KEY that are valid run ids."""
    if found is None or not isinstance(found.value, dict):
        return []
    out = []
    for subkey in found.value:
        try:
            out.append(records.validate_run_id(subkey))
        except ValueError:
            logger.debug(f"dropping malformed run name {subkey!r}")
    return sorted(out)


async def publish(dht, peer_id: str, run_id: str, status: PeerStatus) -> None:
    """Store our status and list our run; both expire unless renewed, so departed peers fade away."""
    now = get_dht_time()
    await dht.store(status_key(run_id), status.to_value(), now + STATUS_TTL_SECONDS, subkey=peer_id)
    await dht.store(RUNS_KEY, {"time": now}, now + STATUS_TTL_SECONDS, subkey=run_id)
