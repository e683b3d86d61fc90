"""The user-space delay line of benchmarks/wan.py (benchmarks/delayline.py): between two network namespaces of our
own, it adds its delay to the round trip and carries a TCP stream intact; and over such a link, two peers that dial
each other at once connect (swarm.node.DAEMON_ENV). Needs root, like the benchmark."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import delayline  # noqa: E402

SERVER = """
import hashlib, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("10.199.7.2", 7000)); s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    f = c.makefile("rb")
    while True:
        line = f.readline()
        if not line:
            break
        if line.startswith(b"bulk "):
            data = f.read(int(line.split()[1]))
            c.sendall(hashlib.sha256(data).hexdigest().encode() + b"\\n")
        else:
            c.sendall(line)
    c.close()
"""

CLIENT = """
import hashlib, os, socket, statistics, sys, time
c = socket.create_connection(("10.199.7.2", 7000), timeout=30); f = c.makefile("rb")
rtts = []
for i in range(8):
    t = time.monotonic(); c.sendall(b"ping\\n"); assert f.readline() == b"ping\\n"; rtts.append(time.monotonic() - t)
data = os.urandom(2 << 20)
c.sendall(b"bulk %d\\n" % len(data) + data)
ok = f.readline().strip().decode() == hashlib.sha256(data).hexdigest()
print(statistics.median(rtts), ok)
"""


DIALER = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr
from swarm import NodeConfig, SwarmNode

async def main(root, me, other, my_ip, other_ip, start, trials):
    results = []
    for k in range(int(trials)):
        port = 4300 + k
        config = NodeConfig(host_maddrs=[f"/ip4/{my_ip}/tcp/{port}"], identity_path=f"{root}/{me}.id")
        node = await SwarmNode.create(config)
        try:
            other_id = PeerID.from_base58(open(f"{root}/{other}.peer").read())
            await asyncio.sleep(max(0.0, float(start) + 6 * k - time.time()))  # both dial at the same moment
            dialed = time.time()
            try:
                address = Multiaddr(f"/ip4/{other_ip}/tcp/{port}")
                await asyncio.wait_for(node.p2p._client.connect(other_id, [address]), 10)
                results.append(["ok", dialed])
            except Exception as e:
                results.append([repr(e)[-200:], dialed])
            await asyncio.sleep(1.0)  # the other side's dial finishes before this node goes
        finally:
            await node.close()
    print(json.dumps(results))

asyncio.run(main(*sys.argv[2:]))
"""

IDENTITIES = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from swarm import NodeConfig, SwarmNode

async def main(root):
    for name in ("a", "b"):
        node = await SwarmNode.create(NodeConfig(identity_path=f"{root}/{name}.id"))
        open(f"{root}/{name}.peer", "w").write(node.peer_id.to_base58())
        await node.close()

asyncio.run(main(sys.argv[2]))
"""

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ns(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, **kwargs)


def _round_trip(a: str) -> tuple[float, bool]:
    out = _ns("netns", "exec", a, sys.executable, "-c", CLIENT, timeout=60).stdout.split()
    return float(out[0]), out[1] == "True"


@contextlib.contextmanager
def linked_namespaces(delay_ms: float | None = None):
    """Two namespaces of our own joined by a veth pair, 10.199.7.1 and .2; with `delay_ms`, a delay line in each."""
    a, b = f"swdl{os.getpid()}a", f"swdl{os.getpid()}b"
    lines = []
    try:
        for ns in (a, b):
            _ns("netns", "add", ns)
            _ns("-n", ns, "link", "set", "lo", "up")
        _ns("-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, address in ((a, "10.199.7.1"), (b, "10.199.7.2")):
            _ns("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ns("-n", ns, "link", "set", "eth0", "up")
            if delay_ms is not None:
                lines.append(delayline.install(ns, address, "10.199.7.0/24", delay_ms))
        yield a, b
    finally:
        for line in lines:
            line.kill()
            line.wait()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.timeout(90)
def test_the_delay_line_adds_its_delay_to_the_round_trip_and_carries_a_stream_intact():
    server = line = None
    with linked_namespaces() as (a, b):
        try:
            server = subprocess.Popen(
                ["ip", "netns", "exec", b, sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
            )
            assert server.stdout.readline().strip() == "ready"

            before, intact = _round_trip(a)
            assert intact and before < 0.05, before

            line = delayline.install(a, "10.199.7.1", "10.199.7.0/24", 150)
            after, intact = _round_trip(a)
            assert intact, "the stream through the delay line arrived changed"
            print(f"round trip {before:.4f} -> {after:.4f}")
            assert 0.15 <= after < 0.15 + 0.1, (
                f"round trip {after:.3f}s through a 150 ms delay line (before: {before:.3f})"
            )
        finally:
            for process in (server, line):
                if process is not None:
                    process.kill()
                    process.wait()


@pytest.mark.timeout(120)
def test_two_peers_that_dial_each_other_at_once_over_a_slow_link_connect(tmp_path):
    """Two matchmaking peers waiting for each other ping each other at once. With 50 ms each way, libp2p's dials from
    its listening port met in one TCP simultaneous open and both failed, every time (swarm.node.DAEMON_ENV)."""
    subprocess.run([sys.executable, "-c", IDENTITIES, REPO, str(tmp_path)], check=True, timeout=60)
    with linked_namespaces(delay_ms=50) as (a, b):
        start = str(time.time() + 10)  # both have started their nodes by then
        sides = [("a", "b", "10.199.7.1", "10.199.7.2", a), ("b", "a", "10.199.7.2", "10.199.7.1", b)]
        dialers = [
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    "-c",
                    DIALER,
                    REPO,
                    str(tmp_path),
                    me,
                    other,
                    mine,
                    theirs,
                    start,
                    "2",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for me, other, mine, theirs, ns in sides
        ]
        results = [json.loads(d.communicate(timeout=90)[0].strip().splitlines()[-1]) for d in dialers]
    # At once: within 30 ms, less than the 50 ms a SYN takes to cross (else this tests nothing).
    assert all(abs(a[1] - b[1]) < 0.03 for a, b in zip(*results)), results
    assert [[outcome for outcome, _ in side] for side in results] == [["ok", "ok"], ["ok", "ok"]], results
