"""Robust averaging of one part's contributions at its reducer: bounded weights, then CenteredClip.

A reducer averages what the members of its group sent for its part. With the plain token-weighted mean one member
can move the average anywhere: a Δ scaled by 1e4, or a weight declared 1e6 times too large, and every member applies
the poisoned θ. Here:

1. Weights are bounded: none counts more than `weight_cap` times the median declared weight of the part. A weight
   declared more than `weight_catch` times the median is a lie, not a bigger machine: that sender is caught.
2. The contributions are compared in the geometry of their Gram matrix G (G_jk = x_j . x_k, one pass over the
   decoded values, see `gram`). Distances to any weighted combination of the x_j follow from G alone, so CenteredClip
   (Karimireddy et al. 2021, as BTARD, arXiv 2106.11257, runs it) iterates on n coefficients, not on n x part-size
   floats: v <- v + Σ a_j min(1, τ / |x_j - v|) (x_j - v), a_j = w_j / Σ w, from the medoid (the contribution
   nearest to most others). Its result is a convex combination Σ β_j x_j: the reducer sums the contributions with
   weights β, exactly as it sums them with the token weights, and nothing here touches the part's values again.
3. τ = `clip_radius` x r, r the median over contributions of their distance to their (n // 2)-th nearest other
   contribution: a scale of the honest spread that a minority cannot inflate, since each honest contribution has that
   many honest neighbours while a minority's has fewer than n // 2 peers of its own.
4. If every contribution lies within τ of the plain weighted mean, that mean is CenteredClip's fixed point: the
   reducer returns it with the declared weights untouched, bit for bit what it returned without robustness. Only
   otherwise is anyone clipped, and a contribution still farther than `catch_radius` x τ from the clipped average is
   dropped (weight 0) and its sender caught. A clipped minority moves the average by at most (its weight / the
   others' weight) x τ, wherever it puts its values.

Nothing here knows the network: pure functions of tensors and floats, tested on their own (tests/test_robust.py).
"""

from __future__ import annotations

import ctypes
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from swarm.codec import Codec
from swarm.native import sqblock

WEIGHT_CAP = 2.0
"""A contribution counts at most this many times the median declared weight of its part. 2 lets an honest peer that
trained on twice the median's tokens count fully, and keeps one attacker of 4 at 2/5 of the weight."""
WEIGHT_CATCH = 100.0
"""A weight declared more than this many times the part's median is a lie: its sender is caught and dropped. A
peer with a larger batch (64 sequences against 8 is 8x) is only capped."""
CLIP_RADIUS = 2.5
"""τ in units of r (see the module docstring). Measured on real pseudo-gradients of the embedded model (7 replicas;
H = 30 with equal batches and with batches of 2 to 32 sequences, H = 10; every group of 2 to 7 split into parts as
the all-reduce splits it; int8 and int4): no honest contribution lay farther than 1.2 r from the plain mean, so none
was ever clipped. 2.5 leaves a margin of 2x; a minority placed just inside τ moves the mean by at most its weight
over the others' x τ (one of 4 at twice the median weight: 2/3 x 2.5 r = 1.7 r)."""
CATCH_RADIUS = 10.0
"""A contribution farther than this many τ from the clipped average is garbage: dropped, and its sender caught."""
MIN_RADIUS = 0.25
"""τ is at least this fraction of the medoid's norm. When most contributions are identical (a part no honest peer
changed), r is 0, and an exact own contribution among identical decoded ones would otherwise lie "beyond" it by the
codec's error (int4: 12% of the norm)."""
ITERATIONS = 100
"""CenteredClip iterations at most; on n coefficients they cost nothing next to one pass over the values."""
_NATIVE_SPAN = 4096  # GRAM_SPAN of swarm/native/sqblock.c: values of each contribution its scratch holds
_CHUNK = 1 << 16  # values per column block of the Gram matrix (n blocks of it stay in cache); READ_ALIGNMENT divides it


@dataclass
class Verdict:
    """How a part's contributions are to be averaged."""

    weights: list[float]
    """What to weigh each contribution with (their sum need not be 1): the declared weights themselves when nobody
    needed bounding, so that the plain path's sum is reproduced bit for bit."""
    clipped: bool = False
    """Whether the result differs from the plain mean of the (capped) declared weights."""
    caught: dict[int, str] = field(default_factory=dict)
    """Contributions dropped as garbage, by index, with the reason."""
    radius: float = 0.0
    """τ, in the units of the values."""
    distances: list[float] = field(default_factory=list)
    """Each contribution's distance to the result."""


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def bound_weights(
    weights: Sequence[float], cap: float = WEIGHT_CAP, catch: float = WEIGHT_CATCH
) -> tuple[list[float], dict[int, str]]:
    """(weights capped at `cap` x their median, the indices whose weight exceeded `catch` x the median).

    Weights of 0 (contributions already dropped) take no part in the median. Caught ones get weight 0. Fewer than
    three weights are left as they are: of two, neither is the majority."""
    live = [w for w in weights if w > 0]
    if len(live) < 3:
        return list(weights), {}
    mid = median(live)
    bounded, caught = [], {}
    for i, w in enumerate(weights):
        if w > catch * mid:
            caught[i] = f"declared weight {w:g}, {w / mid:.3g}x the median of its group ({mid:g})"
            bounded.append(0.0)
        else:
            bounded.append(min(w, cap * mid))
    return bounded, caught


