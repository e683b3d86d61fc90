"""DiLoCo's outer step across the swarm, for any list of float tensors.

`Swarm.outer_step(local, tokens)` takes the parameters a peer reached after its inner loop and does the rest:
pseudo-gradient Δ = θ − θ_local, matchmaking for this outer step, token-weighted butterfly all-reduce of Δ, and
Nesterov SGD on θ. Members of a group end with bit-identical θ. What happens when things go wrong:

- no group within the matchmaking timeout: the peer applies its own Δ and reports group_size 1;
- a member dies mid-round: the others finish every averaged part they can and share them among themselves (see
  swarm.allreduce); if some part is lost for good, the survivors form a new group for the same step without the lost
  members and average again (`allreduce_retries` times), so the round averages exactly the contributions that
  fully arrived;
- a member returns an averaged part that cannot be an average of the group's contributions (swarm.audit): the
  members that see it retry the round without it, like a lost member; it and any member caught sending garbage
  contributions (swarm.robust) are excluded from this peer's groups for the rest of the run (Matchmaker.ban);
- the all-reduce still fails: θ is left as it was, and the caller keeps its local parameters, so the next outer
  step's Δ carries this step's work too (nothing lost, nothing partial applied);
- Δ holds NaN or inf: nothing is sent, θ is left as it was, and the caller restarts from θ.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hivemind.utils import get_dht_time

from swarm import records
from swarm.allreduce import AllReduceError, Averager
from swarm.codec import make_codec
from swarm.flat import all_finite, difference, unflatten
from swarm.matchmaking import Group, Matchmaker, MatchmakingConfig
from swarm.node import SwarmNode
from swarm.outer import DEFAULT_LR, DEFAULT_MOMENTUM, OuterOptimizer
from swarm.state import RunState, StateServer, StateView, download_state, majority_hash

logger = logging.getLogger(__name__)


@dataclass
class SwarmConfig:
    run_id: str
    """Peers average only with peers of the same run id."""
    outer_lr: float = DEFAULT_LR
    outer_momentum: float = DEFAULT_MOMENTUM
    """Nesterov momentum of the outer SGD; 0 is plain SGD (with outer_lr 1: plain averaging). Part of what the peers
    of a group must share, with outer_lr."""
    compression: str = "int8"
    """Wire codec of pseudo-gradients: int8 or int4 (blockwise), fp16 or none."""
    matchmaking: MatchmakingConfig = field(default_factory=MatchmakingConfig)
    allreduce_timeout_seconds: float = 120.0
    """Bound on one all-reduce once the group is formed."""
    allreduce_retries: int = 1
    """New groups tried for the same outer step, without the lost members, after an all-reduce failed.

    A round with a dead member ends within (1 + retries) x (matchmaking timeout + all-reduce timeout) at worst;
    a member that dies outright (its connections close) is noticed at once, and the retry takes seconds."""
    state_chunk_values: int = 1 << 20
    """Values per request when a peer downloads the run's state from several donors at once."""
    error_feedback: bool = False
    """Carry what the codec lost of this peer's pseudo-gradient into its next contribution."""
    direct_data_plane: bool = True
    """Move all-reduce bytes over direct TCP connections between group members when they can reach each other
    (see swarm.direct); off, or unreachable, they go through the p2p daemons' relayed streams."""
    robust_averaging: bool = True
    """Reduce each part robustly (swarm.robust): weights bounded by the group's median, CenteredClip when some
    contribution is far from the others, garbage dropped and its sender named. With nobody out of line the result
    is the plain token-weighted mean, bit for bit; off, it always is."""
    shard: tuple[int, int] | None = None
    """(index, count): this Swarm holds shard `index` of a peer whose model is sharded over `count` workers
    (see swarm.sharded); None for a peer that holds its whole model."""
    keep_buffers_max_bytes: int = 256 << 20
    """Buffers of the model's size are kept between outer steps up to this size (their pages are then faulted in
    once): the all-reduce's output, the copy a state server keeps of a state that changes under a transfer in
    flight. Larger ones live only while they are used: on a large model, 4 bytes per parameter held between steps
    cost more than the page faults."""

    @property
    def outer_description(self) -> str:
        return f"outer lr {self.outer_lr:g} momentum {self.outer_momentum:g}"

    @property
    def namespace(self) -> str:
        """Where this Swarm's records and protocols live: the run, or the run's shard namespace."""
        return self.run_id if self.shard is None else records.shard_namespace(self.run_id, *self.shard)

    def validate(self) -> None:
        records.validate_run_id(self.run_id)
        if self.shard is not None and not (self.shard[1] >= 2 and 0 <= self.shard[0] < self.shard[1]):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count and count >= 2, got {self.shard}")
        make_codec(self.compression)
        self.matchmaking.validate()
        if self.allreduce_timeout_seconds <= 0:
            raise ValueError("allreduce_timeout_seconds must be positive")
        if self.allreduce_retries < 0:
            raise ValueError("allreduce_retries must be at least 0")


