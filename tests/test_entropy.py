"""Huffman-coded payloads on the wire (swarm.entropy): lossless, each peer's own choice, and checked when read."""

import asyncio
import dataclasses
import struct

import msgpack
import pytest
import torch

from swarm.entropy import MIN_CODED_BYTES, EntropyCoding, code, pack
from swarm.wire import ProtocolError, read_frame, write_frame
from tests.conftest import swarm_of
from tests.test_swarm import config, perturbed, running_swarms


class _Buffer:
    """The two methods of a StreamWriter that write_frame uses, writing into bytes."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _frame(header: dict, payload: bytes) -> bytes:
    packed = msgpack.packb(dict(header, nbytes=len(payload)))
    return struct.pack("<I", len(packed)) + packed + payload


def _codes(numel: int, seed: int = 0) -> bytes:
    """int8 codes of Gaussian values: what a coded frame carries."""
    from swarm.codec import make_codec

    return bytes(make_codec("int8").encode(torch.randn(numel, generator=torch.Generator().manual_seed(seed))))


@pytest.mark.timeout(20)
async def test_a_coded_frame_is_smaller_and_reads_back_as_its_raw_bytes():
    raw = _codes(100_000)
    packed = await pack(raw)
    assert packed.coded is not None and len(packed.coded) < 0.98 * len(raw)
    out = _Buffer()
    await write_frame(out, {"type": "part", "numel": 100_000}, packed)
    header, payload = await read_frame(_reader(bytes(out.data)))
    assert payload == raw
    assert header == {"type": "part", "numel": 100_000, "nbytes": len(packed.coded)}  # coding and size consumed
    small = await pack(raw[: MIN_CODED_BYTES - 1])
    assert small.coded is None  # too small to be worth a code table: it goes raw


@pytest.mark.timeout(20)
async def test_malformed_coded_frames_raise_protocol_error():
    raw = _codes(20_000)
    coded = code(raw)
    cases = [
        ({"coding": "gzip", "size": len(raw)}, coded, "unknown payload coding"),
        ({"coding": "huffman"}, coded, "coded payload size None"),
        ({"coding": "huffman", "size": "many"}, coded, "coded payload size"),
        ({"coding": "huffman", "size": 2**40}, coded, "invalid or exceeds"),
        # A frame that claims far more than Huffman codes can expand to: refused before decoding (no bombs).
        ({"coding": "huffman", "size": 100 * len(coded)}, coded, "cannot hold"),
        ({"coding": "huffman", "size": len(raw)}, b"\xff" * len(coded), "does not decode"),
        ({"coding": "huffman", "size": len(raw) - 1}, coded, "more than the"),
        ({"coding": "huffman", "size": len(raw) + 1}, coded, "decodes to"),
        ({"coding": "huffman", "size": len(raw)}, coded[: len(coded) // 2], "decodes to"),
        ({"coding": "huffman", "size": len(raw)}, coded + b"tail", "decodes to"),
    ]
    for extra, payload, match in cases:
        with pytest.raises(ProtocolError, match=match):
            await read_frame(_reader(_frame({"type": "part", **extra}, payload)))


def test_auto_codes_while_the_link_is_slow_and_the_fixed_modes_never_change():
    auto = EntropyCoding("auto", slow_link=8e6)
    assert auto.active  # a volunteer's link is the slow case: code until a round says otherwise
    auto.observe(40_000_000, 0.2)  # 200 MB/s: 127.0.0.1 or a data-centre link
    assert not auto.active and auto.last_rate == 200e6
    auto.observe(6_000_000, 1.5)  # 4 MB/s: 32 Mbit/s
    assert auto.active
    auto.observe(0, 0.0)  # a round that sent nothing says nothing
    assert auto.active
    for mode, active in (("on", True), ("off", False)):
        fixed = EntropyCoding(mode)
        for sent, seconds in ((40_000_000, 0.2), (6_000_000, 1.5)):
            fixed.observe(sent, seconds)
            assert fixed.active is active
    with pytest.raises(ValueError, match="must be one of auto, on, off"):
        EntropyCoding("always")


@pytest.mark.timeout(120)
async def test_members_that_code_and_members_that_do_not_average_to_the_same_bits():
    theta = [torch.randn(300, 200, generator=torch.Generator().manual_seed(0))]  # int8 parts of 20 KB: coded
    modes = ("on", "off", "auto")
    async with swarm_of(3) as (_, nodes):
        results = {}
        for name, mode_of in (("mixed", modes), ("plain", ("off",) * 3)):
            base = config(run_id=f"coding-{name}", compression="int8")
            cfgs = [dataclasses.replace(base, entropy_coding=mode) for mode in mode_of]
            async with running_swarms(nodes, theta, cfgs.__getitem__) as swarms:
                locals_ = [perturbed(theta, i) for i in range(3)]
                reports = await asyncio.gather(*[s.outer_step(loc, 10) for s, loc in zip(swarms, locals_)])
                assert [r.group_size for r in reports] == [3, 3, 3]
                results[name] = reports
    mixed, plain = results["mixed"], results["plain"]
    # Lossless: the same θ, bit for bit, whichever members coded what they sent.
    assert len({r.params_sha256 for r in mixed + plain}) == 1
    # The member that codes sends fewer bytes than it does uncoded; the one that never codes sends the same.
    assert mixed[0].bytes_sent < 0.98 * plain[0].bytes_sent
    assert mixed[1].bytes_sent == plain[1].bytes_sent
