"""`swarm-bootstrap`: a DHT node with a stable identity that volunteers join through, and a view of swarm health.

It holds no training state and decides nothing: a running swarm carries on without it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from peers.config import ConfigCommand, grouped, monitor_config, monitor_options
from swarm import NodeConfig, SwarmConnectionError, SwarmNode
from swarm.access import load_key
from swarm.monitor import MonitorConfig
from swarm.monitor.collector import Collector
from swarm.monitor.prometheus import swarm_registry
from swarm.monitor.web import serve_dashboard, serve_prometheus
from swarm.records import parse_heartbeats, peers_key, validate_run_id

logger = logging.getLogger("swarm-bootstrap")


network, observability = grouped("network"), grouped("observability")


@click.command(
    cls=ConfigCommand,
    check=lambda flags: build_config(flags),
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@network(
    "--identity",
    type=click.Path(dir_okay=False),
    default="bootstrap.id",
    help="Private key file; keeps the same peer id across restarts (created if missing).",
)
@network(
    "--swarm-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="Shared secret file of a private swarm: only nodes with the same key are admitted (see README).",
)
@network(
    "--host-maddrs",
    multiple=True,
    default=["/ip4/0.0.0.0/tcp/31337"],
    help="Addresses to listen on; repeat for several.",
)
@network("--announce-maddrs", multiple=True, help="Addresses to advertise (e.g. the server's public IP).")
@network("--initial-peers", multiple=True, metavar="MADDR", help="Other bootstrap nodes to link up with.")
@observability("--run-id", "run_ids", multiple=True, help="Runs whose health to report; repeat for several.")
@observability(
    "--health-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    help="Seconds between health reports.",
)
@observability("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
@monitor_options
def main(**flags) -> None:
    """Run a bootstrap node. Prints the addresses volunteers pass as --initial-peers, one per line."""
    logging.basicConfig(
        level=flags["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    config, monitor = build_config(flags)
    sys.exit(asyncio.run(_serve(config, list(flags["run_ids"]), flags["health_interval"], monitor)))


def swarm_key(path: str | None) -> bytes | None:
    try:
        return None if path is None else load_key(path)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--swarm-key'") from None


def build_config(flags: dict) -> tuple[NodeConfig, MonitorConfig]:
    """The node's and the monitor's configuration from the flags; errors name the flag to fix."""
    for run_id in flags["run_ids"]:
        try:
            validate_run_id(run_id)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--run-id'") from None
    config = NodeConfig(
        initial_peers=list(flags["initial_peers"]),
        host_maddrs=list(flags["host_maddrs"]),
        announce_maddrs=list(flags["announce_maddrs"]),
        identity_path=flags["identity"],
        swarm_key=swarm_key(flags["swarm_key"]),
    )
    try:
        config.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return config, monitor_config(flags)


async def health_report(node: SwarmNode, run_ids: list[str]) -> str:
    parts = [f"dht peers: {await node.num_dht_peers()}"]
    for run_id in run_ids:
        found = await node.dht.get(peers_key(run_id), latest=True)
        beats = parse_heartbeats(found)
        steps = sorted(b.outer_step for b in beats)
        where = f"outer steps {steps[0]}..{steps[-1]}" if steps else "no live peers"
        parts.append(f"run {run_id}: {len(beats)} live peers, {where}")
    return "; ".join(parts)


async def _serve(
    config: NodeConfig, run_ids: list[str], health_interval: float, monitor: MonitorConfig | None = None
) -> int:
    monitor = monitor or MonitorConfig()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        node = await SwarmNode.create(config)
    except SwarmConnectionError as e:
        logger.error(str(e))
        return 1
    collector, endpoints = None, []
    try:
        if monitor.dashboard_port is not None or monitor.prometheus_port is not None:
            # The view of the swarm: the runs named on the command line, and every run whose peers list themselves.
            collector = await Collector(node, run_ids, discover_runs=True, role="bootstrap").start()
            if monitor.dashboard_port is not None:
                endpoints.append(await serve_dashboard(collector, monitor.dashboard_host, monitor.dashboard_port))
            if monitor.prometheus_port is not None:
                registry = swarm_registry(collector)
                endpoints.append(await serve_prometheus(registry, monitor.prometheus_host, monitor.prometheus_port))
        for maddr in await node.visible_maddrs():
            print(maddr, flush=True)
        logger.info(f"bootstrap node {node.peer_id} is up; volunteers pass one of the addresses above")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), health_interval)
            except asyncio.TimeoutError:
                try:
                    logger.info(await asyncio.wait_for(health_report(node, run_ids), health_interval))
                except Exception as e:  # a slow or failed DHT read only costs one report
                    logger.warning(f"health report failed: {e!r}")
        logger.info("shutting down")
        return 0
    except OSError as e:  # a dashboard or metrics port that is taken: say which, exit non-zero, no traceback
        logger.error(str(e))
        return 1
    finally:
        for endpoint in endpoints:
            await endpoint.close()
        if collector is not None:
            await collector.close()
        await node.close()
