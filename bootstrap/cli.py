"""`swarm-bootstrap`: a DHT node with a stable identity that volunteers join through, and a view of swarm health.

It holds no training state and decides nothing: a running swarm carries on without it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from swarm import NodeConfig, SwarmConnectionError, SwarmNode
from swarm.records import parse_heartbeats, peers_key, validate_run_id

logger = logging.getLogger("swarm-bootstrap")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    default="bootstrap.id",
    help="Private key file; keeps the same peer id across restarts (created if missing).",
)
@click.option(
    "--host-maddrs",
    multiple=True,
    default=["/ip4/0.0.0.0/tcp/31337"],
    help="Addresses to listen on; repeat for several.",
)
@click.option("--announce-maddrs", multiple=True, help="Addresses to advertise (e.g. the server's public IP).")
@click.option("--initial-peers", multiple=True, metavar="MADDR", help="Other bootstrap nodes to link up with.")
@click.option("--run-id", "run_ids", multiple=True, help="Runs whose health to report; repeat for several.")
@click.option(
    "--health-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    help="Seconds between health reports.",
)
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def main(identity, host_maddrs, announce_maddrs, initial_peers, run_ids, health_interval, log_level) -> None:
    """Run a bootstrap node. Prints the addresses volunteers pass as --initial-peers, one per line."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for run_id in run_ids:
        try:
            validate_run_id(run_id)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--run-id'") from None
    config = NodeConfig(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs),
        identity_path=identity,
    )
    try:
        config.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    sys.exit(asyncio.run(_serve(config, list(run_ids), health_interval)))


async def health_report(node: SwarmNode, run_ids: list[str]) -> str:
    parts = [f"dht peers: {await node.num_dht_peers()}"]
    for run_id in run_ids:
        found = await node.dht.get(peers_key(run_id), latest=True)
        beats = parse_heartbeats(found)
        steps = sorted(b.outer_step for b in beats)
        where = f"outer steps {steps[0]}..{steps[-1]}" if steps else "no live peers"
        parts.append(f"run {run_id}: {len(beats)} live peers, {where}")
    return "; ".join(parts)


async def _serve(config: NodeConfig, run_ids: list[str], health_interval: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        node = await SwarmNode.create(config)
    except SwarmConnectionError as e:
        logger.error(str(e))
        return 1
    try:
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
    finally:
        await node.close()
