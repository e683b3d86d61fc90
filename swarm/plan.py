"""How many inner steps each outer step (round) of a run trains: H, after an early phase of shorter rounds.

DiLoCo's replicas drift apart fastest at the start of training, where the loss falls steeply and each replica's steps
are large: the published runs start DiLoCo from a model pretrained with data-parallel (arXiv 2311.08105), and local
SGD generalizes better when it starts after a phase of frequent averaging (post-local SGD, arXiv 1808.07217). A run
that starts from scratch averages more often early instead: its first `early_steps` inner steps go in rounds of
`early_inner_steps` (the last of them shorter where they do not divide), then every round is H long.

Measured in one process (3 replicas, exact mean; the embedded model, H = 30, 900 inner steps, warmup 45), held-out
loss of seeds 0 / 1 / 2 / 3: every round 30 long 1.4700 / 1.4459 / 1.4596 / 1.4448 (mean 1.4551); rounds of 10 for
the first 180 inner steps 1.4561 / 1.4397 / 1.4450 / 1.4384 (1.4448); for the first 270 (6 warmups, the default)
1.4460 / 1.4410 / 1.4415 / 1.4363 (1.4412); for the first 300 1.4442 / 1.4405 / 1.4401 / 1.4378 (1.4407). Better at
every seed, for 18 more rounds (of a third of the inner steps each) in that run. README, Training quality, has the
others tried.

The plan is part of the run's schema (swarm.SwarmConfig): round t means the same inner steps to every peer, so the
inner schedule, the outer momentum's ramp and the last round on the mean agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EARLY_WARMUPS = 6
"""The early phase lasts this many warmups (`--warmup-steps`) by default: the steep start that warmup tames."""


@dataclass(frozen=True)
class RoundPlan:
    inner_steps: int
    """H: inner steps of every round after the early phase."""
    early_inner_steps: int = 0
    """Inner steps of each early round (0: no early phase)."""
    early_steps: int = 0
    """Inner steps of the run trained in early rounds (swarm-peer's are whole outer steps of H, so that the rounds
    after them start where they would without an early phase)."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"a round needs at least one inner step, got H = {self.inner_steps}")
        if self.early_steps < 0 or self.early_inner_steps < 0:
            raise ValueError("early rounds and steps cannot be negative")
        if self.early_steps and not 0 < self.early_inner_steps < self.inner_steps:
            raise ValueError(
                f"early rounds must be shorter than H = {self.inner_steps}, got {self.early_inner_steps} inner steps"
            )

    @classmethod
    def for_run(
        cls, inner_steps: int, warmup_steps: int, early_inner_steps: int | None = None, early_steps: int | None = None
    ) -> RoundPlan:
        """swarm-peer's plan: early rounds of H/3 (rounded down, at least 1) for `EARLY_WARMUPS` warmups, unless
        given, rounded up to whole outer steps of H. No warmup, no early phase (unless `early_steps` asks for one)."""
        short = max(1, inner_steps // 3) if early_inner_steps is None else early_inner_steps
        steps = EARLY_WARMUPS * warmup_steps if early_steps is None else early_steps
        if short <= 0 or short >= inner_steps or steps <= 0:
            return cls(inner_steps)
        return cls(inner_steps, short, math.ceil(steps / inner_steps) * inner_steps)

    @property
    def early_rounds(self) -> int:
        return math.ceil(self.early_steps / self.early_inner_steps) if self.early_steps else 0

    def length(self, t: int) -> int:
        """Inner steps of round t."""
        return self.first_step(t + 1) - self.first_step(t)

    def first_step(self, t: int) -> int:
        """The run's inner step at which round t's inner loop starts."""
        if t < self.early_rounds:
            return t * self.early_inner_steps
        return self.early_steps + (t - self.early_rounds) * self.inner_steps

    def round_at(self, step: int) -> int:
        """The round whose inner loop holds the run's inner step `step`."""
        if step < self.early_steps:
            return step // self.early_inner_steps
        return self.early_rounds + (step - self.early_steps) // self.inner_steps

    def position(self, t: int) -> float:
        """The middle of round t's inner loop, in outer steps of H inner steps (t + 0.5 without an early phase)."""
        return (self.first_step(t) + self.length(t) / 2) / self.inner_steps

    def describe(self) -> str:
        """Words for the schema: empty without an early phase, so that such runs keep their schema."""
        if not self.early_steps:
            return ""
        return f"rounds of {self.early_inner_steps} inner steps for the first {self.early_steps}"
