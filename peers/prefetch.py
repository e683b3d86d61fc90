"""Batches made ahead of the training step, in a background thread, so that the device never waits for data.

Tokenizing and packing text is Python work; done in the training thread it sits between two steps, and the device
idles meanwhile. Here a thread keeps a few batches ready (in page-locked memory when they go to a GPU, so that their
copy to the device is asynchronous). The batches the training took are what counts for a checkpoint: `position` and
`cursor` are those of the last batch handed out, not of the ones made ahead.
"""

from __future__ import annotations

import queue
import threading

import torch

from peers.data import TokenBatcher
from peers.device import pin


class Prefetcher:
    """An iterator over `batcher`'s batches, made `depth` batches ahead in a thread. Call `close()` when done."""

    def __init__(self, batcher: TokenBatcher, device: torch.device, depth: int = 4):
        self.batcher, self.device = batcher, device
        self.position, self.cursor = batcher.position, batcher.cursor
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._error: BaseException | None = None
        # A daemon, so that a process that never reaches close() (killed mid-start) still exits; close() joins it.
        self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._closing.is_set():
                batch = pin(next(self.batcher), self.device)
                self._put((batch, self.batcher.position, self.batcher.cursor))
        except BaseException as e:  # a data error reaches the training thread at its next batch
            self._put((None, e, None))

    def _put(self, item) -> None:
        while not self._closing.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._error is not None:
            raise self._error
        batch, position, cursor = self._ready.get()
        if batch is None:
            self._error = position
            raise position
        self.position, self.cursor = position, cursor
        return batch

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
