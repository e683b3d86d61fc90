"""The view of a swarm that the dashboard, its JSON API and a bootstrap node's Prometheus metrics show.

A `Collector` reads the runs' heartbeats and status records from the DHT every few seconds and keeps a longer
history than one status record carries (each record holds its peer's recent outer steps; the collector merges them
as they come, so the curve grows for as long as the collector runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from hivemind.utils import get_dht_time

from swarm import records
from swarm.monitor import status as status_records
from swarm.monitor.version import VERSION

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_HISTORY_STEPS = 5000
"""Outer steps of curve kept per run; older ones are dropped first."""


class Collector:
    """Use `await Collector(node, ...).start()` and `await collector.close()`; `state()` is the latest view."""

    def __init__(
        self,
        node,
        run_ids: list[str] = (),
        discover_runs: bool = True,
        role: str = "bootstrap",
        interval_seconds: float = 2.0,
    ):
        """`run_ids` are always shown; `discover_runs` also shows every run whose peers list themselves."""
        self.node, self.run_ids, self.discover_runs = node, list(run_ids), discover_runs
        self.role, self.interval_seconds = role, interval_seconds
        # run -> peer -> outer step -> [loss, eval_loss, tokens_total]
        self._history: dict[str, dict[str, dict[int, list]]] = defaultdict(lambda: defaultdict(dict))
        self._statuses: dict[str, dict[str, status_records.PeerStatus]] = {}
        self._live: dict[str, set[str]] = {}
        self._dht_peers = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> Collector:
        self._task = asyncio.create_task(self._loop())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.refresh(), max(10.0, 5 * self.interval_seconds))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a slow or failed DHT read only costs one refresh
                logger.debug(f"monitor refresh failed: {e!r}")
            await asyncio.sleep(self.interval_seconds)

    async def refresh(self) -> None:
        dht = self.node.dht
        runs = list(self.run_ids)
        if self.discover_runs:
            runs += [r for r in status_records.parse_runs(await dht.get(status_records.RUNS_KEY, latest=True))]
        runs = sorted(set(runs))
        now = get_dht_time()
        for run_id in runs:
            beats, found = await asyncio.gather(
                dht.get(records.peers_key(run_id), latest=True), dht.get(status_records.status_key(run_id), latest=True)
            )
            self._live[run_id] = {h.peer_id.to_base58() for h in records.parse_heartbeats(beats) if h.expiration > now}
            statuses = status_records.parse_statuses(found)
            self._statuses[run_id] = statuses
            for peer, status in statuses.items():
                curve = self._history[run_id][peer]
                for step, loss, eval_loss, tokens in status.history:
                    curve[step] = [loss, eval_loss, tokens]
                while len(curve) > MAX_HISTORY_STEPS:
                    del curve[min(curve)]
        self._dht_peers = await self.node.num_dht_peers()

    def state(self) -> dict:
        """The view as JSON-able data; its shape is swarm/monitor/state.schema.json (schema_version)."""
        runs = sorted(set(self._statuses) | set(self._live))
        return {
            "schema_version": SCHEMA_VERSION,
            "generated_at": time.time(),
            "node": {
                "peer_id": self.node.peer_id.to_base58(),
                "role": self.role,
                "version": VERSION,
                "dht_peers": self._dht_peers,
            },
            "runs": [self._run_state(run_id) for run_id in runs],
        }

    def _run_state(self, run_id: str) -> dict:
        now = get_dht_time()
        live = self._live.get(run_id, set())
        statuses = self._statuses.get(run_id, {})
        known = sorted(set(statuses) | live)
        front = max((s.outer_step for p, s in statuses.items() if p in live), default=0)
        curves = self._history.get(run_id, {})
        peers = [self._peer_state(p, statuses.get(p), curves.get(p, {}), p in live, front, now) for p in known]
        live_statuses = [s for p, s in statuses.items() if p in live]
        sent = [s.sent_bytes + s.received_bytes for s in live_statuses]
        return {
            "run_id": run_id,
            "live_peers": len(live),
            "outer_step": front,
            "tokens_per_second": round(sum(s.tokens_per_second for s in live_statuses), 3),
            "tokens_total": sum(s.tokens_total for s in statuses.values()),
            "bytes_per_step": round(sum(sent) / len(sent), 1) if sent else None,
            "loss_curve": self._curve(run_id),
            "peers": peers,
        }

    def _curve(self, run_id: str) -> list[dict]:
        """The swarm's mean training loss and mean held-out loss per outer step, over the peers that reported it."""
        by_step: dict[int, list[list]] = defaultdict(list)
        for curve in self._history.get(run_id, {}).values():
            for step, point in curve.items():
                by_step[step].append(point)
        out = []
        for step in sorted(by_step):
            losses = [p[0] for p in by_step[step] if p[0] is not None]
            evals = [p[1] for p in by_step[step] if p[1] is not None]
            out.append({
                "outer_step": step,
                "loss": sum(losses) / len(losses) if losses else None,
                "eval_loss": sum(evals) / len(evals) if evals else None,
                "peers": len(by_step[step]),
            })  # fmt: skip
        return out

    @staticmethod
    def _peer_state(peer: str, status, curve: dict, live: bool, front: int, now: float) -> dict:
        out = {"peer_id": peer, "short_id": _short(peer), "live": live}
        if status is None:  # a heartbeat but no status yet: it has not finished an outer step
            out.update(outer_step=None, behind=None, tokens_per_second=None, last_seen_seconds=None, link=None,
                       version=None, loss=None, eval_loss=None, group_size=None, workers=None, history=[])  # fmt: skip
            return out
        if status.direct_streams and status.relayed_streams:
            link = "mixed"
        else:
            link = "direct" if status.direct_streams else "relayed" if status.relayed_streams else "none"
        out.update(
            outer_step=status.outer_step,
            behind=max(0, front - status.outer_step),
            tokens_per_second=status.tokens_per_second,
            last_seen_seconds=round(max(0.0, now - status.time), 1),
            link=link,
            version=status.version,
            loss=status.loss,
            eval_loss=status.eval_loss,
            group_size=status.group_size,
            workers=status.workers,
            history=[[step, *curve[step]] for step in sorted(curve)],
        )
        return out


def _short(peer_id: str) -> str:
    """The tail of a peer id: the head is the same multihash prefix for every peer ("12D3KooW...")."""
    return f"…{peer_id[-8:]}"
