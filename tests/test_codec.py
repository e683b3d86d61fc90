"""The wire codecs: any shape and dtype, bounded error, compact payloads, identical decoding everywhere."""

import pytest
import torch

from swarm.codec import (
    CODECS,
    READ_ALIGNMENT,
    Blockwise4BitCompression,
    Blockwise8BitCompression,
    CodecError,
    make_codec,
)
from swarm.native import sqblock


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor(3.5),  # 0-d
        lambda: torch.zeros(0),  # empty
        lambda: torch.randn(1),
        lambda: torch.randn(65),  # odd, one past an int4 block
        lambda: torch.randn(257),  # odd, one past an int8 block
        lambda: torch.randn(7, 13).t(),  # non-contiguous
        lambda: torch.randn(1000).to(torch.bfloat16),
        lambda: torch.randn(1000).to(torch.float16),
        lambda: torch.zeros(600),  # all-zero blocks
    ],
)
def test_roundtrip_any_shape_and_dtype(name, make):
    codec = make_codec(name)
    x = make()
    flat = x.reshape(-1).float()
    payload = codec.encode(x)
    assert len(payload) == codec.encoded_size(flat.numel())
    y = codec.decode(payload, flat.numel())
    assert y.dtype == torch.float32 and y.shape == (flat.numel(),)
    if flat.numel():
        largest = float(flat.abs().max())
        bound = {
            "none": 0.0,
            "fp16": 1e-3 * max(1.0, largest),
            "int8": 0.01 * max(1.0, largest),
            # each value within its level's gap, of a scale rounded up to bfloat16
            "int4": Blockwise4BitCompression._MAX_ERROR * (1 + 2**-7) * largest,
        }[name]
        assert float((y - flat).abs().max()) <= bound


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("numel", [0, 1, 255, 257, 3 * READ_ALIGNMENT, 5 * READ_ALIGNMENT + 77])
def test_a_reader_decodes_any_aligned_slice_to_the_same_bits(name, numel):
    codec = make_codec(name)
    flat = torch.randn(numel) * torch.linspace(0.1, 10, numel)  # blocks of different scales
    payload = codec.encode(flat)
    whole = codec.decode(payload, numel)
    read = codec.reader(payload, numel)
    for step in (READ_ALIGNMENT, 2 * READ_ALIGNMENT):
        pieces = [read(a, torch.empty(min(step, numel - a))) for a in range(0, numel, step)]
        assert torch.equal(torch.cat(pieces) if pieces else torch.empty(0), whole)
    if name == "int8" and sqblock() is not None:  # the native kernel and numpy agree on slices too
        bs, absmax, codes = codec.sqblock_parts(payload, numel)
        n = min(numel, READ_ALIGNMENT + 3)
        piece = codec._decode_parts(bs, absmax[: -(-n // bs)], codes[:n], torch.empty(n), native=False)
        assert torch.equal(piece, whole[:n])
    with pytest.raises(CodecError):
        codec.reader(bytes(payload)[:-1] if len(payload) else b"x", numel)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_int8_error_and_size(dist):
    torch.manual_seed(0)
    n = 1_000_003
    if dist == "gaussian":
        x = torch.randn(n)
    else:
        x = torch.distributions.StudentT(3.0).sample((n,))
    codec = Blockwise8BitCompression()
    payload = codec.encode(x)
    y = codec.decode(payload, n)
    assert len(payload) / (4 * n) <= 0.26
    assert float((y - x).norm() / x.norm()) <= 0.01
    # No clipping: every value's error is within its own block's scale (absmax / 127).
    bs = codec.block_size
    pad = (-n) % bs
    blocks = torch.cat([x, torch.zeros(pad)]).view(-1, bs)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    err = torch.cat([(y - x), torch.zeros(pad)]).view(-1, bs).abs()
    # (plus float32 rounding of the decoded value, a few ulps of the absmax)
    assert bool((err <= scale * (1 + 1e-5)).all())


@pytest.mark.timeout(30)
def test_decoding_is_bit_identical():
    codec = make_codec("int8")
    payload = codec.encode(torch.randn(10_000))
    a, b = codec.decode(payload, 10_000), codec.decode(bytes(payload), 10_000)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", CODECS)
def test_payload_of_wrong_size_is_refused(name):
    codec = make_codec(name)
    payload = codec.encode(torch.randn(100))
    with pytest.raises(CodecError):
        codec.decode(payload[:-1], 100)
    with pytest.raises(CodecError):
        codec.decode(payload, 101)


@pytest.mark.timeout(30)
def test_int8_refuses_nonfinite_scales_and_other_block_sizes():
    codec = Blockwise8BitCompression()
    payload = bytearray(codec.encode(torch.randn(300)))
    payload[4:8] = b"\x00\x00\xc0\x7f"  # NaN as the first scale
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(bytes(payload), 300)
    other = Blockwise8BitCompression(block_size=128)
    with pytest.raises(CodecError):
        other.decode(codec.encode(torch.randn(256)), 256)


@pytest.mark.timeout(30)
def test_fp16_saturates_instead_of_sending_inf():
    codec = make_codec("fp16")
    y = codec.decode(codec.encode(torch.tensor([1e6, -1e6, 1.0])), 3)
    assert torch.isfinite(y).all() and y[0] == 65504.0 and y[1] == -65504.0


@pytest.mark.timeout(30)
def test_unknown_codec_name():
    with pytest.raises(ValueError, match="unknown compression"):
        make_codec("int3")
