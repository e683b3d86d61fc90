"""The outer optimizer's settings and the quality benchmark's baselines.

The benchmark's figures come from long runs (benchmarks/quality.py); these tests keep its arms honest: DiLoCo with
one replica and plain averaging must reproduce plain AdamW step for step, and the outer step's settings must be
what the flags say.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from click.testing import CliRunner

from peers.cli import build_config
from peers.cli import main as peer_main
from peers.inner import InnerConfig
from swarm.outer import MomentumRamp, OuterOptimizer, final_round
from swarm.overlap import to_start_point

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "benchmarks", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_config(*args: str):
    ctx = peer_main.make_context("swarm-peer", list(args))
    flags = dict(ctx.params)
    flags.pop("print_config")
    return build_config(flags)


@pytest.mark.timeout(30)
def test_outer_momentum_zero_is_plain_averaging():
    theta = [torch.randn(4, 3), torch.randn(5)]
    local = [t - 0.1 * torch.randn_like(t) for t in theta]
    outer = OuterOptimizer([t.clone() for t in theta], lr=1.0, momentum=0.0)
    for _ in range(2):  # no momentum carries over: the second step moves by its own Δ alone
        start = [p.detach().clone() for p in outer.params]
        delta = [s - q for s, q in zip(start, local, strict=True)]
        outer.step(delta)
        for p, q in zip(outer.params, local, strict=True):
            assert torch.allclose(p, q, atol=1e-6, rtol=0)
        local = [p.detach() - 0.1 * torch.randn_like(p) for p in outer.params]
    assert outer.momentum() is None


@pytest.mark.timeout(30)
def test_a_checkpoint_brings_back_the_momentum_buffers_but_never_its_settings():
    theta = [torch.randn(4, 3)]
    saved = OuterOptimizer([t.clone() for t in theta], lr=0.7, momentum=0.9)
    saved.step([torch.randn(4, 3)])
    resumed = OuterOptimizer([t.clone() for t in theta], lr=0.5, momentum=0.5)
    resumed.load_state_dict(saved.state_dict())
    group = resumed._sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.5, 0.5, True)
    assert torch.equal(resumed.momentum()[0], saved.momentum()[0])
    plain = OuterOptimizer([t.clone() for t in theta], lr=1.0, momentum=0.0)
    plain.load_state_dict(saved.state_dict())
    assert (plain._sgd.param_groups[0]["momentum"], plain._sgd.param_groups[0]["nesterov"]) == (0.0, False)
    assert plain.momentum() is None


@pytest.mark.timeout(30)
def test_outer_momentum_flag_takes_zero_and_refuses_one():
    assert peer_config("--outer-momentum", "0").swarm.outer_momentum == 0.0
    result = CliRunner().invoke(peer_main, ["--outer-momentum", "1", "--print-config"], prog_name="swarm-peer")
    assert result.exit_code == 2
    assert "--outer-momentum" in result.output and "0<=x<1" in result.output


@pytest.mark.timeout(30)
def test_the_outer_momentum_rises_as_the_inner_rate_decays():
    """A run that knows its length ramps the momentum along its inner decay; an open-ended one keeps it."""
    flags = ("--inner-steps", "30", "--warmup-steps", "45", "--decay-steps", "900", "--early-steps", "0")  # test_plan
    swarm = peer_config(*flags).swarm
    assert swarm.outer_momentum_ramp == MomentumRamp(final=0.8, start=1.5, end=30.0)
    assert "momentum 0.5 rising to 0.8 over outer steps 1.5-30.0" in swarm.outer_description  # part of the schema
    ramp, inner = swarm.outer_momentum_ramp, InnerConfig(lr=1e-3, warmup_steps=45, decay_steps=900)
    momenta = [ramp.at(t, 0.5) for t in range(40)]
    assert momenta[0] == 0.5 and momenta[-1] == 0.8
    assert all(a <= b for a, b in zip(momenta, momenta[1:]))
    for t in range(2, 30):  # the share of the way the inner rate has decayed at the middle of round t's loop
        decayed = (1 - inner.lr_at(30 * t + 15) / 1e-3) / (1 - inner.min_lr_ratio)
        assert momenta[t] == pytest.approx(0.5 + 0.3 * decayed, abs=1e-9)
    assert peer_config("--outer-momentum-final", "0.9", *flags).swarm.outer_momentum_ramp.final == 0.9
    assert peer_config("--inner-steps", "30").swarm.outer_momentum_ramp is None
    assert peer_config("--outer-momentum", "0", *flags).swarm.outer_momentum_ramp is None
    assert peer_config("--outer-momentum", "0.9", *flags).swarm.outer_momentum_ramp is None  # it only rises
    result = CliRunner().invoke(peer_main, ["--outer-momentum-final", "1", "--print-config"], prog_name="swarm-peer")
    assert result.exit_code == 2 and "--outer-momentum-final" in result.output


@pytest.mark.timeout(30)
def test_a_ramped_outer_step_takes_the_momentum_of_its_round_and_the_overlap_guess_foresees_it():
    theta = [torch.randn(4, 3), torch.randn(5)]
    ramp = MomentumRamp(final=0.9, start=0.0, end=4.0)
    outer = OuterOptimizer([t.clone() for t in theta], lr=0.7, momentum=0.5, ramp=ramp)
    params = [torch.nn.Parameter(t.clone()) for t in theta]
    reference = torch.optim.SGD(params, lr=0.7, momentum=0.5, nesterov=True)
    with pytest.raises(ValueError, match="depend on the round"):
        outer.settings()
    for step in range(5):
        delta = [0.1 * torch.randn_like(t) for t in theta]
        guess = [d.clone() for d in delta]
        for i, g in enumerate(guess):  # what an overlapped peer starts from when the mean is its own Δ
            to_start_point(outer, i, g, False, step)
        outer.step(delta, at=step)
        reference.param_groups[0]["momentum"] = ramp.at(step, 0.5)
        for p, d in zip(params, delta, strict=True):
            p.grad = d.clone()
        reference.step()
        for p, q, g in zip(outer.params, params, guess, strict=True):
            assert torch.allclose(p, q, atol=1e-6, rtol=0)
            assert torch.allclose(p, g, atol=1e-6, rtol=0)
    assert outer.settings(4)[1] == 0.9
    with pytest.raises(ValueError, match="positive outer momentum"):
        OuterOptimizer([t.clone() for t in theta], lr=0.7, momentum=0.0, ramp=ramp)


@pytest.mark.timeout(30)
def test_the_round_that_ends_the_decay_lands_on_the_groups_mean():
    """Before it, Nesterov's step; from it on, θ − mean Δ, with the momentum kept as torch's SGD keeps it (a run that
    goes on past its decay goes on averaging), and the overlap guess foresees it."""
    theta = [torch.randn(4, 3), torch.randn(5)]
    outer = OuterOptimizer([t.clone() for t in theta], lr=0.7, momentum=0.5, final_round=2)
    params = [torch.nn.Parameter(t.clone()) for t in theta]
    reference = torch.optim.SGD(params, lr=0.7, momentum=0.5, nesterov=True)
    with pytest.raises(ValueError, match="depends on the round"):
        outer.step([torch.zeros_like(t) for t in theta])
    for step in range(4):
        before = [p.clone() for p in outer.params]
        delta = [0.1 * torch.randn_like(t) for t in theta]
        guess = [d.clone() for d in delta]
        for i, g in enumerate(guess):
            to_start_point(outer, i, g, False, step)
        outer.step(delta, at=step)
        for p, d in zip(params, delta, strict=True):
            p.grad = d.clone()
        reference.step()  # its momentum buffers are what a run that continues needs
        for i, (p, q, g, b, d) in enumerate(zip(outer.params, params, guess, before, delta, strict=True)):
            assert torch.allclose(p, g, atol=1e-6, rtol=0)
            assert torch.allclose(outer.momentum_buffer(i), reference.state[q]["momentum_buffer"], atol=1e-6, rtol=0)
            if step < 2:
                assert torch.allclose(p, q, atol=1e-6, rtol=0)
            else:
                assert torch.equal(p, b - d)
                with torch.no_grad():
                    q.copy_(p)  # the reference goes on from where the mean put θ
    assert [outer.lands_on_mean(t) for t in range(4)] == [False, False, True, True]
    with pytest.raises(ValueError, match="final round"):
        OuterOptimizer([t.clone() for t in theta], final_round=-1)


@pytest.mark.timeout(30)
def test_a_run_that_knows_its_length_ends_on_the_mean_and_an_open_ended_one_never_does():
    flags = ("--inner-steps", "30", "--warmup-steps", "45", "--decay-steps", "900", "--early-steps", "0")  # test_plan
    swarm = peer_config(*flags).swarm
    assert swarm.outer_final_round == 29  # rounds 0-29: the last inner step of round 29 is the decay's 900th
    assert swarm.outer_description.endswith(", the mean from round 29")  # part of the schema
    assert final_round(30, 901) == 30 and final_round(30, 10) == 0 and final_round(30, None) is None
    assert peer_config("--inner-steps", "30").swarm.outer_final_round is None
    assert peer_config("--no-final-mean", *flags).swarm.outer_final_round is None
    assert peer_config("--outer-momentum", "0", *flags).swarm.outer_final_round == 29  # plain SGD steps past too


@pytest.mark.timeout(180)
def test_diloco_with_one_replica_reproduces_adamw(tmp_path):
    """The benchmark's one-peer arm (its data-parallel code with one worker) and its DiLoCo M=1 arm (the inner loop
    and the outer step, as a lone peer runs them) must agree: the harness adds nothing of its own."""
    quality = load_benchmark()
    opts = {
        "model": "embedded", "dataset": "embedded", "batch_size": 2, "seq_len": 32, "lr": 1e-3,
        "warmup_steps": 2, "decay_steps": 8, "eval_batches": 1, "outer_steps": 2, "inner_steps": 4, "early_steps": 0,
        "worker_ids": [b"worker 0", b"worker 1"],  # what the benchmark reads from the swarm peers' identity files
    }  # fmt: skip
    adamw = quality.run_data_parallel(opts, seed=3, world=1, workdir=str(tmp_path))
    m1 = quality.run_diloco({**opts, "outer": {"lr": 1.0, "momentum": 0.0}}, seed=3)
    assert [tokens for tokens, _ in adamw] == [tokens for tokens, _ in m1] == [4 * 64, 8 * 64]
    for (_, a), (_, b) in zip(adamw, m1, strict=True):
        assert abs(a - b) < 1e-4, (adamw, m1)
    # A peer alone takes its own inner result whatever its outer settings (OuterOptimizer.step_alone): the M=1 arm
    # with the defaults, or with extrapolating settings, is plain AdamW too.
    for outer in ({"lr": 0.7, "momentum": 0.5, "momentum_final": 0.8}, {"lr": 1.5, "momentum": 0.9}):
        alone = quality.run_diloco({**opts, "outer": outer}, seed=3)
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(adamw, alone, strict=True)), (adamw, alone)
    # Two replicas do go through the outer optimizer: its settings change the result.
    pair = [quality.run_diloco({**opts, "outer": {"lr": lr, "momentum": 0.0}}, seed=3, replicas=2) for lr in (1.0, 1.5)]
    assert abs(pair[0][-1][1] - pair[1][-1][1]) > 1e-4