def gram(rows, numel: int | None = None, chunk: int = _CHUNK) -> torch.Tensor:
    """G_jk = rows[j] . rows[k] in float64, from one pass over the rows: 1-d float32 tensors of one size, or functions
    `read(start, out)` that write values [start, start + len(out)) into `out` (see Codec.reader; then `numel`).

    Column blocks are copied to float64 while they are in cache and multiplied there: float32 products summed over a
    block of 65,536 values were off by up to 5e-5 of the largest entry, which distances between near-equal
    contributions magnify. float64 costs little here, and the square of any finite float32 is finite in it, so a
    contribution of huge values is judged by its distance like any other rather than poisoning the others' entries."""
    n = len(rows)
    if numel is None:
        numel = rows[0].numel() if n else 0
    total = torch.zeros(n, n, dtype=torch.float64)
    staging = torch.empty(min(chunk, max(numel, 1)))
    block = torch.empty(n, staging.numel(), dtype=torch.float64)
    for a in range(0, numel, chunk):
        b = min(a + chunk, numel)
        part = block[:, : b - a]
        for j, row in enumerate(rows):
            if isinstance(row, torch.Tensor):
                part[j].copy_(row[a:b])
            else:
                part[j].copy_(row(a, staging[: b - a]))
        total += part @ part.T
    return total


def sums_in_pass(codec: Codec) -> bool:
    """Whether `reduce_pass` takes the plain sum in its pass over contributions of `codec` (else the caller does)."""
    block = codec.sqblock_block
    return block is not None and _NATIVE_SPAN % block == 0 and sqblock() is not None


def reduce_pass(
    codec: Codec,
    values: Sequence[torch.Tensor | bytes | memoryview],
    numel: int,
    alphas: Sequence[float] | None = None,
    acc: torch.Tensor | None = None,
    with_gram: bool = True,
) -> tuple[torch.Tensor | None, bool]:
    """A reducer's pass over the contributions to its part, as it holds them (decoded tensors, or payloads of
    `codec` that it checked): (their `gram` if `with_gram`, whether Σ alphas_j x_j was written into `acc`).

    int8 payloads (a codec with a `sqblock_block`) go to one native pass that decodes each slice once for both
    (swarm/native: the sum takes the same float32 operations as the codec's `accumulate`, with or without the Gram
    matrix). Other codecs, or where there is no native code, give the Gram matrix from a slice-at-a-time pass and
    leave the sum to the caller. Never are the contributions all decoded at once (that took an extra model-size
    vector)."""
    n = len(values)
    lib = sqblock() if sums_in_pass(codec) and n else None
    total = None
    if lib is not None:
        # Keep every pointer's owner alive until the kernel returns.
        parts = [None if isinstance(x, torch.Tensor) else codec.sqblock_parts(x, numel) for x in values]
        dense = [x.contiguous() if isinstance(x, torch.Tensor) else None for x in values]
        pointers = ctypes.c_void_p * n
        codes = pointers(*[0 if p is None else p[2].ctypes.data for p in parts])
        scales = pointers(*[0 if p is None else p[1].ctypes.data for p in parts])
        floats = pointers(*[0 if d is None else d.data_ptr() for d in dense])
        weights = (ctypes.c_float * n)(*(alphas if alphas is not None else [0.0] * n))
        scratch = torch.empty(n * _NATIVE_SPAN) if with_gram else None
        total = torch.zeros(n, n, dtype=torch.float64) if with_gram else None
        lib.sqblock_reduce(
            n, codes, scales, floats, weights, numel, codec.sqblock_block,
            None if acc is None else acc.data_ptr(),
            None if scratch is None else scratch.data_ptr(),
            None if total is None else total.data_ptr(),
        )  # fmt: skip
        if total is not None:
            if bool(torch.isfinite(total).all()):
                total += total.tril(-1).T  # the kernel fills the lower triangle
            else:
                # Values beyond ~1e19 overflow the kernel's float32 products (finite garbage at float32's largest
                # scales): the float64 path below judges such a contribution by its distance like any other.
                total = None
    if with_gram and total is None:
        total = gram([x if isinstance(x, torch.Tensor) else codec.reader(x, numel) for x in values], numel)
    return total, lib is not None and acc is not None


