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

The sequence itself (checks, catching up, matchmaking, all-reduce, apply; blocking or overlapped with the next inner
loop) lives in swarm.sequence, shared with sharded peers (swarm.sharded).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
from hivemind.utils import get_dht_time

from swarm import records
from swarm.allreduce import Averager
from swarm.codec import make_codec
from swarm.flat import unflatten
from swarm.local import SoloGroup
from swarm.matchmaking import Group, Matchmaker, MatchmakingConfig
from swarm.node import SwarmNode
from swarm.outer import DEFAULT_LR, DEFAULT_MOMENTUM, MomentumRamp, OuterOptimizer
from swarm.plan import RoundPlan
from swarm.report import OuterStepReport
from swarm.sequence import OuterSequence, SequenceMethods
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
    outer_momentum_ramp: MomentumRamp | None = None
    """The momentum rising from outer_momentum as the run's inner learning rate decays (see MomentumRamp); shared
    by the group like the other outer settings."""
    outer_final_round: int | None = None
    """The run's outer step from which rounds apply the group's mean as it is, without the outer step's
    extrapolation (OuterOptimizer.lands_on_mean): swarm-peer sets the round that ends the inner decay, so a run
    that knows its length ends on the mean of its members' models. Shared by the group like the other outer
    settings; None: never."""
    round_plan: RoundPlan | None = None
    """How many inner steps each round trains (swarm.plan): round t must mean the same inner steps to every member,
    so an early phase of shorter rounds is shared by the group like the outer settings. None: the runner's H for
    every round."""
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
    entropy_coding: str = "auto"
    """Huffman code what this peer sends of each all-reduce (swarm.entropy): `auto` while its last round sent at under
    64 Mbit/s, `on`, `off`. Lossless, and each peer's own choice: members read both."""
    robust_averaging: bool = True
    """Reduce each part robustly (swarm.robust): weights bounded by the group's median, CenteredClip when some
    contribution is far from the others, garbage dropped and its sender named. With nobody out of line the result
    is the plain token-weighted mean, bit for bit; off, it always is."""
    overlap: bool = False
    """Run each round behind the next inner loop instead of before it (swarm.sequence, swarm.overlap): the
    all-reduce of step t averages while step t+1 trains. swarm-peer turns it on by default."""
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
        about = f"outer lr {self.outer_lr:g} momentum {self.outer_momentum:g}"
        if self.outer_momentum_ramp is not None:
            about = f"{about} {self.outer_momentum_ramp.describe()}"
        if self.round_plan is not None and self.round_plan.describe():
            about = f"{about}, {self.round_plan.describe()}"
        return about if self.outer_final_round is None else f"{about}, the mean from round {self.outer_final_round}"

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


@dataclass(frozen=True)
class RunRecords:
    """What the DHT said at one moment about the run at outer step `step`: the live peers' heartbeats, the θ hashes
    published for the step, and (worker 0 only) the declarations of the peers looking for its round's group; with
    our own θ's hash where a drift check is due. Read together by Swarm.read_run; the checks that take them
    (Swarm.newer_state, repair_drift, missed_round) read their own when they are missing or of another step."""

    step: int
    live: list
    hashes: object
    declarations: list | None
    mine: str | None = None


