"""A reducer that returns a garbage averaged part (issue 14): the members catch it (swarm.audit), retry the round
without it, and never group with it again; honest rounds never trip the check.

Honest pseudo-gradients are a shared signal plus 30% per-peer noise, as in tests/test_robust.py; the liars train
like everyone and lie only about the part they reduce, with bytes of the real codec.
"""

import asyncio
import logging
import math

import pytest
import torch

from swarm import StepStatus, audit
from swarm.allreduce import Averager, part_bounds
from swarm.codec import make_codec
from swarm.overlap import merge_share
from swarm.robust import aggregate
from tests.conftest import swarm_of
from tests.test_swarm import (
    config,
    flat,
    locals_from,
    make_params,
    perturbed,
    reference_outer_step,
    running_swarms,
)

NOISE = 0.3
# Parts of 100,000 values and more (groups of up to 7): large enough that random values cannot pass for an average.
SHAPES = [(700, 1000), (1000,), (7, 50)]


def make_theta(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def numel_of(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def deltas(count: int, numel: int, seed: int, noise: float | None = NOISE) -> list[torch.Tensor]:
    """`count` pseudo-gradients: a shared signal plus `noise` x its norm each (None: independent, no signal)."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(numel, generator=g)
    if noise is None:
        return [0.05 * torch.randn(numel, generator=g) for _ in range(count)]
    return [0.05 * (signal + noise * torch.randn(numel, generator=g)) for _ in range(count)]


def moved(applied: torch.Tensor, wanted: torch.Tensor) -> float:
    return float((applied - wanted).norm() / wanted.norm())


LIES = {
    "random": lambda mean, g: mean.norm() * torch.randn(mean.numel(), generator=g) / math.sqrt(mean.numel()),
    "x100": lambda mean, g: 100 * mean,
    "negated": lambda mean, g: -mean,
}
NAN = {"nan": lambda mean, g: torch.full_like(mean, math.nan)}  # refused by the codec before any judging


class LyingAverager(Averager):
    """Reduces its part honestly, then sends every member `lie` of that average instead, encoded by the real codec."""

    def __init__(self, base: Averager, lie: str):
        super().__init__(base.node, base.run_id, base.codec, base.timeout_seconds, robust=base.robust)
        self.lie = lie

    async def _reduce(self, rnd) -> None:
        await rnd.complete.wait()
        lo, hi = rnd.bounds[rnd.group.my_index]
        mean = self._weighted_mean(rnd.contributions, torch.empty(hi - lo))
        rnd.contributions.clear()
        lie = (LIES | NAN)[self.lie](mean, torch.Generator().manual_seed(hi))
        if not rnd.result.done():
            rnd.result.set_result(self.codec.encode(lie))


async def make_liar(swarm, lie: str) -> None:
    await swarm.averager.close()
    swarm.averager = LyingAverager(swarm.averager, lie)
    await swarm.averager.start()
    swarm.matchmaker.direct_endpoints = swarm.averager.direct_endpoints
    swarm.matchmaker.direct_key = swarm.averager.direct_public_key()


async def _lying_round(honest_count: int, lies: list[str], caplog) -> None:
    caplog.set_level(logging.WARNING)
    size = honest_count + len(lies)
    theta = make_theta()
    numel = numel_of(SHAPES)
    async with swarm_of(size) as (_, nodes):
        async with running_swarms(nodes, theta, lambda i: config(compression="int8", timeout=8)) as swarms:
            # Which parts the liars reduce, and whether one of them leads, falls as the random peer ids do.
            honest, liars = swarms[:honest_count], swarms[honest_count:]
            for swarm, lie in zip(liars, lies):
                await make_liar(swarm, lie)
            liar_ids = {s.node.peer_id for s in liars}
            tokens = [100 + 10 * i for i in range(size)]
            momentum = None
            for step in range(2):
                start = [p.clone() for p in honest[0].params]
                locals_ = locals_from(start, deltas(size, numel, seed=step))
                reports = await asyncio.gather(*[s.outer_step(loc, t) for s, loc, t in zip(swarms, locals_, tokens)])
                for report in reports[:honest_count]:
                    assert report.status == StepStatus.AVERAGED, report
                    assert report.group_size == honest_count, report
                    assert {p.to_base58() for p in liar_ids}.isdisjoint(report.members), "a liar in an honest group"
                    # Step 0: the round with the liars, then the retry without them; step 1: never with them.
                    assert report.attempts == (2 if step == 0 else 1), report
                assert len({r.params_sha256 for r in reports[:honest_count]}) == 1, "honest members differ"
                honest_locals, honest_tokens = locals_[:honest_count], tokens[:honest_count]
                expected, momentum = reference_outer_step(
                    start, honest_locals, honest_tokens, momentum_buffers=momentum
                )
                applied, wanted = flat(honest[0].params) - flat(start), flat(expected) - flat(start)
                assert bool(torch.isfinite(applied).all())
                assert moved(applied, wanted) <= 0.5, f"moved by {moved(applied, wanted):.3g}x"
                assert moved(applied, wanted) <= 0.02  # the honest mean itself, within the codec's error
            for swarm in honest:
                assert set(swarm.matchmaker.banned) == liar_ids
                for liar, lie in zip(liars, lies):  # with the reason
                    reason = swarm.averager.caught[liar.node.peer_id]
                    assert ("cannot decode" if lie == "nan" else "cannot be an average") in reason, reason
            for peer in liar_ids:  # named once by each peer that caught it (the honest ones, maybe a liar), with why
                excluded = [r.getMessage() for r in caplog.records if f"excluding {peer}" in r.getMessage()]
                assert honest_count <= len(excluded) <= size - 1, excluded
            honest_ids = {s.node.peer_id for s in honest}  # no honest peer is ever caught
            assert all(honest_ids.isdisjoint(s.averager.caught) for s in honest)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("lie", [*LIES, *NAN])
async def test_a_lying_reducer_of_four_is_caught_retried_without_and_excluded(lie, caplog):
    await _lying_round(3, [lie], caplog)


@pytest.mark.timeout(300)
async def test_two_lying_reducers_of_seven_are_caught_retried_without_and_excluded(caplog):
    await _lying_round(5, ["random", "negated"], caplog)


@pytest.mark.timeout(120)
async def test_a_peer_that_caught_another_never_shares_a_group_with_it_whoever_leads(caplog):
    caplog.set_level(logging.DEBUG, logger="swarm.matchmaking")
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(timeout=6)) as swarms:
            # The leader (smallest peer id) caught nobody; of the two others, one caught the other.
            leader, a, b = sorted(swarms, key=lambda s: s.node.peer_id.to_bytes())
            a.matchmaker.ban(b.node.peer_id, "a test says so")
            for step in range(2):
                locals_ = [perturbed([p.clone() for p in s.params], 10 * step + i) for i, s in enumerate(swarms)]
                reports = dict(
                    zip(swarms, await asyncio.gather(*[s.outer_step(x, 100) for s, x in zip(swarms, locals_)]))
                )
                assert b.node.peer_id.to_base58() not in reports[a].members
                assert a.node.peer_id.to_base58() not in reports[b].members
                # Whichever of them joined the leader first keeps its place; the other averages alone.
                assert reports[leader].group_size == 2, reports[leader]
    refusals = [r.getMessage() for r in caplog.records if "refused us" in r.getMessage()]
    assert any("excludes you" in m or "you exclude" in m for m in refusals), refusals


@pytest.mark.timeout(240)
@pytest.mark.parametrize("compression", ["int8", "none"])
@pytest.mark.parametrize("size", [2, 3, 4])
async def test_honest_rounds_never_trip_the_check(size, compression, caplog):
    caplog.set_level(logging.WARNING)
    shapes = [(300, 100), (100,), (5, 7, 3)]  # parts of 7,500 to 15,000 values
    g = torch.Generator().manual_seed(size)
    theta = [torch.randn(s, generator=g) for s in shapes]
    numel = numel_of(shapes)
    async with swarm_of(size) as (_, nodes):
        async with running_swarms(nodes, theta, lambda i: config(compression=compression)) as swarms:
            # Seeds and data of three kinds: a shared signal with 30% or 100% noise, and independent Δ's; weights
            # from equal to 16x apart.
            for step, (noise, tokens) in enumerate(
                [(NOISE, [100] * size), (1.0, [2**i for i in range(size)]), (None, [100 + 37 * i for i in range(size)])]
            ):
                start = [p.clone() for p in swarms[0].params]
                locals_ = locals_from(start, deltas(size, numel, seed=100 * size + step, noise=noise))
                reports = await asyncio.gather(*[s.outer_step(loc, t) for s, loc, t in zip(swarms, locals_, tokens)])
                assert all(r.status == StepStatus.AVERAGED and r.attempts == 1 for r in reports), reports
                assert [r.group_size for r in reports] == [size] * size
                assert len({r.params_sha256 for r in reports}) == 1
            assert all(not s.averager.caught and not s.matchmaker.banned for s in swarms)
    assert "cannot be an average" not in caplog.text


# ---- the check alone: honest averages pass, the lies do not -------------------------------------------------------


def _honest_parts(xs, weights, codec):
    """What every member receives in an honest round: each part's robust average (its reducer's own contribution
    exact, the others decoded), encoded and decoded."""
    bounds = part_bounds(xs[0].numel(), len(xs))
    parts = []
    for i, (a, b) in enumerate(bounds):
        values = [x[a:b] if k == i else codec.decode(codec.encode(x[a:b]), b - a) for k, x in enumerate(xs)]
        mean, _ = aggregate(values, weights)
        parts.append(codec.decode(codec.encode(mean), b - a))
    return bounds, parts


def _verdicts(xs, weights, parts, bounds, lie_at=None, lie=None, judged=None):
    """Each member's verdict on every other part: {(member, part): reason or None}. `judged`: what each member
    judges by, if not its contribution (Averager.all_reduce)."""
    out = {}
    for j, x in enumerate(xs if judged is None else judged):
        a, b = bounds[j]
        reference = audit.figures(parts[j], x[a:b])
        share = audit.our_share(weights[j], weights, len(weights))
        for i, (a, b) in enumerate(bounds):
            if i == j:
                continue
            values = lie if i == lie_at else parts[i]
            found = audit.figures(values, x[a:b])
            out[j, i] = None if found is None else audit.judge(found, reference, share)
    return out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compression", ["int8", "int4", "none"])
def test_figures_taken_while_decoding_are_those_of_the_decoded_part(compression):
    codec = make_codec(compression)
    g = torch.Generator().manual_seed(3)
    own, average = torch.randn(100_003, generator=g), torch.randn(100_003, generator=g) + 0.5
    payload = codec.encode(average)
    values, found = audit.decode_with_figures(codec, payload, torch.empty(100_003), own)
    assert torch.equal(values, codec.decode(payload, 100_003))
    expected = audit.figures(values, own)
    assert math.isclose(found.ratio, expected.ratio, rel_tol=1e-5) and math.isclose(
        found.lean, expected.lean, rel_tol=1e-4
    )
    assert audit.decode_with_figures(codec, codec.encode(average[:100]), torch.empty(100), own[:100])[1] is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", ["int8", "int4", "none"])
def test_honest_averages_pass_and_gross_lies_are_caught(compression):
    codec = make_codec(compression)
    for seed in range(2):
        for count in (2, 3, 4, 7):
            for noise in (NOISE, 1.0, None):
                xs = deltas(count, 100_000 * count, seed=seed, noise=noise)
                skewed = [float(2 ** (k % 4) * 100) for k in range(count)]
                bounds, parts = _honest_parts(xs, skewed, codec)
                honest = _verdicts(xs, skewed, parts, bounds)
                assert all(v is None for v in honest.values()), (seed, count, noise, honest)
                # The lies, with weights within 2x: a member of a tiny share could not tell random values of the
                # right size from an average on parts of this size (see swarm.audit).
                weights = [100.0 + 10 * k for k in range(count)]
                bounds, parts = _honest_parts(xs, weights, codec)
                g = torch.Generator().manual_seed(seed)
                liar = count - 1
                for name, make in LIES.items():
                    verdicts = _verdicts(xs, weights, parts, bounds, liar, make(parts[liar], g))
                    caught = [v for (j, i), v in verdicts.items() if i == liar]
                    assert all(v is not None for v in caught), (name, seed, count, noise)
                    assert all(v is None for (j, i), v in verdicts.items() if i != liar)


def overlapped_round(numel: int, seed: int, done: list[float], along: float = 0.3, profile: float = 3.0):
    """Members' Δ's in an overlapped round whose round before landed at their hand-over (swarm.sequence), and what
    each one's audit judges them by.

    Member k's loop trained `done[k]` of a full loop: its update, plus `along` x its guess's error s_k (negative: the
    loop undid part of the error on its way; positive: the inner optimizer's momentum carried the last loop's
    direction on), plus the (1 − c)·s_k that the merge left in its Δ (c = merge_share(done[k])). Each s_k is its last
    Δ's distance from the group's mean, amplified by the outer step, so that the errors cancel one another; they are
    `profile` times larger in the first half of the model and as many times smaller in the second, as in a real
    model, where peers' Δ's differ far more in some tensors than in others (the embedding rows of tokens one peer
    saw). Judged by: Δ with the direction of s_k taken out (swarm.sequence._judged)."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(numel, generator=g)
    scale = torch.full((numel,), 1 / profile)
    scale[: numel // 2] = profile
    trained = [0.05 * (signal + 3 * torch.randn(numel, generator=g)) for _ in done]
    previous = [0.05 * (signal + 3 * torch.randn(numel, generator=g)) for _ in done]
    mean = sum(previous) / len(done)
    xs, judged = [], []
    for t, p, d in zip(trained, previous, done):
        s = 1.3 * (p - mean) * scale
        xs.append(d * t + along * d * s + (1 - merge_share(d)) * s)
        judged.append(xs[-1] - torch.dot(xs[-1], s) / torch.dot(s, s) * s)
    return xs, judged


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "done,weights",
    [
        ([1.0, 0.25], [4.0, 1.0]),  # CI: a sharded peer cut after 1 of 4 steps banned its partner, judged against Δ
        ([1.0, 0.1], [10.0, 1.0]),  # and one cut after 1 of 10 steps, judged against Δ less its error share
        ([1.0, 1.0, 3 / 40], [160.0, 160.0, 48.0]),  # tests/test_overlap.py's slow peer, awaited after 3 of 40 steps
    ],
)
@pytest.mark.parametrize("along", [-0.3, 0.0, 0.3])
def test_an_overlapped_round_whose_member_was_cut_short_passes(done, weights, along):
    """A member whose loop was cut short sends a Δ that lies mostly along its guess's error, which the others' errors
    cancel: judged against Δ, the honest average leans away from it where the errors are large. Judged by its Δ with
    that direction taken out (swarm.sequence._judged), every honest part passes, every other member catches a reducer
    that sends the average x100, and the members that trained a whole loop catch a negated one."""
    codec = make_codec("int8")
    for seed in range(3):
        xs, judged = overlapped_round(300_000, seed, done, along)
        bounds, parts = _honest_parts(xs, weights, codec)
        honest = _verdicts(xs, weights, parts, bounds, judged=judged)
        assert all(v is None for v in honest.values()), (seed, honest)
        against_delta = _verdicts(xs, weights, parts, bounds)
        assert any(v is not None for v in against_delta.values()), "the model must show what the judged vector fixes"
        g = torch.Generator().manual_seed(seed)
        for liar in range(len(xs)):
            for name in ("x100", "negated"):
                verdicts = _verdicts(xs, weights, parts, bounds, liar, LIES[name](parts[liar], g), judged)
                caught = {j for (j, i), v in verdicts.items() if i == liar and v is not None}
                others = set(range(len(xs))) - {liar}
                if name == "x100":
                    assert caught == others, (seed, liar, name, caught)
                else:
                    assert {k for k in others if done[k] == 1.0} <= caught, (seed, liar, name, caught)
                assert all(v is None for (j, i), v in verdicts.items() if i != liar)


@pytest.mark.timeout(120)
def test_tiny_parts_and_zero_contributions_are_not_judged():
    x = torch.randn(audit.MIN_NUMEL - 1)
    assert audit.figures(100 * x, x) is None
    assert audit.figures(torch.randn(1000), torch.zeros(1000)) is None
    assert audit.figures(torch.zeros(0), torch.zeros(0)) is None


@pytest.mark.timeout(300)
def test_real_pseudo_gradients_of_the_embedded_model_pass():
    from peers.data import TokenBatcher, load_text_dataset
    from peers.inner import InnerConfig, InnerLoop
    from peers.model import load_model

    data = load_text_dataset("embedded", "train")
    xs, tokens = [], []
    theta = None
    for k, batch in enumerate([2, 4, 8, 4]):  # unequal batches: unequal weights and Δ norms
        loaded = load_model("embedded", seed=0)
        if theta is None:
            theta = [p.detach().clone() for p in loaded.model.parameters()]
        batches = TokenBatcher(data, loaded.tokenizer, batch, 64, seed=7919 * (k + 1))
        result = InnerLoop(loaded.model, batches, InnerConfig()).run(10)
        xs.append(flat([t - p.detach() for t, p in zip(theta, loaded.model.parameters())]))
        tokens.append(float(result.tokens))
    for compression in ("int8", "none"):
        codec = make_codec(compression)
        for count in (2, 3, 4):
            bounds, parts = _honest_parts(xs[:count], tokens[:count], codec)
            verdicts = _verdicts(xs[:count], tokens[:count], parts, bounds)
            assert all(v is None for v in verdicts.values()), (compression, count, verdicts)
