"""The real programs, as a volunteer and an operator run them: swarm-bootstrap and swarm-peer processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from peers.launch import LOOPBACK, read_metrics, start_bootstrap, start_peer, stop

SOME_PEER_ID = "12D3KooWP1b7pVH65mtCj9V4pGaKKoQZMFpMSu3a7njTJpbXk4Aq"
FAST = ["--inner-steps", "5", "--batch-size", "4", "--seq-len", "64"]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_peer_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = "import sys; from peers.cli import main; sys.argv[0] = 'swarm-peer'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.mark.timeout(240)
def test_bootstrap_and_two_peers_train_and_agree(tmp_path):
    boot = start_bootstrap(str(tmp_path), "--run-id", "e2e")
    peers = []
    try:
        for i in range(2):
            metrics = str(tmp_path / f"p{i}.jsonl")
            peers.append(start_peer(str(tmp_path), f"p{i}", boot.maddrs, "--run-id", "e2e", "--outer-steps", "2",
                                    "--metrics-file", metrics, *FAST))  # fmt: skip
        codes = [p.wait(timeout=200) for p in peers]
        logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
        assert codes == [0, 0], logs
        records = [read_metrics(str(tmp_path / f"p{i}.jsonl")) for i in range(2)]
        assert [len(r) for r in records] == [2, 2]
        for a, b in zip(*records):
            assert a["outer_step"] == b["outer_step"]
            assert a["group_size"] == b["group_size"] == 2
            assert a["params_sha256"] == b["params_sha256"]
            assert a["peer_id"] != b["peer_id"] and a["run_id"] == "e2e"
            # Up to H = 5 steps of 4 x 64 tokens: a peer that the round waits for ends its inner loop early.
            assert a["tokens"] == a["inner_steps"] * 4 * 64 and 1 <= a["inner_steps"] <= 5
            assert a["bytes_sent"] > 0 and a["bytes_received"] > 0
            for key in ("loss", "compute_seconds", "comm_seconds", "time"):
                assert isinstance(a[key], float)
        assert [r["outer_step"] for r in records[0]] == [1, 2]
        assert "outer step 1: loss" in logs[0] and "group 2" in logs[0]
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)


@pytest.mark.timeout(120)
def test_bootstrap_keeps_its_identity_and_exits_cleanly_on_signals(tmp_path):
    first = start_bootstrap(str(tmp_path))
    assert first.maddrs[0].startswith("/ip4/127.0.0.1/tcp/") and "/p2p/" in first.maddrs[0]
    daemons = children_of(first.process.pid)
    assert daemons, "the bootstrap node should run a p2p daemon"
    started = time.monotonic()
    first.process.send_signal(signal.SIGINT)
    assert first.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert not any(alive(pid) for pid in daemons), "a p2p daemon outlived the bootstrap node"

    second = start_bootstrap(str(tmp_path))
    try:
        assert second.maddrs[0].split("/p2p/")[1] == first.maddrs[0].split("/p2p/")[1]
        daemons = children_of(second.process.pid)
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(timeout=10) == 0
        assert not any(alive(pid) for pid in daemons)
    finally:
        stop(second.process)


@pytest.mark.timeout(120)
def test_unreachable_initial_peer_fails_clearly_and_quickly():
    started = time.monotonic()
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{SOME_PEER_ID}"
    result = run_peer_cli("--initial-peers", dead, "--host-maddrs", LOOPBACK, "--connect-timeout", "15", timeout=90)
    assert result.returncode == 1
    assert "could not" in result.stderr and dead in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, flag",
    [
        (["--min-group-size", "3", "--max-group-size", "2"], "--max-group-size"),
        (["--initial-peers", "/ip4/127.0.0.1/tcp/4000"], "--initial-peers"),
        (["--initial-peers", "not-an-address/p2p/x"], "--initial-peers"),
        (["--compression", "int3"], "--compression"),
        (["--inner-steps", "0"], "--inner-steps"),
        (["--outer-momentum", "1.5"], "--outer-momentum"),
        (["--run-id", "bad id!"], "--run-id"),
        (["--announce-maddrs", "/ip4/1.2.3.4/tcp/0"], "--announce-maddrs"),
        (["--warmup-steps", "100", "--decay-steps", "50"], "--decay-steps"),
        (["--allreduce-retries", "-1"], "--allreduce-retries"),
        (["--swarm-key", "/nonexistent/swarm.key"], "--swarm-key"),
    ],
)
def test_bad_flags_give_a_usage_error_naming_the_flag(args, flag):
    result = run_peer_cli(*args)
    assert result.returncode == 2
    assert flag in result.stderr


@pytest.mark.timeout(60)
def test_seq_len_longer_than_the_model_is_refused():
    result = run_peer_cli("--seq-len", "4096", "--host-maddrs", LOOPBACK)
    assert result.returncode == 2
    assert "--seq-len 4096 exceeds" in result.stderr


@pytest.mark.timeout(120)
def test_peer_stops_on_sigint_with_a_checkpoint_and_exit_0(tmp_path):
    ckpt = tmp_path / "ckpt"
    peer = start_peer(str(tmp_path), "solo", [], "--run-id", "solo", "--checkpoint-dir", str(ckpt),
                      "--inner-steps", "100000", "--batch-size", "2", "--seq-len", "32")  # fmt: skip
    try:
        log = tmp_path / "solo.log"
        deadline = time.monotonic() + 60
        while "others can join through" not in (log.read_text() if log.exists() else ""):
            assert peer.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        daemons = children_of(peer.pid)
        time.sleep(1)  # a few inner steps
        peer.send_signal(signal.SIGINT)
        assert peer.wait(timeout=30) == 0, log.read_text()
        assert [p.name for p in ckpt.iterdir()] == ["step-00000000.pt"]
        assert not any(alive(pid) for pid in daemons)
    finally:
        stop(peer)


@pytest.mark.timeout(180)
def test_full_disk_for_checkpoints_is_reported_and_training_goes_on(tmp_path):
    """The checkpoint directory sits on a 256 KiB tmpfs (in a private mount namespace): every save fails."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    ckpt.mkdir()
    code = "import sys; from peers.cli import main; sys.argv[0] = 'swarm-peer'; main()"
    peer = [sys.executable, "-c", code, "--host-maddrs", LOOPBACK, "--run-id", "full", "--outer-steps", "2",
            "--min-group-size", "1", "--checkpoint-dir", str(ckpt), "--metrics-file", str(metrics), *FAST]  # fmt: skip
    script = f'mount -t tmpfs -o size=256k tmpfs "{ckpt}" && exec "$@"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *peer], capture_output=True, text=True, timeout=150
    )
    assert result.returncode == 0, result.stderr
    assert "could not write checkpoint" in result.stderr and "No space left on device" in result.stderr
    assert [r["outer_step"] for r in read_metrics(str(metrics))] == [1, 2]
