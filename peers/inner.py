"""The inner loop of DiLoCo: H steps of AdamW on local data. Runs in a worker thread, never in the event loop."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peers.data import TokenBatcher


@dataclass
class InnerConfig:
    lr: float = 1e-3
    """AdamW learning rate of the inner steps."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 turns it off."""


@dataclass
class InnerResult:
    steps: int
    loss: float
    """Mean loss over the steps taken (NaN if a loss was not finite)."""
    tokens: int
    seconds: float
    interrupted: bool


class InnerLoop:
    def __init__(self, model: torch.nn.Module, batches: TokenBatcher, config: InnerConfig):
        self.model, self.batches, self.config = model, batches, config
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.model.parameters(), lr=self.config.lr, betas=self.config.betas, weight_decay=self.config.weight_decay
        )

    def reset_optimizer(self) -> None:
        """Fresh AdamW state, e.g. after a non-finite step poisoned the moments."""
        self.optimizer = self._make_optimizer()

    def run(
        self,
        steps: int,
        stop: threading.Event | None = None,
        on_step: Callable[[float, int], None] | None = None,
    ) -> InnerResult:
        """Take up to `steps` optimizer steps; returns early (interrupted) if `stop` is set."""
        self.model.train()
        losses, tokens, started, taken = [], 0, time.perf_counter(), 0
        for _ in range(steps):
            if stop is not None and stop.is_set():
                break
            batch = next(self.batches)
            out = self.model(input_ids=batch, labels=batch)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            loss = float(out.loss.detach())
            losses.append(loss)
            tokens += batch.numel()
            taken += 1
            if on_step is not None:
                on_step(loss, batch.numel())
        mean = sum(losses) / len(losses) if losses else math.nan
        return InnerResult(taken, mean, tokens, time.perf_counter() - started, taken < steps)
