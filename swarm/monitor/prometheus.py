"""Prometheus metrics of a peer and of a bootstrap node, with prometheus_client.

Names follow Prometheus' conventions: base units in the name (`_seconds`, `_bytes`), `_total` on counters, `_info`
for build metadata. Each process gets its own registry (never the global default one), so several peers in one
test process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from swarm import records
from swarm.monitor.version import VERSION

# Outer-step communication spans from a loopback round (tens of ms) to a slow link under a 100 MB model (minutes).
ALLREDUCE_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _build_info(registry: CollectorRegistry, role: str) -> None:
    Info("swarm_build", "Version of swarm and of its wire protocol", registry=registry).info(
        {"version": VERSION, "protocol": str(records.PROTOCOL_VERSION), "role": role}
    )


class PeerMetrics:
    """What one peer did, updated from its metrics record after every outer step."""

    def __init__(self, run_id: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        _build_info(r, "peer")
        Info("swarm_run", "The training run this peer belongs to", registry=r).info({"run_id": run_id})
        self.outer_steps = Counter("swarm_outer_steps", "Outer steps this process completed", registry=r)
        self.tokens = Counter("swarm_tokens", "Tokens this peer trained on", registry=r)
        self.sent = Counter("swarm_sent_bytes", "Bytes written to all-reduce streams", registry=r)
        self.received = Counter("swarm_received_bytes", "Bytes read from all-reduce streams", registry=r)
        self.compute = Counter("swarm_compute_seconds", "Seconds spent in inner loops", registry=r)
        self.allreduce = Histogram(
            "swarm_allreduce_seconds",
            "Seconds per outer step spent in matchmaking and the all-reduce",
            buckets=ALLREDUCE_BUCKETS_SECONDS,
            registry=r,
        )
        self.loss = Gauge("swarm_loss", "Mean inner training loss of the latest outer step", registry=r)
        self.eval_loss = Gauge("swarm_eval_loss", "Held-out loss of θ at the latest evaluation", registry=r)
        self.tokens_per_second = Gauge(
            "swarm_tokens_per_second", "Tokens per wall-clock second over the latest outer step", registry=r
        )
        self.group_size = Gauge("swarm_group_size", "Members of the latest outer step's group", registry=r)
        self.outer_step = Gauge("swarm_outer_step", "The run's outer-step counter as this peer knows it", registry=r)
        self.live_peers = Gauge("swarm_live_peers", "Live peers of the run in the DHT (heartbeats)", registry=r)
        self.loss.set(float("nan"))
        self.eval_loss.set(float("nan"))

    def observe(self, record: dict) -> None:
        """Fold one metrics record (peers.runner's JSON line) into the metrics."""
        self.outer_steps.inc()
        self.tokens.inc(record["tokens"])
        self.sent.inc(record["bytes_sent"])
        self.received.inc(record["bytes_received"])
        self.compute.inc(record["compute_seconds"])
        self.allreduce.observe(record["comm_seconds"])
        self.loss.set(record["loss"] if record["loss"] is not None else float("nan"))
        if record.get("eval_loss") is not None:
            self.eval_loss.set(record["eval_loss"])
        if record.get("tokens_per_second") is not None:
            self.tokens_per_second.set(record["tokens_per_second"])
        self.group_size.set(record["group_size"])
        self.outer_step.set(record["outer_step"])


class _SwarmView:
    """A custom collector: at each scrape, the runs as the node's monitor collector last saw them."""

    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        state = self.collector.state()
        run = ["run_id"]
        families = {
            "live_peers": GaugeMetricFamily("swarm_live_peers", "Live peers of the run (heartbeats)", labels=run),
            "outer_step": GaugeMetricFamily("swarm_outer_step", "Furthest outer step of a live peer", labels=run),
            "tokens_per_second": GaugeMetricFamily(
                "swarm_tokens_per_second", "Sum of the live peers' tokens per second", labels=["run_id"]
            ),
            "tokens_total": GaugeMetricFamily(
                "swarm_run_tokens", "Tokens the run's peers report having trained on", labels=["run_id"]
            ),
            "loss": GaugeMetricFamily("swarm_loss", "Mean training loss of the latest outer step", labels=["run_id"]),
            "eval_loss": GaugeMetricFamily("swarm_eval_loss", "Mean held-out loss, latest", labels=["run_id"]),
        }
        for run in state["runs"]:
            labels = [run["run_id"]]
            families["live_peers"].add_metric(labels, run["live_peers"])
            families["outer_step"].add_metric(labels, run["outer_step"])
            families["tokens_per_second"].add_metric(labels, run["tokens_per_second"])
            families["tokens_total"].add_metric(labels, run["tokens_total"])
            losses = [p["loss"] for p in run["loss_curve"] if p["loss"] is not None]
            evals = [p["eval_loss"] for p in run["loss_curve"] if p["eval_loss"] is not None]
            families["loss"].add_metric(labels, losses[-1] if losses else float("nan"))
            families["eval_loss"].add_metric(labels, evals[-1] if evals else float("nan"))
        yield GaugeMetricFamily("swarm_dht_peers", "Nodes in this node's DHT routing table", state["node"]["dht_peers"])
        yield from families.values()


def swarm_registry(collector) -> CollectorRegistry:
    """The bootstrap node's metrics: build info and, per run, what the monitor collector sees."""
    registry = CollectorRegistry(auto_describe=False)
    _build_info(registry, "bootstrap")
    registry.register(_SwarmView(collector))
    return registry
