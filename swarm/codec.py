"""Codecs for pseudo-gradients on the wire: fp32 (none), fp16, and blockwise 8-bit.

Every codec encodes a flat float32 tensor to bytes and decodes those bytes back to float32. Decoding is a pure,
elementwise function of the bytes, so every peer that decodes the same bytes gets bit-identical values: that is what
lets a whole group end an outer step with identical parameters.

The name and version of a codec are part of a peer's schema (see `swarm.records`): peers that would decode
differently never meet in a group.
"""

from __future__ import annotations

import abc
import struct

import numpy as np
import torch


class CodecError(ValueError):
    """A payload could not be decoded: wrong size, wrong header, or non-finite content."""


class Codec(abc.ABC):
    """Encodes a flat float32 tensor into bytes and back."""

    name: str
    version: int

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

    @abc.abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Bytes that `encode` produces for `numel` elements."""


def _as_flat_fp32(flat: torch.Tensor) -> torch.Tensor:
    if flat.dim() != 1:
        flat = flat.reshape(-1)
    return flat.detach().to(dtype=torch.float32, device="cpu").contiguous()


class NoCompression(Codec):
    """Raw little-endian float32."""

    name, version = "none", 1

    def encode(self, flat: torch.Tensor) -> bytes:
        return _as_flat_fp32(flat).numpy().astype("<f4", copy=False).tobytes()

    def decode(self, payload, numel: int) -> torch.Tensor:
        if len(payload) != 4 * numel:
            raise CodecError(f"fp32 payload has {len(payload)} bytes, expected {4 * numel}")
        return torch.from_numpy(np.frombuffer(payload, dtype="<f4").copy())

    def encoded_size(self, numel: int) -> int:
        return 4 * numel


class Float16Compression(Codec):
    """IEEE half precision. Values beyond the fp16 range are saturated, not sent as inf."""

    name, version = "fp16", 1
    _FP16_MAX = 65504.0

    def encode(self, flat: torch.Tensor) -> bytes:
        flat = _as_flat_fp32(flat).clamp(-self._FP16_MAX, self._FP16_MAX)
        return flat.to(torch.float16).numpy().astype("<f2", copy=False).tobytes()

    def decode(self, payload, numel: int) -> torch.Tensor:
        if len(payload) != 2 * numel:
            raise CodecError(f"fp16 payload has {len(payload)} bytes, expected {2 * numel}")
        return torch.from_numpy(np.frombuffer(payload, dtype="<f2").astype(np.float32))

    def encoded_size(self, numel: int) -> int:
        return 2 * numel


class Blockwise8BitCompression(Codec):
    """Symmetric absmax int8 per block of `block_size` values, one float32 scale per block.

    Layout: [u32 block_size][float32 scales x n_blocks][int8 codes x numel]. With 256-value blocks the payload is
    (1 + 4/256) / 4 = 0.254x of fp32, and the error of each value is at most half its block's scale (absmax / 254),
    so an outlier only costs precision inside its own block, never clips.
    """

    name, version = "int8-blockwise", 1
    _HEADER = struct.Struct("<I")

    def __init__(self, block_size: int = 256):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size

    def _n_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def encode(self, flat: torch.Tensor) -> bytes:
        flat = _as_flat_fp32(flat)
        numel, bs = flat.numel(), self.block_size
        n_blocks = self._n_blocks(numel)
        padded = torch.zeros(n_blocks * bs, dtype=torch.float32)
        padded[:numel] = flat
        blocks = padded.view(n_blocks, bs)
        scales = blocks.abs().amax(dim=1) / 127.0
        # A block of zeros has scale 0: divide by 1 instead, its codes are 0 anyway.
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return b"".join(
            (
                self._HEADER.pack(bs),
                scales.numpy().astype("<f4", copy=False).tobytes(),
                codes.view(-1)[:numel].numpy().tobytes(),
            )
        )

    def decode(self, payload, numel: int) -> torch.Tensor:
        expected = self.encoded_size(numel)
        if len(payload) != expected:
            raise CodecError(f"int8 payload has {len(payload)} bytes, expected {expected}")
        (bs,) = self._HEADER.unpack_from(payload, 0)
        if bs != self.block_size:
            raise CodecError(f"int8 payload uses blocks of {bs}, this peer uses {self.block_size}")
        n_blocks = self._n_blocks(numel)
        offset = self._HEADER.size
        scales = np.frombuffer(payload, dtype="<f4", count=n_blocks, offset=offset)
        codes = np.frombuffer(payload, dtype=np.int8, count=numel, offset=offset + 4 * n_blocks)
        if not np.isfinite(scales).all():
            raise CodecError("int8 payload carries a non-finite scale")
        out = torch.zeros(n_blocks * bs, dtype=torch.float32)
        out[:numel] = torch.from_numpy(codes.astype(np.float32))
        out = out.view(n_blocks, bs).mul_(torch.from_numpy(scales.astype(np.float32))[:, None])
        return out.view(-1)[:numel].clone()

    def encoded_size(self, numel: int) -> int:
        return self._HEADER.size + 4 * self._n_blocks(numel) + numel


CODECS: dict[str, type[Codec]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "int8": Blockwise8BitCompression,
}


def make_codec(name: str) -> Codec:
    """The codec for a `--compression` value."""
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; choose one of {sorted(CODECS)}") from None
