"""What one outer step (one round) of a peer came to: its status and its figures."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class StepStatus(str, enum.Enum):
    AVERAGED = "averaged"  # Δ averaged with a group of two or more
    ALONE = "alone"  # no group found: own Δ applied
    ALLREDUCE_FAILED = "allreduce_failed"  # θ unchanged, local work carried into the next step
    NONFINITE = "nonfinite"  # Δ had NaN/inf: nothing sent, round sat out, caller restarts from θ
    RESYNCED = "resynced"  # the run was ahead: θ taken over from peers, caller restarts from θ
    MISSED = "missed"  # the round went ahead without us while we looked for it: work carried, caller restarts from θ


@dataclass
class OuterStepReport:
    outer_step: int
    """The run's outer-step counter after this step."""
    status: StepStatus
    group_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    comm_seconds: float = 0.0
    """How long the round took, from its start to θ updated (with overlap, mostly hidden behind the next inner
    loop)."""
    params_sha256: str = ""
    error: str | None = None
    group_id: str = ""
    """Hex id of the group whose average was applied (empty when none was)."""
    attempts: int = 0
    """All-reduces tried for this step (more than one after a member was lost)."""
    members: list[str] = field(default_factory=list)
    """Base58 peer ids of the group whose average was applied (empty when none was): who this peer trained with."""
    overlapped: bool = False
    """The round ran behind the peer's next inner loop (SwarmConfig.overlap)."""
    carried_tokens: int = 0
    """Tokens of this peer's work that no round applied yet and that go into its next contribution (a failed
    round, or a round the run held without this peer)."""

    @property
    def restart_from_global(self) -> bool:
        """Whether the caller should copy θ into its local parameters before the next inner loop.

        Blocking, a failed round leaves the peer's work in its local parameters, and the next Δ carries it. An
        overlapped peer always takes θ: the swarm keeps what no round applied yet (`carried_tokens`)."""
        return self.overlapped or self.status != StepStatus.ALLREDUCE_FAILED
