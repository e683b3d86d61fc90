"""Robust averaging (issue 14): the aggregation on its own, then hostile members of real groups on 127.0.0.1.

Honest pseudo-gradients here are a shared signal plus 30% per-peer noise, so that their mean means something; the
"honest update" is the token-weighted mean of the honest ones. Every attack must leave the applied update within half
the honest update's size of it, every honest member with the same θ, and nothing non-finite anywhere.
"""

import asyncio
import math
import struct

import numpy as np
import pytest
import torch

from swarm import StepStatus
from swarm.allreduce import _Round
from swarm.codec import Blockwise8BitCompression, make_codec
from swarm.matchmaking import Group
from swarm.robust import (
    CLIP_RADIUS,
    WEIGHT_CAP,
    aggregate,
    bound_weights,
    gram,
    reduce_pass,
    robust_weights,
    weighted_sum,
)
from tests.conftest import swarm_of
from tests.test_swarm import (
    assert_params_close,
    config,
    flat,
    locals_from,
    make_params,
    reference_outer_step,
    running_swarms,
)

NOISE = 0.3


def honest_deltas(count: int, numel: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the shared signal, `count` pseudo-gradients: the signal plus noise of 30% of its norm each)."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(numel, generator=g)
    return signal, [signal + NOISE * torch.randn(numel, generator=g) for _ in range(count)]


def moved(result: torch.Tensor, honest: torch.Tensor) -> float:
    return float((result - honest).norm() / honest.norm())


# ---- the aggregation alone ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("count", [2, 3, 4, 5, 7])
def test_honest_contributions_give_exactly_the_plain_weighted_mean(count):
    _, xs = honest_deltas(count, 5000)
    weights = [100.0 + 37 * i for i in range(count)]  # within 2x of the median: nobody is capped
    result, verdict = aggregate(xs, weights)
    assert verdict.weights == weights and not verdict.clipped and not verdict.caught
    assert torch.equal(result, weighted_sum(xs, weights, torch.empty(5000)))


@pytest.mark.timeout(60)
def test_identical_contributions_with_one_exact_among_decoded_ones_are_not_clipped():
    # A part nobody changed differently: the decoded ones are identical, the reducer's own is exact.
    codec = Blockwise8BitCompression()
    x = torch.randn(4096)
    decoded = codec.decode(codec.encode(x), x.numel())
    _, verdict = aggregate([x, decoded, decoded, decoded], [1.0] * 4)
    assert not verdict.clipped and not verdict.caught


@pytest.mark.timeout(60)
def test_weights_are_capped_at_the_median_and_a_lie_is_caught():
    assert bound_weights([10.0, 30.0]) == ([10.0, 30.0], {})  # two: neither is the majority
    bounded, caught = bound_weights([100.0, 100.0, 100.0, 300.0, 1e6, 0.0])
    assert bounded == [100.0, 100.0, 100.0, WEIGHT_CAP * 100.0, 0.0, 0.0]  # the median of the non-zero weights
    assert list(caught) == [4] and "declared weight" in caught[4]


