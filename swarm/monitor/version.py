"""The installed version of swarm, for status records, the dashboard and swarm_build_info."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("swarm-diloco")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
