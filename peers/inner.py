"""The inner loop of DiLoCo: H steps of AdamW on local data. Runs in a worker thread, never in the event loop.

The loop never waits for the host without need: batches come ready from a background thread (peers.prefetch), the
losses are summed on the device and read back once per loop (the progress bar reads one when it redraws), and
gradients of a batch too large for the device accumulate over micro-batches.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from peers.device import adamw, to_device


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
    micro_batch_size: int | None = None
    """Sequences per forward and backward pass; their gradients accumulate into the step's, so --batch-size does not
    depend on device memory. None: the whole batch in one pass."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: about a third more compute
    for activation memory that no longer grows with the number of layers."""

    def validate(self, batch_size: int) -> None:
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= batch_size:
            raise ValueError(f"micro_batch_size must be in [1, batch size {batch_size}], got {self.micro_batch_size}")

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


CALLED_SLACK = 1 / 3
"""A loop whose round waits for it still finishes when at most this share of its steps is left: equal peers that
drift up to a third of a loop apart (an evaluation, a checkpoint, a busy CPU) all train their H steps, and the round
waits that long for them, while a peer 1.5 times slower than the others or more stops after its current step.

At a tenth, equal peers on 2 cores cut a loop in four short by 4 to 9 steps, 5.5% of the run's tokens: held-out
1.6303 against 1.6183 with full loops, the gap to data-parallel's 1.5551 +4.8% against +4.1%, at the same tokens per
second (benchmarks/quality.py, seeds 0 and 1; README, Training quality)."""


def called_slack(steps: int, inner_steps: int) -> int:
    """Steps a called loop of `steps` still finishes, in a run of H = `inner_steps`: a third of H, at most half of
    the loop. Equal peers drift apart by time (an evaluation, a busy CPU), not by a share of their loop, so an early
    round's short loop (swarm.plan) tolerates the steps a full one does, while a peer twice as slow or more is still
    cut. In rounds of 10 of H = 30, a third of the loop (3 steps) cut 6-13% of the early phase's steps on 2 cores."""
    return min(int(CALLED_SLACK * inner_steps), steps // 2)


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
        batches: Iterator[torch.Tensor],
        config: InnerConfig,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        """`model` must already be on `device`. `autocast_dtype` (e.g. bfloat16) runs the forward pass in that
        precision; parameters and AdamW stay fp32.

        A model sharded with FSDP gets its precision from its mixed-precision policy instead (peers.parallelize).
        """
        self.model, self.batches, self.config = model, batches, config
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return adamw(
            self.model.parameters(),
            self.device,
            lr=self.config.lr,
            betas=self.config.betas,
            weight_decay=self.config.weight_decay,
        )

    def reset_optimizer(self) -> None:
        """Fresh AdamW state, e.g. after a non-finite step poisoned the moments."""
        self.optimizer = self._make_optimizer()

    def run(
        self,
        steps: int,
        stop: threading.Event | None = None,
        on_step: Callable[[torch.Tensor, int], None] | None = None,
        first_step: int = 0,
        enough: threading.Event | None = None,
        may_skip: bool = False,
        before_step: Callable[[], None] | None = None,
        before_update: Callable[[], None] | None = None,
        slack: int | None = None,
    ) -> InnerResult:
        """Take up to `steps` optimizer steps; returns early (interrupted) if `stop` is set, and early but complete
        once `enough` is set and at least one step is taken (the round this work feeds waits for it) unless only a
        few are left (`slack`; by default those of a loop of H = `steps`: called_slack), or none if `may_skip` (the
        peer brings earlier work to that round).

        `first_step` is the run's index of the first of these steps: it places them on the learning-rate schedule.
        `on_step(loss, tokens)` gets the step's loss as a device tensor (reading it waits for the device).
        `before_step` runs before each step (an overlapped peer moves its model onto the round's θ there).
        `before_update()` runs before each optimizer step, the first change to the parameters and moments: a
        checkpoint that is still writing them out from the live tensors holds the step there (peers.checkpoint).
        """
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        tokens, started, taken, interrupted = 0, time.perf_counter(), 0, False
        slack = called_slack(steps, steps) if slack is None else slack
        for _ in range(steps):
            if stop is not None and stop.is_set():
                interrupted = True
                break
            if enough is not None and enough.is_set() and (may_skip or (taken > 0 and steps - taken > slack)):
                break
            if before_step is not None:
                before_step()
            batch = to_device(next(self.batches), self.device)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr_at(first_step + taken)
            loss = self.accumulate_gradients(batch)
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            if before_update is not None:
                before_update()
            self.optimizer.step()
            # Freed, not zeroed: between steps and during the outer step the gradients hold no memory.
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss
            tokens += batch.numel()
            taken += 1
            if on_step is not None:
                on_step(loss, batch.numel())
        mean = float(loss_sum) / taken if taken else math.nan  # the loop's one wait for the device
        return InnerResult(taken, mean, tokens, time.perf_counter() - started, interrupted)

    def accumulate_gradients(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward and backward of `batch` in micro-batches, gradients summed into `.grad`; returns the batch's mean
        loss (detached, on the device).

        Every sequence has the same number of predicted tokens, so the batch's mean loss is the micro-batches' mean
        losses weighted by their share of the sequences: scaling each backward by that share gives the whole batch's
        gradient (up to float rounding)."""
        size = self.config.micro_batch_size or batch.shape[0]
        chunks = batch.split(size) if size < batch.shape[0] else (batch,)
        total = None
        for i, chunk in enumerate(chunks):
            set_sync = getattr(self.model, "set_requires_gradient_sync", None)
            if set_sync is not None and len(chunks) > 1:
                set_sync(i == len(chunks) - 1)  # FSDP: reduce the gradients once, after the last micro-batch
            with torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = self.model(input_ids=chunk, labels=chunk).loss
            share = chunk.shape[0] / batch.shape[0]
            (loss * share if len(chunks) > 1 else loss).backward()
            part = loss.detach() * share
            total = part if total is None else total + part
        return total


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers' own per-block checkpointing, non-reentrant (the form that works under FSDP2 and autocast)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
