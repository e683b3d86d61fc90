"""Codecs for pseudo-gradients on the wire: fp32 (none), fp16, and blockwise 8-bit and 4-bit.

Every codec encodes a flat float32 tensor to bytes and decodes those bytes back to float32. Decoding is a pure,
elementwise function of the bytes, so every peer that decodes the same bytes gets bit-identical values: that is what
lets a whole group end an outer step with identical parameters.

The name and version of a codec are part of a peer's schema (see `swarm.records`): peers that would decode
differently never meet in a group.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Callable

import numpy as np
import torch

from swarm.flat import all_finite
from swarm.native import sqblock

READ_ALIGNMENT = 256
"""Where `Codec.reader` may start a slice: a whole number of every codec's blocks (and of int4's byte pairs)."""


class CodecError(ValueError):
    """A payload could not be decoded: wrong size, wrong header, or non-finite content."""


class Codec(abc.ABC):
    """Encodes a flat float32 tensor into bytes and back."""

    name: str
    version: int
    decodes_finite: bool = False
    """Whether every payload that decodes without a CodecError decodes to finite values (no check needed)."""
    sqblock_block: int | None = None
    """The block size if this codec's payloads are in the layout swarm/native's kernels read (int8's square-law codes,
    one float32 absmax per block; `sqblock_parts`), which judging and auditing then use; None if they are not."""

    @property
    def tag(self) -> str:
        """What peers compare before averaging together: name and version."""
        return f"{self.name}/v{self.version}"

    @abc.abstractmethod
    def encode(self, flat: torch.Tensor) -> bytes:
        """Encode a 1-d float32 tensor."""

    @abc.abstractmethod
    def decode(self, payload: bytes | memoryview, numel: int) -> torch.Tensor:
        """Decode into a new 1-d float32 tensor of `numel` elements; raise CodecError if the payload does not fit."""

    def decode_into(self, payload: bytes | memoryview, out: torch.Tensor) -> torch.Tensor:
        """Decode into `out` (1-d, contiguous float32, e.g. a slice of a larger vector) and return it."""
        out.copy_(self.decode(payload, out.numel()))
        return out

    def check_finite(self, payload: bytes | memoryview, numel: int) -> torch.Tensor | None:
        """Raise CodecError unless the payload decodes to `numel` finite values.

        Returns the decoded values when checking needed them anyway, or None when the payload could be checked
        without decoding it (then `accumulate` reads it straight from the bytes)."""
        values = self.decode(payload, numel)
        if not all_finite(values):
            raise CodecError("payload holds NaN or inf")
        return values

    def accumulate(self, payload: bytes | memoryview, acc: torch.Tensor, alpha: float) -> None:
        """acc += alpha * decode(payload)."""
        acc.add_(self.decode(payload, acc.numel()), alpha=alpha)

    @abc.abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Bytes that `encode` produces for `numel` elements."""

    def sqblock_parts(self, payload: bytes | memoryview, numel: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(block size, float32 scales, int8 codes) of a payload in the native kernels' layout, checked (CodecError);
        only for codecs with a `sqblock_block`."""
        raise NotImplementedError(f"{self.tag} payloads are not in the native kernels' layout")

    @abc.abstractmethod
    def reader(self, payload: bytes | memoryview, numel: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """A function that decodes values [start, start + len(out)) of the payload into `out` (1-d contiguous
        float32), `start` a multiple of READ_ALIGNMENT: a payload read a slice at a time, so that judging many
        contributions never holds them all decoded. The payload is checked once, here (CodecError)."""


def _as_flat_fp32(flat: torch.Tensor) -> torch.Tensor:
    if flat.dim() != 1:
        flat = flat.reshape(-1)
    return flat.detach().to(dtype=torch.float32, device="cpu").contiguous()


class _ElementwiseCodec(Codec):
    """A codec that sends every value on its own in a fixed little-endian float type (`_wire`): the payload is
    `numel` of them, nothing else."""

    _wire: str

    def _values(self, payload, numel: int) -> np.ndarray:
        """The payload's values as they are on the wire, checked for size."""
        expected = self.encoded_size(numel)
        if len(payload) != expected:
            raise CodecError(f"{np.dtype(self._wire).name} payload has {len(payload)} bytes, expected {expected}")
        return np.frombuffer(payload, dtype=self._wire)

    def encoded_size(self, numel: int) -> int:
        return np.dtype(self._wire).itemsize * numel

    def decode_into(self, payload, out: torch.Tensor) -> torch.Tensor:
        out.numpy()[:] = self._values(payload, out.numel())
        return out

    def reader(self, payload, numel: int):
        values = self._values(payload, numel)

        def read(start: int, out: torch.Tensor) -> torch.Tensor:
            out.numpy()[:] = values[start : start + out.numel()]
            return out

        return read


class NoCompression(_ElementwiseCodec):
    """Raw little-endian float32."""

    name, version = "none", 1
    _wire = "<f4"

    def encode(self, flat: torch.Tensor) -> bytes:
        return _as_flat_fp32(flat).numpy().astype("<f4", copy=False).tobytes()

    def decode(self, payload, numel: int) -> torch.Tensor:
        values = self._values(payload, numel)
        # A writable buffer (a bytearray read straight off a socket) becomes the tensor as it is: no 2nd copy.
        return torch.from_numpy(values if values.flags.writeable else values.copy())


class Float16Compression(_ElementwiseCodec):
    """IEEE half precision. Values beyond the fp16 range are saturated, not sent as inf."""

    name, version = "fp16", 1
    _wire = "<f2"
    _FP16_MAX = 65504.0

    def encode(self, flat: torch.Tensor) -> bytes:
        flat = _as_flat_fp32(flat).clamp(-self._FP16_MAX, self._FP16_MAX)
        return flat.to(torch.float16).numpy().astype("<f2", copy=False).tobytes()

    def decode(self, payload, numel: int) -> torch.Tensor:
        return torch.from_numpy(self._values(payload, numel).astype(np.float32))


class Blockwise8BitCompression(Codec):
    """8 bits per value on square-law levels, one float32 absmax per block of `block_size` values.

    Layout: [u32 block_size][float32 absmax x n_blocks][int8 codes x numel]. A code c stands for
    sign(c) * (|c| / 127)^2 * absmax: the levels are dense near zero, where most of a pseudo-gradient lives, and
    coarse near the block's largest value. With 256-value blocks the payload is (1 + 4/256) / 4 = 0.254x of fp32, the
    relative L2 error about 0.7% on Gaussian and 0.8% on Student-t(3) data (uniform levels: 0.7% and 1.9%), and
    no value is ever clipped: each value's error is at most its block's absmax / 127.

    Decoding is a table lookup and one float32 multiply: the table holds k^2/16129 rounded once from exact double
    arithmetic, so every machine decodes the same bytes to the same bits (no pow or sqrt on the decoding path). The
    native kernels compute the entry as (float)(c|c|) / 16129 instead, which is the same float (IEEE division is
    correctly rounded and c|c| exact; a test checks every code) and vectorizes where a lookup does not.

    Where a C compiler is available both directions run in native code (swarm.native: one pass per block, 3-9x
    faster than the torch/numpy path). Decoding gives the same bits either way. Encoding may differ from the torch
    path by one level on values that sit exactly between two levels (torch's vectorized sqrt is not always correctly
    rounded); that is harmless, because every member decodes the bytes that were actually sent.
    """

    name, version = "int8-sqblock", 1
    decodes_finite = True  # finite scales, codes -127..127 (checked in _parts): finite values
    _HEADER = struct.Struct("<I")
    _TINY = 1e-30
    # Code byte b (as uint8) -> signed level; -128 is never produced, and refused when received.
    _SIGNED_LEVELS = np.array([(1 if c < 128 else -1) * min(c, 256 - c) ** 2 / 16129 for c in range(256)], "<f4")

    def __init__(self, block_size: int = 256):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = self.sqblock_block = block_size

    def _n_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def encode(self, flat: torch.Tensor) -> bytes | bytearray:
        flat = _as_flat_fp32(flat)
        native = sqblock()
        if native is not None:
            return self._encode_native(native, flat)
        return self._encode_torch(flat)

    def _encode_native(self, native, flat: torch.Tensor) -> bytearray:
        numel, bs = flat.numel(), self.block_size
        n_blocks = self._n_blocks(numel)
        out = bytearray(self.encoded_size(numel))  # the payload itself: no intermediate buffers
        self._HEADER.pack_into(out, 0, bs)
        absmax = np.frombuffer(out, dtype="<f4", count=n_blocks, offset=self._HEADER.size)
        codes = np.frombuffer(out, dtype=np.int8, count=numel, offset=self._HEADER.size + 4 * n_blocks)
        native.sqblock_encode(flat.data_ptr(), numel, bs, absmax.ctypes.data, codes.ctypes.data)
        return out

    def _encode_torch(self, flat: torch.Tensor) -> bytes:
        numel, bs = flat.numel(), self.block_size
        n_blocks = self._n_blocks(numel)
        padded = torch.zeros(n_blocks * bs, dtype=torch.float32)
        padded[:numel] = flat
        blocks = padded.view(n_blocks, bs)
        magnitude = blocks.abs()
        absmax = magnitude.amax(dim=1)
        # A block of zeros has absmax 0: divide by 1 instead, its codes are 0 anyway.
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        # 16129 / absmax overflows for absmax below about 5e-35: compute such blocks scaled up by 2^64 (exact).
        tiny = safe < self._TINY
        if bool(tiny.any()):
            up = torch.where(tiny, torch.full_like(safe, 2.0**64), torch.ones_like(safe))
            magnitude.mul_(up[:, None])
            safe = safe * up
        # round(127 * sqrt(|x| / absmax)) as round(sqrt(|x| * 127^2 / absmax)), in place: few passes over memory.
        magnitude.mul_((16129.0 / safe)[:, None]).sqrt_().round_().clamp_(max=127)
        codes = magnitude.copysign_(blocks).to(torch.int8)
        return b"".join(
            (
                self._HEADER.pack(bs),
                absmax.numpy().astype("<f4", copy=False).tobytes(),
                codes.view(-1)[:numel].numpy().tobytes(),
            )
        )

    def decode(self, payload, numel: int) -> torch.Tensor:
        return self.decode_into(payload, torch.empty(numel, dtype=torch.float32))

    def check_finite(self, payload, numel: int) -> torch.Tensor | None:
        if sqblock() is None:
            return super().check_finite(payload, numel)
        self.sqblock_parts(payload, numel)  # every level times a finite scale below the bound is finite: no decoding
        return None

    def accumulate(self, payload, acc: torch.Tensor, alpha: float) -> None:
        lib = sqblock()
        if lib is None:
            super().accumulate(payload, acc, alpha)
            return
        bs, absmax, codes = self.sqblock_parts(payload, acc.numel())
        lib.sqblock_accumulate(codes.ctypes.data, absmax.ctypes.data, acc.numel(), bs, alpha, acc.data_ptr())

    def sqblock_parts(self, payload, numel: int):
        """(block size, scales, codes) of a payload, checked: right size and block size, finite scales, codes in
        -127..127 (so that it decodes to finite values)."""
        expected = self.encoded_size(numel)
        if len(payload) != expected:
            raise CodecError(f"int8 payload has {len(payload)} bytes, expected {expected}")
        (bs,) = self._HEADER.unpack_from(payload, 0)
        if bs != self.block_size:
            raise CodecError(f"int8 payload uses blocks of {bs}, this peer uses {self.block_size}")
        n_blocks = self._n_blocks(numel)
        offset = self._HEADER.size
        absmax = np.frombuffer(payload, dtype="<f4", count=n_blocks, offset=offset)
        codes = np.frombuffer(payload, dtype=np.int8, count=numel, offset=offset + 4 * n_blocks)
        absmax = absmax.astype(np.float32)
        if not np.isfinite(absmax).all() or (absmax < 0).any():
            raise CodecError("int8 payload carries a non-finite or negative scale")
        if numel and int(codes.min()) == -128:
            # Never produced (codes are -127..127): refused, so every level is at most 1 in magnitude and any finite
            # scale decodes to finite values; the payload can be trusted without decoding it.
            raise CodecError("int8 payload holds code -128")
        return bs, absmax, codes

    def decode_into(self, payload, out: torch.Tensor, native: bool = True) -> torch.Tensor:
        bs, absmax, codes = self.sqblock_parts(payload, out.numel())
        return self._decode_parts(bs, absmax, codes, out, native)

    def reader(self, payload, numel: int):
        bs, absmax, codes = self.sqblock_parts(payload, numel)

        def read(start: int, out: torch.Tensor) -> torch.Tensor:
            stop = start + out.numel()
            return self._decode_parts(bs, absmax[start // bs : -(-stop // bs)], codes[start:stop], out)

        return read

    def _decode_parts(self, bs: int, absmax, codes, out: torch.Tensor, native: bool = True) -> torch.Tensor:
        """Decode checked parts (whole blocks, but for a last partial one) into `out`."""
        numel = out.numel()
        lib = sqblock() if native else None
        if lib is not None:  # computes each level (bit for bit the table's) rather than looking it up: vectorizes
            lib.sqblock_decode(codes.ctypes.data, absmax.ctypes.data, numel, bs, out.data_ptr())
            return out
        # One lookup (sign folded into the table, indexed by the code's byte) and one multiply per value.
        values = out.numpy()
        np.take(self._SIGNED_LEVELS, codes.view(np.uint8), out=values)
        full = (numel // bs) * bs
        values[:full].reshape(-1, bs)[...] *= absmax[: numel // bs, None]
        if full < numel:
            values[full:] *= absmax[-1]
        return out

    def encoded_size(self, numel: int) -> int:
        return self._HEADER.size + 4 * self._n_blocks(numel) + numel


class Blockwise4BitCompression(Codec):
    """4 bits per value on 16 fitted levels, one signed bfloat16 scale per block of `block_size` values: 4.25 bits a
    value at the default 64 (MXFP4's budget), 0.133x of fp32.

    Layout: [u32 block_size][bfloat16 scale x n_blocks][u8 x ceil(numel / 2)], value 2i in the low nibble of byte i
    and value 2i+1 in its high one; for an odd numel the last high nibble holds the code of 0. Code c stands for
    LEVELS[c] * scale, where a block's scale is its value of largest magnitude, sign included, rounded away from zero
    to bfloat16 (at most 2^-7 of it larger): that value lands on level +1, and the one level that 16 codes have
    beyond a symmetric 15 goes to the side of the block's largest value. The levels are a Lloyd-Max fit to 64-value
    blocks of Gaussian and Student-t(3) data, dense near zero like the int8 codec's square law; every value goes to
    its nearest level.

    Relative L2 error measured on 4M values (held-out seeds), Gaussian / Student-t(3), blocks of 64, float32 scales:
      these levels 8.7% / 11.5%; NF4 (QLoRA's levels, unsigned absmax) 9.2% / 12.3%;
      square law (k/7)^2 11.6% / 12.4%; uniform k/7 10.8% / 18.1%.
    These levels by block size (float32 scales): 32: 8.1% / 9.5% at 0.156x of fp32; 64: 8.7% / 11.5% at 0.141x;
    128: 9.1% / 14.0% at 0.133x; 256: 9.5% / 17.0% at 0.129x. A single outlier coarsens every level of its block,
    so heavy tails want small blocks. Version 1 sent float32 scales per 64 values (0.141x: 709x less traffic than
    data-parallel fp32 at H = 100); bfloat16 scales give the bytes of 128-value blocks (0.133x, 753x) at the error of
    64-value ones: on the same 4M values, float32 scales 8.66% / 11.64%, bfloat16 8.67% / 11.67%, blocks of 128 with
    float32 scales 9.12% / 14.14% (the scale's rounding stretches the levels by at most 0.8%).
    No value is ever clipped: each value's error is at most |scale| * _MAX_ERROR (a value at -|scale| goes to the
    most negative level, -0.8566). The one exception is a block whose largest magnitude lies above bfloat16's
    largest finite value (3.39e38, within 0.4% of float32's largest): its scale is that value, and its values come
    back at most 0.4% of it further off. Blocks whose every magnitude is below 2^-126 (float32 subnormals) get a
    bfloat16 subnormal scale, at least 2^-133: their values come back within 2^-133 of themselves.

    Decoding is one lookup of a byte's two levels and one float32 multiply by the scale, in numpy, from a table of
    float32 constants; a bfloat16 scale is the upper half of a float32 and widens exactly: every machine decodes the
    same bytes to the same bits. Encoding finds the nearest level through a 2049-entry table over the
    block-normalized range and one comparison with the midpoint it may straddle.
    """

    name, version = "int4-block", 2
    decodes_finite = True  # finite scales and levels within [-1, 1] (checked in _parts): finite values
    _HEADER = struct.Struct("<I")
    LEVELS = np.array(
        [-0.8566, -0.6593, -0.5052, -0.3761, -0.2644, -0.1662, -0.0788, 0.0]
        + [0.0742, 0.1559, 0.2472, 0.3499, 0.4673, 0.6047, 0.7733, 1.0],
        dtype=np.float32,
    )
    _ZERO = 7  # LEVELS[7] == 0: the code of zero, of all-zero blocks and of the padding nibble
    _MAX_ERROR = 0.1434  # largest distance from any point of [-1, 1] to its nearest level, in units of |scale|
    # Byte -> its (low nibble, high nibble) levels as one 8-byte item: decoding is a single gather.
    _PAIRS = np.ascontiguousarray(np.stack([np.tile(LEVELS, 16), np.repeat(LEVELS, 16)], axis=1)).view(np.uint64)[:, 0]
    # Encoding works on t = (x / scale + 1) * 1024 in [0, 2048]: _BIN_CODE[floor(t)] is the code of the bin's lower
    # end (minus a margin for rounding), and a value moves one code up if it lies past that code's upper midpoint.
    # Bins are 0.001 wide and midpoints at least 0.07 apart: no bin straddles two.
    _HALF_BINS = 1024
    _SLAB_VALUES = 1 << 20
    _MIDPOINTS = (LEVELS[1:].astype(np.float64) + LEVELS[:-1]) / 2
    _BIN_CODE = np.searchsorted(_MIDPOINTS, np.arange(2 * _HALF_BINS + 1) / _HALF_BINS - 1 - 1e-4).astype(np.uint8)
    _UPPER_T = np.append((_MIDPOINTS + 1) * _HALF_BINS, np.inf).astype(np.float32)

    def __init__(self, block_size: int = 64):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size

    def _n_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def encode(self, flat: torch.Tensor) -> bytearray:
        flat = _as_flat_fp32(flat)
        numel, bs = flat.numel(), self.block_size
        n_blocks = self._n_blocks(numel)
        out = bytearray(self.encoded_size(numel))
        self._HEADER.pack_into(out, 0, bs)
        if numel == 0:
            return out
        if numel == n_blocks * bs:
            blocks = flat.view(n_blocks, bs)
        else:
            blocks = torch.zeros(n_blocks * bs, dtype=torch.float32)
            blocks[:numel] = flat
            blocks = blocks.view(n_blocks, bs)
        low, high = torch.aminmax(blocks, dim=1)  # a NaN anywhere in a block makes both NaN
        absmax = torch.maximum(high, -low)
        finite = torch.isfinite(absmax)
        signed = torch.where(high >= -low, high, low)
        # Like int8: a block with NaN or inf is sent with a NaN or inf scale, which every decoder refuses.
        exact = torch.where(finite, torch.where(absmax > 0, signed, torch.zeros_like(signed)), absmax)
        bits = np.frombuffer(out, dtype="<u2", count=n_blocks, offset=self._HEADER.size)
        bits[:] = self._bfloat16_away_from_zero(exact.numpy())
        # Values are coded against the scale every decoder reads, not the exact one.
        scale = torch.from_numpy(self._widen(bits))
        safe = torch.where(finite & (absmax > 0), scale, torch.ones_like(scale))
        # The block padding encodes as zero's code; the one extra code pads an odd numel when the blocks do not.
        codes = np.empty(n_blocks * bs + 1, dtype=np.uint8)
        codes[-1] = self._ZERO
        # Slabs of blocks keep the temporaries in cache, and their memory small next to the vector's.
        slab = -(-self._SLAB_VALUES // bs)
        for lo in range(0, n_blocks, slab):
            hi = min(lo + slab, n_blocks)
            # Division, not multiplication by a reciprocal: 1 / scale overflows for subnormal scales, and the quotient
            # of a value by its block's largest magnitude stays within [-1, 1].
            work = torch.div(blocks[lo:hi], safe[lo:hi, None])
            if not bool(finite[lo:hi].all()):
                work[~finite[lo:hi]] = 0.0  # their codes go unread; zero keeps the table lookups in range
            # (within [0, 2048] but for a block beyond bfloat16's largest scale: at most 0.4% past it)
            work.add_(1.0).mul_(float(self._HALF_BINS)).clamp_(0.0, 2.0 * self._HALF_BINS)
            t = work.view(-1).numpy()
            part = codes[lo * bs : hi * bs]
            np.take(self._BIN_CODE, t.astype(np.int32), out=part)
            part += t > np.take(self._UPPER_T, part)
        pairs = -(-numel // 2)
        packed = np.frombuffer(out, dtype=np.uint8, offset=self._HEADER.size + 2 * n_blocks)
        np.bitwise_or(codes[0 : 2 * pairs : 2], codes[1 : 2 * pairs : 2] << 4, out=packed)
        return out

    @staticmethod
    def _bfloat16_away_from_zero(values: np.ndarray) -> np.ndarray:
        """bfloat16 bits of float32 `values`, finite ones rounded away from zero (so that no value of a block lies
        beyond its scale) and at most bfloat16's largest finite value; NaN and inf stay non-finite."""
        bits = values.astype(np.float32, copy=False).view(np.uint32)
        magnitude = bits & np.uint32(0x7FFFFFFF)
        rounded = np.minimum((magnitude + np.uint32(0xFFFF)) >> np.uint32(16), np.uint32(0x7F7F))
        high = np.where(magnitude < np.uint32(0x7F800000), rounded, magnitude >> np.uint32(16))
        return (high | ((bits >> np.uint32(16)) & np.uint32(0x8000))).astype(np.uint16)

    @staticmethod
    def _widen(bits: np.ndarray) -> np.ndarray:
        """float32 values of bfloat16 bits: exact (a bfloat16 is the upper half of a float32)."""
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def _parts(self, payload, numel: int):
        """(block size, scales, packed codes) of a payload, checked: right size and block size, finite scales, the
        padding nibble of an odd numel holding the code of zero."""
        expected = self.encoded_size(numel)
        if len(payload) != expected:
            raise CodecError(f"int4 payload has {len(payload)} bytes, expected {expected}")
        (bs,) = self._HEADER.unpack_from(payload, 0)
        if bs != self.block_size:
            raise CodecError(f"int4 payload uses blocks of {bs}, this peer uses {self.block_size}")
        n_blocks = self._n_blocks(numel)
        offset = self._HEADER.size
        scale = self._widen(np.frombuffer(payload, dtype="<u2", count=n_blocks, offset=offset))
        packed = np.frombuffer(payload, dtype=np.uint8, count=-(-numel // 2), offset=offset + 2 * n_blocks)
        if not np.isfinite(scale).all():
            raise CodecError("int4 payload carries a non-finite scale")
        if numel % 2 and packed[-1] >> 4 != self._ZERO:
            # Never produced, and refused like int8's unused code -128: a payload is well formed to its last bit.
            raise CodecError("int4 payload has a non-zero padding nibble")
        return bs, scale, packed

    def decode(self, payload, numel: int) -> torch.Tensor:
        return self.decode_into(payload, torch.empty(numel, dtype=torch.float32))

    def check_finite(self, payload, numel: int) -> torch.Tensor | None:
        self._parts(payload, numel)  # every level times a finite scale is finite: no decoding
        return None

    def decode_into(self, payload, out: torch.Tensor) -> torch.Tensor:
        bs, scale, packed = self._parts(payload, out.numel())
        return self._decode_parts(bs, scale, packed, out)

    def reader(self, payload, numel: int):
        bs, scale, packed = self._parts(payload, numel)

        def read(start: int, out: torch.Tensor) -> torch.Tensor:
            stop = start + out.numel()  # start is even: its byte pairs begin at start / 2
            return self._decode_parts(bs, scale[start // bs : -(-stop // bs)], packed[start // 2 : -(-stop // 2)], out)

        return read

    def _decode_parts(self, bs: int, scale, packed, out: torch.Tensor) -> torch.Tensor:
        """Decode checked parts (whole blocks but for a last partial one, from an even value) into `out`."""
        numel = out.numel()
        values = out.numpy()
        pairs = numel // 2
        np.take(self._PAIRS, packed[:pairs], out=values[: 2 * pairs].view(np.uint64))
        if numel % 2:
            values[-1] = self.LEVELS[packed[-1] & 15]
        full = (numel // bs) * bs
        values[:full].reshape(-1, bs)[...] *= scale[: numel // bs, None]
        if full < numel:
            values[full:] *= scale[-1]
        return out

    def encoded_size(self, numel: int) -> int:
        return self._HEADER.size + 2 * self._n_blocks(numel) + -(-numel // 2)


CODECS: dict[str, type[Codec]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "int8": Blockwise8BitCompression,
    "int4": Blockwise4BitCompression,
}


def make_codec(name: str) -> Codec:
    """The codec for a `--compression` value."""
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; choose one of {sorted(CODECS)}") from None
