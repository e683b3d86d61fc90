"""What a member can check of an averaged part with what it already holds, so that a lying reducer is caught.

In the butterfly all-reduce member i reduces part i and sends the same averaged bytes to every member. Nothing makes
it honest: it could send random values, the average scaled by 100 or negated, another round's values. Each member j
holds, for every part i, its own contribution x_j,i to it, and for its own part it holds an average it computed
itself, honestly. An honest average of part i is a convex combination Σ β_k x_k,i in which x_j,i has about j's weight
share s_j (the reducer may bound weights and clip outliers, never drop an honest member), so two figures per part,
three dot products, tell a lie from an average:

- ratio = |avg_i| / |x_j,i|: an average is no longer than its longest contribution. Whatever the peers' Δ norms are
  relative to ours, they are so in every part: the ratio of part i may exceed that of our own part by at most
  `RATIO_FACTOR` (the average scaled by 100, or random values of the wrong size, are far beyond it).
- lean = <avg_i, x_j,i> / |x_j,i|^2: the average leans towards our contribution by our share, plus whatever the
  others have in common with us (in DiLoCo: a lot). It must be at least `LEAN_FRACTION` of min(our share, our own
  part's lean), less what chance alone gives a part of `numel` values (`SPREAD`): a negated average leans away from
  us, random values and a zero part do not lean at all. Our share is the one a robust reducer gives us (`our_share`),
  with room for a member that declares other weights to other reducers than to us.

Measured on real pseudo-gradients of the embedded model (7 replicas, H = 30, 6 outer steps with equal batches and 4
with batches of 2 to 32 sequences; groups of 2 to 7 drawn from them, split into parts as the all-reduce splits them,
the honest robust average of every part, codecs none, int8 and int4; 3,360 figures per codec): a part's ratio is 0.60
to 1.62x our own part's, its lean 1.01 to 35x our plain share. With the bounds below no honest part came within 1.9x
of the ratio bound or 2.7x of the lean floor; nor did any of 24,000 honest parts of synthetic Δ's trip either
(uncorrelated, a shared signal plus 30% or 100% Gaussian noise, or plus Student-t(3) noise; parts of 260 to 20,000
values, groups of 2 to 7, weights 1x to 16x apart).

What it catches, on the same real Δ's (int8, every honest member's verdict): random values of the average's norm,
the average x100, negated, or zero, by every member; the average x3 by none of 15 (4 members) and 2 of 30 (7); the
previous step's average of the same part by 3 of 15 and 0 of 30; another group's average of the same step by none.

Contributions that cancel ours. Overlapped (swarm.overlap), a member's Δ carries (1 − c)·s, the share of its guess's
error s that the merge onto θ left in it, and the members' errors cancel one another by construction. A member whose
inner loop was cut short (a slow peer awaited after a few inner steps) sends a Δ that lies mostly along s: that share,
and an update of a step or two that mostly carries on its last loop's direction (AdamW's momentum), which is s's
direction too. The others' errors pull against it, and judged against its Δ, the honest average leans away from it.
Measured: -0.22 (int8, a share of 0.13, parts 11x as long as its Δ) where the floor below asked for -0.07, and the
slow peer banned its honest partners; in CI, two sharded peers, the one cut after 1 of 4 steps: -0.07 against a floor
of 0.039; with only the error share taken out of the Δ judged, a peer cut after 1 of 10 steps: -0.184 against -0.091.
So an overlapped member judges by its Δ with the direction of s taken out (swarm.sequence._judged,
Averager.all_reduce's `judged`). On the synthetic rounds of tests/test_lying_reducer.py (`python
benchmarks/audit_overlapped.py`: groups of 2 to 4 with members a whole loop, half of one or a step or two done;
updates with -0.3, 0 or 0.3 of their error; errors up to 6x larger in one half of the model than the other), honest
verdicts that failed went from 122 to 6 of 504, lies caught from 880 to 1,208 of 1,512; the 6 left are norm ratios
where the errors are 36x larger in one half than in the other. Whatever else pulls against ours, our own part,
averaged by us, shows how strongly: beyond chance, the lean floor drops by that pull (a cosine) times the others'
length over ours in the part (at most its ratio plus our share), times ALIGNMENT_FACTOR. Then a negated or zeroed
average passes where the others cancel us (nothing can tell it from an honest one there); the ratio bound still holds,
and members whose contributions the others do not cancel still catch it. A liar can use this: a contribution against
ours to the part we reduce lowers our floor for the part it reduces, and it sees the others' contributions to its own
part only, not to ours, so it must guess at ours (a negated copy of its own Δ is a fair guess in DiLoCo). A lie along
our s alone shows in the ratio only.

What a crafted lie can still do (the reducer holds every x_k,i of its part, so it can aim): any average within the
bounds of every honest member passes. Found by bisection on those Δ's: the honest average plus a vector orthogonal to
every member's contribution of 2.1 to 3.0x its norm, or the average scaled by 2.3 to 3.1; as a move of the whole
honest update, 0.8 to 1.4x its size (the liar's part holds 26% to 63% of its norm), beyond the 0.5x that robust
reduction keeps to. On parts of fewer than a few thousand values (or, for a member of a tiny weight share, fewer than
about 10^5) random values of the right size pass too, the lean floor being below chance there. Members whose verdicts
differ (a lie near a bound) end the round differently: those that caught it retry without the liar, the others apply
the lie, and their θ differ until swarm.diloco's drift repair takes the majority's. A reducer that sends different
bytes to different members is not caught here either, with the same outcome. Closing these takes the members
comparing notes (a digest of each part they received, and <avg_i, x_k,i> and |x_k,i|^2 from every member, checked
against |avg_i|^2 with the weights the reducer used): a round trip this check does without.
"""

