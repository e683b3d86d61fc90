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
    warmup_steps: int = 0
    """Inner steps of the run (counted across all outer steps) over which the learning rate rises linearly to `lr`."""
    decay_steps: int | None = None
    """Inner steps of the run after which a cosine decay reaches `min_lr_ratio * lr`; None keeps `lr` after warmup."""
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int) -> float:
        """Learning rate of the run's inner step `step` (outer step t, inner step k: step = t * H + k).

        The position comes from the run's outer-step counter, so a peer that joins or resumes anywhere in the run is
        at the same point of the schedule as everyone else.
        """
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps is None:
            return self.lr
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        scale = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * scale


CALLED_SLACK = 0.1
"""A loop whose round waits for it still finishes when at most this share of its steps is left: equal peers a few
steps apart all train their H steps (the round waits that little for them), while a peer several times slower than
the others stops after its current step."""


@dataclass
class InnerResult:
    steps: int
    loss: float
    """Mean loss over the steps taken (NaN if a loss was not finite)."""
    tokens: int
    seconds: float
    interrupted: bool


class InnerLoop:
    def __init__(
        self,
        model: torch.nn.Module,
        batches: TokenBatcher,
        config: InnerConfig,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        """`autocast_dtype` (e.g. bfloat16) runs the forward pass in that precision; parameters and AdamW stay fp32.

        A model sharded with FSDP gets its precision from its mixed-precision policy instead (peers.parallelize).
        """
        self.model, self.batches, self.config = model, batches, config
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype
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
        first_step: int = 0,
        enough: threading.Event | None = None,
        may_skip: bool = False,
        before_step: Callable[[], None] | None = None,
    ) -> InnerResult:
        """Take up to `steps` optimizer steps; returns early (interrupted) if `stop` is set, and early but complete
        once `enough` is set and at least one step is taken (the round this work feeds waits for it) unless only a
        few are left (CALLED_SLACK), or none if `may_skip` (the peer brings earlier work to that round).

        `first_step` is the run's index of the first of these steps: it places them on the learning-rate schedule.
        `before_step` runs before each step (an overlapped peer moves its model onto the round's θ there).
        """
        self.model.train()
        losses, tokens, started, taken, interrupted = [], 0, time.perf_counter(), 0, False
        slack = int(CALLED_SLACK * steps)
        for _ in range(steps):
            if stop is not None and stop.is_set():
                interrupted = True
                break
            if enough is not None and enough.is_set() and (may_skip or (taken > 0 and steps - taken > slack)):
                break
            if before_step is not None:
                before_step()
            batch = next(self.batches).to(self.device)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr_at(first_step + taken)
            with torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
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
        return InnerResult(taken, mean, tokens, time.perf_counter() - started, interrupted)
