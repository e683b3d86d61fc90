"""Local checkpoints of a peer: atomic (temp file, fsync, rename), the newest K kept, corrupt ones skipped.

A peer saves after every outer step from its live tensors, in a background thread (`save_in_background`): no copy of
θ, the momentum, the model or AdamW's moments is made (that was a third of a CPU peer's memory), and the event loop
goes on answering the swarm while gigabytes go to disk. The price is a rule for the caller: nothing the checkpoint
holds may change until `wait()` says the write is done. The peer waits before its first optimizer step of the next
inner loop (the first change to the model and the moments, so the step's forward and backward overlap the write) and
before its next outer step (the first change to θ and the momentum).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import logging
import os
import re
import time

import torch

logger = logging.getLogger(__name__)
_ANY = re.compile(r"^step-(\d{8})(\.shard\d+of\d+)?\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); training state in memory is intact."""


class Checkpointer:
    """Checkpoints of one worker: `step-NNNNNNNN.pt`, or `step-NNNNNNNN.shard{i}of{n}.pt` for worker i of a peer
    sharded over n workers (each worker saves and loads its own shard; nothing is gathered)."""

    def __init__(self, directory: str, keep: int = 3, shard: tuple[int, int] | None = None):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory, self.keep = directory, keep
        self.suffix = "" if shard is None else f".shard{shard[0]}of{shard[1]}"
        self._name = re.compile(rf"^step-(\d{{8}}){re.escape(self.suffix)}\.pt$")
        os.makedirs(directory, exist_ok=True)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self.last_write: tuple[int, float] | None = None
        """(outer step, seconds) of the newest checkpoint written in the background."""

    def _paths(self) -> list[str]:
        names = [n for n in os.listdir(self.directory) if self._name.match(n)]
        return [os.path.join(self.directory, n) for n in sorted(names)]

    def path(self, outer_step: int) -> str:
        return os.path.join(self.directory, f"step-{outer_step:08d}{self.suffix}.pt")

    def steps(self) -> list[int]:
        """Outer steps this worker has a checkpoint file of (not checked yet), oldest first."""
        return [int(self._name.match(os.path.basename(p)).group(1)) for p in self._paths()]

    def other_layouts(self) -> list[str]:
        """Checkpoint files in the directory that belong to another worker layout than ours."""
        return sorted(n for n in os.listdir(self.directory) if _ANY.match(n) and not self._name.match(n))

    def save(self, state: dict, outer_step: int) -> str:
        path = self.path(outer_step)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if os.path.exists(tmp):
                os.remove(tmp)
            raise CheckpointError(f"could not write checkpoint {path}: {_os_reason(e)}") from e
        for old in self._paths()[: -self.keep]:
            os.remove(old)
        return path

    def save_in_background(self, state: dict, outer_step: int) -> concurrent.futures.Future:
        """Start writing `state` (live tensors, not copies) in a background thread; returns its future.

        The tensors in `state` must not change until `wait()` returns: see the module's docstring. A failed write is
        logged (training goes on, the next outer step tries again) and its future holds the CheckpointError."""
        self.wait()  # one write at a time: the newest K are kept in order
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending = self._writer.submit(self._timed_save, state, outer_step)
        return self._pending

    def _timed_save(self, state: dict, outer_step: int) -> str:
        started = time.perf_counter()
        try:
            path = self.save(state, outer_step)
        except CheckpointError as e:
            logger.error(f"{e}; training continues, the next outer step tries again")
            raise
        seconds = time.perf_counter() - started
        self.last_write = (outer_step, seconds)
        logger.info(f"checkpoint of outer step {outer_step} written in {seconds:.2f}s: {path}")
        return path

    @property
    def writing(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Block until the background write in flight (if any) is done, whether it succeeded or not."""
        pending = self._pending
        if pending is not None:
            concurrent.futures.wait([pending])

    async def wait_async(self) -> None:
        """`wait()` for the event loop: awaits the write without blocking the loop."""
        pending = self._pending
        if pending is not None and not pending.done():
            await asyncio.wait([asyncio.wrap_future(pending)])

    def close(self) -> None:
        """Finish the write in flight and stop the writer thread."""
        self.wait()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def load_latest(self) -> tuple[dict, str] | None:
        """The newest checkpoint that loads; a damaged one is skipped with a warning."""
        self.remove_stale()
        for path in reversed(self._paths()):
            state = self._load(path)
            if state is not None:
                return state, path
        return None

    def load(self, outer_step: int) -> dict | None:
        """The checkpoint of `outer_step`, or None (with a warning) if it is missing or damaged."""
        return self._load(self.path(outer_step))

    def remove_stale(self) -> None:
        for stale in glob.glob(os.path.join(self.directory, f"*{self.suffix}.pt.tmp-*")):
            os.remove(stale)  # left by a crash mid-save; the rename never happened

    @staticmethod
    def _load(path: str) -> dict | None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "swarm" not in state:
                raise ValueError("not a swarm checkpoint")
            return state
        except Exception as e:
            logger.warning(f"checkpoint {path} is unreadable ({e}); trying the previous one")
            return None


def _os_reason(error: BaseException) -> str:
    """The operating system's words for a failure (e.g. 'No space left on device'), wherever it is in the chain."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(error)
