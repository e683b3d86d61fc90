"""A swarm node: one libp2p daemon and one Kademlia DHT node, living in the caller's event loop.

Many nodes can share one event loop (each starts its own p2pd process), which is what lets a test run several peers
in one process. The node knows nothing about models or runs; matchmaking and averaging register their handlers on
`node.p2p`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field

import hivemind.hivemind_cli
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon import P2PD_FILENAME
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from swarm import reaper
from swarm.access import CHECK_PROTOCOL, Access, KeyAuthorizer, guarded
from swarm.signing import NodeIdentity

logger = logging.getLogger(__name__)


class SwarmConnectionError(RuntimeError):
    """The node could not start or could not reach any of its initial peers."""


class SwarmAccessError(SwarmConnectionError):
    """The initial peers do not admit this node: its swarm key is missing, differs, or is not wanted (swarm.access)."""


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
    swarm_key: bytes | None = field(default=None, repr=False)
    """The private swarm's shared secret (swarm.access.load_key reads it from a file); None for an open swarm."""

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
        if self.swarm_key is not None and len(self.swarm_key) < 32:
            raise ValueError("a swarm key has at least 32 bytes")


DAEMON_ENV = {"LIBP2P_TCP_REUSEPORT": "false"}
"""Added to the p2p daemon's environment. By default libp2p dials from its listening port (SO_REUSEPORT), so two
peers that dial each other at once, as two matchmaking peers waiting for each other do, can meet in one TCP
simultaneous open: both then start the noise handshake as its initiator and both dials fail ("noise: message is too
short"), after which libp2p backs off dialing that peer. Over links with 100 ms round trips that happened every time
(8 of 8; tests/test_delayline.py), and a peer was left out of every round of a blocking run. Dialing from ephemeral
ports, the two dials are two connections and both succeed."""

_spawning = 0  # SwarmNode.create calls in progress that want the p2p daemon in a session of its own
_plain_exec = None


@contextlib.contextmanager
def _daemon_in_own_session():
    """While this is active, hivemind starts p2pd in a new session (setsid), so in a process group of its own.

    A stop signal sent to the peer's whole process group (a terminal's Ctrl-C, `kill -- -PGID`, a service manager
    stopping the group) would otherwise reach the daemon too: it dies at once, and the peer, which is still
    finishing its round, loses every connection and averages alone. Out of the group, the daemon stays up until
    `SwarmNode.close()` stops it; if the peer dies without closing it (SIGKILL), swarm.reaper does. Ignoring the
    signals in the child instead does not work: the Go daemon installs its own SIGINT/SIGTERM handlers (measured).

    hivemind spawns the daemon with `asyncio.subprocess.create_subprocess_exec` deep inside `P2P.create` and has no
    option for it, so this swaps that function for one that adds `start_new_session=True` (and DAEMON_ENV) for the
    p2pd binary only, and only while some node is being created (nodes created concurrently in one loop share the
    swap).
    """
    global _spawning, _plain_exec
    if _spawning == 0:
        _plain_exec = asyncio.subprocess.create_subprocess_exec
        plain = _plain_exec
        daemon_dir = os.path.realpath(os.path.dirname(hivemind.hivemind_cli.__file__))

        async def exec_daemon_in_own_session(program, *args, **kwargs):
            path = os.path.realpath(os.fspath(program))
            if os.path.basename(path) == P2PD_FILENAME and os.path.dirname(path) == daemon_dir:
                kwargs.setdefault("start_new_session", True)
                kwargs["env"] = {**(kwargs.get("env") or os.environ), **DAEMON_ENV}
            return await plain(program, *args, **kwargs)

        asyncio.subprocess.create_subprocess_exec = exec_daemon_in_own_session
    _spawning += 1
    try:
        yield
    finally:
        _spawning -= 1
        if _spawning == 0:
            asyncio.subprocess.create_subprocess_exec = _plain_exec
            _plain_exec = None


