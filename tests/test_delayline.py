"""The user-space delay line of benchmarks/wan.py (benchmarks/delayline.py): between two network namespaces of our
own, it adds its delay to the round trip and carries a TCP stream intact. Needs root, like the benchmark."""

from __future__ import annotations

import os
import subprocess
import sys

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


def _ns(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, **kwargs)


def _round_trip(a: str) -> tuple[float, bool]:
    out = _ns("netns", "exec", a, sys.executable, "-c", CLIENT, timeout=60).stdout.split()
    return float(out[0]), out[1] == "True"


@pytest.mark.timeout(90)
def test_the_delay_line_adds_its_delay_to_the_round_trip_and_carries_a_stream_intact():
    a, b = f"swdl{os.getpid()}a", f"swdl{os.getpid()}b"
    server = line = None
    try:
        for ns in (a, b):
            _ns("netns", "add", ns)
            _ns("-n", ns, "link", "set", "lo", "up")
        _ns("-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, address in ((a, "10.199.7.1"), (b, "10.199.7.2")):
            _ns("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ns("-n", ns, "link", "set", "eth0", "up")
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
        assert 0.15 <= after < 0.15 + 0.1, f"round trip {after:.3f}s through a 150 ms delay line (before: {before:.3f})"
    finally:
        for process in (server, line):
            if process is not None:
                process.kill()
                process.wait()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
