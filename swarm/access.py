"""Private runs: a shared secret (the swarm key) that every node of a private swarm must prove it holds.

A node started with a key admits only nodes that hold the same key, on every channel it serves:
- DHT RPCs carry an HMAC of the request under the key, and answers an HMAC of the answer (`KeyAuthorizer`, plugged
  into hivemind's DHT protocol), so a stranger can neither store, read nor answer records, nor enter routing tables;
- every libp2p stream of swarm's own protocols (matchmaking, all-reduce, state transfer) starts with a 32-byte proof
  bound to the protocol and to both peer ids, which libp2p's secure channel has authenticated. A stream without the
  right proof is closed after those 32 bytes: nothing of its request is read;
- the direct data plane mixes the key into its connection secrets (`direct_secret`).

An open swarm (no key) sends no proofs, so its wire format is the one it always had.

At start a node checks the key against its initial peers (`check_initial_peers`, over the `swarm/access/1` protocol
that every node serves): a node without a key in a private swarm, or with another key, or with a key in an open swarm,
stops with an error that says which.

Make a key with `openssl rand -hex 32 > swarm.key` (any file of at least 32 bytes works; surrounding whitespace is
ignored) and give every node of the run the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets

from hivemind.p2p import P2P, PeerID
from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from swarm.wire import ProtocolError, close_writer, read_frame, write_frame

logger = logging.getLogger(__name__)

PROOF_BYTES = 32
CHECK_PROTOCOL = "swarm/access/1"
_MIN_KEY_BYTES = 32
_MAX_KEY_BYTES = 4096
_PROOF_TIMEOUT = 10.0
_CLOCK_SKEW_SECONDS = 60.0


def load_key(path: str) -> bytes:
    """The swarm key in a file: its bytes, stripped of surrounding whitespace. Clear errors for unusable files."""
    try:
        size = os.path.getsize(path)
        if size > _MAX_KEY_BYTES:
            raise ValueError(f"swarm key file {path} holds {size} bytes; a key is 32 to {_MAX_KEY_BYTES} bytes")
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the swarm key file {path}: {e.strerror or e}") from None
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(
            f"swarm key file {path} holds {len(key)} bytes; use at least {_MIN_KEY_BYTES}"
            " (make one with `openssl rand -hex 32 > swarm.key`)"
        )
    return key


class Access:
    """One node's side of the swarm key: proofs for the streams it opens, checks for the streams it serves."""

    def __init__(self, key: bytes | None):
        # Derived once: the file's bytes are never used as a MAC key directly, and the digest has a fixed size.
        self._key = hashlib.sha256(b"swarm-key/1\0" + key).digest() if key else None
        self.refused: dict[PeerID, int] = {}
        """Streams refused per remote peer (no proof, or a wrong one): what a test or an operator can look at."""

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def _mac(self, *parts: bytes) -> bytes:
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            h.update(len(part).to_bytes(4, "big") + part)
        return h.digest()

    def stream_proof(self, protocol: str, opener: PeerID, server: PeerID) -> bytes:
        return self._mac(b"stream", protocol.encode(), opener.to_bytes(), server.to_bytes())

    def direct_secret(self, secret: bytes) -> bytes:
        """A direct connection's secret, bound to the swarm key: without the key nobody can compute it."""
        return secret if self._key is None else self._mac(b"direct", secret)

    async def admit(self, protocol: str, me: PeerID, stream_info, reader: asyncio.StreamReader) -> bool:
        """Whether a stream served here may go on: it must open with the proof. Reads at most PROOF_BYTES."""
        if self._key is None:
            return True
        peer = stream_info.peer_id
        try:
            proof = await asyncio.wait_for(reader.readexactly(PROOF_BYTES), _PROOF_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            proof = b""
        if hmac.compare_digest(proof, self.stream_proof(protocol, peer, me)):
            return True
        self.refused[peer] = self.refused.get(peer, 0) + 1
        if self.refused[peer] == 1:
            logger.warning(f"refused {protocol} from {peer}: it does not hold this swarm's key")
        return False

    # ---- the start-up check -----------------------------------------------------------------------------------

    def _check_mac(self, role: bytes, client: PeerID, server: PeerID, nonce: bytes) -> bytes:
        return self._mac(b"check", role, client.to_bytes(), server.to_bytes(), nonce)

    async def serve_check(self, p2p: P2P, stream_info, reader, writer) -> None:
        """Tell a node whether its key fits ours, so it can say so at start. The answer gives nothing away."""
        try:
            request, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), _PROOF_TIMEOUT)
            keyed, nonce = request.get("keyed"), request.get("nonce")
            if not isinstance(keyed, bool) or not isinstance(nonce, bytes) or len(nonce) != 16:
                raise ProtocolError("malformed access check")
            client, me = stream_info.peer_id, p2p.peer_id
            if self._key is None:
                reply = {"result": "open" if keyed else "ok"}
            elif not keyed:
                reply = {"result": "key-required"}
            elif not hmac.compare_digest(request.get("mac", b""), self._check_mac(b"client", client, me, nonce)):
                reply = {"result": "mismatch"}
            else:  # proving ours in return: a node posing as a member without the key is caught by the client
                reply = {"result": "ok", "mac": self._check_mac(b"server", client, me, nonce)}
            await write_frame(writer, reply)
        except (ProtocolError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            logger.debug(f"bad access check from {stream_info.peer_id}: {e!r}")
        finally:
            close_writer(writer)

    async def check(self, p2p: P2P, peer: PeerID, timeout: float) -> str:
        """'ok', or why `peer` will not let us in or cannot be trusted: 'key-required', 'mismatch' or 'open'."""
        nonce = secrets.token_bytes(16)
        request = {"keyed": self.keyed, "nonce": nonce}
        if self.keyed:
            request["mac"] = self._check_mac(b"client", p2p.peer_id, peer, nonce)
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, CHECK_PROTOCOL), timeout)
        try:
            await write_frame(writer, request)
            reply, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), timeout)
        finally:
            close_writer(writer)
        result = reply.get("result")
        if result == "ok" and self.keyed:
            expected = self._check_mac(b"server", p2p.peer_id, peer, nonce)
            if not hmac.compare_digest(reply.get("mac", b""), expected):
                return "mismatch"
        if result not in ("ok", "key-required", "mismatch", "open"):
            raise ProtocolError(f"unexpected access check answer {result!r}")
        return result

    async def check_initial_peers(self, p2p: P2P, peers: list[PeerID], timeout: float) -> str | None:
        """Why the initial peers do not admit us, or None if one does; peers that cannot be reached say nothing."""
        results = await asyncio.gather(*(self.check(p2p, peer, timeout) for peer in peers), return_exceptions=True)
        for peer, result in zip(peers, results):
            if not isinstance(result, str):
                logger.debug(f"no access check answer from {peer}: {result!r}")
        answers = [r for r in results if isinstance(r, str)]
        if not answers or "ok" in answers:
            return None  # nobody answered: the DHT bootstrap that follows reports the unreachable peers
        if "key-required" in answers:
            return "this swarm requires a key: start with --swarm-key FILE, the key file the run's owner gives out"
        if "mismatch" in answers:
            return "the swarm key does not match the one of this swarm: check the --swarm-key file"
        return "this swarm has no key, but this node was given one: start it without --swarm-key"


