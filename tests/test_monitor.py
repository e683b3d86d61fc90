"""Seeing the swarm: status records, the dashboard in a real browser, /api/v1/state and Prometheus' /metrics."""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.request

import jsonschema
import pytest
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from peers.launch import read_metrics, start_bootstrap, start_peer, stop
from swarm.monitor import status as status_records
from swarm.monitor.collector import Collector
from swarm.monitor.web import state_schema
from tests import browser
from tests.conftest import swarm_of
from tests.test_programs import FAST, free_port

ARTIFACTS = os.environ.get("SWARM_TEST_ARTIFACTS", os.path.join(os.path.dirname(__file__), "..", "test-artifacts"))


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def get_state(port: int) -> dict:
    return json.loads(get(f"http://127.0.0.1:{port}/api/v1/state"))


def wait_for(what, deadline_seconds: float, explain):
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            found = what()
        except OSError:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, explain()
        time.sleep(0.5)


def good_status(step: int = 3) -> status_records.PeerStatus:
    return status_records.PeerStatus(
        outer_step=step, loss=2.5, eval_loss=2.7, tokens_per_second=1000.0, tokens_total=3000, sent_bytes=10,
        received_bytes=12, group_size=2, direct_streams=2, relayed_streams=0, version="0.1.0", workers=1,
        time=get_dht_time(), history=[[s, 3.0 - s / 10, None, 1000 * s] for s in range(1, step + 1)],
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_status_records_refuse_malformed_values():
    value = good_status().to_value()
    assert status_records.parse_status(value) == good_status().__class__(**value)
    broken = [
        {**value, "outer_step": -1},
        {**value, "loss": float("nan")},
        {**value, "tokens_per_second": "fast"},
        {**value, "history": [[1, 2.0, None]]},
        {**value, "history": [[1, 2.0, None, 5]] * (status_records.HISTORY_LENGTH + 1)},
        {**value, "version": "x" * 1000},
        {**value, "workers": True},
        "not a dict",
    ]
    for bad in broken:
        assert status_records.parse_status(bad) is None, bad


@pytest.mark.timeout(120)
async def test_collector_merges_statuses_and_drops_garbage():
    """Real DHT nodes: two peers publish statuses, a third writes garbage under the run; the view has the two."""
    async with swarm_of(3) as (bootstrap, (a, b, hostile)):
        await status_records.publish(a.dht, a.peer_id.to_base58(), "view", good_status(3))
        await status_records.publish(b.dht, b.peer_id.to_base58(), "view", good_status(2))
        await hostile.dht.store(status_records.status_key("view"), {"outer_step": "many"}, get_dht_time() + 60,
                                subkey=hostile.peer_id.to_base58())  # fmt: skip
        await hostile.dht.store(status_records.RUNS_KEY, {}, get_dht_time() + 60, subkey="bad run id!")
        collector = Collector(bootstrap, discover_runs=True)
        await collector.refresh()
        state = collector.state()
        jsonschema.validate(state, state_schema())
        assert [r["run_id"] for r in state["runs"]] == ["view"]
        run = state["runs"][0]
        assert sorted(p["peer_id"] for p in run["peers"]) == sorted([a.peer_id.to_base58(), b.peer_id.to_base58()])
        assert [p["outer_step"] for p in run["loss_curve"]] == [1, 2, 3]
        assert [p["peers"] for p in run["loss_curve"]] == [2, 2, 1]
        assert math.isclose(run["loss_curve"][0]["loss"], 2.9) and run["tokens_total"] == 6000
        assert run["live_peers"] == 0  # statuses, but no heartbeats: these peers have left


def scrape(port: int) -> dict[str, tuple[str, float]]:
    """Unlabelled samples of /metrics by name, with their family's type."""
    out = {}
    for family in text_string_to_metric_families(get(f"http://127.0.0.1:{port}/metrics")):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = (family.type, sample.value)
    return out


@pytest.mark.timeout(300)
def test_dashboard_and_metrics_of_a_live_swarm(tmp_path):
    """A bootstrap node with the dashboard and two peers training: the page in headless Chromium lists the peers
    and draws the loss; the JSON validates; a peer's /metrics agrees with its metrics file."""
    dash, boot_prom, peer_prom, peer_dash = (free_port() for _ in range(4))
    boot = start_bootstrap(str(tmp_path), "--run-id", "watch", "--dashboard-port", str(dash),
                           "--prometheus-port", str(boot_prom))  # fmt: skip
    peers = []
    try:
        for i in range(2):
            extra = ["--prometheus-port", str(peer_prom), "--dashboard-port", str(peer_dash)] if i == 0 else []
            peers.append(start_peer(str(tmp_path), f"p{i}", boot.maddrs, "--run-id", "watch", "--outer-steps", "400",
                                    "--metrics-file", str(tmp_path / f"p{i}.jsonl"), *FAST, *extra))  # fmt: skip

        def logs():
            return "\n".join((tmp_path / n).read_text() for n in os.listdir(tmp_path) if n.endswith(".log"))

        def ready():
            state = get_state(dash)
            runs = [r for r in state["runs"] if r["run_id"] == "watch"]
            if not runs or runs[0]["live_peers"] != 2 or len(runs[0]["loss_curve"]) < 3:
                return None
            if sum(1 for p in runs[0]["peers"] if p["outer_step"]) < 2:
                return None
            return state

        state = wait_for(ready, 180, logs)
        jsonschema.validate(state, json.loads(get(f"http://127.0.0.1:{dash}/api/v1/schema")))
        run = next(r for r in state["runs"] if r["run_id"] == "watch")
        assert state["node"]["role"] == "bootstrap" and run["tokens_per_second"] > 0 and run["tokens_total"] > 0
        assert all(p["eval_loss"] is not None for p in run["loss_curve"])  # held-out loss of θ, every outer step
        assert {p["link"] for p in run["peers"]} <= {"direct", "mixed"}
        assert run["bytes_per_step"] > 0

        # The page, as a person's browser shows it.
        url = f"http://127.0.0.1:{dash}/"
        dom = browser.dump_dom(url)
        assert 'data-loaded="true"' in dom
        assert 'data-run-id="watch"' in dom
        shown = set(re.findall(r'<tr class="peer[^"]*" data-peer-id="([^"]+)"', dom))
        assert shown == {p["peer_id"] for p in run["peers"]}
        assert len(re.findall(r'<circle class="loss-point"', dom)) >= 3
        assert len(re.findall(r'<circle class="eval-point"', dom)) >= 3
        assert 'class="mean-loss"' in dom
        assert "http://" not in dom.replace(url[:-1], "").replace("http://www.w3.org/", "")  # nothing from outside
        shot = browser.screenshot(url, os.path.join(ARTIFACTS, "dashboard.png"))
        assert os.path.getsize(shot) > 10_000

        # A peer serves the same page and JSON for its own run.
        mine = get_state(peer_dash)
        jsonschema.validate(mine, state_schema())
        assert mine["node"]["role"] == "peer" and [r["run_id"] for r in mine["runs"]] == ["watch"]

        # The peer's /metrics against its metrics file: read both until they describe the same outer step.
        def consistent():
            before = read_metrics(str(tmp_path / "p0.jsonl"))
            samples = scrape(peer_prom)
            after = read_metrics(str(tmp_path / "p0.jsonl"))
            steps = samples.get("swarm_outer_steps_total", (None, -1))[1]
            return (samples, after) if len(before) == len(after) == steps and steps >= 2 else None

        samples, records = wait_for(consistent, 60, logs)
        assert samples["swarm_outer_steps_total"][0] == "counter"
        assert samples["swarm_tokens_total"] == ("counter", sum(r["tokens"] for r in records))
        assert samples["swarm_sent_bytes_total"] == ("counter", sum(r["bytes_sent"] for r in records))
        assert samples["swarm_received_bytes_total"] == ("counter", sum(r["bytes_received"] for r in records))
        assert samples["swarm_allreduce_seconds_count"] == ("histogram", len(records))
        assert math.isclose(samples["swarm_allreduce_seconds_sum"][1], sum(r["comm_seconds"] for r in records))
        assert samples["swarm_loss"] == ("gauge", records[-1]["loss"])
        assert samples["swarm_eval_loss"] == ("gauge", records[-1]["eval_loss"])
        assert samples["swarm_group_size"] == ("gauge", records[-1]["group_size"])
        assert samples["swarm_outer_step"] == ("gauge", records[-1]["outer_step"])
        assert samples["swarm_live_peers"][1] == 2

        families = {f.name: f for f in text_string_to_metric_families(get(f"http://127.0.0.1:{boot_prom}/metrics"))}
        build = families.get("swarm_build") or families["swarm_build_info"]
        assert [s.labels["role"] for s in build.samples] == ["bootstrap"]
        live = {s.labels["run_id"]: s.value for s in families["swarm_live_peers"].samples}
        assert live["watch"] == 2
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)