def _distances(g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """|x_j - Σ_k β_k x_k| for every j, from the Gram matrix: G_jj - 2 (Gβ)_j + βᵀGβ (clamped at 0 for rounding)."""
    gb = g @ beta
    return (g.diagonal() - 2 * gb + beta @ gb).clamp_(min=0).sqrt_()


def _centered_clip(g: torch.Tensor, share: torch.Tensor, start: int, tau: float, iterations: int) -> torch.Tensor:
    """CenteredClip's coefficients β (Σβ = 1, β >= 0) from contribution `start`, with weights `share` (Σ = 1)."""
    n = g.shape[0]
    beta = torch.zeros(n, dtype=torch.float64)
    beta[start] = 1.0
    eye = torch.eye(n, dtype=torch.float64)
    for _ in range(iterations):
        d = _distances(g, beta)
        scale = torch.where(d > tau, tau / d.clamp(min=1e-300), torch.ones_like(d))
        pull = share * scale  # each contribution's step toward itself, clipped to τ
        new = beta + pull @ (eye - beta)
        if float((new - beta).abs().max()) < 1e-12:
            return new
        beta = new
    return beta


def robust_weights(
    g: torch.Tensor,
    weights: Sequence[float],
    clip_radius: float = CLIP_RADIUS,
    catch_radius: float = CATCH_RADIUS,
    min_radius: float = MIN_RADIUS,
    iterations: int = ITERATIONS,
) -> Verdict:
    """The weights to average a part with, from its contributions' Gram matrix `g` and their bounded weights.

    Contributions of weight 0 take no part. Returns `weights` unchanged (the same list of floats) when every
    contribution lies within τ of their plain weighted mean."""
    weights = [float(w) for w in weights]
    n = len(weights)
    live = [i for i in range(n) if weights[i] > 0]
    if len(live) < 3:  # with two, neither is the majority: nothing to be robust about
        return Verdict(weights)
    sub = g[live][:, live]
    w = torch.tensor([weights[i] for i in live], dtype=torch.float64)
    share = w / w.sum()
    diag = sub.diagonal()
    pairwise = (diag[:, None] + diag[None, :] - 2 * sub).clamp_(min=0).sqrt_()
    k = len(live) // 2
    # Each one's distance to its k-th nearest other (column 0 after sorting is itself, at 0).
    scores = pairwise.sort(dim=1).values[:, k]
    medoid = int(scores.argmin())
    r = median(scores.tolist())
    tau = max(clip_radius * r, min_radius * math.sqrt(float(sub[medoid, medoid])))
    d = _distances(sub, share)
    if bool((d <= tau).all()):
        return Verdict(weights, radius=tau, distances=_expand(d, live, n))
    caught: dict[int, str] = {}
    beta = _centered_clip(sub, share, medoid, tau, iterations)
    d = _distances(sub, beta)
    far = d > catch_radius * tau
    if bool(far.any()):
        for j in far.nonzero().flatten().tolist():
            caught[live[j]] = f"contribution {float(d[j]) / tau:.3g}x the clipping radius from the robust average"
        keep = ~far
        share = torch.where(keep, share, torch.zeros_like(share))
        share /= share.sum()
        d = _distances(sub, share)
        if bool((d[keep] <= tau).all()):
            # Without the garbage, the others agree: their plain mean, with their own weights.
            kept = [0.0 if i in caught else weights[i] for i in range(n)]
            return Verdict(kept, clipped=True, caught=caught, radius=tau, distances=_expand(d, live, n))
        beta = _centered_clip(sub, share, medoid, tau, iterations)
        d = _distances(sub, beta)
    result = [0.0] * n
    for j, i in enumerate(live):
        result[i] = float(beta[j])
    return Verdict(result, clipped=True, caught=caught, radius=tau, distances=_expand(d, live, n))


def _expand(d: torch.Tensor, live: list[int], n: int) -> list[float]:
    out = [math.nan] * n
    for j, i in enumerate(live):
        out[i] = float(d[j])
    return out


def weighted_sum(values: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    """Σ w_j x_j / Σ w_j in index order, skipping weight 0: the reducer's plain mean, on decoded values."""
    total = sum(weights)
    out.zero_()
    for x, w in zip(values, weights, strict=True):
        if w > 0:
            out.add_(x, alpha=w / total)
    return out


def aggregate(values: Sequence[torch.Tensor], weights: Sequence[float], **options) -> tuple[torch.Tensor, Verdict]:
    """The robust average of 1-d float32 tensors with their declared weights, and how it was reached."""
    bounded, caught = bound_weights(weights)
    verdict = robust_weights(gram(values), bounded, **options)
    verdict.caught = {**caught, **verdict.caught}
    return weighted_sum(values, verdict.weights, torch.empty_like(values[0])), verdict