class SwarmNode:
    """Use `await SwarmNode.create(config)` and `await node.close()`, or `async with await SwarmNode.create(...)`."""

    def __init__(self, dht: DHTNode, config: NodeConfig, access: Access | None = None):
        self.dht = dht
        self.p2p: P2P = dht.p2p
        self.config = config
        self.access = access or Access(config.swarm_key)
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
        # Our own key file, even without identity_path, so the DHT records this node writes can be signed with the key
        # its peer id derives from (swarm.signing); p2pd would otherwise make a key that Python never sees.
        identity = await asyncio.to_thread(NodeIdentity.open, config.identity_path)  # RSA keygen: ~50 ms of CPU
        access = Access(config.swarm_key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.connect_timeout_seconds
        p2p = None
        try:
            # The daemon first, then the key check against the initial peers, then the DHT: a node whose key does
            # not fit learns why before its DHT bootstrap would fail on refused requests without saying why.
            with _daemon_in_own_session():
                p2p = await asyncio.wait_for(
                    P2P.create(
                        initial_peers=config.initial_peers or None,
                        host_maddrs=config.host_maddrs,
                        announce_maddrs=config.announce_maddrs or None,
                        identity_path=identity.path,
                        check_if_identity_free=not identity.fresh,  # else a second daemon starts just to check
                        dht_mode="client" if config.client_mode else "server",
                        # Only swarm's own loopback/LAN addresses matter; UPnP and AutoNAT probes would reach out.
                        nat_port_map=False,
                        auto_nat=False,
                        startup_timeout=config.connect_timeout_seconds,
                    ),
                    timeout=config.connect_timeout_seconds,
                )
            identity.check(p2p.peer_id)
            identity.close()  # p2pd has read its key file: a temporary one goes now, so no kill can leave it behind
            await p2p.add_binary_stream_handler(CHECK_PROTOCOL, functools.partial(access.serve_check, p2p))
            if config.initial_peers:
                peers = list(dict.fromkeys(PeerID.from_base58(Multiaddr(m)["p2p"]) for m in config.initial_peers))
                refusal = await access.check_initial_peers(p2p, peers, max(1.0, deadline - loop.time()))
                if refusal is not None:
                    raise SwarmAccessError(refusal)
            dht = await asyncio.wait_for(
                DHTNode.create(
                    p2p=p2p,
                    initial_peers=config.initial_peers or None,
                    client_mode=config.client_mode,
                    authorizer=KeyAuthorizer(access) if access.keyed else None,
                    record_validator=identity.validator(),
                    bootstrap_timeout=min(5.0, config.connect_timeout_seconds),
                ),
                timeout=max(1.0, deadline - loop.time()),
            )
        except BaseException as e:
            identity.close()
            if p2p is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p2p.shutdown(), 10)
            if isinstance(e, SwarmConnectionError):
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise SwarmConnectionError(
                    f"could not join the swarm through {config.initial_peers} within"
                    f" {config.connect_timeout_seconds:.0f}s; check that the addresses are right and the nodes are up"
                ) from None
            if isinstance(e, (P2PDaemonError, ConnectionError, OSError, RuntimeError)):
                where = f"through {', '.join(config.initial_peers)}" if config.initial_peers else "(new swarm)"
                raise SwarmConnectionError(f"could not start a swarm node {where}: {e}") from None
            raise
        return cls(dht, config, access)

    async def add_stream_handler(self, protocol: str, handler) -> None:
        """Serve `protocol` (a binary stream handler); in a private swarm only to nodes that hold the key."""
        await self.p2p.add_binary_stream_handler(protocol, guarded(self.access, protocol, self.peer_id, handler))

    async def remove_stream_handler(self, protocol: str) -> None:
        await self.p2p.remove_binary_stream_handler(protocol)

    async def open_stream(self, peer: PeerID, protocol: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to `peer`'s `protocol` handler; in a private swarm it opens with our proof of the key."""
        _, reader, writer = await self.p2p.call_binary_stream_handler(peer, protocol)
        if self.access.keyed:
            writer.write(self.access.stream_proof(protocol, self.peer_id, peer))  # goes out with the first frame
        return reader, writer

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
        self._take_connection_errors()
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

    def _take_connection_errors(self) -> None:
        """Collect the error of hivemind's daemon-connection tasks if the daemon died under us.

        They end with ConnectionResetError when the daemon goes first (OOM killer, a signal to every process of a
        service); nothing awaits them, so Python would print 'Task exception was never retrieved' with a traceback
        when they are collected. Taking the error here says it in one line instead.
        """
        control = getattr(getattr(self.p2p, "_client", None), "control", None)
        for name in ("_read_task", "_write_task"):
            task = getattr(control, name, None)
            if isinstance(task, asyncio.Task) and task.done() and not task.cancelled() and task.exception():
                logger.warning(f"the connection to this node's p2p daemon broke before it closed: {task.exception()!r}")

    async def __aenter__(self) -> SwarmNode:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
