"""The metrics file: one JSON object per line per completed outer step, flushed and synced as it is written; and
what benchmarks and tests read from the records of several peers."""

from __future__ import annotations

import collections
import json
import os
import statistics


class MetricsWriter:
    def __init__(self, path: str):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def groups_agree(peers: list[list[dict]]) -> bool:
    """Within every group (same outer step and group id), every member recorded the same θ hash."""
    seen: dict[tuple, set] = collections.defaultdict(set)
    for records in peers:
        for r in records:
            if r["group"]:
                seen[(r["outer_step"], r["group"])].add(r["params_sha256"])
    return all(len(h) == 1 for h in seen.values())


def peer_figures(records: list[dict]) -> dict:
    """Steady-state figures of one peer (records 3 to n-1: start-up and the final drain left out)."""
    steady = list(range(2, len(records) - 1))
    wall = sum(records[i]["time"] - records[i - 1]["time"] for i in steady)
    compute = sum(records[i]["compute_seconds"] for i in steady)
    tokens = sum(records[i]["tokens"] for i in steady)
    landed = [records[i]["landed_at"] for i in steady if "landed_at" in records[i]]
    return {
        "utilization": compute / wall if wall else float("nan"),
        "tokens_per_second": tokens / wall if wall else float("nan"),
        "wait_seconds": statistics.mean(records[i].get("wait_seconds", 0.0) for i in steady) if steady else 0.0,
        "inner_steps": statistics.mean(r.get("inner_steps", 0) for r in records),
        "landed_at": statistics.mean(landed) if landed else float("nan"),
        "statuses": dict(collections.Counter(r["status"] for r in records)),
        "group_sizes": dict(collections.Counter(r["group_size"] for r in records)),
        "bytes_per_token": sum(r["bytes_sent"] for r in records) / max(1, sum(r["tokens"] for r in records)),
        "step_seconds": wall / len(steady) if steady else float("nan"),
        "bytes_per_round": statistics.mean(r["bytes_sent"] for r in records if r["group_size"] > 1)
        if any(r["group_size"] > 1 for r in records)
        else float("nan"),
    }
