"""Where an overlapped peer's next inner loop starts while the round of its last pseudo-gradient is in flight, and how
it moves onto the round's result once that lands.

Overlapped, the round of step t averages while the peer trains its next inner loop, so that loop cannot start from
θ_{t+1}: the average is not there yet. The shared θ still takes exactly the blocking DiLoCo update, a little later:
every member applies the same average to the same θ (bit-identical by construction, as in PCCL's async DiLoCo), and
θ alone is what hashes, state transfer and checkpoints carry. Locally, the peer:

1. starts its next inner loop from its own guess of θ_{t+1}: the outer step as if the group's average were its own
   pseudo-gradient (eager updates, arXiv 2502.12996: the peer's fresh Δ stands in for the average not yet arrived);
2. when the round lands, shifts its model by θ_{t+1} minus that guess, between two inner steps, keeping what it
   trained meanwhile; from then on its inner loop is DiLoCo's from θ_{t+1}, and its next Δ is θ_{t+1} minus where the
   loop ends, as blocking.

Measured (benchmarks/quality.py `--arms diloco-ideal,diloco-overlap`, 3 replicas in one process, held-out loss
against blocking DiLoCo's on the same tokens, seed 0): starting from θ_t and applying each average a round late (the
naive delayed update) costs +45.5%; guessing without the shift +9.7%; guessing and shifting when a tenth of the next
inner loop is done +1.1%, a quarter +3.1%, half +4.8%. Own Δ was the best guess tried: its share of the average
alone (Δ / k) +3.6% at a quarter, the last round's average +10.0%. The cost grows with the time the round takes.
"""

from __future__ import annotations

import torch

from swarm.outer import OuterOptimizer


@torch.no_grad()
def to_start_point(outer: OuterOptimizer, index: int, values: torch.Tensor, alone: bool) -> None:
    """Overwrite `values`, this peer's pseudo-gradient for parameter `index` of θ, with its guess of θ after the round
    in flight: the outer step with that pseudo-gradient as the group's average (momentum drift included, the same on
    every member), or, when the peer expects to average `alone`, its own inner result (θ − Δ, as
    OuterOptimizer.step_alone)."""
    theta = outer.params[index].reshape(values.shape)
    if alone:
        values.neg_().add_(theta)
        return
    lr, mu = outer.settings()
    # Nesterov (torch's SGD): buf' = mu * buf + g, θ' = θ - lr * (g + mu * buf') = θ - lr * ((1 + mu) g + mu² buf).
    values.mul_(-lr * (1 + mu))
    buf = outer.momentum_buffer(index)
    if buf is not None and mu > 0:
        values.add_(buf.reshape(values.shape), alpha=-lr * mu * mu)
    values.add_(theta)
