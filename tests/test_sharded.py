"""Peers sharded over several local workers (FSDP2 on gloo): real worker processes, real nodes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from peers.checkpoint import Checkpointer
from peers.launch import read_metrics, start_bootstrap, start_peer, stop
from peers.sharded import worker_node_config
from peers.workers import launch
from swarm import NodeConfig, records
from swarm.diloco import SwarmConfig
from swarm.matchmaking import Group, parse_shard_nodes
from swarm.outer import OuterOptimizer
from swarm.wire import ProtocolError
from tests.test_programs import alive, children_of, free_port

FAST = ["--inner-steps", "4", "--batch-size", "4", "--seq-len", "64"]


def start_sharded_worker(peer: int, rank: int, port: int, bootstrap: str, out: str, steps: int, *extra: str):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env["OMP_NUM_THREADS"] = "1"
    args = [sys.executable, "tests/sharded_worker.py", "--peer", str(peer), "--steps", str(steps)]
    args += ["--bootstrap", bootstrap, "--out", out, *extra]
    log = open(os.path.join(out, f"worker{peer}.{rank}.log"), "wb")  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


@pytest.mark.timeout(240)
def test_two_sharded_peers_equal_the_reference_diloco(tmp_path):
    """2 peers x 2 workers: after every outer step the full θ is identical on both and equals the reference."""
    out, steps = str(tmp_path), 2
    run_two_sharded_peers(out, steps)

    initial = [torch.load(f"{out}/peer{p}-initial.pt") for p in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*initial, strict=True))
    theta = [t.clone() for t in initial[0]]
    # The reference DiLoCo, on the whole model in one place, with the settings the peers ran with (the defaults).
    outer = OuterOptimizer(theta, lr=SwarmConfig.outer_lr, momentum=SwarmConfig.outer_momentum)
    for step in range(steps):
        got = [torch.load(f"{out}/peer{p}-step{step}.pt") for p in range(2)]
        assert [g["status"] for g in got] == ["averaged", "averaged"]
        assert [g["group_size"] for g in got] == [2, 2]
        # Worker 0's shard went over a direct connection authenticated by its pair key, not through the daemons.
        assert all(g["streams"]["relayed"] == 0 and g["streams"]["direct"] > 0 for g in got)
        assert all(torch.equal(a, b) for a, b in zip(got[0]["after"], got[1]["after"], strict=True))
        deltas = [[t - mine for t, mine in zip(outer.params, g["local"], strict=True)] for g in got]
        mean = []
        for i in range(len(theta)):
            acc = torch.zeros_like(theta[i])
            for d in deltas:  # equal token counts: the reducers' weights are 1/2 each
                acc.add_(d[i], alpha=0.5)
            mean.append(acc)
        outer.step(mean)
        for expected, actual in zip(outer.params, got[0]["after"], strict=True):
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
        # The peer's hash of its sharded θ is the hash of the whole θ computed in one place.
        assert got[0]["theta"] == records.theta_sha256([records.row_digests(t) for t in got[0]["after"]])


def run_two_sharded_peers(out: str, steps: int, extra: dict[int, list[str]] | None = None) -> None:
    boot = start_bootstrap(out)
    workers = []
    try:
        for peer in range(2):
            port, more = free_port(), (extra or {}).get(peer, [])
            workers += [start_sharded_worker(peer, rank, port, boot.maddrs[0], out, steps, *more) for rank in range(2)]
        for w in workers:
            w.wait(200)
        logs = [open(f"{out}/{n}").read()[-2000:] for n in sorted(os.listdir(out)) if n.endswith(".log")]
        assert [w.returncode for w in workers] == [0, 0, 0, 0], logs
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        stop(boot.process)


@pytest.mark.timeout(240)
def test_nan_in_one_shard_is_never_sent_and_the_peer_rejoins(tmp_path):
    """A NaN in worker 1's shard: the whole peer sits the round out, then takes the round's result and averages on."""
    out = str(tmp_path)
    nan = ["--nan-step", "1", "--nan-rank", "1"]
    run_two_sharded_peers(out, 3, {0: ["--matchmaking-timeout", "5"], 1: ["--matchmaking-timeout", "5", *nan]})
    got = [[torch.load(f"{out}/peer{p}-step{s}.pt") for s in range(3)] for p in range(2)]
    assert [g["status"] for g in got[1]] == ["averaged", "nonfinite", "averaged"]
    assert [g["status"] for g in got[0]] == ["averaged", "alone", "averaged"]
    # After sitting out it took over the round's result, so both trained step 2 from the same θ and agree again.
    assert torch.isnan(got[1][1]["local"][3]).any()
    assert all(torch.isfinite(t).all() for g in got[1] for t in g["after"])
    assert got[0][2]["theta"] == got[1][2]["theta"]
    assert all(torch.equal(a, b) for a, b in zip(got[0][2]["after"], got[1][2]["after"], strict=True))


@pytest.mark.timeout(300)
def test_sharded_newcomer_takes_each_shard_from_the_run_and_averages(tmp_path):
    """A 2-worker peer joining two 2-worker peers mid-run: every worker takes its shard, then it averages with them."""
    w = str(tmp_path)
    boot = start_bootstrap(w, "--run-id", "late")
    common = [
        "--run-id",
        "late",
        "--nproc-per-node",
        "2",
        "--inner-steps",
        "10",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
    ]
    peers = []
    try:
        for i in range(2):
            peers.append(start_peer(w, f"p{i}", boot.maddrs, *common, "--metrics-file", f"{w}/m{i}.jsonl"))
        deadline = time.monotonic() + 120
        while len(read_metrics(f"{w}/m0.jsonl")) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        late = start_peer(w, "late", boot.maddrs, *common, "--outer-steps", "3", "--metrics-file", f"{w}/late.jsonl")
        peers.append(late)
        assert late.wait(150) == 0, open(f"{w}/late.log").read()[-3000:]
        mine = read_metrics(f"{w}/late.jsonl")
        assert "caught up with the run" in open(f"{w}/late.log").read()
        assert mine[0]["outer_step"] > 2  # it started from the run's state, not from θ0
        others = {r["outer_step"]: r for i in range(2) for r in read_metrics(f"{w}/m{i}.jsonl")}
        averaged = [r for r in mine if r["status"] == "averaged" and r["group_size"] == 3]
        assert averaged, [(r["outer_step"], r["status"], r["group_size"], r.get("landed_at")) for r in mine]
        for r in averaged:
            assert r["params_sha256"] == others[r["outer_step"]]["params_sha256"]
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)


@pytest.mark.timeout(300)
def test_sharded_swarm_peer_programs_agree_and_resume(tmp_path):
    """Two `swarm-peer --nproc-per-node 2`: equal θ hashes per outer step, loss falls; one restarts where it was."""
    w = str(tmp_path)
    boot = start_bootstrap(w, "--run-id", "fsdp")
    peers = []
    try:
        for i in range(2):
            args = ["--run-id", "fsdp", "--nproc-per-node", "2", "--outer-steps", "3", "--metrics-file",
                    f"{w}/m{i}.jsonl", "--checkpoint-dir", f"{w}/ck{i}", "--identity", f"{w}/p{i}.id",
                    *FAST]  # fmt: skip
            peers.append(start_peer(w, f"p{i}", boot.maddrs, *args))
        assert [p.wait(200) for p in peers] == [0, 0], open(f"{w}/p0.log").read()[-3000:]
        records_ = [read_metrics(f"{w}/m{i}.jsonl") for i in range(2)]
        for a, b in zip(*records_, strict=True):
            assert a["outer_step"] == b["outer_step"]
            assert a["status"] == b["status"] == "averaged" and a["group_size"] == 2
            assert a["params_sha256"] == b["params_sha256"] == a["theta_sha256"]
            assert a["workers"] == 2 and len(a["outer_step_peak_mb"]) == 2
        losses = [r["loss"] for r in records_[0]]
        assert [r["outer_step"] for r in records_[0]] == [1, 2, 3]
        assert losses[-1] < losses[0]
        files = sorted(os.listdir(f"{w}/ck0"))
        assert "step-00000003.shard0of2.pt" in files and "step-00000003.shard1of2.pt" in files
        # The checkpoint holds each worker's shard only: together they are the θ the metrics hashed.
        shards = [torch.load(f"{w}/ck0/step-00000003.shard{r}of2.pt")["swarm"]["params"] for r in range(2)]
        digests = [records.row_digests(a) + records.row_digests(b) for a, b in zip(*shards, strict=True)]
        assert records.theta_sha256(digests) == records_[0][-1]["theta_sha256"]

        # Peer 0 restarts alone from its checkpoints and goes on from outer step 3 with the same θ, until SIGTERM.
        args = ["--run-id", "fsdp", "--nproc-per-node", "2", "--metrics-file", f"{w}/m0.jsonl",
                "--checkpoint-dir", f"{w}/ck0", "--identity", f"{w}/p0.id", "--matchmaking-timeout", "3",
                *FAST]  # fmt: skip
        again = start_peer(w, "p0-again", boot.maddrs, *args)
        peers.append(again)
        deadline = time.monotonic() + 120
        while len(read_metrics(f"{w}/m0.jsonl")) < 4 and time.monotonic() < deadline and again.poll() is None:
            time.sleep(0.3)
        workers = children_of(again.pid)
        assert len(workers) == 2
        again.send_signal(signal.SIGTERM)  # the launcher forwards it: both workers finish the phase and save
        assert again.wait(60) == 0, open(f"{w}/p0-again.log").read()[-3000:]
        assert not any(alive(pid) for pid in workers)
        log = open(f"{w}/p0-again.log").read()
        resumed = re.search(r"resumed from outer step 3 .*θ ([0-9a-f]{12})", log)
        assert resumed and resumed.group(1) == records_[0][-1]["theta_sha256"][:12], log[-3000:]
        after = read_metrics(f"{w}/m0.jsonl")[3:]
        assert after[0]["outer_step"] == 4 and after[0]["status"] == "alone"
        newest = max(Checkpointer(f"{w}/ck0", shard=(r, 2)).steps()[-1] for r in range(2))
        assert Checkpointer(f"{w}/ck0", shard=(0, 2)).steps()[-1] == newest == after[-1]["outer_step"]
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)


@pytest.mark.timeout(180)
def test_peers_of_different_worker_layouts_are_refused_clearly(tmp_path):
    """A 1-worker and a 2-worker peer in one run never average; both say why, naming both layouts."""
    w = str(tmp_path)
    boot = start_bootstrap(w, "--run-id", "mixed")
    peers = []
    try:
        common = ["--run-id", "mixed", "--outer-steps", "2", "--matchmaking-timeout", "6", *FAST]
        peers.append(start_peer(w, "one", boot.maddrs, *common, "--metrics-file", f"{w}/one.jsonl"))
        peers.append(start_peer(w, "two", boot.maddrs, *common, "--nproc-per-node", "2", "--precision", "bf16",
                                "--metrics-file", f"{w}/two.jsonl"))  # fmt: skip
        assert [p.wait(150) for p in peers] == [0, 0]
        for name in ("one", "two"):
            assert [r["group_size"] for r in read_metrics(f"{w}/{name}.jsonl")] == [1, 1]
            assert all(r["loss"] is not None for r in read_metrics(f"{w}/{name}.jsonl"))  # bf16 compute included
        logs = open(f"{w}/one.log").read() + open(f"{w}/two.log").read()
        assert re.search(r"incompatible.*one worker.*sharded over 2 workers|incompatible.*sharded over 2 workers"
                         r".*one worker", logs), logs[-3000:]  # fmt: skip
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)


@pytest.mark.timeout(60)
def test_launcher_stops_every_worker_when_one_fails():
    """A failing worker takes the peer down with its code; the others are not left waiting in a collective."""
    code = (
        "import os, signal, sys, time\n"
        "if os.environ['SWARM_WORKER_RANK'] == '1':\n"
        "    time.sleep(0.5); sys.exit(3)\n"
        "signal.pause()  # until the launcher stops us\n"
    )
    started = time.monotonic()
    assert launch([], 2, command=[sys.executable, "-c", code]) == 3
    assert time.monotonic() - started < 30


@pytest.mark.timeout(30)
def test_shard_groups_derive_from_the_peer_group():
    from hivemind.p2p import PeerID

    ids = [PeerID(os.urandom(34)) for _ in range(4)]  # two peers, each with a second worker's node
    shards = {ids[0]: [(ids[2], [], b"k" * 32)], ids[1]: [(ids[3], [("127.0.0.1", 9)], b"")]}
    group = Group(b"g" * 16, 5, (ids[0], ids[1]), 1, b"s" * 32, {}, shards)
    shard = group.for_shard(1)
    assert shard.peer_ids == (ids[2], ids[3]) and shard.my_index == 1 and shard.outer_step == 5
    assert shard.keys == {ids[2]: b"k" * 32} and shard.direct == {ids[3]: [("127.0.0.1", 9)]}
    assert shard.group_id != group.group_id and shard.secret not in (b"", group.secret)
    assert group.for_shard(0) is group
    with pytest.raises(ProtocolError, match="not sharded like us"):
        Group(b"g" * 16, 5, (ids[0], ids[1]), 0, b"", {}, {ids[0]: [(ids[2], [], b"")]}).for_shard(1)
    with pytest.raises(ProtocolError):
        parse_shard_nodes([["not-a-peer-id", [], b""]])
    with pytest.raises(ProtocolError):
        parse_shard_nodes([[ids[2].to_base58(), [], b"short"]])
    with pytest.raises(ProtocolError):
        parse_shard_nodes({"a": 1})
    parsed = parse_shard_nodes([[ids[2].to_base58(), [["127.0.0.1", 5000]], b"k" * 32]])
    assert parsed == [(ids[2], [("127.0.0.1", 5000)], b"k" * 32)]


@pytest.mark.timeout(30)
def test_theta_hash_does_not_depend_on_the_worker_layout():
    torch.manual_seed(0)
    tensors = [torch.randn(257, 8), torch.randn(7), torch.tensor(3.0), torch.randn(0, 4)]
    whole = records.theta_sha256([records.row_digests(t) for t in tensors])
    for workers in (2, 3, 4):
        per_tensor = []
        for t in tensors:
            pieces = torch.chunk(t, workers, dim=0) if t.dim() > 0 and t.shape[0] > 0 else [t]
            per_tensor.append(b"".join(records.row_digests(piece) for piece in pieces))
        assert records.theta_sha256(per_tensor) == whole
    changed = [t.clone() for t in tensors]
    changed[0][100, 3] += 1e-6
    assert records.theta_sha256([records.row_digests(t) for t in changed]) != whole


@pytest.mark.timeout(30)
def test_sharded_checkpoints_and_worker_nodes(tmp_path):
    ck = Checkpointer(str(tmp_path), shard=(1, 2))
    ck.save({"swarm": {}, "x": 1}, 7)
    assert ck.steps() == [7] and ck.load(7)["x"] == 1
    Checkpointer(str(tmp_path)).save({"swarm": {}}, 3)
    assert Checkpointer(str(tmp_path), shard=(0, 4)).other_layouts() == [
        "step-00000003.pt",
        "step-00000007.shard1of2.pt",
    ]
    node = NodeConfig(host_maddrs=["/ip4/0.0.0.0/tcp/4000", "/ip4/0.0.0.0/tcp/0"], identity_path="/x/id")
    node.announce_maddrs = ["/ip4/1.2.3.4/tcp/4000"]
    second = worker_node_config(node, 2)
    assert second.host_maddrs == ["/ip4/0.0.0.0/tcp/4002", "/ip4/0.0.0.0/tcp/0"]
    assert second.announce_maddrs == ["/ip4/1.2.3.4/tcp/4002"] and second.identity_path == "/x/id.worker2"
    assert worker_node_config(node, 0) is node
