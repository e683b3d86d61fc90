"""DiLoCo across real swarm nodes in one event loop: discovery, matchmaking, all-reduce, outer step."""

import asyncio
import contextlib
import dataclasses
import math

import pytest
import torch

from swarm import MatchmakingConfig, StepStatus, Swarm, SwarmConfig
from swarm.allreduce import part_bounds
from swarm.outer import MomentumRamp
from tests.conftest import swarm_of

SHAPES = [(64, 33), (33,), (5, 7, 3), ()]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def perturbed(params, seed: int, scale: float = 0.05) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [p - scale * torch.randn(p.shape, generator=g) for p in params]


def config(run_id="test", compression="none", min_group_size=2, timeout=15.0, **kwargs) -> SwarmConfig:
    mm = MatchmakingConfig(min_group_size=min_group_size, timeout_seconds=timeout, **kwargs)
    return SwarmConfig(run_id=run_id, compression=compression, matchmaking=mm, allreduce_timeout_seconds=20)


async def make_swarms(nodes, params, cfg_for):
    return [await Swarm.create(node, params, cfg_for(i)) for i, node in enumerate(nodes)]


@contextlib.asynccontextmanager
async def running_swarms(nodes, params, cfg_for):
    """One Swarm per node (config `cfg_for(index)`), all closed on the way out."""
    swarms = await make_swarms(nodes, params, cfg_for)
    try:
        yield swarms
    finally:
        for s in swarms:
            await s.close()


