"""A direct TCP data plane between the members of a group, beside the p2p daemon's relayed streams.

Every byte of a libp2p stream crosses two p2p daemons (ours and theirs) and two unix sockets; for the bulk of an
all-reduce that relay costs more CPU than the averaging itself. So each averager also listens on a plain TCP port,
announces its endpoints in its join request, and the leader hands the whole group everyone's endpoints together with
a fresh random secret in the "begin" message. That message travels over libp2p streams, which are encrypted and
authenticated with the peers' identities, so only the group's members learn the secret.

A member opens a TCP connection to a reducer and first sends
  {"type": "hello", "group_id": g, "sender": i, "mac": HMAC-SHA256(secret, g | i | j)}
and waits for {"type": "welcome"}, then speaks exactly the protocol it would speak on a libp2p stream. The reducer
welcomes the connection only for a group it is in, from a member index of that group, with the right MAC; anything
else is closed. The welcome matters: an announced address may lead to another machine (a private or loopback address
seen from elsewhere), and then nothing is sent there. If no endpoint welcomes us (NAT, firewall), the member falls
back to the relayed libp2p stream, and does not try that peer directly again.

A reducer that does not know the group yet (its sender left matchmaking a moment before it) answers at once
{"type": "pending", "key": its direct public key}, then "welcome" once it learns of the group, or, after the grace a
late member gets (HELLO_TIMEOUT, the same as on a relayed stream), {"type": "not-a-member"}: it never learned of the
group, so it is lost to this round and alive for the next (NotAMember), not unreachable. The key in "pending" tells
the peer we meant from another machine at the same address, which is skipped at once.

The MAC proves membership of the group, not which member: a member could open a connection in another member's name.
It gains nothing it could not do with its own contribution, and a duplicate part fails the round for everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from swarm.wire import ProtocolError, close_writer, read_frame, require, write_frame

logger = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
"""How long a reducer waits to learn of the group a part or a direct hello names (its sender may have left
matchmaking a moment before it) before answering that it is not a member."""
WELCOME_TIMEOUT = 2.0
"""How long a member waits for the first answer to its hello: "welcome", or "pending" while the reducer waits for the
group. Silence means the address leads somewhere else."""


class NotAMember(Exception):
    """The reducer answered, directly, that it never learned of the group: lost to this round, not unreachable."""


class DirectKey:
    """This averager's X25519 key pair for the direct data plane.

    A member announces the public half in its join request, over the libp2p stream that authenticates it by its
    peer id, and the leader hands every member all the group's public halves. Two members then share a secret that
    nobody else can compute, not even the other members: a direct connection proves which member opened it.
    """

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def pair_secret(self, group_secret: bytes, their_public: bytes) -> bytes:
        """The key for connections between us and the member that announced `their_public`, in one group only."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        if not isinstance(their_public, bytes) or len(their_public) != 32:
            raise ValueError("a direct key is 32 bytes")
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(their_public))
        return hmac.new(group_secret, b"swarm-direct-pair\0" + shared, hashlib.sha256).digest()


def group_mac(secret: bytes, group_id: bytes, sender: int, receiver: int) -> bytes:
    message = group_id + sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")
    return hmac.new(secret, message, hashlib.sha256).digest()


def _ip_of(maddr: str) -> str | None:
    parts = str(maddr).split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return None


class SocketStream:
    """Reader and writer of one TCP connection, reading every frame straight into a buffer of its final size.

    asyncio's StreamReader grows a bytearray chunk by chunk and copies it out again: for 25 MB parts that costs more
    CPU than the network. This has the interface `swarm.wire` needs (readexactly, write, drain, close).
    """

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._pending: list = []

    async def readexactly(self, n: int) -> bytearray:
        buffer = bytearray(n)
        view = memoryview(buffer)
        got = 0
        while got < n:
            k = await self._loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise asyncio.IncompleteReadError(bytes(buffer[:got]), n)
            got += k
        return buffer

    def write(self, data) -> None:
        self._pending.append(data)

    async def drain(self) -> None:
        pending, self._pending = self._pending, []
        for data in pending:
            await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


