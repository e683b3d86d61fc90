"""Emulated wide-area links for benchmarks that run real peers: every node (the bootstrap node and each peer) in a
network namespace of its own, joined to a bridge in a hub namespace by a veth pair capped both ways with tbf, and
optionally a user-space delay line (benchmarks/delayline.py: netem is not available here) that holds each packet a
node sends for D ms, so the round trip between two nodes is 2D.

Addresses are in 10.198.0.0/24, a private range: in the benchmarking range 198.18.0.0/15 the peers never reached each
other (every connection failed with "routing: not found", the addresses presumably filtered out as unroutable). Each
link is capped both ways (tbf on the node's end for what it sends, on the hub's end for what it receives; mtu 1500,
burst 1mb, limit 8mb, which give textbook transfer times here), so a peer's cap limits that peer alone. Nothing
leaves the namespaces made here, and they are deleted on exit. Needs root; `Loopback` is the same interface on
127.0.0.1, uncapped.

    with Links(nodes, rates, delay_ms) as links:
        run_to_end(workdir, args, timeout, place=links.place)
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import delayline  # beside this module

PREFIX = "swan"  # namespace and interface names: swan-hub, swan-n0, ...; veths swan-v0, ...
SUBNET = "10.198.0"  # private: libp2p keeps these addresses (not 198.18.0.0/15)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Links:
    """A bridge in a hub namespace and one namespace per node, each behind a veth link capped both ways."""

    def __init__(self, nodes: int, rates: list[str | None], delay_ms: float = 0.0):
        self.nodes, self.rates, self.delay_ms = nodes, rates, delay_ms
        self.delay_lines: list = []

    def namespace(self, i: int) -> str:
        return f"{PREFIX}-n{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def __enter__(self) -> Links:
        self._delete()  # leftovers of an interrupted run
        try:
            self._create()
        except BaseException:
            self.__exit__()  # a half-made topology goes too, delay lines included
            raise
        return self

    def _create(self) -> None:
        hub = f"{PREFIX}-hub"
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i in range(self.nodes):
            ns, veth = self.namespace(i), f"{PREFIX}-v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "mtu", "1500", "type", "veth", "peer", "name", "eth0", "mtu", "1500", "netns", ns)
            _ip("link", "set", veth, "netns", hub)
            _ip("-n", hub, "link", "set", veth, "master", "br0")
            _ip("-n", hub, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if self.rates[i] is not None:
                for where, dev in ((ns, "eth0"), (hub, veth)):
                    tbf = ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rates[i]]
                    _ip("netns", "exec", where, *tbf, "burst", "1mb", "limit", "8mb")
            if self.delay_ms > 0:
                line = delayline.install(ns, self.address(i), f"{SUBNET}.0/24", self.delay_ms)
                self.delay_lines.append(line)

    def __exit__(self, *exc) -> None:
        self._delete()  # it ends the delay lines too: they run in our namespaces
        for line in self.delay_lines:
            line.wait()

    def _delete(self) -> None:
        names = [f"{PREFIX}-hub", *(self.namespace(i) for i in range(self.nodes))]
        for ns in names:
            # Whatever still runs in our namespaces is ours: end it before the namespace goes.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace(i))

    def place(self, i: int) -> tuple[str, tuple[str, ...]]:
        """Node i's host address and command prefix, as peers.launch.run_to_end takes them."""
        return f"/ip4/{self.address(i)}/tcp/0", self.prefix(i)


class Loopback:
    """`--rate none`: every node on 127.0.0.1, no namespaces, no cap (no root needed)."""

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def address(self, i: int) -> str:
        return "127.0.0.1"

    def prefix(self, i: int) -> tuple[str, ...]:
        return ()

    def place(self, i: int) -> tuple[str, tuple[str, ...]]:
        return f"/ip4/{self.address(i)}/tcp/0", ()