class StepStatus(str, enum.Enum):
    AVERAGED = "averaged"  # Δ averaged with a group of two or more
    ALONE = "alone"  # no group found: own Δ applied
    ALLREDUCE_FAILED = "allreduce_failed"  # θ unchanged, local work carried into the next step
    NONFINITE = "nonfinite"  # Δ had NaN/inf: nothing sent, round sat out, caller restarts from θ
    RESYNCED = "resynced"  # the run was ahead: θ taken over from peers, own Δ dropped, caller restarts from θ


@dataclass
class OuterStepReport:
    outer_step: int
    """The run's outer-step counter after this step."""
    status: StepStatus
    group_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    comm_seconds: float = 0.0
    params_sha256: str = ""
    error: str | None = None
    group_id: str = ""
    """Hex id of the group whose average was applied (empty when none was)."""
    attempts: int = 0
    """All-reduces tried for this step (more than one after a member was lost)."""
    members: list[str] = field(default_factory=list)
    """Base58 peer ids of the group whose average was applied (empty when none was): who this peer trained with."""

    @property
    def restart_from_global(self) -> bool:
        """Whether the caller should copy θ into its local parameters before the next inner loop."""
        return self.status != StepStatus.ALLREDUCE_FAILED


class Swarm:
    """One peer's membership in a training run. Holds the global parameters θ and the outer optimizer state.

    Use `await Swarm.create(node, params, config)` and `await swarm.close()`.
    """

    def __init__(
        self,
        node: SwarmNode,
        params: Sequence[torch.Tensor],
        config: SwarmConfig,
        outer_step: int = 0,
        layout: str = "",
    ):
        """`layout` describes how the peer splits its model over workers (swarm.sharded); it enters the schema."""
        config.validate()
        self.node, self.config = node, config
        self.params = [p.detach().to(device="cpu", dtype=torch.float32).clone() for p in params]
        self.outer = OuterOptimizer(self.params, lr=config.outer_lr, momentum=config.outer_momentum)
        self.params = self.outer.params
        self.codec = make_codec(config.compression)
        self.namespace = config.namespace
        shapes, outer = [p.shape for p in self.params], config.outer_description
        self.schema = records.schema_hash(config.run_id, shapes, self.codec.tag, layout, outer)
        about = records.describe_schema(shapes, self.codec.tag, layout, outer)
        self.matchmaker = Matchmaker(node, self.namespace, self.schema, config.matchmaking, about)
        self.averager = Averager(
            node,
            self.namespace,
            self.codec,
            config.allreduce_timeout_seconds,
            direct=config.direct_data_plane,
            robust=config.robust_averaging,
        )
        self.global_step = outer_step
        numel = sum(p.numel() for p in self.params)
        self.residual = torch.zeros(numel) if config.error_feedback else None
        self._state_version = 0  # bumped whenever θ or the momentum change
        self._changing = False  # θ or the momentum are being written in another thread
        self._last_group: tuple[int, tuple] | None = None  # (outer step after it, members) of the last average
        self._average: torch.Tensor | None = None  # see average_buffer
        self.state_server = StateServer(
            node, self.namespace, self.schema, self._snapshot, keep_copy_max_bytes=config.keep_buffers_max_bytes
        )

    @classmethod
    async def create(
        cls, node: SwarmNode, params: Sequence[torch.Tensor], config: SwarmConfig, outer_step: int = 0, layout: str = ""
    ) -> Swarm:
        self = cls(node, params, config, outer_step, layout)
        self.matchmaker.set_outer_step(outer_step)
        await self.averager.start()
        self.matchmaker.direct_endpoints = self.averager.direct_endpoints
        self.matchmaker.direct_key = self.averager.direct_public_key()
        await self.state_server.start()
        await self.matchmaker.start()
        return self

    async def close(self) -> None:
        await self.matchmaker.close()
        await self.state_server.close()
        await self.averager.close()

    def _snapshot(self) -> StateView:
        """The state as newcomers see it: read in place, never copied (see swarm.state.StateView)."""
        return StateView(self.global_step, self._state_version, self.params, self.outer.momentum(), self._changing)

    async def _changing_state(self, change, *args) -> None:
        """Run `change(*args)`, which writes θ or the momentum in place, in a thread: the outer step of a large model
        takes seconds of CPU, and the event loop serves the swarm meanwhile. The state server sees the state as
        changing until it is done."""
        self.state_server.before_change()
        self._changing = True
        self._state_version += 1
        try:
            await asyncio.to_thread(change, *args)
        finally:
            self._state_version += 1
            self._changing = False

    async def catch_up(self, timeout_seconds: float = 60.0) -> bool:
        """If live peers of the run are ahead of us, take over their θ, momentum and outer step. True if we did."""
        taken = None
        for _ in range(3):  # the run may move on during a transfer: a failed one is worth a second try
            ahead, taken = await self.newer_state(timeout_seconds)
            if not ahead:
                break
            if taken is not None:
                logger.info(f"caught up with the run: outer step {self.global_step} -> {taken.outer_step}")
                await self._adopt(taken)
                break
        return taken is not None

    async def newer_state(self, timeout_seconds: float = 60.0) -> tuple[bool, RunState | None]:
        """(whether live peers are ahead of us, the newest state they agree on or None): one try, nothing adopted."""
        me = self.node.peer_id
        live = await self.matchmaker.live_peers()
        ahead = [h for h in live if h.schema == self.schema and h.outer_step > self.global_step and h.peer_id != me]
        if not ahead:
            return False, None
        donors = [h.peer_id for h in sorted(ahead, key=lambda h: -h.outer_step)]
        return True, await self._take_state(donors, lambda step, _: step > self.global_step, timeout_seconds)

    async def join_run(self, timeout_seconds: float = 60.0) -> bool:
        """On start: take over the run's state if it is ahead, and line up with its next round. True if taken.

        If the others are already forming the round of the step we took over, our first inner loop would arrive too
        late for it: we wait for that round's result instead, so that our first inner loop starts with theirs.
        """
        if not await self.catch_up(timeout_seconds):
            return False
        await self._rejoin()
        return True

    async def repair_drift(self, timeout_seconds: float = 60.0, same_step: bool = False) -> bool:
        """If most members of our last group published another θ hash than ours for that step, take their θ.

        Only the last group counts: groups of one step may legitimately hold different θ (e.g. --max-group-size).
        With `same_step`, only their θ of our own step is taken (a sharded peer's workers must stay at one step).
        """
        if self.global_step == 0 or self._last_group is None or self._last_group[0] != self.global_step:
            return False
        members = set(self._last_group[1])
        found = await self.node.dht.get(records.hash_key(self.namespace, self.global_step), latest=True)
        published = {peer: digest for peer, digest in records.parse_hashes(found).items() if peer in members}
        mine = await asyncio.to_thread(self.params_sha256)
        published[self.node.peer_id] = mine
        votes = collections.Counter(published.values())
        majority, count = votes.most_common(1)[0]
        if majority == mine or count < 2 or count <= votes[mine]:
            return False
        donors = [peer for peer, digest in published.items() if digest == majority]
        step = self.global_step
        taken = await self._take_state(
            donors,
            lambda other_step, digest: digest == majority if same_step else (other_step > step or digest == majority),
            timeout_seconds,
        )
        if taken is None:
            logger.warning(f"θ at outer step {step} differs from {count} of {len(published)} members; no donor")
            return False
        logger.warning(
            f"θ at outer step {step} differed from its group's majority ({count} of {len(published)} members):"
            f" resynced to outer step {taken.outer_step} from a peer that holds it"
        )
        await self._adopt(taken)
        return True

    async def _rejoin(self, wait_for_round: bool = False) -> None:
        """After taking over θ_s mid-step: make sure our next inner loop starts from the θ the others start from.

        With `wait_for_round` (we have nothing to contribute to round s at all), wait for the round's result whenever
        other live peers are at step s, whether they are still in their inner loop or already forming the round.

        If the others are still in their inner loop of step s, our next inner loop (from θ_s) reaches round s in
        time. If round s is being formed right now by enough peers to close it, we cannot take part (we have no Δ
        against θ_s): we say so, so nobody waits for us, and wait for the round's result θ_{s+1} instead of lagging one
        round behind forever.
        """
        step = self.global_step
        if await self.round_under_way(wait_for_round):
            await self.wait_for_round(step)

    async def round_under_way(self, wait_for_round: bool = False) -> bool:
        """Whether round `global_step` goes ahead without us, so we should wait for its result (see _rejoin)."""
        step = self.global_step
        now = get_dht_time()
        if wait_for_round:
            me = self.node.peer_id
            live = await self.matchmaker.live_peers()
            others = any(h.outer_step == step and h.schema == self.schema and h.peer_id != me for h in live)
        else:
            me = self.node.peer_id
            declared, live = await asyncio.gather(self.matchmaker.declarations(step), self.matchmaker.live_peers())
            looking = [d for d in declared if d.looking and d.schema == self.schema and d.deadline > now]
            # Peers that already formed round s (or sat it out): it is under way without us.
            formed = [d for d in declared if not d.looking and d.schema == self.schema and d.peer_id != me]
            ahead = any(h.outer_step > step and h.schema == self.schema for h in live)
            # Too few looking to average without us: they wait for more peers anyway, so we train and join them.
            others = ahead or bool(formed) or len(looking) >= self.config.matchmaking.min_group_size
        return others

    async def wait_for_round(self, step: int) -> None:
        """Sit round `step` out and take over its result once it exists (or give up after the round's bound)."""
        await self.matchmaker.sit_out(step)
        mm = self.config.matchmaking
        deadline = time.monotonic() + mm.timeout_seconds + self.config.allreduce_timeout_seconds
        while time.monotonic() < deadline:
            if await self.catch_up():
                return
            await asyncio.sleep(mm.poll_interval_seconds)
        logger.warning(f"round {step} did not finish within the bound; training on from outer step {step}")

    async def _take_state(self, donors, acceptable, timeout_seconds: float) -> RunState | None:
        """The newest state the donors agree on that passes `acceptable(step, hash)` and the DHT's majority hash."""

        async def accept(step: int, digest: str) -> bool:
            if not acceptable(step, digest):
                return False
            expected = await majority_hash(self.node, self.namespace, step)
            if expected is not None and expected != digest:
                logger.warning(f"donors offer θ of step {step} that most peers disown; not taking it")
                return False
            return True

        numel = sum(p.numel() for p in self.params)
        try:
            return await download_state(
                self.node,
                self.state_server.protocol,
                self.schema,
                list(donors),
                numel,
                accept,
                timeout_seconds,
                self.config.state_chunk_values,
            )
        except Exception as e:
            logger.warning(f"could not take the run's state from {len(donors)} donors: {e!r}")
            return None

    async def _adopt(self, state: RunState) -> None:
        momentum = None if state.momentum is None else unflatten(state.momentum, self.params)
        await self._changing_state(self.outer.load, unflatten(state.params, self.params), momentum)
        self.global_step = state.outer_step
        self.matchmaker.set_outer_step(self.global_step)
        if self.residual is not None:
            self.residual.zero_()  # errors against a θ we no longer hold

    def params_sha256(self) -> str:
        return records.params_sha256(self.params)

    async def outer_step(
        self, local: Sequence[torch.Tensor], tokens: int, delta: torch.Tensor | None = None
    ) -> OuterStepReport:
        """One DiLoCo outer step from the peer's post-inner-loop parameters; `tokens` weighs its contribution.

        `delta`, if given, is Δ = θ - local computed by the caller as one flat float32 vector (a CPU peer computes it
        over its own parameters' memory, and saves the 4 bytes per parameter of a separate Δ); it is only read."""
        if len(local) != len(self.params):
            raise ValueError(f"got {len(local)} local tensors for {len(self.params)} global parameters")
        step = self.global_step
        if delta is None:
            delta = await asyncio.to_thread(difference, self.params, local)
        started = time.perf_counter()
        if not await asyncio.to_thread(all_finite, delta):  # one pass and no mask; the count only on a bad step
            bad = int((~torch.isfinite(delta)).sum())
            error = f"pseudo-gradient of outer step {step} has {bad} NaN/inf values: not sent, sitting this round out"
            logger.error(error)
            # Sit the round out without making anyone wait, and start the next inner loop from the round's result.
            await self._rejoin(wait_for_round=True)
            return await self._advance(
                StepStatus.NONFINITE, 0, started, error=error, next_step=self.global_step == step
            )
        if tokens <= 0 or not math.isfinite(tokens):
            raise ValueError(f"tokens must be positive, got {tokens}")

        if await self.catch_up() or await self.repair_drift():
            # The run moved on without us, or our θ drifted from it: our Δ is against a θ nobody else holds.
            await self._rejoin()
            return await self._advance(StepStatus.RESYNCED, 0, started, next_step=False)
        contribution, residual = delta, None
        if self.residual is not None:
            contribution, residual = delta + self.residual, torch.empty_like(delta)
        excluded: set = set()
        # Whom we expect at this round even if the DHT does not show them: our last group, then this round's group.
        known = set(self._last_group[1]) if self._last_group is not None else set()
        attempt = 0
        while True:
            group = await self.matchmaker.form_group(step, exclude=excluded, known=known)
            if group is None or group.size == 1:
                timeout = self.config.matchmaking.timeout_seconds
                why = f"no group within {timeout:.0f}s" if group is None else "no other peer"
                logger.info(f"outer step {step + 1}: {why}, applying this peer's own pseudo-gradient")
                await self._apply_off_loop(delta, alone=True)
                return await self._advance(StepStatus.ALONE, 1, started, attempts=attempt)
            attempt += 1
            try:
                out = self.average_buffer(contribution.numel())
                result = await self.averager.all_reduce(group, contribution, float(tokens), residual, out)
                break
            except AllReduceError as e:
                self._average = None  # a failed round's decoder threads may still write into it
                if attempt > self.config.allreduce_retries:
                    error = f"outer step {step}: all-reduce with {group.size} peers failed ({e}); θ unchanged"
                    logger.warning(f"{error}, work carried into the next step")
                    status = StepStatus.ALLREDUCE_FAILED
                    return await self._advance(status, group.size, started, error=error, attempts=attempt)
                excluded |= e.suspects
                known = set(group.peer_ids) - excluded
                lost = ", ".join(str(p) for p in e.suspects) or "none identified"
                logger.warning(
                    f"outer step {step}: all-reduce with {group.size} peers failed ({e}); lost or caught members:"
                    f" {lost}; forming a new group without them"
                )
            finally:
                # Whoever this round caught sending garbage (either side of it) shares no group with us again.
                self.ban(group, self.caught_in(group))
        await self._apply_off_loop(result.averaged)
        self._last_group = (step + 1, group.peer_ids)
        if residual is not None:
            self.residual = residual
        return await self._advance(
            StepStatus.AVERAGED,
            group.size,
            started,
            result.bytes_sent,
            result.bytes_received,
            group_id=group.group_id.hex(),
            attempts=attempt,
            members=[p.to_base58() for p in group.peer_ids],
        )

    def caught_in(self, group: Group) -> dict[int, str]:
        """Members of `group` (by index) that our averager caught sending garbage, as a reducer of their
        contributions or as a member judging their averaged parts (swarm.audit), with the reason."""
        caught = self.averager.caught
        return {i: caught[peer] for i, peer in enumerate(group.peer_ids) if peer in caught}

    def ban(self, group: Group, caught: dict[int, str]) -> None:
        """Exclude the members of `group` at the indices `caught` from our groups for the rest of the run."""
        for i, reason in caught.items():
            self.matchmaker.ban(group.peer_ids[i], reason)

    def average_buffer(self, numel: int) -> torch.Tensor:
        """Where all-reduces write the average: the same vector every step, so its pages are faulted in once.

        It costs one float32 copy of this peer's θ in memory between steps, and spares the all-reduce touching
        4 bytes of fresh memory per parameter each step (a third of its time on a 2-core machine); above
        `keep_buffers_max_bytes` it is made afresh each step instead (see there)."""
        if self._average is None or self._average.numel() != numel:
            self._average = torch.empty(numel, dtype=torch.float32)
        return self._average

    async def _apply_off_loop(self, flat_delta: torch.Tensor, alone: bool = False) -> None:
        """`_apply` in a thread; a large average buffer is let go afterwards (see keep_buffers_max_bytes)."""
        await self._changing_state(self._apply, flat_delta, alone)
        average = self._average
        if average is not None and flat_delta.data_ptr() == average.data_ptr():
            if average.numel() * 4 > self.config.keep_buffers_max_bytes:
                self._average = None

    def _apply(self, flat_delta: torch.Tensor, alone: bool = False) -> None:
        """The outer step with a group's average, or (alone) with this peer's own Δ: see OuterOptimizer.step_alone."""
        if alone:
            self.outer.step_alone(unflatten(flat_delta, self.params))
        else:
            self.outer.step(unflatten(flat_delta, self.params))
        self._state_version += 1

    async def _advance(
        self,
        status,
        group_size,
        started,
        sent=0,
        received=0,
        error=None,
        next_step=True,
        group_id="",
        attempts=0,
        members=(),
    ) -> OuterStepReport:
        if next_step:
            self.global_step += 1
            self.matchmaker.set_outer_step(self.global_step)
        digest = await asyncio.to_thread(self.params_sha256)  # a second or more for a large θ: off the loop
        return OuterStepReport(
            outer_step=self.global_step,
            status=status,
            group_size=group_size,
            bytes_sent=sent,
            bytes_received=received,
            comm_seconds=time.perf_counter() - started,
            params_sha256=digest,
            error=error,
            group_id=group_id,
            attempts=attempts,
            members=list(members),
        )

    async def publish_hash(self, report: OuterStepReport) -> None:
        """Record our θ hash for this outer step in the DHT, so peers can compare (and a tool can check drift)."""
        await self.node.dht.store(
            records.hash_key(self.namespace, report.outer_step),
            report.params_sha256,
            get_dht_time() + 600,
            subkey=self.node.peer_id.to_base58(),
        )

    def state_dict(self) -> dict:
        """θ, the momentum and the residual as the live tensors, not copies: write them out (peers.checkpoint) before
        the next outer step changes them."""
        state = {"params": list(self.params), "outer": self.outer.state_dict(), "step": self.global_step}
        if self.residual is not None:
            state["residual"] = self.residual
        return state

    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError("checkpoint holds a different number of parameters")
        with torch.no_grad():
            for p, q in zip(self.params, state["params"]):
                p.copy_(q)
        self.outer.load_state_dict(state["outer"])
        self._state_version += 1
        self.global_step = int(state["step"])
        self.matchmaker.set_outer_step(self.global_step)
        if self.residual is not None and state.get("residual") is not None:
            self.residual.copy_(state["residual"])
