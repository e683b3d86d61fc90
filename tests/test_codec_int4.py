"""The int4 codec: the int8 codec's properties (bounded error, refusal of malformed or non-finite payloads, identical
decoding everywhere, accumulate = decode then add), at 4 bits a value."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from swarm.codec import CODECS, Blockwise4BitCompression, CodecError, make_codec

FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32)
CODEC = Blockwise4BitCompression()
BS = CODEC.block_size
LEVELS = CODEC.LEVELS
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


BFLOAT16_MAX = float(np.array([0x7F7F0000], np.uint32).view(np.float32)[0])
FINITE_BFLOAT16 = st.integers(0, 0xFFFF).filter(lambda bits: bits & 0x7F80 != 0x7F80)


def n_blocks(numel: int) -> int:
    return -(-numel // BS)


def widen(bits) -> np.ndarray:
    """float32 values of bfloat16 bit patterns, written out: the bits are a float32's upper half."""
    return np.array([struct.unpack("<f", struct.pack("<I", int(b) << 16))[0] for b in bits], np.float32)


def scales_of(payload: bytes, numel: int) -> np.ndarray:
    return widen(np.frombuffer(payload, "<u2", count=n_blocks(numel), offset=4))


def reference_decode(payload: bytes, numel: int) -> np.ndarray:
    """The format as written down, one value at a time: LEVELS[nibble] * scale in float32."""
    scales = scales_of(payload, numel)
    packed = np.frombuffer(payload, np.uint8, offset=4 + 2 * n_blocks(numel))
    out = np.empty(numel, np.float32)
    for i in range(numel):
        nibble = (int(packed[i // 2]) >> (4 * (i % 2))) & 15
        out[i] = np.float32(LEVELS[nibble]) * np.float32(scales[i // BS])
    return out


def payload_of(scale_bits, nibbles) -> bytes:
    nibbles = list(nibbles) + [7] * (len(nibbles) % 2)
    packed = bytes(lo | (hi << 4) for lo, hi in zip(nibbles[0::2], nibbles[1::2], strict=True))
    return struct.pack("<I", BS) + np.asarray(scale_bits, "<u2").tobytes() + packed


@pytest.mark.timeout(30)
def test_registered_as_int4():
    assert CODECS["int4"] is Blockwise4BitCompression
    codec = make_codec("int4")
    assert isinstance(codec, Blockwise4BitCompression) and codec.tag == "int4-block/v2" and codec.decodes_finite


@pytest.mark.timeout(30)
def test_levels_are_sorted_within_one_and_the_max_error_is_their_largest_half_gap():
    assert LEVELS.dtype == np.float32 and LEVELS.size == 16 and bool((np.diff(LEVELS) > 0).all())
    assert LEVELS[7] == 0.0 and LEVELS[-1] == 1.0 and LEVELS[0] >= -1.0
    gaps = np.concatenate([[LEVELS[0] + 1.0], np.diff(LEVELS.astype(np.float64)) / 2])
    assert float(gaps.max()) == pytest.approx(CODEC._MAX_ERROR, abs=1e-4)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dist, bound", [("gaussian", 0.09), ("student_t3", 0.12)])
def test_error_and_size(dist, bound):
    torch.manual_seed(0)
    n = 1_000_003
    x = torch.randn(n) if dist == "gaussian" else torch.distributions.StudentT(3.0).sample((n,))
    payload = CODEC.encode(x)
    y = CODEC.decode(payload, n)
    assert len(payload) / (4 * n) <= (0.5 + 2 / BS) / 4 + 1e-5  # 1/8 of fp32, plus one bfloat16 scale per block
    assert float((y - x).norm() / x.norm()) <= bound


@pytest.mark.timeout(120)
@SETTINGS
@given(arrays(np.float32, st.integers(0, 1300), elements=FINITE))
def test_any_finite_vector_roundtrips_within_its_blocks_scale(values):
    x = torch.from_numpy(values.copy())
    payload = CODEC.encode(x)
    assert len(payload) == CODEC.encoded_size(x.numel())
    y = CODEC.decode(payload, x.numel())
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    scales = scales_of(bytes(payload), x.numel())
    for i, start in enumerate(range(0, x.numel(), BS)):
        block, decoded = x[start : start + BS].double(), y[start : start + BS].double()
        largest, scale = float(block.abs().max()), abs(float(scales[i]))
        # The scale is the largest magnitude rounded up to bfloat16 (down only past bfloat16's largest finite value;
        # a subnormal one to at least bfloat16's least step, 2^-133).
        if largest > BFLOAT16_MAX:
            assert scale == BFLOAT16_MAX
        elif largest >= 2.0**-126:
            assert largest <= scale <= largest * (1 + 2.0**-7)
        else:
            assert largest <= scale <= largest + 2.0**-133
        beyond = max(0.0, largest - scale)  # only past bfloat16's largest finite value
        assert float((decoded - block).abs().max()) <= scale * CODEC._MAX_ERROR * (1 + 1e-5) + beyond + 1e-45
        # The block's value of largest magnitude lands on level +1 (unless the scale is a bfloat16 subnormal, coarser
        # than a float32 one): it comes back as its scale.
        if largest >= 2.0**-126:
            assert scale in decoded.abs().tolist()


@pytest.mark.timeout(120)
@SETTINGS
@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-(2.0**100), 2.0**100, width=32)))
def test_every_value_goes_to_its_nearest_level(values):
    x = torch.from_numpy(values.copy())
    payload = bytes(CODEC.encode(x))
    y = CODEC.decode(payload, x.numel()).double().numpy()
    scales = scales_of(payload, x.numel())
    for start in range(0, x.numel(), BS):
        block = values[start : start + BS].astype(np.float64)
        scale = float(scales[start // BS])  # sign and magnitude of the block's largest value, as bfloat16
        candidates = LEVELS.astype(np.float64)[None, :] * scale
        nearest = np.abs(candidates - block[:, None]).min(axis=1)
        got = np.abs(y[start : start + BS] - block)
        # (ties and float32 rounding of x / scale may pick the other neighbour of a midpoint: a few ulps of scale)
        assert bool((got <= nearest + 1e-6 * abs(scale) + 1e-45).all())


@pytest.mark.timeout(120)
@SETTINGS
@given(st.integers(0, 10_000_000))
def test_payload_is_half_a_byte_a_value_plus_one_scale_a_block(numel):
    assert CODEC.encoded_size(numel) == 4 + 2 * n_blocks(numel) + -(-numel // 2)
    if numel >= 1 << 16:  # below that, the header and the last partial block's scale weigh more
        assert CODEC.encoded_size(numel) / (4 * numel) <= 0.1329  # 4.25 bits a value: 1/0.1328 = 7.53


@pytest.mark.timeout(120)
@SETTINGS
@given(st.binary(min_size=0, max_size=600), st.integers(0, 500))
def test_arbitrary_bytes_either_decode_to_finite_values_or_are_refused(payload, numel):
    try:
        out = CODEC.decode(payload, numel)
    except CodecError:
        with pytest.raises(CodecError):
            CODEC.check_finite(payload, numel)
        return
    assert out.shape == (numel,) and bool(torch.isfinite(out).all())
    assert CODEC.check_finite(payload, numel) is None


@pytest.mark.timeout(120)
@SETTINGS
@given(st.integers(1, 400), st.data())
def test_malformed_payloads_are_refused(numel, data):
    payload = bytes(CODEC.encode(torch.randn(numel)))
    CODEC.decode(payload, numel)
    # wrong length, either way, and the right bytes for another numel
    with pytest.raises(CodecError, match="bytes, expected"):
        CODEC.decode(payload[:-1], numel)
    with pytest.raises(CodecError, match="bytes, expected"):
        CODEC.decode(payload + b"\x00", numel)
    if CODEC.encoded_size(numel + 1) != len(payload):
        with pytest.raises(CodecError):
            CODEC.decode(payload, numel + 1)
    # a non-finite scale in any block
    block = data.draw(st.integers(0, n_blocks(numel) - 1))
    bad = data.draw(st.sampled_from([b"\xc0\x7f", b"\x80\x7f", b"\x80\xff", b"\x81\x7f"]))
    broken = bytearray(payload)
    broken[4 + 2 * block : 6 + 2 * block] = bad
    with pytest.raises(CodecError, match="non-finite"):
        CODEC.decode(bytes(broken), numel)
    with pytest.raises(CodecError, match="non-finite"):
        CODEC.check_finite(bytes(broken), numel)
    # another block size in the header
    broken = bytearray(payload)
    broken[0:4] = struct.pack("<I", BS * 2)
    with pytest.raises(CodecError, match="blocks of"):
        CODEC.decode(bytes(broken), numel)
    # a padding nibble other than zero's code
    if numel % 2:
        broken = bytearray(payload)
        broken[-1] = (broken[-1] & 0x0F) | (data.draw(st.sampled_from([n for n in range(16) if n != 7])) << 4)
        with pytest.raises(CodecError, match="padding"):
            CODEC.decode(bytes(broken), numel)
        with pytest.raises(CodecError, match="padding"):
            CODEC.check_finite(bytes(broken), numel)


@pytest.mark.timeout(30)
def test_other_block_sizes_do_not_decode_each_other():
    other = Blockwise4BitCompression(block_size=128)
    with pytest.raises(CodecError):
        other.decode(CODEC.encode(torch.randn(256)), 256)
    with pytest.raises(ValueError):
        Blockwise4BitCompression(block_size=0)


@pytest.mark.timeout(120)
def test_huge_and_tiny_magnitudes():
    x = torch.tensor([3.0e38, -3.0e38, 1e-38, 1e-45, 0.0, -0.0] * 50, dtype=torch.float32)
    y = CODEC.decode(CODEC.encode(x), x.numel())
    assert bool(torch.isfinite(y).all())
    assert float(y[0]) == pytest.approx(3.0e38, rel=2**-7) and float(y[1]) == pytest.approx(-3.0e38, rel=0.15)
    # Beyond bfloat16's largest finite scale (float32's largest values): finite, at most 0.4% further off.
    top = torch.tensor([3.4028e38, -3.4e38, 1.0] * 30, dtype=torch.float32)
    w = CODEC.decode(CODEC.encode(top), top.numel())
    assert bool(torch.isfinite(w).all()) and float(w[0]) == pytest.approx(3.4028e38, rel=0.004)
    tiny = torch.tensor([1e-45, -1e-45, 0.0, 3e-45] * 20, dtype=torch.float32)  # subnormal scales
    z = CODEC.decode(CODEC.encode(tiny), tiny.numel())
    assert float((z - tiny).abs().max()) <= 2.0**-133  # bfloat16's least step: a float32 subnormal's values are lost


@pytest.mark.timeout(120)
@SETTINGS
@given(arrays(np.float32, st.integers(0, 700), elements=st.floats(width=32)))
def test_decoding_is_bit_identical_and_matches_the_format(values):
    """bytes, bytearray or memoryview, into a new tensor or a slice of a larger one: the same bits, and those of
    LEVELS[nibble] * scale computed one value at a time."""
    x = torch.from_numpy(values.copy())
    payload = CODEC.encode(x)
    assert bytes(payload) == bytes(CODEC.encode(x.clone()))  # encoding is deterministic too
    numel = x.numel()
    try:
        first = CODEC.decode(bytes(payload), numel)
    except CodecError:
        assert not np.isfinite(values).all()
        return
    expected = torch.from_numpy(reference_decode(bytes(payload), numel))
    bits = [first, CODEC.decode(bytearray(payload), numel), CODEC.decode(memoryview(bytes(payload)), numel)]
    big = torch.full((numel + 3,), 7.0)
    bits.append(CODEC.decode_into(payload, big[1 : 1 + numel]))  # an odd offset: not 8-byte aligned
    assert big[0] == 7.0 and bool((big[1 + numel :] == 7.0).all())
    for decoded in bits:
        assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))


@pytest.mark.timeout(120)
@SETTINGS
@given(st.lists(FINITE_BFLOAT16, min_size=1, max_size=5), st.data())
def test_every_code_decodes_to_its_level_under_any_scale(scale_bits, data):
    scales = widen(scale_bits)
    numel = data.draw(st.integers(max(1, (len(scales) - 1) * BS + 1), len(scales) * BS))
    nibbles = [i % 16 for i in range(numel)]
    payload = payload_of(scale_bits, nibbles)
    decoded = CODEC.decode(payload, numel)
    assert bool(torch.isfinite(decoded).all())
    expected = np.array([LEVELS[n] * np.float32(scales[i // BS]) for i, n in enumerate(nibbles)], np.float32)
    assert torch.equal(decoded.view(torch.int32), torch.from_numpy(expected).view(torch.int32))


@pytest.mark.timeout(120)
@SETTINGS
@given(arrays(np.float32, st.integers(0, 700), elements=FINITE), st.floats(-2.0, 2.0, width=32))
def test_accumulate_equals_decode_then_add(values, alpha):
    x = torch.from_numpy(values.copy())
    payload = CODEC.encode(x)
    assert CODEC.check_finite(payload, x.numel()) is None  # checked from the bytes: accumulate reads them later
    start = torch.linspace(-1, 1, x.numel())
    acc = start.clone()
    CODEC.accumulate(payload, acc, alpha)
    decoded = CODEC.decode(payload, x.numel())
    assert torch.equal(acc, start.clone().add_(decoded, alpha=alpha))
    exact = start.double() + alpha * decoded.double()
    size = start.double().abs() + abs(alpha) * decoded.double().abs()
    representable = size < 3e38
    assert bool(((acc.double() - exact).abs() <= 1e-6 * size + 1e-45)[representable].all())
