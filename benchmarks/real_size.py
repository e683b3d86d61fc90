"""A real model size on this machine: two `swarm-peer` processes of a ~300M-parameter Llama config with checkpoints
every outer step, then a newcomer.

    python benchmarks/real_size.py [--model benchmarks/models/llama-302m.json] [--outer-steps 5] [--inner-steps 3]
                                   [--batch-size 1] [--seq-len 128] [--newcomer-after 1]

A bootstrap node and two peers start on 127.0.0.1 (one torch thread each: the machine has two cores) with
`--checkpoint-dir` and `--metrics-file`; once the first peer has done `--newcomer-after` outer steps, a newcomer
starts, takes over the run's state and trains on until the two first peers are done (then it is stopped with
SIGTERM, which a peer answers by finishing its phase, saving and exiting 0). Per outer step and peer, from the
metrics records: the outer step's time (matchmaking, all-reduce and the outer optimizer), the checkpoint write (the
previous step's, written in the background during this step's inner loop, and how long the inner loop waited for
it before its first optimizer step), the largest event-loop stall (a 50 ms
ticker in each peer's loop) and the peak resident memory per parameter. The newcomer's join: from its process start to
taking over the run's state, and to its first averaged outer step. Alongside, the largest resident memory of all the
run's processes together (p2p daemons included), sampled every half second.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.join import log_time, wait_for  # noqa: E402
from peers.launch import read_metrics, start_bootstrap, start_peer, stop  # noqa: E402
from peers.model import load_model  # noqa: E402


def rss_of_tree(root: int) -> int:
    """Resident bytes of `root` and every process below it."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                rss[int(entry)] = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0) if pid != root else 0  # the benchmark itself holds no model
        todo += children.get(pid, [])
    return total


class MemoryWatch:
    """The largest resident memory of this process's descendants, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.5):
        self.peak, self.interval = 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_of_tree(os.getpid()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/llama-302m.json")
    parser.add_argument("--outer-steps", type=int, default=5, help="outer steps of the two first peers")
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--newcomer-after", type=int, default=1, help="outer steps of peer 0 before the newcomer")
    parser.add_argument("--no-newcomer", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep logs, metrics and checkpoints here")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()

    params = sum(p.numel() for p in load_model(args.model).model.parameters())
    print(
        f"{args.model}: {params / 1e6:.1f}M parameters; 2 peers x {args.outer_steps} outer steps of {args.inner_steps}"
        f" inner steps, batch {args.batch_size} x {args.seq_len}, checkpoints every outer step", flush=True
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="swarm-real-size-") as scratch:
        workdir = args.workdir or scratch
        os.makedirs(workdir, exist_ok=True)
        common = [
            "--run-id", "real-size", "--model", args.model, "--inner-steps", str(args.inner_steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-dataset", "none",
            "--matchmaking-timeout", "120", "--allreduce-timeout", "600", "--device", "cpu",
        ]  # fmt: skip

        def peer_args(name: str, steps: int | None) -> list[str]:
            extra = ["--checkpoint-dir", os.path.join(workdir, f"{name}-ckpt")]
            extra += ["--metrics-file", os.path.join(workdir, f"{name}.jsonl")]
            return common + extra + ([] if steps is None else ["--outer-steps", str(steps)])

        watch = MemoryWatch()
        boot = start_bootstrap(workdir)
        deadline = time.monotonic() + args.timeout
        procs, newcomer, newcomer_started = [], None, None
        try:
            for name in ("peer0", "peer1"):
                procs.append(start_peer(workdir, name, boot.maddrs, *peer_args(name, args.outer_steps)))
            first = os.path.join(workdir, "peer0.jsonl")
            if not args.no_newcomer:
                wait_for(lambda: len(read_metrics(first)) >= args.newcomer_after, args.timeout, "the first steps")
                newcomer_started = time.time()
                newcomer = start_peer(workdir, "newcomer", boot.maddrs, *peer_args("newcomer", None))
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
            newcomer_code = None if newcomer is None else stop(newcomer, timeout=300)
        finally:
            for p in procs + ([newcomer] if newcomer is not None else []):
                stop(p)
            stop(boot.process)
            watch.close()
        report(workdir, params, codes, newcomer_code, newcomer_started, watch.peak)


def report(workdir, params, codes, newcomer_code, newcomer_started, peak_total) -> None:
    names = ["peer0", "peer1"] + (["newcomer"] if newcomer_started is not None else [])
    print(f"exit codes: peers {codes}, newcomer {newcomer_code}")
    print(
        f"{'step':>4} {'peer':>9} {'group':>5} {'outer s':>8} {'ckpt s':>7} {'wait s':>7} {'stall s':>8}"
        f" {'B/param':>8} {'θ':>13}"
    )
    worst_stall, worst_bytes = 0.0, 0.0
    for name in names:
        for r in read_metrics(os.path.join(workdir, f"{name}.jsonl")):
            stall = r.get("event_loop_stall_seconds") or 0.0
            per_param = (r.get("peak_rss_mb") or 0) * 2**20 / params
            worst_stall, worst_bytes = max(worst_stall, stall), max(worst_bytes, per_param)
            ckpt, wait = r.get("checkpoint_seconds"), r.get("checkpoint_wait_seconds")
            print(
                f"{r['outer_step']:>4} {name:>9} {r['group_size']:>5} {r['comm_seconds']:>8.1f}"
                f" {'-' if ckpt is None else f'{ckpt:.1f}':>7} {'-' if wait is None else f'{wait:.1f}':>7}"
                f" {stall:>8.3f} {per_param:>8.1f}"
                f" {r['params_sha256'][:12]:>13}"
            )
    print(f"largest event-loop stall {worst_stall:.3f}s; peak RSS per parameter {worst_bytes:.1f} B (one process)")
    print(f"all processes together at most {peak_total / 2**30:.2f} GiB resident")
    if newcomer_started is not None:
        log = os.path.join(workdir, "newcomer.log")
        up = log_time(log, "caught up with the run")
        with open(log, encoding="utf-8", errors="replace") as f:
            found = re.search(r"caught up with the run: outer step \d+ -> (\d+)", f.read())
        records = read_metrics(os.path.join(workdir, "newcomer.jsonl"))
        averaged = [r for r in records if r["group_size"] >= 2]
        if up is None or found is None:
            print("newcomer: never took over the run's state")
            return
        joined = int(found.group(1))
        took = up - newcomer_started
        print(f"newcomer: took over the run's state of outer step {joined} {took:.1f}s after its start")
        if not averaged:
            print("newcomer: it never averaged")
            return
        first = averaged[0]
        theirs = {
            r["outer_step"]: r["params_sha256"]
            for name in ("peer0", "peer1")
            for r in read_metrics(os.path.join(workdir, f"{name}.jsonl"))
        }
        same = theirs.get(first["outer_step"]) == first["params_sha256"]
        print(
            f"newcomer: first averaged outer step {first['outer_step']} ({first['outer_step'] - joined - 1} outer steps"
            f" sat out after joining), {first['time'] - newcomer_started:.1f}s after its start; θ equal to the"
            f" others': {same}"
        )


if __name__ == "__main__":
    main()
