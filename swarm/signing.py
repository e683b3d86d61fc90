"""Signed DHT records: every record a node stores carries its writer's signature, and nodes refuse any that do not.

The signing key is the node's libp2p identity key, the one its p2p daemon proves on every connection, so a peer id
names exactly one signing key: a record whose subkey is a peer id is accepted only when signed by that peer. A
record whose subkey is something else (the monitor lists runs by run id) still needs a valid signature by some key,
so every record is bound to the identity that wrote it.

hivemind calls the validator when a node is asked to store a record (a remote `rpc_store`, and its own `store`
before it keeps a local copy) and when a node reads the records another node returns (`call_find`); a dictionary
read from a node is refused whole if any of its records fails. Validators see the DHTID hash of the key only, not
the key itself, so they cannot tell our kinds of records apart: every record in a swarm DHT must be signed.

A signed value is the original value with an envelope in front:

    b"sws1" | u16 public key length | u16 signature length | public key | signature | value

the public key being libp2p's protobuf `PublicKey` (RSA, DER SubjectPublicKeyInfo): its sha256 multihash is the
peer id. The signature (RSA-PSS, SHA-256) covers the DHTID of the key, the serialized subkey, the value and the
expiration time, so none can be changed or moved to another record. Replays stay possible: anyone may store again
a record its writer signed, with its original expiration (the DHT keeps the newest expiration per subkey, so a
replay cannot override a newer record or outlive its own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

logger = logging.getLogger(__name__)

MAGIC = b"sws1"
_HEADER = struct.Struct("!4sHH")
_DOMAIN = b"swarm-record/1\0"
_MESSAGE = struct.Struct("!HHId")  # lengths of key, subkey, value; expiration time (float64 exactly as stored)

# Bounds checked before any parsing or RSA work, so a hostile record costs little to refuse. Our records are far
# smaller: a DHTID key is 20 bytes, a peer id subkey about 50, the largest value (a monitor status) a few KB.
MAX_KEY_BYTES = 64
MAX_SUBKEY_BYTES = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_PUBLIC_KEY_BYTES = 600  # an RSA-4096 key in libp2p's protobuf is about 550
MAX_SIGNATURE_BYTES = 700  # base64 of an RSA-4096 signature is 684
_RSA_BITS = (2048, 4096)
_RSA_EXPONENT = 65537  # what libp2p and hivemind use; a huge exponent would make verification as slow as signing

_SHA256_MULTIHASH = b"\x12\x20"  # libp2p ids of keys over 42 bytes (all RSA keys): sha2-256, 32-byte digest
_CACHED_KEYS = 1024
_CACHED_RECORDS = 4096


def load_identity(path: str) -> RSAPrivateKey:
    """The private key of a libp2p identity file (protobuf PrivateKey, as hivemind and p2pd write it)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        message = crypto_pb2.PrivateKey.FromString(data)
    except Exception as e:
        raise ValueError(f"identity file {path} is not a libp2p private key ({e})") from None
    if message.key_type != crypto_pb2.RSA:
        raise ValueError(
            f"identity file {path} holds a {crypto_pb2.KeyType.Name(message.key_type)} key; swarm signs its records"
            " with RSA identity keys only: remove the file to have a new one made, or point to another"
        )
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": message.data})  # hivemind's unpickling path: the only way in from DER bytes
    return key


def make_identity(path: str) -> None:
    """A new RSA identity file at `path` (readable by its owner only), in the format p2pd loads."""
    P2P.generate_identity(path)


def public_key_bytes(private_key: RSAPrivateKey) -> bytes:
    """libp2p's serialized PublicKey of `private_key`: what peer ids are hashed from."""
    loaded = serialization.load_der_private_key(private_key.to_bytes(), password=None)
    der = loaded.public_key().public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()


def peer_id_of(public_key: bytes) -> PeerID:
    """The peer id of a libp2p serialized RSA public key (see PeerID.from_identity)."""
    return PeerID(_peer_id_bytes(public_key))


def _peer_id_bytes(public_key: bytes) -> bytes:
    return _SHA256_MULTIHASH + hashlib.sha256(public_key).digest()  # no PeerID: it computes its base58 form at once


def _subkey_peer_id(subkey_bytes: bytes) -> bytes | None:
    """The peer id (bytes) a serialized subkey names, or None when it is not a peer id.

    A subkey counts as a peer id when it is a well-formed sha2-256 multihash (bytes, or base58 text as our writers
    store it): records.py takes such subkeys for peers. Run ids under the monitor's RUNS_KEY may be valid base58
    too, but never decode to a 34-byte multihash unless made to.
    """
    try:
        subkey = MSGPackSerializer.loads(subkey_bytes)
        raw = subkey if isinstance(subkey, bytes) else base58.b58decode(subkey) if isinstance(subkey, str) else None
    except Exception:
        return None
    if raw is not None and len(raw) == 34 and raw.startswith(_SHA256_MULTIHASH):
        return raw
    if raw is not None and len(raw) >= 2 and raw[0] == 0 and raw[1] == len(raw) - 2:
        return raw  # an identity multihash (Ed25519 and other short keys): a peer id, but never one of an RSA key
    return None


def _message(record: DHTRecord) -> bytes:
    header = _MESSAGE.pack(len(record.key), len(record.subkey), len(record.value), record.expiration_time)
    return b"".join((_DOMAIN, header, record.key, record.subkey, record.value))


