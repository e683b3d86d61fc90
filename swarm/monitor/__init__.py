"""What a run looks like from outside: peers' status records in the DHT, a dashboard page with its JSON API, and
Prometheus metrics. Shared by swarm-peer and swarm-bootstrap; nothing here takes part in training."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MonitorConfig:
    dashboard_port: int | None = None
    """Serve the dashboard page and /api/v1/state on this port; None serves no dashboard."""
    dashboard_host: str = "127.0.0.1"
    """Address the dashboard listens on: loopback unless the operator opens it on purpose."""
    prometheus_port: int | None = None
    """Serve /metrics in the Prometheus text format on this port; None serves none."""
    prometheus_host: str = "127.0.0.1"
    """Address the Prometheus endpoint listens on."""
