"""Where an overlapped peer's next inner loop starts while the round of its last pseudo-gradient is in flight, and how
it moves onto the round's result once that lands.

Overlapped, the round of step t averages while the peer trains its next inner loop, so that loop cannot start from
θ_{t+1}: the average is not there yet. The shared θ still takes exactly the blocking DiLoCo update, a little later:
every member applies the same average to the same θ (bit-identical by construction, as in PCCL's async DiLoCo), and
θ alone is what hashes, state transfer and checkpoints carry. Locally, the peer:

1. starts its next inner loop from its own guess of θ_{t+1}: the outer step as if the group's average were its own
   pseudo-gradient (eager updates, arXiv 2502.12996: the peer's fresh Δ stands in for the average not yet arrived);
2. when the round lands, between two inner steps, moves onto θ_{t+1}: with s = θ_{t+1} minus the guess (the guess's
   error), x ← x + c·s, keeping all it trained since the guess and taking a share c = `merge_share` of the error,
   by the share of the inner loop done. Its next Δ is θ_{t+1} minus where the loop ends, as blocking: the loop's
   whole update plus the (1 − c)·s not taken. A peer that averaged alone guessed θ_{t+1} exactly and just goes on
   (c = 1, s = 0).

Why not all of the error (c = 1): where the loss is steep, the steps since the guess have already undone part of the
guess's error (the guess is off by this peer's own noise, amplified by the outer step), and shifting by all of s on
top counts that correction twice; what the shift leaves out is not lost, it stays in the next Δ. The later the round
lands, the more of it the loop has undone: c = max(1/2, 1 − done). Before this rule the merge was
x ← c·(x + s) + (1 − c)·(θ_{t+1} − s) (after Streaming DiLoCo's merge of local and global parameters, arXiv
2501.18512), which is the guess plus c of the loop's progress plus c of s: it threw away half of what a loop trained
before a late round landed, and its next Δ carried only half the loop's update.

Measured (benchmarks/quality.py `--arms diloco-ideal,diloco-overlap --overlap-landing F`, 3 replicas in one process,
the embedded model, 900 inner steps with the early phase, held-out loss against blocking DiLoCo's on the same tokens,
1.4460 / 1.4410 / 1.4415 / 1.4363 at seeds 0-3), by when the round lands in the next inner loop:

| landing after | 0.1 | 0.5 | 0.6 | 0.75 | 1 (the whole loop) |
|---|---|---|---|---|---|
| x + c·s (this rule) | +0.08% | +0.44 / +0.36% | | | +0.86 / +0.60 / +0.37 / +0.40% |
| c·(x + s) + (1 − c)·(θ − s) (before) | | | +1.89 / +1.50 / +1.61% (seeds 1-3) | +2.25 / +2.27% | +3.53 / +3.47% |

(Seeds 0, 0-1 or 0-3, unless said.) Without the early phase (`--warmup-steps 0`), landing at the end costs +0.76%.
In a real swarm on 5 Mbit/s links, rounds landing after 0.4-1 of the loop: +0.60% / +0.35% at seeds 0 / 1 (the merge
before: +2.35% at seed 0). The README's Benchmarks table has these and the 5.6M-parameter model's.

In seed-0 runs at 0.6 (a scratch replica of the same loop), the share of s hardly matters once the progress is kept
(c = 1/4, 1/2, 3/4: +0.46%, +0.49%, +0.57%); keeping 3/4 of the progress gives +0.84%, 1/2 of it +1.59-1.64%.
Starting from θ_t and applying each average a round late (the naive delayed update) cost +45.5% in an earlier setup;
guessing θ_t without the shift +9.7%. Own Δ was the best guess tried there: its share of the average alone (Δ / k),
the last round's average, and the eager updates' estimate (own fresh share plus the others' shares from the last
round, arXiv 2502.12996) all did worse.
"""

from __future__ import annotations

import torch

from swarm.outer import OuterOptimizer


@torch.no_grad()
def to_start_point(outer: OuterOptimizer, index: int, values: torch.Tensor, alone: bool, at: int) -> None:
    """Overwrite `values`, this peer's pseudo-gradient for parameter `index` of θ, with its guess of θ after the round
    in flight, which starts from the run's outer step `at`: the outer step with that pseudo-gradient as the group's
    average (momentum drift included, the same on every member), or, when the peer expects to average `alone`, its
    own inner result (θ − Δ, as OuterOptimizer.step_alone); a round that lands on the group's mean
    (OuterOptimizer.lands_on_mean) foresees θ − Δ as well."""
    theta = outer.params[index].reshape(values.shape)
    if alone or outer.lands_on_mean(at):
        values.neg_().add_(theta)
        return
    lr, mu = outer.settings(at)
    # Nesterov (torch's SGD): buf' = mu * buf + g, θ' = θ - lr * (g + mu * buf') = θ - lr * ((1 + mu) g + mu² buf).
    values.mul_(-lr * (1 + mu))
    buf = outer.momentum_buffer(index)
    if buf is not None and mu > 0:
        values.add_(buf.reshape(values.shape), alpha=-lr * mu * mu)
    values.add_(theta)


MERGE_FLOOR = 0.5
"""The least share of the guess's error a merge takes (see the module's docstring)."""


def merge_share(done: float) -> float:
    """c of the merge, the share of the guess's error taken, when the round lands after `done` (a share, 0..1, or
    more) of the inner loop."""
    return max(MERGE_FLOOR, 1.0 - done)


@torch.no_grad()
def merge(x: torch.Tensor, shift: torch.Tensor, share: float) -> None:
    """In place: x ← x + share·shift, the model moved by `share` of the shift from its guess to θ."""
    x.add_(shift, alpha=share)