Handler = Callable[[bytes, int, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class DirectServer:
    """Listens for direct connections and hands each authenticated-looking hello to `handler`."""

    def __init__(self, handler: Handler):
        self._handler = handler
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()
        self.endpoints: list[tuple[str, int]] = []

    async def start(self, host_maddrs: list[str], visible_maddrs: list[str]) -> None:
        """Listen on the IPs the node listens on; announce the ones others can reach (see `visible_maddrs`)."""
        hosts = {ip for ip in map(_ip_of, host_maddrs) if ip is not None}
        if not hosts:
            return
        port = 0
        for host in sorted(hosts):
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            port = sock.getsockname()[1]  # the same port on every IP keeps announcements simple
            self._sockets.append(sock)
            self._spawn(self._serve_forever(sock))
        announced = []
        for host in sorted(hosts):
            if ipaddress.ip_address(host).is_unspecified:
                announced += [
                    ip for ip in map(_ip_of, visible_maddrs) if ip and not ipaddress.ip_address(ip).is_unspecified
                ]
            else:
                announced.append(host)
        self.endpoints = [(ip, port) for ip in dict.fromkeys(announced)]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:  # e.g. out of file descriptors: keep serving once it passes
                logger.debug(f"direct accept failed: {e!r}")
                await asyncio.sleep(0.1)
                continue
            stream = SocketStream(conn)
            self._spawn(self._accept(stream, stream))

    async def _accept(self, reader: SocketStream, writer: SocketStream) -> None:
        try:
            hello, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), HELLO_TIMEOUT)
            if hello.get("type") != "hello":
                raise ProtocolError(f"expected hello, got {hello.get('type')!r}")
            group_id = require(hello, "group_id", bytes)
            sender = require(hello, "sender", int)
            mac = require(hello, "mac", bytes)
            await self._handler(group_id, sender, mac, reader, writer)
        except Exception as e:  # a stranger, a port scanner, a member that vanished: nothing to keep
            logger.debug(f"direct connection refused or failed: {e!r}")
        finally:
            close_writer(writer)


async def connect(
    endpoints, group_id: bytes, sender: int, receiver: int, secret: bytes, timeout: float, their_key: bytes = b""
) -> tuple[SocketStream, SocketStream]:
    """Open a direct connection to the first reachable endpoint and introduce ourselves. `their_key` is the direct
    public key the receiver announced. Raises ConnectionError, or NotAMember when the receiver says it never learned
    of the group."""
    errors = []
    loop = asyncio.get_running_loop()
    # Loopback last: from another machine it leads to the wrong host (harmless, thanks to the welcome, but slower).
    for host, port in sorted(endpoints, key=lambda e: ipaddress.ip_address(e[0]).is_loopback):
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            sock.close()
            errors.append(f"{host}:{port}: {e!r}")
            continue
        stream = SocketStream(sock)
        mac = group_mac(secret, group_id, sender, receiver)
        try:
            await write_frame(stream, {"type": "hello", "group_id": group_id, "sender": sender, "mac": mac})
            answer, _ = await asyncio.wait_for(read_frame(stream, max_payload=0), WELCOME_TIMEOUT)
            if answer.get("type") == "pending":
                if their_key and answer.get("key") != their_key:
                    raise ProtocolError("another peer answers at this address")
                # It waits for the group up to HELLO_TIMEOUT, then says whether it learned of it.
                answer, _ = await asyncio.wait_for(read_frame(stream, max_payload=0), HELLO_TIMEOUT + WELCOME_TIMEOUT)
                if answer.get("type") == "not-a-member":
                    stream.close()
                    raise NotAMember(f"{host}:{port} never learned of group {group_id.hex()}")
            if answer.get("type") != "welcome":
                raise ProtocolError(f"not welcomed: {answer.get('type')!r}")
        except (OSError, EOFError, ProtocolError, asyncio.TimeoutError) as e:
            stream.close()
            errors.append(f"{host}:{port}: {e!r}")
            continue
        return stream, stream
    raise ConnectionError(f"no direct endpoint reachable ({'; '.join(errors) or 'none announced'})")


def parse_endpoints(value) -> list[tuple[str, int]]:
    """Endpoints from a peer's message, checked: a list of [ip, port] with a valid IP and port."""
    if not isinstance(value, list) or len(value) > 16:
        raise ProtocolError("direct endpoints must be a short list")
    endpoints = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)):
            raise ProtocolError("a direct endpoint must be [ip, port]")
        try:
            ipaddress.ip_address(item[0])
        except ValueError:
            raise ProtocolError(f"bad IP address {item[0]!r}") from None
        if not 0 < item[1] < 65536:
            raise ProtocolError(f"bad port {item[1]}")
        endpoints.append((item[0], item[1]))
    return endpoints
