"""A run's round lengths (swarm.plan): shorter rounds early, then H, the same to every peer."""

import math

import pytest
from click.testing import CliRunner

from peers.cli import main as peer_main
from peers.evaluate import EvalConfig
from peers.inner import InnerConfig, called_slack
from peers.launch import read_metrics
from peers.runner import Peer
from swarm.outer import MomentumRamp, final_round
from swarm.plan import RoundPlan
from tests.test_quality import peer_config
from tests.test_training import peer_config as training_config


def test_rounds_are_short_early_then_h_and_steps_map_to_rounds_both_ways():
    plan = RoundPlan(25, 10, 25)  # 10, 10, then 5 to close the early phase, then 25s
    assert [plan.length(t) for t in range(5)] == [10, 10, 5, 25, 25]
    assert [plan.first_step(t) for t in range(5)] == [0, 10, 20, 25, 50]
    for step in range(200):
        t = plan.round_at(step)
        assert plan.first_step(t) <= step < plan.first_step(t) + plan.length(t)
    assert plan.position(0) == 5 / 25 and plan.position(3) == (25 + 12.5) / 25
    flat = RoundPlan(30)
    assert [flat.first_step(t) for t in range(3)] == [0, 30, 60] and flat.position(3) == 3.5
    assert flat.describe() == "" and flat.early_rounds == 0
    for bad in ((0,), (30, 30, 60), (30, -1, 60), (30, 10, -30)):
        with pytest.raises(ValueError):
            RoundPlan(*bad)


def test_swarm_peer_averages_every_third_of_h_for_six_warmups_and_the_schema_says_so():
    flags = ("--inner-steps", "30", "--warmup-steps", "45", "--decay-steps", "900")
    config = peer_config(*flags)
    plan = config.swarm.round_plan
    assert plan == RoundPlan(30, 10, 270)  # 6 x 45 = 270: whole outer steps of 30
    assert ", rounds of 10 inner steps for the first 270" in config.swarm.outer_description  # part of the schema
    # The last round on the mean and the momentum's ramp count rounds as the plan lays them out.
    assert config.swarm.outer_final_round == 27 + 20 == final_round(30, 900, plan) == plan.round_at(899)
    ramp = config.swarm.outer_momentum_ramp
    assert ramp == MomentumRamp(final=0.8, start=1.5, end=30.0, plan=plan)
    inner = InnerConfig(lr=1e-3, warmup_steps=45, decay_steps=900)
    for t in range(plan.round_at(899) + 1):  # the share of the way the inner rate has decayed mid-round
        middle = plan.first_step(t) + plan.length(t) / 2
        decayed = (1 - inner.lr_at(middle) / 1e-3) / (1 - inner.min_lr_ratio) if middle > 45 else 0.0
        assert ramp.at(t, 0.5) == pytest.approx(0.5 + 0.3 * decayed, abs=1e-9)
    assert peer_config("--early-inner-steps", "5", *flags).swarm.round_plan == RoundPlan(30, 5, 270)
    assert peer_config("--early-steps", "100", *flags).swarm.round_plan == RoundPlan(30, 10, 120)
    # No early phase: asked for none, or no warmup to size it by; the schema is then what it was before plans.
    for off in (peer_config("--early-steps", "0", *flags), peer_config("--inner-steps", "30")):
        assert off.swarm.round_plan.early_steps == 0 and "rounds of" not in off.swarm.outer_description
    assert peer_config("--early-steps", "0", *flags).swarm.outer_final_round == 29
    result = CliRunner().invoke(peer_main, ["--early-inner-steps", "30", *flags, "--print-config"])
    assert result.exit_code == 2 and "--early-inner-steps" in result.output and "shorter than" in result.output


@pytest.mark.timeout(240)
async def test_a_peer_trains_its_outer_steps_worth_of_inner_steps_in_the_plans_rounds(tmp_path):
    config = training_config(tmp_path, outer_steps=2)  # H = 25: 50 inner steps
    config.swarm.round_plan = RoundPlan(25, 10, 25)
    config.inner = InnerConfig(lr=2e-3, warmup_steps=5, decay_steps=50)
    peer = Peer(config)
    try:
        await peer.start()
        await peer.run()
        assert peer.swarm.global_step == 4
        # The schedule went by the run's inner steps: the last one was step 49.
        assert peer.inner.optimizer.param_groups[0]["lr"] == pytest.approx(config.inner.lr_at(49))
    finally:
        await peer.close()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["outer_step"], r["inner_steps"]) for r in records] == [(1, 10), (2, 10), (3, 5), (4, 25)]
    # Overlapped, an early round's loop waits for its round before its first step; a full one at the lag bound.
    peer._loop_length = 10
    assert peer._lag_steps() == 0
    peer._loop_length = 25
    assert peer._lag_steps() == math.ceil(config.overlap_max_lag * 25)


def test_short_rounds_tolerate_the_drift_a_full_one_does_and_are_evaluated_where_full_ones_end():
    # A called loop finishes when at most this many steps are left: a third of H, at most half of a short loop.
    assert [called_slack(steps, 30) for steps in (30, 10, 4, 1)] == [10, 5, 2, 0]
    assert called_slack(25, 25) == 8
    plan, config = RoundPlan(30, 10, 270), EvalConfig(every_outer_steps=1)
    due = [t for t in range(1, 40) if config.due(plan.first_step(t), plan.inner_steps)]
    assert due == [3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29] + list(range(30, 40))  # every 30 inner steps
    every2 = EvalConfig(every_outer_steps=2)
    assert [t for t in range(1, 6) if every2.due(RoundPlan(30).first_step(t), 30)] == [2, 4]