@pytest.mark.timeout(60)
def test_gram_matches_float64_and_survives_values_beyond_float32_products():
    rows = [torch.randn(200_000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    exact = torch.stack([r.double() for r in rows])
    expected = exact @ exact.T
    scale = 1e-12 * float(expected.abs().max())  # float64 blocks: only the summation order differs
    assert torch.allclose(gram(rows), expected, rtol=0, atol=scale)
    assert torch.allclose(gram(torch.stack(rows)), expected, rtol=0, atol=scale)
    rows[2] = torch.full((200_000,), 1e30)  # finite, but its square is not in float32
    g = gram(rows)
    assert bool(torch.isfinite(g).all()) and math.isclose(float(g[2, 2]), 2e65, rel_tol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["int8", "int4", "none", "fp16"])
def test_the_gram_of_payloads_and_tensors_as_a_reducer_holds_them_is_their_decoded_gram(name):
    codec = make_codec(name)
    numel = 3 * 65_536 + 301  # several column blocks and a partial int8 block
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(numel, generator=g) * (1 + i) for i in range(4)]
    held = [xs[0], *[codec.encode(x) for x in xs[1:]]]  # our own part exact, the others as their payloads
    decoded = torch.stack([xs[0].double(), *[codec.decode(p, numel).double() for p in held[1:]]])
    expected = decoded @ decoded.T
    got = reduce_pass(codec, held, numel)[0]
    assert torch.allclose(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(got, got.T)
    if name != "fp16":  # finite values whose products overflow float32 (fp16 saturates them on the wire)
        held[2] = codec.encode(torch.full((numel,), 1e30))
        got = reduce_pass(codec, held, numel)[0]
        assert bool(torch.isfinite(got).all()) and math.isclose(float(got[2, 2]), numel * 1e60, rel_tol=1e-2)


def _attacks(signal: torch.Tensor, count: int, seed: int) -> dict[str, tuple[list[torch.Tensor], list[float]]]:
    g = torch.Generator().manual_seed(100 + seed)
    numel = signal.numel()
    like = [signal + NOISE * torch.randn(numel, generator=g) for _ in range(count)]
    return {
        "scaled by 1e4": ([1e4 * x for x in like], [100.0] * count),
        "weight inflated 1e6x": (like, [1e8] * count),
        "random, 100x the norm": (
            [100 * signal.norm() * torch.randn(numel, generator=g) / math.sqrt(numel) for _ in range(count)],
            [100.0] * count,
        ),
        "huge finite values": ([torch.full((numel,), 3e38) for _ in range(count)], [100.0] * count),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("honest_count, hostile_count", [(3, 1), (5, 2)])
def test_each_attack_is_dropped_and_its_senders_caught(honest_count, hostile_count):
    signal, xs = honest_deltas(honest_count, 5000)
    weights = [100.0] * honest_count
    honest = weighted_sum(xs, weights, torch.empty(5000))
    for name, (hostile, hostile_weights) in _attacks(signal, hostile_count, honest_count).items():
        result, verdict = aggregate(xs + hostile, weights + hostile_weights)
        assert bool(torch.isfinite(result).all()), name
        assert moved(result, honest) <= 0.5, name
        assert sorted(verdict.caught) == list(range(honest_count, honest_count + hostile_count)), name
        # Dropped, the attackers leave the honest contributions' own plain mean.
        assert moved(result, honest) < 1e-6, name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("honest_count, hostile_count", [(3, 1), (5, 2)])
def test_a_minority_anywhere_moves_the_mean_by_at_most_its_weight_share_of_the_radius(honest_count, hostile_count):
    # The adaptive attacker: placed just within, at, or beyond the clipping radius, at the largest weight it may have.
    signal, xs = honest_deltas(honest_count, 5000, seed=1)
    weights = [100.0] * honest_count
    honest = weighted_sum(xs, weights, torch.empty(5000))
    tau = robust_weights(gram(xs + xs[:hostile_count]), weights + weights[:hostile_count]).radius
    direction = -signal / signal.norm()
    bound = WEIGHT_CAP * hostile_count / honest_count  # (its weight / the others' weight) x τ
    for k in (0.5, 1.0, 2.0, 5.0, 9.0, 50.0):
        hostile = [honest + k * tau * direction] * hostile_count
        result, verdict = aggregate(xs + hostile, weights + [2 * w for w in weights[:hostile_count]])
        assert float((result - honest).norm()) <= bound * verdict.radius * 1.05, k
        assert bool(torch.isfinite(result).all())
    assert tau > 0 and CLIP_RADIUS > 1


# ---- hostile members of real groups -------------------------------------------------------------------------------


class HostileCodec(Blockwise8BitCompression):
    """The int8 codec of an attacker: the contributions it sends are garbage; it decodes like everyone, and the
    averaged part it reduces goes out intact (a reducer that lies is another attack, checked by the members)."""

    def __init__(self, fault: str, swarm):
        super().__init__()
        self.fault, self.swarm = fault, swarm

    def encode(self, flat: torch.Tensor) -> bytearray:
        payload = bytearray(super().encode(flat))
        average = self.swarm._average  # where its own averaged part is reduced
        if average is not None and flat.untyped_storage().data_ptr() == average.untyped_storage().data_ptr():
            return payload
        n_blocks = self._n_blocks(flat.numel())
        scales = np.frombuffer(payload, dtype="<f4", count=n_blocks, offset=4)
        codes = np.frombuffer(payload, dtype=np.int8, offset=4 + 4 * n_blocks)
        if self.fault == "nan":
            struct.pack_into("<f", payload, 4, math.nan)
        else:  # finite garbage: random codes at the largest scale float32 holds
            scales[:] = 3e38
            codes[:] = np.random.default_rng(0).integers(-127, 128, codes.size, dtype=np.int8)
        return payload


ATTACKS = ["scaled by 1e4", "weight inflated 1e6x", "random, 100x the norm", "nan", "garbage"]


async def _hostile_round(honest_count: int, hostile_count: int, attack: str, robust: bool = True):
    """One outer step of `honest_count` honest members and `hostile_count` attackers, all int8.

    Returns (the honest members' θ change, the honest update's θ change, honest swarms, attackers' peer ids)."""
    theta = make_params()
    numel = sum(p.numel() for p in theta)
    signal, honest = honest_deltas(honest_count, numel, seed=honest_count)
    signal, honest = 0.05 * signal, [0.05 * d for d in honest]
    tokens = [100 + 10 * i for i in range(honest_count)]
    g = torch.Generator().manual_seed(7)
    like = [signal + NOISE * 0.05 * torch.randn(numel, generator=g) for _ in range(hostile_count)]
    hostile, hostile_tokens = like, [100] * hostile_count
    if attack == "scaled by 1e4":
        hostile = [1e4 * d for d in like]
    elif attack == "weight inflated 1e6x":
        hostile_tokens = [100_000_000] * hostile_count
    elif attack == "random, 100x the norm":
        hostile = [100 * signal.norm() * torch.randn(numel, generator=g) / math.sqrt(numel) for _ in like]

    def cfg(i: int):
        c = config(compression="int8", min_group_size=honest_count + hostile_count)
        c.robust_averaging = robust
        return c

    async with swarm_of(honest_count + hostile_count) as (_, nodes):
        async with running_swarms(nodes, theta, cfg) as swarms:
            if attack in ("nan", "garbage"):
                for s in swarms[honest_count:]:
                    s.averager.codec = HostileCodec(attack, s)
            locals_ = locals_from(theta, honest + hostile)
            reports = await asyncio.gather(
                *[s.outer_step(loc, t) for s, loc, t in zip(swarms, locals_, tokens + hostile_tokens)]
            )
            for report in reports[:honest_count]:
                assert report.status == StepStatus.AVERAGED and report.group_size == honest_count + hostile_count
            assert len({r.params_sha256 for r in reports[:honest_count]}) == 1, "honest members differ"
            expected, _ = reference_outer_step(theta, locals_from(theta, honest), tokens)
            applied = flat(swarms[0].params) - flat(theta)
            wanted = flat(expected) - flat(theta)
            return applied, wanted, swarms[:honest_count], [s.node.peer_id for s in swarms[honest_count:]]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("honest_count, hostile_count", [(3, 1), (5, 2)])
async def test_hostile_members_move_the_honest_update_by_at_most_half_and_are_named(
    honest_count, hostile_count, attack, caplog
):
    applied, wanted, honest, attackers = await _hostile_round(honest_count, hostile_count, attack)
    assert bool(torch.isfinite(applied).all())
    assert moved(applied, wanted) <= 0.5, f"{attack}: moved by {moved(applied, wanted):.3g}x"
    for swarm in honest:  # every honest reducer received the attackers' contributions to its part
        for peer in attackers:
            assert peer in swarm.averager.caught, (attack, swarm.averager.caught)
    for peer in attackers:
        assert f"caught {peer}" in caplog.text
    # Honest members are never named.
    assert not any(s.node.peer_id in h.averager.caught for s in honest for h in honest)


@pytest.mark.timeout(180)
async def test_without_robust_averaging_one_attacker_moves_the_update_far():
    # The control: the same round, robustness off, as the issue measured it.
    applied, wanted, honest, _ = await _hostile_round(3, 1, "scaled by 1e4", robust=False)
    assert moved(applied, wanted) > 100
    assert all(not s.averager.caught for s in honest)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("compression", ["none", "int8"])
async def test_without_attackers_the_result_is_the_plain_mean(compression):
    async with swarm_of(5) as (_, nodes):
        theta = make_params()
        numel = sum(p.numel() for p in theta)
        _, deltas = honest_deltas(5, numel, seed=3)
        locals_ = locals_from(theta, [0.05 * d for d in deltas])
        tokens = [128, 200, 256, 300, 384]
        async with running_swarms(nodes, theta, lambda i: config(compression=compression, min_group_size=5)) as swarms:
            assert all(s.averager.robust for s in swarms)  # on by default
            reports = await asyncio.gather(*[s.outer_step(loc, t) for s, loc, t in zip(swarms, locals_, tokens)])
            assert [r.group_size for r in reports] == [5] * 5
            assert len({r.params_sha256 for r in reports}) == 1
            assert all(not s.averager.caught for s in swarms)
            expected, _ = reference_outer_step(theta, locals_, tokens)
            if compression == "none":
                assert_params_close(swarms[0].params, expected)
            else:  # within the codec's error of it, and nobody clipped
                assert moved(flat(swarms[0].params) - flat(theta), flat(expected) - flat(theta)) < 0.02


@pytest.mark.timeout(60)
async def test_the_robust_reduction_returns_the_plain_one_bit_for_bit_when_all_are_honest():
    async with swarm_of(1) as (_, (node,)):
        async with running_swarms([node], make_params(), lambda i: config(compression="int8")) as (swarm,):
            averager = swarm.averager
            _, xs = honest_deltas(4, 300_001, seed=5)  # an odd size: the kernels' tails count too
            codec = averager.codec
            rnd = _Round(group=Group(b"x" * 16, 0, (node.peer_id,) * 4, 0))
            # As the reducer holds them: its own part exact, the others as checked payloads.
            rnd.contributions = {0: (100.0, xs[0])} | {i: (100.0 + i, codec.encode(x)) for i, x in enumerate(xs) if i}
            plain = averager._weighted_mean(rnd.contributions, torch.empty(300_001))
            robust = await averager._robust_mean(rnd, torch.empty(300_001))
            assert torch.equal(plain, robust) and not averager.caught
            # And with a contribution far out, the same call gives the mean of the others.
            rnd.contributions[3] = (103.0, codec.encode(1e4 * xs[3]))
            robust = await averager._robust_mean(rnd, torch.empty(300_001))
            others = {i: rnd.contributions[i] for i in range(3)}
            assert torch.equal(robust, averager._weighted_mean(others, torch.empty(300_001)))
            assert "contribution" in averager.caught[node.peer_id]
