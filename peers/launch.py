"""Starting the real programs as child processes: for the local-swarm example, benchmarks and end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _program(name: str) -> list[str]:
    """Run the console scripts of the interpreter we run under, installed or not."""
    module = {"swarm-peer": "peers.cli", "swarm-bootstrap": "bootstrap.cli", "swarm-export": "peers.export"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.argv[0] = {name!r}; main()"]


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        # Several peers on one small machine: one torch thread each avoids oversubscribing the cores.
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Bootstrap:
    process: subprocess.Popen
    maddrs: list[str]


def start_bootstrap(
    workdir: str, *extra: str, timeout: float = 60.0, host: str = LOOPBACK, prefix: tuple[str, ...] = ()
) -> Bootstrap:
    """Start `swarm-bootstrap` on loopback (or `host`) and wait for the addresses it prints. `prefix` runs it under
    another command, e.g. `ip netns exec NS` (benchmarks/wan.py)."""
    os.makedirs(workdir, exist_ok=True)
    args = [*prefix, *_program("swarm-bootstrap"), "--identity", os.path.join(workdir, "bootstrap.id")]
    args += ["--host-maddrs", host, *extra]
    stderr = open(os.path.join(workdir, "bootstrap.log"), "ab")  # noqa: SIM115 - owned by the child from now on
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, env=_env(1), text=True)
    stderr.close()
    deadline = time.monotonic() + timeout
    line = process.stdout.readline()  # the first address comes once the node is up
    if not line or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f"swarm-bootstrap did not start; see {workdir}/bootstrap.log")
    return Bootstrap(process, [line.strip()])


def start_peer(
    workdir: str,
    name: str,
    initial_peers: list[str],
    *extra: str,
    threads: int | None = 1,
    new_session: bool = False,
    host: str = LOOPBACK,
    prefix: tuple[str, ...] = (),
):
    """Start `swarm-peer` on loopback (or `host`, under `prefix` as in start_bootstrap); its stdout and stderr go to
    {workdir}/{name}.log.

    `new_session` puts it in a session (and process group) of its own, as systemd or a terminal would: a test can
    then signal its whole group (os.killpg) without hitting itself."""
    os.makedirs(workdir, exist_ok=True)
    args = [*prefix, *_program("swarm-peer"), "--host-maddrs", host, "--no-progress"]
    for maddr in initial_peers:
        args += ["--initial-peers", maddr]
    args += list(extra)
    log = open(os.path.join(workdir, f"{name}.log"), "ab")  # noqa: SIM115 - owned by the child from now on
    process = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env=_env(threads), start_new_session=new_session
    )
    log.close()
    return process


def run_to_end(
    workdir: str,
    peer_args: list[list[str]],
    timeout: float,
    place: Callable[[int], tuple[str, tuple[str, ...]]] | None = None,
) -> None:
    """A bootstrap node and one `swarm-peer` per argument list (logs {workdir}/peer{i}.log), until every peer exits,
    within `timeout` seconds in all; raises if one fails. Benchmarks give each peer `--outer-steps`, so the run ends
    by itself. `place(n)` gives node n's host address and command prefix (see start_bootstrap; node 0 is the
    bootstrap node, node i + 1 peer i): loopback by default."""
    place = place or (lambda n: (LOOPBACK, ()))
    host, prefix = place(0)
    boot = start_bootstrap(workdir, host=host, prefix=prefix)
    deadline = time.monotonic() + timeout
    procs = []
    try:
        for i, args in enumerate(peer_args):
            host, prefix = place(i + 1)
            procs.append(start_peer(workdir, f"peer{i}", boot.maddrs, *args, host=host, prefix=prefix))
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        if any(codes):
            raise RuntimeError(f"peers exited with {codes}; see {workdir}")
    finally:
        for p in procs:
            stop(p)
        stop(boot.process)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stop(process: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
