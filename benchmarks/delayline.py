"""A user-space delay line: every packet a network namespace sends to its subnet leaves it a fixed time later.

netem is not available here, so this is how `benchmarks/wan.py` adds latency to a peer's link. Inside the peer's
namespace a TUN device takes the routes to the subnet; this process reads each packet off it, holds it for the delay,
and writes it back, and the namespace forwards it out of its veth (policy routing: packets that come in through the
TUN device look up a table that routes the subnet to the veth). The veth's own tbf cap applies after the delay, so a
link is "capped, then delayed" like a long-haul path behind an access link.

Only what the namespace sends is delayed: i's packets to j wait d_i, j's answers wait d_j, so the round-trip time
between peers i and j is d_i + d_j. Packets leave in the order they came, each `delay` after it was read (plus the
scheduler's jitter).

    ip netns exec NS python benchmarks/delayline.py --dev dly0 --delay-ms 50

`install(namespace, address, subnet, delay_ms)` sets a namespace up (device, routes, sysctls) and starts this
process in it; the caller ends the process (it also ends with the namespace's devices).
"""

from __future__ import annotations

import collections
import fcntl
import os
import struct
import subprocess
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
DEVICE = "dly0"
TABLE = "100"  # the routing table that packets coming back out of the delay line look up


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def delay_packets(fd: int, delay: float) -> None:
    """Forever: read packets from `fd` and write each back `delay` seconds after it was read, in order."""
    queue: collections.deque = collections.deque()
    ready = threading.Condition()

    def read() -> None:
        while True:
            packet = os.read(fd, 65536)
            with ready:
                queue.append((time.monotonic() + delay, packet))
                ready.notify()

    threading.Thread(target=read, daemon=True, name="delayline-read").start()
    while True:
        with ready:
            while not queue:
                ready.wait()
            due, packet = queue[0]
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # later packets are due later: nothing else to do meanwhile
        with ready:
            queue.popleft()
        try:
            os.write(fd, packet)
        except OSError:  # a packet the kernel refuses (e.g. the device went down) is lost, as on a real link
            pass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def install(namespace: str, address: str, subnet: str, delay_ms: float, veth: str = "eth0") -> subprocess.Popen:
    """Delay by `delay_ms` everything `namespace` (whose `veth` holds `address`) sends to `subnet` ("a.b.c.0/24").
    Returns the delay line's process, running in the namespace."""
    base, _ = subnet.split("/")
    halves = [f"{base}/25", f"{base.rsplit('.', 1)[0]}.128/25"]  # more specific than the veth's own /24 route
    _ip("-n", namespace, "tuntap", "add", "dev", DEVICE, "mode", "tun")
    _ip("-n", namespace, "link", "set", DEVICE, "mtu", "1500", "up")
    sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{DEVICE}.rp_filter=0",
               f"net.ipv4.conf.{DEVICE}.accept_local=1"]  # fmt: skip
    # accept_local: the packets coming back out of the delay line carry one of our own addresses as their source.
    _ip("netns", "exec", namespace, "sysctl", "-q", "-w", *sysctls)
    _ip("-n", namespace, "route", "add", subnet, "dev", veth, "table", TABLE)
    _ip("-n", namespace, "rule", "add", "iif", DEVICE, "lookup", TABLE, "pref", "100")
    process = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, os.path.abspath(__file__),
         "--dev", DEVICE, "--delay-ms", str(delay_ms)],
    )  # fmt: skip
    try:
        # Routes last, once the delay line holds the device (its carrier is up): until then the device drops what
        # it is sent, so connections made meanwhile would fail.
        deadline = time.monotonic() + 30
        while (
            "NO-CARRIER"
            in subprocess.run(
                ["ip", "-n", namespace, "link", "show", DEVICE], capture_output=True, text=True, check=True
            ).stdout
        ):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the delay line of {namespace} did not start (exit status {process.poll()})")
            time.sleep(0.05)
        for half in halves:
            _ip("-n", namespace, "route", "add", half, "dev", DEVICE, "src", address)
    except BaseException:
        process.kill()  # deleting a namespace does not end what runs in it
        process.wait()
        raise
    return process


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", default=DEVICE, help="the TUN device to serve (made with `ip tuntap add`)")
    parser.add_argument("--delay-ms", type=float, required=True, help="how long each packet is held")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be at least 0")
    delay_packets(open_tun(args.dev), args.delay_ms / 1000)


if __name__ == "__main__":
    main(sys.argv[1:])
