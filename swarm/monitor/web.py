"""HTTP endpoints of a node: the dashboard page, its JSON API, and Prometheus' /metrics.

One aiohttp server per port, in the node's own event loop (the collector that feeds it lives there too). The page
is one self-contained file: no CDN, no outside calls, so it works on a server with no internet and leaks nothing.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)


def page_html() -> str:
    return resources.files("swarm.monitor").joinpath("page.html").read_text(encoding="utf-8")


def state_schema() -> dict:
    return json.loads(resources.files("swarm.monitor").joinpath("state.schema.json").read_text(encoding="utf-8"))


class HttpEndpoint:
    """A started aiohttp site; `await endpoint.close()` stops it."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, host: str, port: int):
        self._runner, self._site, self.host, self.port = runner, site, host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def close(self) -> None:
        await self._runner.cleanup()


async def _serve(app: web.Application, host: str, port: int, what: str) -> HttpEndpoint:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(e.errno, f"cannot serve the {what} on {host}:{port}: {e.strerror or e}") from None
    bound = site._server.sockets[0].getsockname()[1] if port == 0 else port  # port 0: tests ask for a free one
    return HttpEndpoint(runner, site, host, bound)


async def serve_dashboard(collector, host: str, port: int) -> HttpEndpoint:
    """`/` is the page, `/api/v1/state` the collector's view, `/api/v1/schema` that view's JSON schema."""
    page, schema = page_html(), state_schema()

    async def index(_request):
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def state(_request):
        return web.json_response(collector.state(), headers={"Cache-Control": "no-store"})

    async def schema_view(_request):
        return web.json_response(schema)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/v1/state", state)
    app.router.add_get("/api/v1/schema", schema_view)
    endpoint = await _serve(app, host, port, "dashboard")
    logger.info(f"dashboard at {endpoint.url}")
    return endpoint


async def serve_prometheus(registry: CollectorRegistry, host: str, port: int) -> HttpEndpoint:
    """`/metrics` in the Prometheus text format, rendered by prometheus_client from `registry` at each scrape."""

    async def metrics(_request):
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    endpoint = await _serve(app, host, port, "Prometheus metrics")
    logger.info(f"Prometheus metrics at {endpoint.url}metrics")
    return endpoint
