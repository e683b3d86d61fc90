"""How long the event loop was unable to run: a ticker due every `interval` seconds notes how late it wakes up.

The event loop answers DHT requests, heartbeats, matchmaking and state transfers for the peer; bulk work done on it
(hashing θ, copying it, writing a checkpoint) delays all of them. The peer reports the longest delay of each outer
step in its metrics record, so that such work is seen when it creeps back in.
"""

from __future__ import annotations

import asyncio
import contextlib


class LoopLag:
    """Use `LoopLag.start()` inside the running loop, `take()` for the longest delay since the last take, `close()`."""

    def __init__(self, interval_seconds: float = 0.05):
        self.interval_seconds = interval_seconds
        self._worst = 0.0
        self._task: asyncio.Task | None = None

    @classmethod
    def start(cls, interval_seconds: float = 0.05) -> LoopLag:
        lag = cls(interval_seconds)
        lag._task = asyncio.get_running_loop().create_task(lag._tick())
        return lag

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_seconds
            await asyncio.sleep(self.interval_seconds)
            self._worst = max(self._worst, loop.time() - due)

    def take(self) -> float:
        """The longest delay (seconds) since the previous take."""
        worst, self._worst = self._worst, 0.0
        return worst

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