class Swarm(SequenceMethods):
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
        self.outer = OuterOptimizer(
            self.params,
            lr=config.outer_lr,
            momentum=config.outer_momentum,
            ramp=config.outer_momentum_ramp,
            final_round=config.outer_final_round,
        )
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
            entropy_coding=config.entropy_coding,
        )
        self.global_step = outer_step
        numel = sum(p.numel() for p in self.params)
        self.residual = torch.zeros(numel) if config.error_feedback else None
        self._state_version = 0  # bumped whenever θ or the momentum change
        self._changing = False  # θ or the momentum are being written in another thread
        self.state_lock = asyncio.Lock()
        """Held while θ or the momentum change (`_changing_state`), and by readers that must see them whole while a
        round may land in the background (`reading_state`)."""
        self.before_state_change: Callable[[], Awaitable[None]] | None = None
        """Awaited before θ or the momentum change: the peer's checkpoint, written from the live tensors in the
        background, finishes first (peers.checkpoint)."""
        self._last_group: tuple[int, tuple] | None = None  # (outer step after it, members) of the last average
        self._average: torch.Tensor | None = None  # see average_buffer
        self.state_server = StateServer(
            node, self.namespace, self.schema, self._snapshot, keep_copy_max_bytes=config.keep_buffers_max_bytes
        )
        self.round_called = threading.Event()
        """Set when a leader of the round this peer feeds next waits for it (it pinged us): the inner loop should end
        after its current step, so that nobody waits for us longer than one of our inner steps (see
        swarm.sequence). Cleared when the peer hands over its work."""
        self.matchmaker.on_awaited = self._on_awaited
        self.sequence = OuterSequence(self, SoloGroup())
        """The outer-step sequence of a one-worker peer; a sharded peer's workers run theirs (swarm.sharded)."""
        self._publishing: set[asyncio.Task] = set()

    @classmethod
    async def create(
        cls, node: SwarmNode, params: Sequence[torch.Tensor], config: SwarmConfig, outer_step: int = 0, layout: str = ""
    ) -> Swarm:
        self = cls(node, params, config, outer_step, layout)
        self.matchmaker.set_outer_step(outer_step)
        self.matchmaker.next_round = outer_step
        await self.averager.start()
        self.matchmaker.direct_endpoints = self.averager.direct_endpoints
        self.matchmaker.direct_key = self.averager.direct_public_key()
        await self.state_server.start()
        await self.matchmaker.start()
        return self

    async def close(self) -> None:
        await self.sequence.close()
        for task in list(self._publishing):
            task.cancel()
        await self.matchmaker.close()
        await self.state_server.close()
        await self.averager.close()

    @property
    def next_round(self) -> int:
        """The round this peer's next contribution goes to (overlapped, one past `global_step` while a round is in
        flight)."""
        step = self.matchmaker.next_round
        return self.global_step if step is None else step

    def _on_awaited(self, step: int) -> None:
        if not self.round_called.is_set():
            logger.debug(f"a leader of round {step} waits for this peer: ending the inner loop after this step")
            self.round_called.set()

    # ---- the run's state ------------------------------------------------------------------------------------------

    def _snapshot(self) -> StateView:
        """The state as newcomers see it: read in place, never copied (see swarm.state.StateView)."""
        return StateView(self.global_step, self._state_version, self.params, self.outer.momentum(), self._changing)

    async def _changing_state(self, change, *args) -> None:
        """Run `change(*args)`, which writes θ or the momentum in place, in a thread: the outer step of a large model
        takes seconds of CPU, and the event loop serves the swarm meanwhile. The state server sees the state as
        changing until it is done."""
        async with self.state_lock:
            if self.before_state_change is not None:
                await self.before_state_change()
            self.state_server.before_change()
            self._changing = True
            self._state_version += 1
            try:
                await asyncio.to_thread(change, *args)
            finally:
                self._state_version += 1
                self._changing = False

    async def reading_state(self, read, *args):
        """`read(*args)` in a thread, with θ and the momentum unchanged meanwhile (an overlapped round lands in the
        background); its result."""
        async with self.state_lock:
            return await asyncio.to_thread(read, *args)

    async def read_run(self, declarations: bool = True) -> RunRecords:
        """The DHT records that decide what becomes of the work handed over at our step, read at once: each read is a
        round trip or more over a slow link, and the hand-over stands between two inner loops (see RunRecords)."""
        step = self.global_step
        reads = [self.matchmaker.live_peers(), self.node.dht.get(records.hash_key(self.namespace, step), latest=True)]
        reads.append(self.matchmaker.declarations(step) if declarations else asyncio.sleep(0))
        # Our θ's hash (a model-size pass, in a thread) meanwhile, where repair_drift will compare it.
        reads.append(asyncio.to_thread(self.params_sha256) if self._drift_check_due() else asyncio.sleep(0))
        live, hashes, declared, mine = await asyncio.gather(*reads)
        return RunRecords(step, live, hashes, declared, mine)

    def _drift_check_due(self) -> bool:
        return self.global_step != 0 and self._last_group is not None and self._last_group[0] == self.global_step

    async def newer_state(
        self, timeout_seconds: float = 60.0, live: list | None = None
    ) -> tuple[bool, RunState | None]:
        """(whether live peers are ahead of us, the newest state they agree on or None): one try, nothing adopted.
        `live`: the heartbeats, if already read."""
        me = self.node.peer_id
        live = await self.matchmaker.live_peers() if live is None else live
        ahead = [h for h in live if h.schema == self.schema and h.outer_step > self.global_step and h.peer_id != me]
        if not ahead:
            return False, None
        donors = [h.peer_id for h in sorted(ahead, key=lambda h: -h.outer_step)]
        state = await self._take_state(donors, lambda step, _: step > self.global_step, timeout_seconds)
        if state is not None:
            state.holders = tuple(h.peer_id for h in ahead if h.outer_step == state.outer_step)
        return True, state

    async def repair_drift(self, timeout_seconds: float = 60.0, same_step: bool = False, read=None) -> bool:
        """If most members of our last group published another θ hash than ours for that step, take their θ.

        Only the last group counts: groups of one step may legitimately hold different θ (e.g. --max-group-size).
        With `same_step`, only their θ of our own step is taken (a sharded peer's workers must stay at one step).
        `read`: the RunRecords of our step, if already read.
        """
        if not self._drift_check_due():
            return False
        members = set(self._last_group[1])
        if read is not None and read.step == self.global_step and read.mine is not None:
            found, mine = read.hashes, read.mine
        else:  # our hash (a model-size pass, in a thread) while the DHT answers: this check runs before every round
            found, mine = await asyncio.gather(
                self.node.dht.get(records.hash_key(self.namespace, self.global_step), latest=True),
                asyncio.to_thread(self.params_sha256),
            )
        published = {peer: digest for peer, digest in records.parse_hashes(found).items() if peer in members}
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

    async def missed_round(self, step: int, read: RunRecords | None = None) -> bool:
        """Whether round `step` went ahead without us (Matchmaker.round_progress): formed by enough peers of the run
        that nobody looks for it any more, or held already. We came too late for it (swarm.sequence takes its result
        and carries our work on). `read`: the RunRecords of that step, if already read."""
        fresh = read is not None and read.step == step and read.declarations is not None
        if fresh:
            found, live = read.declarations, read.live
        else:
            found, live = await asyncio.gather(self.matchmaker.declarations(step), self.matchmaker.live_peers())
        progress, _ = self.matchmaker.round_progress(step, found, live, get_dht_time())
        return progress is not None

    async def live_others(self) -> int:
        """How many other live peers of the run could average with us."""
        me = self.node.peer_id
        return len({h.peer_id for h in await self.matchmaker.live_peers() if h.schema == self.schema} - {me})

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
        if state.holders:
            # The peers that held this θ stand in for the group we would have averaged with: our next search waits
            # for them even if the DHT does not show them (a newcomer's view of it may be partial for a while), and
            # our next drift check compares with them.
            self._last_group = (state.outer_step, state.holders)
        if self.residual is not None:
            self.residual.zero_()  # errors against a θ we no longer hold

    def params_sha256(self) -> str:
        return records.params_sha256(self.params)

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
        self.let_go_of_average(flat_delta)

    def let_go_of_average(self, applied: torch.Tensor) -> None:
        """After an outer step that read `applied`: if it was the average buffer and that is larger than
        `keep_buffers_max_bytes`, let it go (the next round makes a new one)."""
        average = self._average
        if average is not None and applied.data_ptr() == average.data_ptr():
            if average.numel() * 4 > self.config.keep_buffers_max_bytes:
                self._average = None

    def _apply(self, flat_delta: torch.Tensor, alone: bool = False) -> None:
        """The outer step with a group's average, or (alone) with this peer's own Δ: see OuterOptimizer.step_alone."""
        if alone:
            self.outer.step_alone(unflatten(flat_delta, self.params))
        else:
            self.outer.step(unflatten(flat_delta, self.params), at=self.global_step)
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

    def publish_later(self, report: OuterStepReport) -> None:
        """Publish our θ hash for the report's step in the background (advisory: a failure only costs a drift
        check), so that the round's members find each other's hashes at their next step."""

        # Now, not when the task runs: a sharded peer's caller puts the full θ's hash into its report afterwards.
        frozen = OuterStepReport(report.outer_step, report.status, 0, params_sha256=report.params_sha256)

        async def publish() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.publish_hash(frozen), 10)

        task = asyncio.create_task(publish())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

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
        self.matchmaker.next_round = self.global_step
        if self.residual is not None and state.get("residual") is not None:
            self.residual.copy_(state["residual"])
