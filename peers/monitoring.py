"""What a peer shows the world after each outer step: its status record in the DHT, Prometheus metrics, and
(when asked) the same dashboard a bootstrap node serves, for the peer's own run.

Nothing here can stop training, or hold it up: the status record is published in the background (two DHT round trips
and a signature, a tenth of a second or more that the next inner loop would otherwise wait for), bounded in time,
its failures logged at debug level.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.utils import get_dht_time

from swarm.monitor import MonitorConfig
from swarm.monitor import status as status_records
from swarm.monitor.collector import Collector
from swarm.monitor.prometheus import PeerMetrics
from swarm.monitor.version import VERSION
from swarm.monitor.web import HttpEndpoint, serve_dashboard, serve_prometheus

logger = logging.getLogger(__name__)
PUBLISH_TIMEOUT_SECONDS = 10.0


class PeerMonitor:
    """Use `await PeerMonitor.create(...)`, `await monitor.observe(record)` per outer step, `await monitor.close()`
    (which waits, within PUBLISH_TIMEOUT_SECONDS, for the last status to be published)."""

    def __init__(self, config: MonitorConfig, node, swarm, run_id: str):
        """`swarm` is the peer's one-worker Swarm (worker 0's for a sharded peer): its matchmaker and averager."""
        self.config, self.node, self.swarm, self.run_id = config, node, swarm, run_id
        self.metrics = PeerMetrics(run_id)
        self.history: list[list] = []
        self.endpoints: list[HttpEndpoint] = []
        self.collector: Collector | None = None
        self._unpublished: status_records.PeerStatus | None = None  # the newest status not yet handed to the DHT
        self._publisher: asyncio.Task | None = None

    @classmethod
    async def create(cls, config: MonitorConfig, node, swarm, run_id: str) -> PeerMonitor:
        monitor = cls(config, node, swarm, run_id)
        try:
            if config.prometheus_port is not None:
                monitor.endpoints.append(
                    await serve_prometheus(monitor.metrics.registry, config.prometheus_host, config.prometheus_port)
                )
            if config.dashboard_port is not None:
                monitor.collector = await Collector(node, [run_id], discover_runs=False, role="peer").start()
                monitor.endpoints.append(
                    await serve_dashboard(monitor.collector, config.dashboard_host, config.dashboard_port)
                )
        except BaseException:
            await monitor.close()
            raise
        return monitor

    async def observe(self, record: dict, tokens_total: int) -> None:
        """Fold one metrics record in: Prometheus at once, then the status record in the DHT.

        `tokens_total` is what this peer trained on over its whole life, restarts included (peers.exportable)."""
        self.metrics.observe(record)
        self.history.append([record["outer_step"], record["loss"], record.get("eval_loss"), tokens_total])
        del self.history[: -status_records.HISTORY_LENGTH]
        streams = self.swarm.averager.streams
        status = status_records.PeerStatus(
            outer_step=record["outer_step"],
            loss=record["loss"],
            eval_loss=record.get("eval_loss"),
            tokens_per_second=float(record.get("tokens_per_second") or 0.0),
            tokens_total=tokens_total,
            sent_bytes=record["bytes_sent"],
            received_bytes=record["bytes_received"],
            group_size=record["group_size"],
            direct_streams=streams.get("direct", 0),
            relayed_streams=streams.get("relayed", 0),
            version=VERSION,
            workers=record.get("workers", 1),
            time=get_dht_time(),
            history=[list(h) for h in self.history],
        )
        self._unpublished = status
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_newest())

    async def _publish_newest(self) -> None:
        # One publication at a time; statuses observed meanwhile replace each other: only the newest is worth sending.
        while self._unpublished is not None:
            status, self._unpublished = self._unpublished, None
            try:
                await asyncio.wait_for(self._publish(status), PUBLISH_TIMEOUT_SECONDS)
            except Exception as e:  # the status is for people watching; training goes on without it
                logger.debug(f"could not publish the status record: {e!r}")

    async def _publish(self, status: status_records.PeerStatus) -> None:
        await status_records.publish(self.node.dht, self.node.peer_id.to_base58(), self.run_id, status)
        live = await self.swarm.matchmaker.live_peers()
        self.metrics.live_peers.set(len(live))

    async def close(self) -> None:
        if self._publisher is not None:
            try:  # the last status (the run's final step) is worth a moment; no more than one publication's bound
                await asyncio.wait_for(asyncio.shield(self._publisher), PUBLISH_TIMEOUT_SECONDS)
            except Exception as e:
                logger.debug(f"the last status record was not published: {e!r}")
                self._publisher.cancel()
            self._publisher = None
        for endpoint in self.endpoints:
            await endpoint.close()
        self.endpoints = []
        if self.collector is not None:
            await self.collector.close()
            self.collector = None
