"""Stopping real `swarm-peer` processes the way systemd or a terminal does: a signal to the peer's whole process group.

The peer under test runs in a session of its own (as under a service manager or in a terminal), so os.killpg on it
reaches the peer and everything that shares its group, and not pytest. A clean stop: exit 0, no traceback, the p2p
daemon gone afterwards, and the θ the peer checkpoints and last recorded is the run's θ (the other peer's hash).
"""

import os
import signal
import time

import pytest

from peers.checkpoint import Checkpointer
from peers.launch import read_metrics, start_bootstrap, start_peer, stop
from swarm import records
from tests.test_programs import alive, children_of

SMALL = ["--batch-size", "4", "--seq-len", "64"]
NOISE = ("Traceback", "Task was destroyed but it is pending", "Exception ignored")


def daemons_of(pid: int) -> list[int]:
    """The p2pd processes a peer started (its other child is swarm.reaper's helper)."""
    found = []
    for child in children_of(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                program = f.read().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(program) == b"p2pd":
            found.append(child)
    return found


def wait_for(condition, timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"exited with {process.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_clean_log(text: str) -> None:
    for noise in NOISE:
        assert noise not in text, text


def checkpoint_theta(directory) -> tuple[int, str]:
    """(outer step, θ hash) of the newest checkpoint."""
    state, _ = Checkpointer(str(directory)).load_latest()
    return state["swarm"]["step"], records.params_sha256(state["swarm"]["params"])


def by_step(path) -> dict[int, dict]:
    return {r["outer_step"]: r for r in read_metrics(str(path))}


def stop_group_and_check(peer, workdir, name: str) -> float:
    """SIGTERM to the peer's process group; asserts a clean exit with its daemon gone. Returns when it exited."""
    daemons = daemons_of(peer.pid)
    assert daemons, "the peer should run a p2p daemon"
    # What keeps it up until the peer has left: the group signal does not reach it.
    assert all(os.getpgid(pid) != os.getpgid(peer.pid) for pid in daemons)
    os.killpg(peer.pid, signal.SIGTERM)
    code = peer.wait(timeout=60)
    exited = time.time()
    log = (workdir / f"{name}.log").read_text()
    assert code == 0, log
    assert "SIGTERM: finishing the current phase" in log
    assert_clean_log(log)
    assert not any(alive(pid) for pid in daemons), "the p2p daemon outlived the peer"
    return exited


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["--no-overlap", "--overlap"])
def test_group_sigterm_during_the_inner_loop_stops_cleanly_with_the_runs_theta(tmp_path, mode):
    boot = start_bootstrap(str(tmp_path), "--run-id", "sig-inner")
    common = ["--run-id", "sig-inner", "--inner-steps", "60", mode, *SMALL]
    steady = start_peer(str(tmp_path), "steady", boot.maddrs, *common, "--outer-steps", "3",
                        "--metrics-file", str(tmp_path / "steady.jsonl"))  # fmt: skip
    leaver = start_peer(str(tmp_path), "leaver", boot.maddrs, *common, "--checkpoint-dir", str(tmp_path / "ckpt"),
                        "--metrics-file", str(tmp_path / "leaver.jsonl"), new_session=True)  # fmt: skip
    # Blocking, a round's record is written before the next inner loop; overlapped, after it (the round flies
    # meanwhile), and the round in flight when the signal comes finishes with the group before the peer leaves.
    last = 1 if mode == "--no-overlap" else 2
    try:
        # Its first record is written just before an inner loop (60 steps, seconds) starts.
        wait_for(lambda: read_metrics(str(tmp_path / "leaver.jsonl")), 150, "the first outer step", leaver)
        time.sleep(0.5)
        left_at = stop_group_and_check(leaver, tmp_path, "leaver")
        log = (tmp_path / "leaver.log").read_text()
        assert "inner loop interrupted" in log, "the signal missed the inner loop"

        mine = read_metrics(str(tmp_path / "leaver.jsonl"))
        assert [r["outer_step"] for r in mine] == list(range(1, last + 1)) and mine[-1]["group_size"] == 2
        assert steady.wait(timeout=120) == 0, (tmp_path / "steady.log").read_text()
        theirs = by_step(tmp_path / "steady.jsonl")
        assert mine[-1]["params_sha256"] == theirs[last]["params_sha256"]
        # The checkpoint holds the run's θ of that step, and the interrupted loop's work beside it, in the model:
        # nothing of it is lost (the next Δ after a restart carries it).
        assert checkpoint_theta(tmp_path / "ckpt") == (last, theirs[last]["params_sha256"])
        state, _ = Checkpointer(str(tmp_path / "ckpt")).load_latest()
        assert state["pending_tokens"] > 0 and not state["model_is_theta"]
        assert "partial work (" in log and "is kept in the checkpoint" in log
        # The other peer trains on without it, and does not wait out the matchmaking timeout for it.
        assert sorted(theirs) == [1, 2, 3]
        assert theirs[last + 1]["time"] > left_at and theirs[last + 1]["status"] == "alone"
        assert theirs[last + 1]["comm_seconds"] < 20
    finally:
        for p in (leaver, steady):
            stop(p)
        stop(boot.process)


@pytest.mark.timeout(240)
def test_group_sigterm_during_the_outer_step_finishes_the_round_with_the_group(tmp_path):
    boot = start_bootstrap(str(tmp_path), "--run-id", "sig-outer")
    # The steady peer's inner loop is 30x longer: the leaver spends most of each outer step waiting for it. Blocking:
    # overlapped, the round runs behind the next inner loop, and the test above stops a peer with one in flight.
    steady = start_peer(str(tmp_path), "steady", boot.maddrs, "--run-id", "sig-outer", "--inner-steps", "150",
                        "--outer-steps", "3", "--metrics-file", str(tmp_path / "steady.jsonl"), "--no-overlap",
                        *SMALL)  # fmt: skip
    leaver = start_peer(str(tmp_path), "leaver", boot.maddrs, "--run-id", "sig-outer", "--inner-steps", "5",
                        "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-file", str(tmp_path / "leaver.jsonl"),
                        "--no-overlap", *SMALL, new_session=True)  # fmt: skip
    try:
        log_file = tmp_path / "leaver.log"
        wait_for(lambda: "outer step 2: inner loop done" in log_file.read_text(), 150, "its second outer step", leaver)
        assert len(read_metrics(str(tmp_path / "steady.jsonl"))) == 1, "the steady peer was not slower"
        left_at = stop_group_and_check(leaver, tmp_path, "leaver")
        log = (tmp_path / "leaver.log").read_text()
        assert "inner loop interrupted" not in log
        assert log.index("SIGTERM: finishing") < log.index("outer step 2: loss"), "the signal came after the step"

        mine = read_metrics(str(tmp_path / "leaver.jsonl"))
        assert [r["outer_step"] for r in mine] == [1, 2]
        assert steady.wait(timeout=120) == 0, (tmp_path / "steady.log").read_text()
        theirs = by_step(tmp_path / "steady.jsonl")
        # The round in flight completed with the group: averaged together, not alone on a forked θ.
        assert mine[1]["status"] == "averaged" and mine[1]["group_size"] == 2
        assert mine[1]["params_sha256"] == theirs[2]["params_sha256"] and mine[1]["group"] == theirs[2]["group"]
        assert checkpoint_theta(tmp_path / "ckpt") == (2, theirs[2]["params_sha256"])
        assert sorted(theirs) == [1, 2, 3] and theirs[3]["time"] > left_at
    finally:
        for p in (leaver, steady):
            stop(p)
        stop(boot.process)


@pytest.mark.timeout(180)
def test_a_lone_peer_does_not_wait_out_the_matchmaking_timeout(tmp_path):
    boot = start_bootstrap(str(tmp_path), "--run-id", "lone")
    args = ["--run-id", "lone", "--inner-steps", "5", "--outer-steps", "3", "--matchmaking-timeout", "30"]
    peer = start_peer(str(tmp_path), "lone", boot.maddrs, *args, "--metrics-file", str(tmp_path / "lone.jsonl"), *SMALL)
    try:
        wait_for(lambda: daemons_of(peer.pid), 60, "the p2p daemon", peer)
        daemons = daemons_of(peer.pid)
        assert peer.wait(timeout=150) == 0
        log = (tmp_path / "lone.log").read_text()
        assert_clean_log(log)  # an --outer-steps exit is a normal one
        assert not any(alive(pid) for pid in daemons)
        mine = read_metrics(str(tmp_path / "lone.jsonl"))
        assert [r["outer_step"] for r in mine] == [1, 2, 3]
        assert all(r["status"] == "alone" and r["group_size"] == 1 for r in mine)
        # Well under the 30 s timeout: each outer step (and the time from one record to the next) takes seconds.
        assert max(r["comm_seconds"] for r in mine) < 12, [r["comm_seconds"] for r in mine]
        assert all(b["time"] - a["time"] < 15 for a, b in zip(mine, mine[1:]))
        assert "no other peer, applying this peer's own pseudo-gradient" in log
    finally:
        stop(peer)
        stop(boot.process)


def descendants(pid: int) -> list[int]:
    out = []
    for child in children_of(pid):
        out += [child, *descendants(child)]
    return out


@pytest.mark.timeout(180)
def test_group_sigterm_to_a_sharded_peer_is_one_clean_stop_for_every_worker(tmp_path):
    """The launcher forwards the stop to its workers; one that also gets it directly (a service manager signals every
    process of the service) takes the two deliveries as one stop, not as the second signal that leaves at once."""
    boot = start_bootstrap(str(tmp_path), "--run-id", "sig-sharded")
    peer = start_peer(str(tmp_path), "sharded", boot.maddrs, "--run-id", "sig-sharded", "--nproc-per-node", "2",
                      "--inner-steps", "100000", "--batch-size", "2", "--seq-len", "32",
                      "--checkpoint-dir", str(tmp_path / "ckpt"), threads=None, new_session=True)  # fmt: skip
    try:
        log = tmp_path / "sharded.log"
        wait_for(lambda: "others can join through" in log.read_text(), 120, "the peer to join", peer)
        time.sleep(1)  # into the inner loop
        workers = children_of(peer.pid)
        everything = descendants(peer.pid)
        assert len(workers) == 2
        assert sum(len(daemons_of(w)) for w in workers) == 2, "each worker runs its own p2p daemon"
        os.killpg(peer.pid, signal.SIGTERM)
        for worker in workers:
            os.kill(worker, signal.SIGTERM)
        assert peer.wait(timeout=60) == 0, log.read_text()
        text = log.read_text()
        assert_clean_log(text)
        assert "second signal" not in text
        assert not any(alive(pid) for pid in everything), "a worker, daemon or helper outlived the peer"
        assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-00000000.shard0of2.pt", "step-00000000.shard1of2.pt"]
    finally:
        stop(peer)
        stop(boot.process)
