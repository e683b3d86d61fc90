"""Local checkpoints of a peer: atomic (temp file, fsync, rename), the newest K kept, corrupt ones skipped."""

from __future__ import annotations

import glob
import logging
import os
import re

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
