"""Flattening a list of tensors into one float32 vector and back: the unit that the swarm averages."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([t.detach().to(device="cpu", dtype=torch.float32).reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    total = sum(t.numel() for t in like)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} values, the tensors need {total}")
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def all_finite(values: torch.Tensor) -> bool:
    """One pass, no temporary: min and max are both finite iff every value is (NaN propagates into both)."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def difference(minuend: Sequence[torch.Tensor], subtrahend: Sequence[torch.Tensor]) -> torch.Tensor:
    """flatten(minuend) - flatten(subtrahend), written straight into one vector (no flat copy of either side)."""
    if len(minuend) != len(subtrahend):
        raise ValueError(f"{len(minuend)} tensors against {len(subtrahend)}")
    out = torch.empty(sum(t.numel() for t in minuend), dtype=torch.float32)
    offset = 0
    for a, b in zip(minuend, subtrahend, strict=True):
        if a.numel() != b.numel():
            raise ValueError(f"tensor of {a.numel()} values against one of {b.numel()}")
        b = b.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        torch.sub(a.detach().reshape(-1), b, out=out[offset : offset + a.numel()])
        offset += a.numel()
    return out
