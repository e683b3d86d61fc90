"""Local checkpoints of a peer: atomic (temp file, fsync, rename), the newest K kept, corrupt ones skipped."""

from __future__ import annotations

import glob
import logging
import os
import re

import torch

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); training state in memory is intact."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory, self.keep = directory, keep
        os.makedirs(directory, exist_ok=True)

    def _paths(self) -> list[str]:
        names = [n for n in os.listdir(self.directory) if _NAME.match(n)]
        return [os.path.join(self.directory, n) for n in sorted(names)]

    def save(self, state: dict, outer_step: int) -> str:
        path = os.path.join(self.directory, f"step-{outer_step:08d}.pt")
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
        for stale in glob.glob(os.path.join(self.directory, "*.tmp-*")):
            os.remove(stale)  # left by a crash mid-save; the rename never happened
        for path in reversed(self._paths()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "swarm" not in state:
                    raise ValueError("not a swarm checkpoint")
                return state, path
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
