"""A swarm node: one libp2p daemon and one Kademlia DHT node, living in the caller's event loop.

Many nodes can share one event loop (each starts its own p2pd process), which is what lets a test run several peers
in one process. The node knows nothing about models or runs; matchmaking and averaging register their handlers on
`node.p2p`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from swarm import reaper

logger = logging.getLogger(__name__)


class SwarmConnectionError(RuntimeError):
    """The node could not start or could not reach any of its initial peers."""


@dataclass
class NodeConfig:
    initial_peers: list[str] = field(default_factory=list)
    """Full multiaddrs (with /p2p/<peer id>) of live nodes to join through; empty starts a new swarm."""
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    """Addresses to listen on. Port 0 picks a free port."""
    announce_maddrs: list[str] = field(default_factory=list)
    """Addresses to advertise to others instead of the listening ones (e.g. a public IP behind NAT)."""
    identity_path: str | None = None
    """Private key file: the same file gives the same peer id across restarts. Created if missing."""
    connect_timeout_seconds: float = 30.0
    """Bound on starting the daemon and joining the DHT through the initial peers."""
    client_mode: bool = False
    """A client node can reach others but does not serve DHT requests (for peers behind NAT)."""

    def validate(self) -> None:
        for maddr in [*self.initial_peers, *self.host_maddrs, *self.announce_maddrs]:
            try:
                Multiaddr(maddr)
            except Exception as e:
                raise ValueError(f"{maddr!r} is not a valid multiaddr: {e}") from None
        for maddr in self.initial_peers:
            if "/p2p/" not in maddr:
                raise ValueError(f"initial peer {maddr!r} lacks its peer id: use the full address ending in /p2p/<id>")
        if self.connect_timeout_seconds <= 0:
            raise ValueError("connect_timeout_seconds must be positive")


class SwarmNode:
    """Use `await SwarmNode.create(config)` and `await node.close()`, or `async with await SwarmNode.create(...)`."""

    def __init__(self, dht: DHTNode, config: NodeConfig):
        self.dht = dht
        self.p2p: P2P = dht.p2p
        self.config = config
        self._closed = False
        daemon = getattr(self.p2p, "_child", None)  # hivemind keeps the p2pd process here
        self._reaper = reaper.watch(os.getpid(), daemon.pid) if daemon is not None else None

    @classmethod
    async def create(cls, config: NodeConfig | None = None) -> SwarmNode:
        config = config or NodeConfig()
        config.validate()
        if config.identity_path is not None:
            parent = os.path.dirname(os.path.abspath(config.identity_path))
            os.makedirs(parent, exist_ok=True)
        try:
            dht = await asyncio.wait_for(
                DHTNode.create(
                    initial_peers=config.initial_peers or None,
                    host_maddrs=config.host_maddrs,
                    announce_maddrs=config.announce_maddrs or None,
                    identity_path=config.identity_path,
                    client_mode=config.client_mode,
                    # Only swarm's own loopback/LAN addresses matter; UPnP and AutoNAT probes would reach out.
                    nat_port_map=False,
                    auto_nat=False,
                    startup_timeout=config.connect_timeout_seconds,
                    bootstrap_timeout=min(5.0, config.connect_timeout_seconds),
                ),
                timeout=config.connect_timeout_seconds,
            )
        except asyncio.TimeoutError:
            raise SwarmConnectionError(
                f"could not join the swarm through {config.initial_peers} within {config.connect_timeout_seconds:.0f}s;"
                " check that the addresses are right and the nodes are up"
            ) from None
        except (P2PDaemonError, ConnectionError, OSError, RuntimeError) as e:
            where = f"through {', '.join(config.initial_peers)}" if config.initial_peers else "(new swarm)"
            raise SwarmConnectionError(f"could not start a swarm node {where}: {e}") from None
        return cls(dht, config)

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    async def visible_maddrs(self) -> list[str]:
        """Full addresses (with /p2p/<id>) that other nodes can pass as initial peers."""
        return [str(m) for m in await self.p2p.get_visible_maddrs()]

    async def num_dht_peers(self) -> int:
        return len(self.dht.protocol.routing_table.uid_to_peer_id)

    async def close(self) -> None:
        """Stops the DHT node and its p2p daemon; waits for the daemon process to exit.

        Also safe when the daemon already died: hivemind waits forever on replies from a dead daemon while it
        unregisters handlers, so that step is skipped (daemon gone) or bounded (daemon stuck).
        """
        if self._closed:
            return
        self._closed = True
        daemon = getattr(self.p2p, "_child", None)
        if daemon is None or daemon.returncode is None:
            try:
                await asyncio.wait_for(self.dht.shutdown(), 10)
            except Exception as e:
                logger.warning(f"the DHT node did not shut down cleanly ({e!r}); stopping its p2p daemon")
        self.dht.is_alive = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.p2p.shutdown(), 10)
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper.wait()

    async def __aenter__(self) -> SwarmNode:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