class KeyAuthorizer(AuthorizerBase):
    """hivemind DHT requests and answers authenticated with the swarm key (HMAC-SHA256), replays refused."""

    def __init__(self, access: Access):
        self._access = access
        self._recent_nonces = TimedStorage()

    def _sign(self, message) -> bytes:
        message.auth.signature = b""
        return self._access._mac(b"dht", message.SerializeToString())

    async def sign_request(self, request, service_public_key) -> None:
        request.auth.time = get_dht_time()
        request.auth.nonce = secrets.token_bytes(16)
        request.auth.signature = self._sign(request)

    async def validate_request(self, request) -> bool:
        auth = request.auth
        signature = auth.signature
        valid = len(signature) == PROOF_BYTES and hmac.compare_digest(signature, self._sign(request))
        auth.signature = signature
        if not valid:
            return False
        now = get_dht_time()
        if abs(auth.time - now) > _CLOCK_SKEW_SECONDS:
            logger.debug("a DHT request's clock is too far off, or it is replayed")
            return False
        with self._recent_nonces.freeze():
            if auth.nonce in self._recent_nonces:
                return False
        self._recent_nonces.store(auth.nonce, None, now + 2 * _CLOCK_SKEW_SECONDS)
        return True

    async def sign_response(self, response, request) -> None:
        response.auth.nonce = request.auth.nonce  # binds the answer to the request it answers
        response.auth.signature = self._sign(response)

    async def validate_response(self, response, request) -> bool:
        auth = response.auth
        signature = auth.signature
        valid = len(signature) == PROOF_BYTES and hmac.compare_digest(signature, self._sign(response))
        auth.signature = signature
        return valid and hmac.compare_digest(auth.nonce, request.auth.nonce)


def guarded(access: Access, protocol: str, me: PeerID, handler):
    """A stream handler that serves only streams opening with the swarm key's proof (see Access.admit)."""

    async def handle(stream_info, reader, writer):
        if not await access.admit(protocol, me, stream_info, reader):
            with contextlib.suppress(Exception):
                close_writer(writer)
            return
        await handler(stream_info, reader, writer)

    return handle
