"""`swarm-peer --nproc-per-node N`: start N worker processes that shard the model (FSDP) and train as one peer.

The launcher holds no model and no node. It starts the workers in their own session (so a Ctrl-C in the terminal
reaches them once, through the launcher), forwards SIGINT/SIGTERM to them, and if one worker fails it stops the
others: their collectives would otherwise wait for it. Each worker re-reads the same flags and learns its index from
the environment (like torchrun); the workers die with the launcher if it is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

logger = logging.getLogger("swarm-peer")

RANK_ENV = "SWARM_WORKER_RANK"
COUNT_ENV = "SWARM_WORKER_COUNT"
STOP_GRACE_SECONDS = 20.0


def worker_index() -> tuple[int, int] | None:
    """(index, count) when this process is a worker started by the launcher, else None."""
    if RANK_ENV not in os.environ:
        return None
    return int(os.environ[RANK_ENV]), int(os.environ[COUNT_ENV])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the worker when the launcher dies, even by SIGKILL.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch(argv: list[str], count: int, command: list[str] | None = None) -> int:
    """Run `count` workers with these command-line flags until they all exit; returns the peer's exit code.

    `command` replaces the worker program (swarm-peer itself) for tests of the launcher."""
    port = _free_port()
    threads = str(max(1, (os.cpu_count() or 1) // count))
    workers = []
    for rank in range(count):
        env = dict(os.environ)
        env.update({RANK_ENV: str(rank), COUNT_ENV: str(count), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        env.setdefault("OMP_NUM_THREADS", threads)  # N workers share the cores instead of each taking all of them
        program = command or [
            sys.executable,
            "-c",
            "import sys; from peers.cli import main; sys.argv[0] = 'swarm-peer'; main()",
        ]
        workers.append(
            subprocess.Popen(
                [*program, *argv],
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        )

    def forward(signum, _frame) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [worker.poll() for worker in workers]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank, code = failed[0]
                logger.error(f"worker {rank} exited with code {code}: stopping the other workers of this peer")
                _stop_all(workers)
                return code if code > 0 else 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for worker in workers:
        try:
            worker.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
