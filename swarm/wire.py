"""Framing for swarm's binary libp2p streams: length-prefixed msgpack headers, optionally followed by raw bytes.

Each frame is `u32 header_len | header (msgpack map) | payload (header["nbytes"] bytes, may be 0)`. Raw payloads
travel as they are, so a 100 MB pseudo-gradient is never copied into a msgpack object. A payload may travel Huffman
coded (swarm.entropy): the header then says `coding` and the raw `size`, and the reader hands on the raw bytes.
Everything read from the network is checked: a malformed frame raises ProtocolError and never reaches the caller as
data.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

import msgpack

from swarm.entropy import CODING, CodingError, Packed, unpack

MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 2**31
_LEN = struct.Struct("<I")


class ProtocolError(Exception):
    """A peer sent something that does not follow the protocol."""


@dataclass
class ByteCounter:
    """Bytes moved through frames, counted as they are written to or read from the stream."""

    sent: int = 0
    received: int = 0


async def write_frame(
    writer: asyncio.StreamWriter,
    header: dict,
    payload: bytes | memoryview | Packed = b"",
    counter: ByteCounter | None = None,
) -> None:
    """Write one frame; a Packed payload goes as its coding where it has one."""
    if isinstance(payload, Packed):
        if payload.coded is not None:
            header = dict(header, coding=CODING, size=len(payload.raw))
            payload = payload.coded
        else:
            payload = payload.raw
    header = dict(header, nbytes=len(payload))
    packed = msgpack.packb(header, use_bin_type=True)
    writer.write(_LEN.pack(len(packed)) + packed)
    if len(payload):
        writer.write(payload)
    await writer.drain()
    if counter is not None:
        counter.sent += _LEN.size + len(packed) + len(payload)


async def read_frame(
    reader: asyncio.StreamReader, counter: ByteCounter | None = None, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[dict, bytes]:
    """Read one frame. Raises ProtocolError on malformed input, asyncio.IncompleteReadError if the stream ends."""
    (header_len,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    raw = await reader.readexactly(header_len)
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"frame header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header must be a map, got {type(header).__name__}")
    nbytes = header.get("nbytes", 0)
    if not isinstance(nbytes, int) or not 0 <= nbytes <= max_payload:
        raise ProtocolError(f"frame payload size {nbytes!r} is invalid or exceeds {max_payload}")
    payload = await reader.readexactly(nbytes) if nbytes else b""
    if counter is not None:
        counter.received += _LEN.size + header_len + nbytes
    if "coding" in header:
        coding, size = header.pop("coding"), header.pop("size", None)
        if coding != CODING:
            raise ProtocolError(f"unknown payload coding {coding!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_payload:
            raise ProtocolError(f"coded payload size {size!r} is invalid or exceeds {max_payload}")
        try:
            payload = await unpack(payload, size)
        except CodingError as e:
            raise ProtocolError(str(e)) from None
    return header, payload


def require(header: dict, key: str, kind: type | tuple[type, ...]):
    """A header field, checked for presence and type."""
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"field {key!r} is missing or has the wrong type ({type(value).__name__})")
    return value


def close_writer(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # the stream may already be gone with its peer; nothing is left to release
        pass
