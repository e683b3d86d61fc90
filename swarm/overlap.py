"""Where an overlapped peer's next inner loop starts while the round of its last pseudo-gradient is in flight, and how
it moves onto the round's result once that lands.

Overlapped, the round of step t averages while the peer trains its next inner loop, so that loop cannot start from
θ_{t+1}: the average is not there yet. The shared θ still takes exactly the blocking DiLoCo update, a little later:
every member applies the same average to the same θ (bit-identical by construction, as in PCCL's async DiLoCo), and
θ alone is what hashes, state transfer and checkpoints carry. Locally, the peer:

1. starts its next inner loop from its own guess of θ_{t+1}: the outer step as if the group's average were its own
   pseudo-gradient (eager updates, arXiv 2502.12996: the peer's fresh Δ stands in for the average not yet arrived);
2. when the round lands, between two inner steps, merges onto θ_{t+1}: with s = θ_{t+1} minus the guess,
   x ← c·(x + s) + (1 − c)·(θ_{t+1} − s), the model shifted onto θ_{t+1} (keeping what it trained since the guess)
   weighed against the guess it started from, c = `merge_share` of the share of the inner loop done. From then on
   its next Δ is θ_{t+1} minus where the loop ends, as blocking. A peer that averaged alone guessed θ_{t+1} exactly
   and just goes on (c = 1, s = 0).

Why merge rather than shift all the way (c = 1): where the loss is steep, the steps since the guess have already
undone the guess's error, and shifting by s on top counts that correction twice; where it is flat, the steps are
progress that the shift should carry over whole. c = 1/2 is right for the first (it is Streaming DiLoCo's merge of
local and global parameters, arXiv 2501.18512), c = 1 for the second, and the later the round lands, the more of the
steep part the loop has undone: c = max(1/2, 1 − done).

Measured (benchmarks/quality.py `--arms diloco-ideal,diloco-overlap`, 3 replicas in one process, held-out loss
against blocking DiLoCo's 1.6777 on the same tokens, seed 0), by when the round lands in the next inner loop:

| landing after | a tenth | a quarter | half | three quarters |
|---|---|---|---|---|
| merge, c = max(1/2, 1 − done) | +0.33% | +2.17% | +3.24% | +5.95% |
| shift all the way (c = 1) | +1.14% | +3.10% | +4.79% | +5.87% |
| Streaming DiLoCo's merge alone (c = 1/2) | +1.75% | +2.46% | +3.24% | +5.95% |

Seed 1 (blocking 1.6458): the merge +1.45% at a quarter and +4.22% at half, the full shift +1.90% and +5.14%.

Starting from θ_t and applying each average a round late (the naive delayed update) costs +45.5%; guessing without
the shift +9.7%. Own Δ was the best guess tried (with the full shift): its share of the average alone (Δ / k) +3.6%
at a quarter, the last round's average +10.0%, and the eager updates' estimate (own fresh share plus the others'
shares from the last round, arXiv 2502.12996) +6.1% at a quarter and +13.0% at half. The cost grows with the time
the round takes.
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
"""The least share of the shifted model a merge keeps (Streaming DiLoCo's 1/2): see the module's docstring."""


def merge_share(done: float) -> float:
    """c of the merge when the round lands after `done` (a share, 0..1, or more) of the inner loop."""
    return max(MERGE_FLOOR, 1.0 - done)


@torch.no_grad()
def merge(x: torch.Tensor, theta: torch.Tensor, shift: torch.Tensor, share: float) -> None:
    """In place: x ← share·(x + shift) + (1 − share)·(θ − shift), θ − shift being the guess the loop started from."""
    if share == 1.0:
        x.add_(shift)
        return
    x.mul_(share).add_(theta, alpha=1.0 - share).add_(shift, alpha=2.0 * share - 1.0)