from __future__ import annotations

import ctypes
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarm.codec import Codec
from swarm.native import sqblock
from swarm.robust import WEIGHT_CAP

RATIO_FACTOR = 3.0
"""A part's |avg| / |own| may be at most this many times our own part's (honest: at most 1.62x, see above; 2.3x on
parts whose noise is Student-t(3), where a handful of values make a part's norm)."""
LEAN_FRACTION = 0.4
"""A part's average must lean towards our contribution by at least this fraction of our share (honest: >= 1.01x; a
member that declares other weights to other reducers can halve our share there, see `our_share`)."""
ALIGNMENT_FACTOR = 3.0
"""How many times as strongly as in our own part the others' contributions may pull against ours in another part
(a cosine; honest parts of one round differ by up to 1.5x, measured on the runs of tests/test_overlap.py)."""
SPREAD = 5.0
"""Standard deviations of chance allowed on each figure: what uncorrelated values give a part of few values."""
_CHUNK = 1 << 17  # values per block of the products: a block of each vector stays in cache
MIN_NUMEL = 256
"""Parts of fewer values are not judged: by chance alone, our contribution to a handful of values can be near zero
and the ratio anything (measured with a ratio factor of 2.5: honest parts of 50 uncorrelated values exceed the bound
about once in 1,500, parts of 563 never, by a margin of 2.4x)."""


@dataclass(frozen=True)
class Figures:
    """How an averaged part relates to our own contribution to it."""

    numel: int
    ratio: float
    """|avg| / |own|."""
    lean: float
    """<avg, own> / |own|^2: our contribution's coefficient in the average, plus what the others share with us."""


def figures(average: torch.Tensor, own: torch.Tensor) -> Figures | None:
    """Three dot products, in one pass over both; None where there is nothing to judge by (a part of fewer than
    MIN_NUMEL values, or our contribution to it is zero)."""
    own_sq = average_sq = cross = 0.0
    # Block by block, so that the second and third products read from cache: one pass over memory, not four.
    for start in range(0, own.numel(), _CHUNK):
        x, v = own[start : start + _CHUNK], average[start : start + _CHUNK]
        own_sq += float(torch.dot(x, x))
        average_sq += float(torch.dot(v, v))
        cross += float(torch.dot(v, x))
    return _figures(own.numel(), own_sq, average_sq, cross)