def locals_from(theta, flat_deltas) -> list[list[torch.Tensor]]:
    """Local parameters θ - Δ for flat pseudo-gradients Δ."""
    out = []
    for delta in flat_deltas:
        parts, offset = [], 0
        for p in theta:
            parts.append(p - delta[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        out.append(parts)
    return out


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def assert_params_close(params, expected, message: str = "differs from reference") -> None:
    for got, want in zip(params, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=0), message


def reference_outer_step(
    theta, locals_, tokens, lr=SwarmConfig.outer_lr, momentum=SwarmConfig.outer_momentum, momentum_buffers=None
):
    """DiLoCo by hand: token-weighted mean of pseudo-gradients, then torch.optim.SGD(nesterov=True)."""
    params = [torch.nn.Parameter(t.clone()) for t in theta]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if momentum_buffers is not None:
        opt.load_state_dict(momentum_buffers)
        opt.param_groups[0]["momentum"] = momentum  # the saved dict brings back its own
    total = sum(tokens)
    for i, p in enumerate(params):
        p.grad = sum(w / total * (theta[i] - loc[i]) for w, loc in zip(tokens, locals_, strict=True))
    opt.step()
    return [p.detach() for p in params], opt.state_dict()


@pytest.mark.timeout(120)
async def test_four_peers_find_each_other_through_bootstrap_and_average():
    async with swarm_of(4) as (bootstrap, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as swarms:
            tokens = [100, 200, 300, 400]
            locals_ = [perturbed(theta, i) for i in range(4)]
            reports = await asyncio.gather(*[s.outer_step(loc, t) for s, loc, t in zip(swarms, locals_, tokens)])
            assert [r.group_size for r in reports] == [4, 4, 4, 4]
            assert all(r.status == StepStatus.AVERAGED for r in reports)
            assert all(r.bytes_sent > 0 and r.bytes_received > 0 for r in reports)
            # The nodes only knew the bootstrap node; they found each other through the DHT.
            for node in nodes:
                assert await node.num_dht_peers() >= 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ramp", [None, MomentumRamp(final=0.9, start=0.0, end=2.0)], ids=["constant", "ramp"])
async def test_outer_step_equals_reference_diloco_without_compression(ramp):
    """With a ramp, as swarm-peer's --decay-steps sets it up: the momentum rises, and the last round (step 2, which
    ends the decay) applies the group's mean as it is."""
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        final = None if ramp is None else 2
        cfg = dataclasses.replace(config(), outer_momentum_ramp=ramp, outer_final_round=final)
        async with running_swarms(nodes, theta, lambda i: cfg) as swarms:
            expected, state = theta, None
            for step in range(3):
                tokens = [128 * (i + 1) + step for i in range(3)]
                locals_ = [perturbed([p.clone() for p in swarms[0].params], 10 * step + i) for i in range(3)]
                reports = await asyncio.gather(*[s.outer_step(loc, t) for s, loc, t in zip(swarms, locals_, tokens)])
                assert [r.group_size for r in reports] == [3, 3, 3]
                mu = SwarmConfig.outer_momentum
                if ramp is not None:  # round t sits at t + 0.5 of a cosine from 0.5 at step 0 to 0.9 at step 2
                    mu += (0.9 - mu) * (1 - math.cos(math.pi * min(1.0, (step + 0.5) / 2))) / 2
                if step == final:  # the mean of the members' models, no extrapolation past it
                    expected, _ = reference_outer_step(expected, locals_, tokens, lr=1.0, momentum=0.0)
                else:
                    expected, state = reference_outer_step(
                        expected, locals_, tokens, momentum=mu, momentum_buffers=state
                    )
                for s in swarms:
                    assert_params_close(s.params, expected, f"step {step}: differs from reference")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", ["int8", "fp16"])
async def test_group_members_hold_identical_parameters_after_every_step(compression):
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(compression=compression)) as swarms:
            for step in range(3):
                locals_ = [perturbed([p.clone() for p in s.params], 10 * step + i) for i, s in enumerate(swarms)]
                reports = await asyncio.gather(
                    *[s.outer_step(loc, 100 + 7 * i) for i, (s, loc) in enumerate(zip(swarms, locals_))]
                )
                assert [r.group_size for r in reports] == [3, 3, 3]
                assert len({r.params_sha256 for r in reports}) == 1
                assert all(r.outer_step == step + 1 for r in reports)
                for s in swarms[1:]:
                    for a, b in zip(s.params, swarms[0].params, strict=True):
                        assert torch.equal(a, b)


@pytest.mark.timeout(120)
async def test_peers_of_another_run_never_join_the_group():
    async with swarm_of(4) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(run_id="run-a" if i < 2 else "run-b")) as swarms:
            locals_ = [perturbed(theta, i) for i in range(4)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [2, 2, 2, 2]
            assert reports[0].params_sha256 == reports[1].params_sha256
            assert reports[2].params_sha256 == reports[3].params_sha256
            assert reports[0].params_sha256 != reports[2].params_sha256


@pytest.mark.timeout(120)
async def test_peer_with_another_codec_is_never_grouped(caplog):
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        codecs = ["int8", "int8", "none"]
        async with running_swarms(nodes, theta, lambda i: config(compression=codecs[i], timeout=4)) as swarms:
            locals_ = [perturbed(theta, i) for i in range(3)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [2, 2, 1]
            assert reports[2].status == StepStatus.ALONE
            # Both sides say why: each names the other's codec and its own.
            warnings = [r.getMessage() for r in caplog.records if "incompatible" in r.getMessage()]
            assert any("it runs protocol 2, codec none/v1" in w and "this peer runs" in w for w in warnings)
            assert any("it runs protocol 2, codec int8-sqblock/v1" in w for w in warnings)


@pytest.mark.timeout(120)
async def test_peer_with_other_outer_settings_is_never_grouped(caplog):
    """Members apply the same average with their own outer optimizer: with another momentum their θ would part."""
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        momenta = [0.5, 0.5, 0.9]
        cfg = lambda i: dataclasses.replace(config(timeout=4), outer_momentum=momenta[i])  # noqa: E731
        async with running_swarms(nodes, theta, cfg) as swarms:
            locals_ = [perturbed(theta, i) for i in range(3)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [2, 2, 1]
            assert reports[0].params_sha256 == reports[1].params_sha256
            warnings = [r.getMessage() for r in caplog.records if "incompatible" in r.getMessage()]
            assert any("outer lr 0.7 momentum 0.9" in w and "outer lr 0.7 momentum 0.5" in w for w in warnings)


@pytest.mark.timeout(60)
async def test_no_group_within_timeout_applies_own_pseudo_gradient():
    async with swarm_of(1) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(timeout=2)) as (swarm,):
            local = perturbed(theta, 0)
            started = asyncio.get_running_loop().time()
            report = await swarm.outer_step(local, 100)
            assert report.group_size == 1 and report.status == StepStatus.ALONE
            assert asyncio.get_running_loop().time() - started < 6
            # Alone, θ takes the peer's own inner result as it is: no extrapolation of one trajectory's noise.
            assert_params_close(swarm.params, local)
            assert swarm.outer.momentum() is None


@pytest.mark.timeout(120)
async def test_nonfinite_pseudo_gradient_is_never_sent_and_others_average_without_it():
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as swarms:
            locals_ = [perturbed(theta, i) for i in range(3)]
            locals_[2][0][0, 0] = float("nan")
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert reports[2].status == StepStatus.NONFINITE and "NaN" in reports[2].error
            assert reports[2].group_size == 0
            assert [r.group_size for r in reports[:2]] == [2, 2]
            # Peer 2 sat the round out and holds the round's result: its next inner loop starts from the global θ.
            assert reports[2].params_sha256 == reports[0].params_sha256 and swarms[2].global_step == 1
            expected, _ = reference_outer_step(theta, locals_[:2], [100, 100])
            for s in swarms[:2]:
                assert all(torch.isfinite(p).all() for p in s.params)
                assert_params_close(s.params, expected)


@pytest.mark.timeout(120)
async def test_newcomer_takes_over_the_runs_state_then_averages_with_it():
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes[:2], theta, lambda i: config()) as early:
            for step in range(2):
                locals_ = [perturbed([p.clone() for p in s.params], 10 * step + i) for i, s in enumerate(early)]
                reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(early, locals_)])
                for s, r in zip(early, reports):
                    await s.publish_hash(r)
            async with running_swarms(nodes[2:], theta, lambda i: config()) as (late,):
                assert late.global_step == 0
                assert await late.catch_up()
                assert late.global_step == 2
                assert late.params_sha256() == early[0].params_sha256()
                for a, b in zip(late.outer.momentum(), early[0].outer.momentum(), strict=True):
                    assert torch.equal(a, b)
                everyone = [*early, late]
                locals_ = [perturbed([p.clone() for p in s.params], 100 + i) for i, s in enumerate(everyone)]
                reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(everyone, locals_)])
                assert [r.group_size for r in reports] == [3, 3, 3]
                assert [r.outer_step for r in reports] == [3, 3, 3]
                assert len({r.params_sha256 for r in reports}) == 1


