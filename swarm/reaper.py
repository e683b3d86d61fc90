"""Stops a node's p2p daemon when the process that owns it dies without a chance to clean up (SIGKILL, OOM kill).

hivemind starts `p2pd` as a plain child process, which outlives a parent killed with SIGKILL and keeps its port and
its place in other peers' connections. `watch(owner_pid, daemon_pid)` starts this module as a small helper process
that blocks until the owner exits and then terminates the daemon. A clean `SwarmNode.close()` stops the helper.

    python swarm/reaper.py OWNER_PID DAEMON_PID
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time


def watch(owner_pid: int, daemon_pid: int) -> subprocess.Popen:
    """Start the helper; it ends by itself once the owner or the daemon is gone."""
    return subprocess.Popen(
        # Run as a plain script in isolated mode: it needs only the standard library, not torch or hivemind.
        [sys.executable, "-I", "-S", os.path.abspath(__file__), str(owner_pid), str(daemon_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C aimed at the owner must not kill the helper before the owner cleans up
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def main(owner_pid: int, daemon_pid: int) -> None:
    owner = os.pidfd_open(owner_pid)
    # Wake when the owner exits; also look now and then whether the daemon already went away by itself.
    while _alive(daemon_pid):
        ready, _, _ = select.select([owner], [], [], 5.0)
        if ready:
            break
    else:
        return
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        try:
            os.kill(daemon_pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(daemon_pid):
            time.sleep(0.05)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