def decode_with_figures(
    codec: Codec, payload: bytes | memoryview, out: torch.Tensor, own: torch.Tensor
) -> tuple[torch.Tensor, Figures | None]:
    """Decode an averaged part into `out` (CodecError if it does not decode) and take its `figures` against `own`,
    our contribution to it: each part judged as it arrives, in the time spent waiting for the others. int8 in one
    native pass (swarm/native: the products taken while the decoded values are in registers, 40% less CPU than
    decoding then multiplying)."""
    lib = sqblock() if codec.sqblock_block is not None and own.is_contiguous() else None
    if lib is None:
        values = codec.decode_into(payload, out)
        return values, figures(values, own)
    bs, absmax, codes = codec.sqblock_parts(payload, out.numel())
    dots = (ctypes.c_double * 3)()
    numel = out.numel()
    lib.sqblock_decode_dots(codes.ctypes.data, absmax.ctypes.data, numel, bs, own.data_ptr(), out.data_ptr(), dots)
    return out, _figures(out.numel(), dots[0], dots[1], dots[2])


def _figures(numel: int, own_sq: float, average_sq: float, cross: float) -> Figures | None:
    if numel < MIN_NUMEL or not own_sq > 0:
        return None
    return Figures(numel, math.sqrt(average_sq / own_sq), cross / own_sq)


def our_share(weight: float, weights: Sequence[float], members: int) -> float:
    """Our weight share of the round as a robust reducer counts it (swarm.robust: none above WEIGHT_CAP x the
    median, when there are three or more), from what the members declared to us.

    `weights`: the positive weights declared to us, ours among them; members whose weight we refused count at the
    cap. A member may declare more to another reducer than to us (up to the cap there): with one liar of three that
    declares the cap to the others and next to nothing to us, our share at an honest reducer is half of this one
    (LEAN_FRACTION allows for it)."""
    cap = WEIGHT_CAP * statistics.median(weights) if len(weights) >= 3 else math.inf
    mine = min(weight, cap)
    refused = max(0, members - len(weights))
    others = sum(min(w, cap) for w in weights) - mine + (refused * cap if refused else 0.0)
    return mine / (mine + others) if math.isfinite(others) else 0.0


def _others_cosine(figures: Figures, share: float) -> float:
    """The cosine between our contribution x and the others' o = avg - share·x in a part, from its figures:
    <o, x> / |x|^2 = lean - share and |o|^2 / |x|^2 = ratio^2 - 2·share·lean + share^2 (0 where o vanishes)."""
    length = math.sqrt(max(0.0, figures.ratio**2 - 2 * share * figures.lean + share**2))
    return max(-1.0, min(1.0, (figures.lean - share) / length)) if length > 0 else 0.0


def judge(part: Figures, reference: Figures | None, share: float) -> str | None:
    """Why `part` cannot be an honest average, or None if it can be.

    `reference`: the same figures for the part we reduced ourselves (None if it is empty or our contribution to it
    is zero: then only the lean is judged, against our share). `share`: our weight share of the round (`our_share`)."""
    if not (math.isfinite(part.ratio) and math.isfinite(part.lean)):
        return f"its figures are not finite (norm ratio {part.ratio:.3g}, lean {part.lean:.3g})"
    chance = SPREAD / math.sqrt(part.numel)
    if reference is not None:
        # At least our share: where the others' contributions to our part cancel, the ratio there says little.
        ratio = max(reference.ratio, share)
        if part.ratio > RATIO_FACTOR * ratio * (1 + chance):
            return (
                f"it is {part.ratio:.3g}x as long as our contribution to it, {part.ratio / ratio:.3g}x the ratio of the"
                f" part we reduced (at most {RATIO_FACTOR:g}x)"
            )
    expected = share if reference is None else min(share, reference.lean)
    floor = LEAN_FRACTION * expected - chance * (part.ratio + share)
    if reference is not None:
        # Where the others' contributions pull against ours in the part we reduced ourselves, beyond chance, they
        # do so in every part, in proportion to their length over ours: lower the floor by as much (ALIGNMENT_FACTOR
        # for the spread between parts). See "Contributions that cancel ours" above.
        pull = min(0.0, _others_cosine(reference, share) + SPREAD / math.sqrt(reference.numel))
        floor += ALIGNMENT_FACTOR * pull * (part.ratio + share)  # |others| <= |avg| + |ours| in the part
    if part.lean < floor:
        return (
            f"it leans {part.lean:.3g} towards our contribution, an average with our share {share:.3g} at least"
            f" {floor:.3g}"
        )
    return None