@pytest.mark.timeout(120)
async def test_a_peer_whose_round_went_ahead_while_it_looked_takes_the_runs_theta_and_carries_its_work():
    """A peer looks for round 0 while two others average it without it (here they exclude it; on a real run, a
    leader whose DHT view missed it does the same) and move on. It must not wait out its timeout and average alone
    (a second θ of step 0): it takes the run's θ of step 1 and keeps its work for the next round."""
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(timeout=20)) as swarms:
            early, late = swarms[:2], swarms[2]
            for s in early:
                s.matchmaker.ban(late.node.peer_id, "left out on purpose by the test")
            mine = perturbed(theta, 2)
            looking = asyncio.create_task(late.outer_step(mine, 100))
            for _ in range(100):  # it looks for round 0 before the others begin
                if late.matchmaker._looking is not None:
                    break
                await asyncio.sleep(0.05)
            assert late.matchmaker._looking is not None
            started = asyncio.get_running_loop().time()
            locals_ = [perturbed(theta, i) for i in range(2)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(early, locals_)])
            assert [r.group_size for r in reports] == [2, 2]
            for s, r in zip(early, reports):
                await s.publish_hash(r)
            report = await asyncio.wait_for(looking, 30)
            assert asyncio.get_running_loop().time() - started < 12, "it waited for a round that was over"
            assert report.status == StepStatus.MISSED and report.restart_from_global
            assert late.global_step == 1 and report.params_sha256 == reports[0].params_sha256
            assert report.carried_tokens == 100 and late.carries_work
            # It holds the run's θ of step 1, not a θ of its own.
            expected, _ = reference_outer_step(theta, locals_, [100, 100])
            assert_params_close(late.params, expected)


