"""Lossless entropy coding of all-reduce payloads on the wire, and when a peer uses it.

A codec's 8-bit (or 4-bit) codes of a pseudo-gradient are not uniform: int8's square-law levels put most values in the
middle codes, and real pseudo-gradients carry 7.7-7.8 bits of entropy per 8-bit code. Huffman coding the payload's
bytes (zlib's Huffman-only deflate: no string matching, which finds nothing in such codes) takes 3-8% off the wire,
losslessly, at about 140 MB/s to code and 220 MB/s to decode on one core. Lossless, it changes no decoded bit: the
group's θ stays identical whichever members code.

That trade pays where the link is slower than the coder by more than the bytes it saves, the links volunteers have
(a 50 Mbit/s link moves 6 MB/s), and not on a data-centre link or 127.0.0.1, where the data plane moves hundreds of MB/s
and the coder would be the bottleneck. So each peer chooses for itself (a frame says whether it is coded, and every
peer reads both): `auto`, the default, codes while its last round sent at under `SLOW_LINK_BYTES_PER_SECOND`.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass

CODING = "huffman"
"""The only coding a frame may name (wire.read_frame refuses any other)."""

MIN_CODED_BYTES = 4096
"""Smaller payloads travel as they are: the code table would eat what coding saves."""

MAX_EXPANSION = 8
"""Huffman codes take at least one bit per byte, so an honest coded payload decodes to at most 8x its size (plus the
header's slack): a frame that claims more is refused before anything is allocated (no decompression bombs)."""

SLOW_LINK_BYTES_PER_SECOND = 8e6
"""`auto` codes below this send rate (64 Mbit/s). Coding and decoding cost about B/86 MB/s of CPU per B bytes and save
4-8% of the transfer's B/rate: it pays below about 4-7 MB/s done one after the other, and a little above when the
coder runs beside other transfers (it runs in a thread and releases the GIL)."""

MODES = ("auto", "on", "off")

_OFFLOAD_BYTES = 256 * 1024


class CodingError(ValueError):
    """A coded payload that does not decode to the size its frame declared."""


@dataclass(frozen=True)
class Packed:
    """A payload ready for the wire: its raw bytes, and their Huffman coding where that is smaller."""

    raw: bytes | bytearray | memoryview
    coded: bytes | None = None


def code(raw: bytes | bytearray | memoryview) -> bytes:
    """Raw deflate with Huffman coding only (level and window do not matter to it)."""
    coder = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return coder.compress(raw) + coder.flush()


def decode(coded: bytes | bytearray | memoryview, size: int) -> bytes:
    """The `size` raw bytes of a coded payload. CodingError if it is not exactly that (or not deflate at all)."""
    if not 0 < size <= MAX_EXPANSION * len(coded) + 64:
        raise CodingError(f"a coded payload of {len(coded)} bytes cannot hold {size}")
    decoder = zlib.decompressobj(-15)
    try:
        raw = decoder.decompress(coded, size)  # never more than `size` bytes out
    except zlib.error as e:
        raise CodingError(f"coded payload does not decode: {e}") from None
    if len(raw) != size or not decoder.eof or decoder.unconsumed_tail or decoder.unused_data:
        raise CodingError(f"coded payload decodes to {len(raw)} bytes or more than the {size} declared")
    return raw


async def pack(raw: bytes | bytearray | memoryview) -> Packed:
    """`raw`, coded where that makes it smaller (the coding runs in a thread when it is large)."""
    if len(raw) < MIN_CODED_BYTES:
        return Packed(raw)
    coded = await asyncio.to_thread(code, raw) if len(raw) >= _OFFLOAD_BYTES else code(raw)
    return Packed(raw, coded if len(coded) < len(raw) else None)


async def unpack(coded: bytes, size: int) -> bytes:
    if size >= _OFFLOAD_BYTES:
        return await asyncio.to_thread(decode, coded, size)
    return decode(coded, size)


class EntropyCoding:
    """Whether this peer codes what it sends: always (`on`), never (`off`), or (`auto`) while its last round of the
    all-reduce sent at under `slow_link` bytes per second. `auto` starts coding (a volunteer's link is the slow case)
    and measures from the first round on."""

    def __init__(self, mode: str = "auto", slow_link: float = SLOW_LINK_BYTES_PER_SECOND):
        if mode not in MODES:
            raise ValueError(f"entropy coding must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.slow_link = mode, slow_link
        self.active = mode != "off"
        self.last_rate: float | None = None
        """Bytes per second the last observed round sent at."""

    def observe(self, bytes_sent: int, seconds: float) -> None:
        """A finished round: `bytes_sent` (on the wire) in `seconds`."""
        if seconds <= 0 or bytes_sent <= 0:
            return
        self.last_rate = bytes_sent / seconds
        if self.mode == "auto":
            self.active = self.last_rate < self.slow_link
