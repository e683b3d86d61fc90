"""Peers and bootstrap nodes that die: the rest of the swarm goes on, and newcomers join through any live peer."""

import contextlib
import os
import re
import signal
import time

import pytest

from peers.launch import read_metrics, start_bootstrap, start_peer, stop
from tests.test_programs import alive, children_of

FAST = ["--inner-steps", "10", "--batch-size", "4", "--seq-len", "64", "--matchmaking-timeout", "20"]


def wait_for(predicate, timeout: float, what: str, logs=()) -> None:
    """Wait until `predicate()`; on a timeout, the failure shows the tails of the `logs` (paths) to tell why."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            tails = "".join(f"\n--- {p}:\n" + (p.read_text()[-4000:] if p.exists() else "(none)") for p in logs)
            raise AssertionError(f"timed out waiting for {what}{tails}")
        time.sleep(0.2)


def own_address(log_path) -> str:
    text = log_path.read_text() if log_path.exists() else ""
    found = re.search(r"--initial-peers (\S+)", text)
    return found.group(1) if found else ""


def kill_hard(process, started: bool = True) -> None:
    """SIGKILL a program; its p2p daemon must not outlive it (swarm.reaper stops it).

    `started`: the program is past its start, so it must have a daemon (a program still starting may have none)."""
    daemons = [pid for pid in children_of(process.pid) if "p2pd" in open(f"/proc/{pid}/cmdline").read()]
    assert daemons or not started
    process.kill()
    process.wait()
    try:
        wait_for(lambda: not any(alive(pid) for pid in daemons), 15, "the killed program's p2p daemon to stop")
    finally:
        for pid in daemons:  # never leave a daemon behind, even when the assertion fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(420)
def test_swarm_outlives_its_bootstrap_node_and_a_killed_peer_and_takes_a_newcomer(tmp_path):
    boot = start_bootstrap(str(tmp_path))
    procs = {}
    try:
        for name in ("a", "b", "c"):
            procs[name] = start_peer(str(tmp_path), name, boot.maddrs, "--run-id", "el", "--outer-steps", "400",
                                     "--metrics-file", str(tmp_path / f"{name}.jsonl"),
                                     "--checkpoint-dir", str(tmp_path / f"ckpt-{name}"), *FAST)  # fmt: skip
        metrics = {name: tmp_path / f"{name}.jsonl" for name in procs}
        # The three average together. Not necessarily from the first step: a peer whose start is slower (imports on
        # a loaded 2-core machine) finds the other two already averaging, and catches up with them.
        wait_for(
            lambda: sum(r["group_size"] == 3 for r in read_metrics(str(metrics["a"]))) >= 2,
            150,
            "groups of three",
            [tmp_path / f"{name}.log" for name in procs],
        )

        # Fault: the bootstrap node and peer c die at once, without a word.
        kill_hard(boot.process)
        kill_hard(procs.pop("c"))
        killed_at = max(r["outer_step"] for r in read_metrics(str(metrics["a"])))
        wait_for(
            lambda: any(r["outer_step"] >= killed_at + 3 for r in read_metrics(str(metrics["a"]))),
            120,
            "more steps",
            [tmp_path / "a.log", tmp_path / "b.log"],
        )
        later = [r for r in read_metrics(str(metrics["a"])) if r["outer_step"] >= killed_at + 2]
        assert later and all(r["group_size"] == 2 for r in later)

        # A newcomer joins through peer a's own address, takes over the run's state, and averages with a and b.
        address = own_address(tmp_path / "a.log")
        assert "/p2p/" in address
        procs["d"] = start_peer(str(tmp_path), "d", [address], "--run-id", "el", "--outer-steps", "3",
                                "--metrics-file", str(tmp_path / "d.jsonl"), *FAST)  # fmt: skip
        assert procs["d"].wait(timeout=150) == 0, (tmp_path / "d.log").read_text()
        assert "caught up with the run" in (tmp_path / "d.log").read_text()
        joined = read_metrics(str(tmp_path / "d.jsonl"))
        assert joined[0]["outer_step"] > killed_at
        by_step = {r["outer_step"]: r for r in read_metrics(str(metrics["a"]))}
        for record in joined:
            if record["group_size"] == 3:
                assert by_step[record["outer_step"]]["params_sha256"] == record["params_sha256"]
        assert any(r["group_size"] == 3 for r in joined)

        # The killed peer restarts with its checkpoint directory: it resumes, finds the run ahead, takes its state
        # and averages with the others again.
        procs["c"] = start_peer(str(tmp_path), "c", [address], "--run-id", "el", "--outer-steps", "3",
                                "--metrics-file", str(tmp_path / "c2.jsonl"),
                                "--checkpoint-dir", str(tmp_path / "ckpt-c"), *FAST)  # fmt: skip
        assert procs["c"].wait(timeout=150) == 0, (tmp_path / "c.log").read_text()
        log = (tmp_path / "c.log").read_text()
        assert "resumed from" in log and "caught up with the run" in log
        rejoined = read_metrics(str(tmp_path / "c2.jsonl"))
        by_step = {r["outer_step"]: r for r in read_metrics(str(metrics["a"]))}
        assert any(r["group_size"] >= 3 for r in rejoined)
        for record in rejoined:
            if record["group_size"] >= 3:
                assert by_step[record["outer_step"]]["params_sha256"] == record["params_sha256"]
        for name in ("a", "b"):
            assert procs[name].poll() is None, f"peer {name} died"
    finally:
        for p in procs.values():
            stop(p)
        stop(boot.process)