@pytest.mark.timeout(120)
async def test_max_group_size_splits_the_run_into_full_groups():
    async with swarm_of(4) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(max_group_size=2, timeout=20)) as swarms:
            locals_ = [perturbed(theta, i) for i in range(4)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [2, 2, 2, 2]
            hashes = [r.params_sha256 for r in reports]
            assert sorted(hashes.count(h) for h in set(hashes)) == [2, 2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", ["int8", "none"])
async def test_error_feedback_keeps_what_the_codec_lost(compression):
    async with swarm_of(2) as (_, nodes):
        theta = make_params()

        def cfg(i):
            c = config(compression=compression)
            c.error_feedback = True
            return c

        async with running_swarms(nodes, theta, cfg) as swarms:
            locals_ = [perturbed(theta, i) for i in range(2)]
            deltas = [torch.cat([(t - loc).reshape(-1) for t, loc in zip(theta, local)]) for local in locals_]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [2, 2]
            exact_parts = []
            for s, delta in zip(swarms, deltas):
                if compression == "none":
                    assert torch.count_nonzero(s.residual) == 0
                else:
                    # What was lost is small (at most a block's absmax / 127) but not nothing.
                    assert 0 < float(s.residual.abs().max()) <= float(delta.abs().max()) / 127 * 1.001
                    assert float(s.residual.norm() / delta.norm()) < 0.02
                    # Nothing of the part a member reduces itself: it adds its own values exactly.
                    bounds = part_bounds(delta.numel(), 2)
                    exact_parts += [i for i, (a, b) in enumerate(bounds) if not torch.count_nonzero(s.residual[a:b])]
            if compression == "int8":
                assert sorted(exact_parts) == [0, 1]
            assert reports[0].params_sha256 == reports[1].params_sha256


@pytest.mark.timeout(120)
async def test_a_peer_whose_parameters_drifted_resyncs_from_its_groups_majority(caplog):
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as swarms:
            locals_ = [perturbed(theta, i) for i in range(3)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            # Fault: peer 2's θ silently changes (a bad bit, a bug) after the step; it publishes the wrong hash.
            with torch.no_grad():
                swarms[2].params[0][0, 0] += 1.0
            reports[2].params_sha256 = swarms[2].params_sha256()
            for s, r in zip(swarms, reports):
                await s.publish_hash(r)
            majority = reports[0].params_sha256
            locals_ = [perturbed([p.clone() for p in s.params], 10 + i) for i, s in enumerate(swarms)]
            started = asyncio.get_running_loop().time()
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            # Peer 2 takes its group's θ back and sits this round out; the others do not wait for it, and peer 2
            # takes the round's result, so that its next inner loop starts from the same θ as theirs.
            assert reports[2].status == StepStatus.RESYNCED and reports[2].group_size == 0
            assert "differed from its group's majority (2 of 3 members)" in caplog.text
            assert majority != swarms[2].params_sha256() == reports[0].params_sha256
            assert swarms[2].global_step == 2
            assert [r.group_size for r in reports[:2]] == [2, 2]
            assert asyncio.get_running_loop().time() - started < 10  # well under the 15 s matchmaking timeout
            locals_ = [perturbed([p.clone() for p in s.params], 20 + i) for i, s in enumerate(swarms)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [3, 3, 3]
            assert len({r.params_sha256 for r in reports}) == 1


@pytest.mark.timeout(60)
async def test_all_reduce_refuses_an_output_buffer_it_cannot_write_safely():
    from swarm.allreduce import Averager
    from swarm.codec import make_codec
    from swarm.matchmaking import Group

    async with swarm_of(2) as (_, nodes):
        averager = Averager(nodes[0], "out-check", make_codec("int8"), direct=False)
        group = Group(b"g" * 16, 0, (nodes[0].peer_id, nodes[1].peer_id), 0)
        flat = torch.ones(1000)
        for bad in (flat, flat[:500], torch.ones(1000, dtype=torch.float64), torch.ones(2000)[::2]):
            with pytest.raises(ValueError, match="out must"):
                await averager.all_reduce(group, flat, 1.0, out=bad)
