"""Training on the embedded default: the real inner loop, model and data, with the swarm in the same process."""

import pytest

from peers.checkpoint import Checkpointer
from peers.inner import InnerConfig
from peers.launch import read_metrics
from peers.runner import Peer, PeerConfig
from swarm import MatchmakingConfig, NodeConfig, SwarmConfig


def peer_config(tmp_path, outer_steps: int, **kwargs) -> PeerConfig:
    return PeerConfig(
        node=NodeConfig(),
        swarm=SwarmConfig(run_id="train", matchmaking=MatchmakingConfig(min_group_size=1, timeout_seconds=5)),
        inner_steps=25,
        batch_size=8,
        seq_len=64,
        outer_steps=outer_steps,
        metrics_file=str(tmp_path / "metrics.jsonl"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        **kwargs,
    )


@pytest.mark.timeout(240)
async def test_loss_falls_on_the_embedded_default(tmp_path):
    peer = Peer(peer_config(tmp_path, outer_steps=4))
    try:
        await peer.start()
        await peer.run()
    finally:
        await peer.close()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["outer_step"] for r in records] == [1, 2, 3, 4]
    assert all(r["group_size"] == 1 for r in records)
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.timeout(240)
async def test_restart_resumes_from_the_checkpoint(tmp_path):
    schedule = InnerConfig(lr=2e-3, warmup_steps=30, decay_steps=100)
    first = Peer(peer_config(tmp_path, outer_steps=2, inner=schedule))
    try:
        await first.start()
        await first.run()
        theta = first.swarm.params_sha256()
        position = first.batches.position
    finally:
        await first.close()
    second = Peer(peer_config(tmp_path, outer_steps=1, inner=schedule))
    try:
        await second.start()
        assert second.swarm.global_step == 2
        assert second.swarm.params_sha256() == theta
        assert second.batches.position == position
        await second.run()
        assert second.swarm.global_step == 3
        # The learning-rate schedule goes on from the run's position (outer step 2, inner steps 50..74).
        assert second.inner.optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(2 * 25 + 24))
    finally:
        await second.close()
    assert [r["outer_step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]


@pytest.mark.timeout(60)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step in range(3):
        ckpt.save({"swarm": {"step": step}}, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt", "step-00000002.pt"]
    (tmp_path / "step-00000002.pt").write_bytes(b"\x00" * 100)
    state, path = ckpt.load_latest()
    assert state["swarm"]["step"] == 1 and path.endswith("step-00000001.pt")
    assert "unreadable" in caplog.text


def test_learning_rate_schedule_warms_up_then_decays_by_cosine():
    config = InnerConfig(lr=1e-3, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert config.lr_at(0) == pytest.approx(1e-4)
    assert config.lr_at(9) == pytest.approx(1e-3)
    assert config.lr_at(60) == pytest.approx(0.55e-3)  # halfway through the decay
    assert config.lr_at(110) == pytest.approx(1e-4) == config.lr_at(10_000)
    rates = [config.lr_at(step) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert InnerConfig(lr=1e-3).lr_at(12345) == 1e-3
