"""Frames read from the network are checked before anything uses them."""

import asyncio
import struct

import msgpack
import pytest

from swarm.wire import MAX_HEADER_BYTES, ProtocolError, read_frame


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@pytest.mark.timeout(10)
async def test_malformed_frames_raise_protocol_error():
    header = msgpack.packb([1, 2, 3])
    with pytest.raises(ProtocolError, match="must be a map"):
        await read_frame(_reader(struct.pack("<I", len(header)) + header))
    with pytest.raises(ProtocolError, match="exceeds"):
        await read_frame(_reader(struct.pack("<I", MAX_HEADER_BYTES + 1)))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        await read_frame(_reader(struct.pack("<I", 2) + b"\xc1\xc1"))
    header = msgpack.packb({"nbytes": -5})
    with pytest.raises(ProtocolError, match="invalid"):
        await read_frame(_reader(struct.pack("<I", len(header)) + header))
    header = msgpack.packb({"nbytes": 10})
    with pytest.raises(ProtocolError, match="invalid or exceeds"):
        await read_frame(_reader(struct.pack("<I", len(header)) + header), max_payload=0)


@pytest.mark.timeout(10)
async def test_truncated_frame_is_an_incomplete_read():
    header = msgpack.packb({"nbytes": 10})
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(_reader(struct.pack("<I", len(header)) + header + b"abc"))
