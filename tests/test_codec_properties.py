"""Properties of the int8 codec over generated inputs: sizes, error bounds, refusal of non-finite payloads (int4's
own in test_codec_int4.py)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from swarm.codec import Blockwise4BitCompression, Blockwise8BitCompression, CodecError, make_codec

FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32)
CODEC = Blockwise8BitCompression()
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.timeout(120)
@SETTINGS
@given(arrays(np.float32, st.integers(0, 1300), elements=FINITE))
def test_any_finite_vector_roundtrips_within_its_blocks_scale(values):
    x = torch.from_numpy(values.copy())
    payload = CODEC.encode(x)
    assert len(payload) == CODEC.encoded_size(x.numel())
    y = CODEC.decode(payload, x.numel())
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    for start in range(0, x.numel(), CODEC.block_size):
        block, decoded = x[start : start + CODEC.block_size].double(), y[start : start + CODEC.block_size].double()
        scale = float(block.abs().max()) / 127
        assert float((decoded - block).abs().max()) <= scale * (1 + 1e-5) + 1e-45


@pytest.mark.timeout(120)
@SETTINGS
@given(st.integers(0, 10_000_000))
def test_payload_is_one_byte_a_value_plus_one_scale_a_block(numel):
    assert CODEC.encoded_size(numel) == 4 + 4 * -(-numel // 256) + numel
    if numel >= 4096:  # below that, the last partial block's scale weighs more
        assert CODEC.encoded_size(numel) / (4 * numel) <= 0.26


@pytest.mark.timeout(120)
@SETTINGS
@given(
    arrays(np.float32, st.integers(1, 600), elements=FINITE),
    st.integers(0, 599),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
@pytest.mark.parametrize("codec", [CODEC, Blockwise4BitCompression()], ids=["int8", "int4"])
def test_a_nonfinite_value_never_decodes_silently(codec, values, where, bad):
    values = values.copy()
    values[where % len(values)] = bad
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(codec.encode(torch.from_numpy(values)), len(values))


@pytest.mark.timeout(120)
@SETTINGS
@given(st.binary(min_size=0, max_size=600), st.integers(0, 500))
def test_arbitrary_bytes_either_decode_to_finite_values_or_are_refused(payload, numel):
    for name in ("int8", "fp16", "none"):
        try:
            out = make_codec(name).decode(payload, numel)
        except CodecError:
            continue
        assert out.shape == (numel,)
        if name == "int8":
            assert bool(torch.isfinite(out).all())


@pytest.mark.timeout(120)
def test_huge_and_tiny_magnitudes():
    x = torch.tensor([3.0e38, -3.0e38, 1e-38, 1e-45, 0.0, -0.0] * 50, dtype=torch.float32)
    y = CODEC.decode(CODEC.encode(x), x.numel())
    assert bool(torch.isfinite(y).all())
    assert float(y[0]) == pytest.approx(3.0e38, rel=1e-6) and float(y[1]) == pytest.approx(-3.0e38, rel=1e-6)


@pytest.mark.timeout(60)
def test_the_native_codec_is_built_on_a_machine_with_a_compiler():
    import shutil

    from swarm.native import sqblock

    assert shutil.which("cc") or shutil.which("gcc")
    assert sqblock() is not None


@pytest.mark.timeout(120)
@SETTINGS
@given(arrays(np.float32, st.integers(0, 1300), elements=st.floats(width=32)))
def test_native_and_torch_codecs_agree(values):
    """Same scales, codes at most one level apart (ties), and bit-identical decoding of the same bytes."""
    x = torch.from_numpy(values.copy())
    native, reference = bytes(CODEC.encode(x)), CODEC._encode_torch(x)
    n_blocks = -(-x.numel() // 256)
    scales = [np.frombuffer(p, "<f4", count=n_blocks, offset=4) for p in (native, reference)]
    assert np.array_equal(scales[0], scales[1], equal_nan=True)
    codes = [np.frombuffer(p, np.int8, offset=4 + 4 * n_blocks).astype(int) for p in (native, reference)]
    finite = np.repeat(np.isfinite(scales[0]), 256)[: x.numel()]
    assert np.abs(codes[0] - codes[1])[finite].max(initial=0) <= 1
    for payload in (native, reference):
        try:
            fast = CODEC.decode(payload, x.numel())
        except CodecError:
            assert not np.isfinite(values).all()
            continue
        slow = CODEC.decode_into(payload, torch.empty(x.numel()), native=False)
        assert torch.equal(fast, slow)


@pytest.mark.timeout(120)
@SETTINGS
@given(st.lists(st.floats(0, 3.0000000054977558e38, width=32), min_size=1, max_size=4), st.floats(0.0, 1.0))
def test_every_code_decodes_and_accumulates_alike_on_both_paths(scales, alpha):
    """The native kernels compute each level as c|c| / 16129 in float32; the table holds k^2 / 16129 rounded once.

    Both must give the same bits for every code -127..127 and any scale, or peers with and without a C compiler
    would decode the same bytes differently."""
    codes = np.tile(np.arange(-127, 128, dtype=np.int8), len(scales))  # 255 codes, once under each scale
    n_blocks = -(-codes.size // 256)
    block_scales = np.resize(np.array(scales, "<f4"), n_blocks)
    payload = b"".join((np.uint32(256).tobytes(), block_scales.tobytes(), codes.tobytes()))
    fast = CODEC.decode(payload, codes.size)
    slow = CODEC.decode_into(payload, torch.empty(codes.size), native=False)
    assert torch.equal(fast, slow)
    start = torch.linspace(-1, 1, codes.size)
    acc = start.clone()
    CODEC.accumulate(payload, acc, alpha)
    assert torch.equal(acc, start + np.float32(alpha) * slow)