class SignedRecordValidator(RecordValidatorBase):
    """Signs every record with this node's identity key; refuses records not signed by their subkey's peer."""

    def __init__(self, private_key: RSAPrivateKey):
        self._private_key = private_key
        self._public_key = public_key_bytes(private_key)
        self.peer_id = peer_id_of(self._public_key)
        self._keys: OrderedDict[bytes, RSAPublicKey] = OrderedDict()  # parsed keys of recent writers (LRU)
        self._verified: OrderedDict[bytes, None] = OrderedDict()  # digests of records verified lately (LRU)

    def sign_value(self, record: DHTRecord) -> bytes:
        signature = self._private_key.sign(_message(record))
        return _HEADER.pack(MAGIC, len(self._public_key), len(signature)) + self._public_key + signature + record.value

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > _HEADER.size + MAX_PUBLIC_KEY_BYTES + MAX_SIGNATURE_BYTES + MAX_VALUE_BYTES:
            logger.debug("refusing an oversized DHT record")
            return False  # before _split copies any of it
        parts = _split(record.value)
        if parts is None:
            logger.debug("refusing a DHT record without a well-formed signature envelope")
            return False
        public_key, signature, value = parts
        if len(record.key) > MAX_KEY_BYTES or len(record.subkey) > MAX_SUBKEY_BYTES or len(value) > MAX_VALUE_BYTES:
            logger.debug("refusing an oversized DHT record")
            return False
        # A record's validity depends on its bytes only, and the same record comes back from every node holding it
        # on every read (heartbeats: each peer's, from each replica, every poll): verify each once.
        digest = hashlib.sha256(_message(record)).digest()
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        owner = _subkey_peer_id(record.subkey)
        if owner is not None and owner != _peer_id_bytes(public_key):
            logger.debug(f"refusing a DHT record under peer {PeerID(owner)} signed by {peer_id_of(public_key)}")
            return False
        key = self._parse_key(public_key)
        if key is None:
            return False
        stripped = DHTRecord(record.key, record.subkey, value, record.expiration_time)
        if not key.verify(_message(stripped), signature):
            logger.debug(f"refusing a DHT record with a bad signature by {peer_id_of(public_key)}")
            return False
        self._verified[digest] = None
        if len(self._verified) > _CACHED_RECORDS:
            self._verified.popitem(last=False)
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        parts = _split(record.value)
        return record.value if parts is None else parts[2]

    @property
    def priority(self) -> int:
        return 10  # like hivemind's RSASignatureValidator: check the signature before any schema validator

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignedRecordValidator)  # one signer per node: a second one adds nothing

    def _parse_key(self, public_key: bytes) -> RSAPublicKey | None:
        key = self._keys.get(public_key)
        if key is not None:
            self._keys.move_to_end(public_key)
            return key
        try:
            message = crypto_pb2.PublicKey.FromString(public_key)
            loaded = serialization.load_der_public_key(message.data)
        except Exception:
            logger.debug("refusing a DHT record with an unreadable public key")
            return None
        if (
            message.key_type != crypto_pb2.RSA
            or not isinstance(loaded, rsa.RSAPublicKey)
            or not _RSA_BITS[0] <= loaded.key_size <= _RSA_BITS[1]
            or loaded.public_numbers().e != _RSA_EXPONENT
        ):
            logger.debug("refusing a DHT record signed with a key of another type or size")
            return None
        key = RSAPublicKey(loaded)
        self._keys[public_key] = key
        if len(self._keys) > _CACHED_KEYS:
            self._keys.popitem(last=False)
        return key


def _split(signed: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(public key, signature, value) of a signed value, or None if it is not one (or claims oversized parts)."""
    if len(signed) < _HEADER.size:
        return None
    magic, key_length, signature_length = _HEADER.unpack_from(signed)
    if magic != MAGIC or key_length > MAX_PUBLIC_KEY_BYTES or signature_length > MAX_SIGNATURE_BYTES:
        return None
    start = _HEADER.size
    if len(signed) < start + key_length + signature_length:
        return None
    key_end = start + key_length
    return signed[start:key_end], signed[key_end : key_end + signature_length], signed[key_end + signature_length :]


@dataclass
class NodeIdentity:
    """A node's identity file and its key. Without a file of its own, a node gets a fresh one in a private
    temporary directory: p2pd would otherwise make a key that Python never sees. `close` removes that directory
    (p2pd reads the file once, at start; the key stays in memory for signing)."""

    path: str
    private_key: RSAPrivateKey
    fresh: bool
    """Made just now: no other peer can be using it, so hivemind need not start a second daemon to check."""
    temp_dir: str | None = None

    @classmethod
    def open(cls, identity_path: str | None) -> NodeIdentity:
        temp_dir = None
        if identity_path is None:
            temp_dir = tempfile.mkdtemp(prefix="swarm-identity-")  # mode 0700: the key is readable by us only
            identity_path = os.path.join(temp_dir, "identity.key")
        try:
            fresh = not os.path.isfile(identity_path)
            if fresh:
                make_identity(identity_path)
            return cls(identity_path, load_identity(identity_path), fresh, temp_dir)
        except BaseException:
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise

    def validator(self) -> SignedRecordValidator:
        return SignedRecordValidator(self.private_key)

    def check(self, peer_id: PeerID) -> None:
        """The daemon runs under this identity: else records we sign would not be accepted under our peer id."""
        expected = peer_id_of(public_key_bytes(self.private_key))
        if peer_id != expected:
            raise RuntimeError(
                f"the p2p daemon runs as {peer_id}, but identity file {self.path} belongs to {expected}: the node's"
                " DHT records would be refused; check that the file is a libp2p RSA identity"
            )

    def close(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
