"""The outer-step sequence of a peer, whether it holds its whole model or one shard of it: the one place where a
round is run.

One call of `OuterSequence.submit(local, tokens)` after every inner loop:
1. the pseudo-gradient of the inner loop (plus any work carried from earlier), checked finite on every worker;
2. catching up with the run if it is ahead, taking the group's θ back if ours drifted from it;
3. the round: matchmaking (worker 0 finds the group for the peer), the all-reduce of every worker's shard, the
   workers' agreement on the outcome, and the outer step on θ; a member lost mid-round is left out of a new group
   for the same step (`allreduce_retries`).

Blocking (`SwarmConfig.overlap` off), the round runs before `submit` returns, and the next inner loop starts from the
new θ. Overlapped, the round runs in the background while the next inner loop trains: `submit` waits for the round
of the previous call (usually long done: the wait is the only communication time the compute sees), launches this
one, and `start_inner_loop` writes where the next inner loop starts (swarm.overlap: our guess of θ after the round in
flight; `shift_inner_loop` merges the inner loop onto the real θ once the round lands). The shared state stays θ:
every member of a group applies the same average to the same θ, so θ is bit-identical across the group, and θ is what
hashes, state transfer and checkpoints carry. The guess and the merge are local and go nowhere.

Work that no round applied is never lost and never applied in part: a failed round applies nothing, and its
pseudo-gradient goes into the next contribution with its tokens; so does the work of a peer that finds the run one
round ahead (it came too late for that round). Every worker of a sharded peer calls every method in the same order;
the round in flight meets the other workers on a channel of its own (LocalGroup.rounds).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from swarm.allreduce import AllReduceError
from swarm.flat import all_finite, difference, unflatten
from swarm.matchmaking import RoundHeld
from swarm.overlap import merge, merge_share, to_start_point
from swarm.report import OuterStepReport, StepStatus
from swarm.wire import ProtocolError

if TYPE_CHECKING:
    from swarm.diloco import Swarm

logger = logging.getLogger(__name__)

MAX_STALE_ROUNDS = 2
"""How many rounds behind the run a peer's work may be and still be averaged: a peer slower than the run's rounds
(its inner steps longer than the others' whole inner loop) brings its work to the round under way after taking the
run's θ. Older work is dropped: its Δ is against a θ the run left too long ago."""

MIN_MATCHMAKING_BUDGET_SECONDS = 5.0
"""The least an overlapped round looks for its group, however short the inner loop: a few DHT polls and join
requests, so that peers a moment apart still meet."""


@dataclass
class _Work:
    """This peer's inner-loop work that no round applied yet, or the shift that moves its inner loop onto θ.

    `state`:
    - "flight": `vector` is the pseudo-gradient the round in flight averages; the inner loop started from the guess
      swarm.overlap makes from it (θ and the momentum are still those it was launched against);
    - "landed": the round was applied; `vector` is θ after it minus the guess, the shift with which the inner loop
      merges onto θ between two steps (swarm.overlap.merge; `shifted` once it did);
    - "carried": no round took the pseudo-gradient in `vector` (a failed round, or one that went ahead without us); it
      goes into the next contribution, and the inner loop started from the guess (or from θ if `alone` is None).
    """

    vector: torch.Tensor
    state: str
    tokens: int
    alone: bool | None
    """How the inner loop's start point was guessed (swarm.overlap.to_start_point); None: it started from θ."""
    guessed_at: int = 0
    """The run's outer step of the round the guess foresaw: its outer settings (a momentum ramp) rebuild the start
    point later, after a failed round has moved the step on."""
    shifted: bool = False
    landed_alone: bool = False
    """The round applied our own Δ (nobody to average with): θ is our own inner result, which the guess foresaw."""

    @property
    def tokens_carried(self) -> int:
        return self.tokens if self.state == "carried" else 0


class OuterSequence:
    """matchmaking -> all-reduce -> outer step, for a `Swarm` and the workers of its peer (LocalGroup or SoloGroup)."""

    def __init__(self, swarm: Swarm, workers):
        self.swarm, self.workers = swarm, workers
        self.overlap = swarm.config.overlap
        self._round: asyncio.Task | None = None
        self._work: _Work | None = None
        self._last_call: float | None = None  # when submit() was last called: the inner loop's length follows
        self._alone: bool | None = None  # whether our last round had nobody else (before any: who is live decides)
        self.shift_ready = threading.Event()
        """Set when the round in flight has landed and the inner loop may take its shift (`shift_inner_loop`)."""
        self.round_over = threading.Event()
        """Set while no round is in flight: it landed, failed or was cut off (an inner loop that may not run further
        ahead of its round waits for this; then `shift_ready` says whether there is a shift to take)."""
        self.round_over.set()
        self._error: torch.Tensor | None = None  # our guess's error s (see _judged), a buffer reused each round

    # ---- agreeing on state ----------------------------------------------------------------------------------------

    async def catch_up(self, timeout_seconds: float = 60.0, read=None) -> bool:
        """If the run is ahead, every worker takes over its shard of the same newer state, or none does. `read`: the
        RunRecords of our step, if already read (Swarm.read_run)."""
        swarm = self.swarm
        for attempt in range(3):  # the run may move on during a transfer: a failed one is worth a second try
            live = read.live if read is not None and attempt == 0 else None
            ahead, state = await swarm.newer_state(timeout_seconds, live)
            seen = await self.workers.all_gather((ahead, None if state is None else state.outer_step))
            if not any(a for a, _ in seen):
                return False
            steps = {s for _, s in seen}
            if len(steps) == 1 and None not in steps:
                logger.info(f"caught up with the run: outer step {swarm.global_step} -> {state.outer_step}")
                await swarm._adopt(state)
                self._next_round(swarm.global_step)
                return True
            if self.workers.size > 1:
                logger.info(f"workers took different states of the run ({[s for _, s in seen]}); trying again")
        return False

    async def join_run(self, timeout_seconds: float = 60.0) -> bool:
        """On start: take over the run's state if it is ahead, and line up with its next round. True if taken.

        If the others are already forming the round of the step we took over, our first inner loop would arrive too
        late for it: we wait for that round's result instead, so that our first inner loop starts with theirs.
        """
        taken = await self.catch_up(timeout_seconds)
        if taken:
            await self._rejoin()
        self._next_round(self.swarm.global_step)
        return taken

    async def _rejoin(self, wait_for_round: bool = False) -> None:
        """After taking over θ_s mid-step: make sure our next inner loop starts from the θ the others start from.

        If the others are still in their inner loop of step s, our next inner loop (from θ_s) reaches round s in
        time. If round s is being formed right now by enough peers to close it, we cannot take part (we have no Δ
        against θ_s): we say so, so nobody waits for us, and wait for the round's result θ_{s+1} instead of lagging
        one round behind forever. With `wait_for_round` (we have nothing to contribute to round s at all), we wait
        whenever other live peers are at step s, in their inner loop or already forming the round.
        """
        swarm = self.swarm
        step = swarm.global_step
        under_way = await swarm.round_under_way(wait_for_round) if self.workers.rank == 0 else None
        if not await self.workers.broadcast(under_way):
            return
        await swarm.matchmaker.sit_out(step)
        mm = swarm.config.matchmaking
        deadline = time.monotonic() + mm.timeout_seconds + swarm.config.allreduce_timeout_seconds
        while True:
            if await self.catch_up():
                return
            # Worker 0's clock decides, so every worker runs the same number of rounds of collectives.
            if not await self.workers.broadcast(time.monotonic() < deadline):
                break
            await asyncio.sleep(mm.poll_interval_seconds)
        logger.warning(f"round {step} did not finish within the bound; training on from outer step {step}")

    async def repair_drift(self, read=None) -> bool:
        """Take the θ most members of our last group hold if ours differs (see Swarm.repair_drift); every worker
        checks its own shard, and a sharded peer takes only θ of its own step, so its workers stay at one step."""
        repaired = await self.swarm.repair_drift(same_step=self.workers.size > 1, read=read)
        repaired = any(await self.workers.all_gather(repaired))
        if repaired:
            self._next_round(self.swarm.global_step)
        return repaired

    def _next_round(self, step: int) -> None:
        """The round this peer's next contribution goes to: a leader of that round that pings us ends our inner
        loop early (Swarm.round_called), and our answers say we are coming. A call for the round before is void."""
        if self.swarm.matchmaker.next_round != step:
            self.swarm.round_called.clear()
        self.swarm.matchmaker.next_round = step

    # ---- the outer step -------------------------------------------------------------------------------------------

    async def submit(
        self, local: Sequence[torch.Tensor], tokens: int, delta: torch.Tensor | None = None, done: float = 1.0
    ) -> list[OuterStepReport]:
        """Hand over this worker's part of the inner loop's result; `tokens` is the whole peer's count. `delta`, if
        given, is θ - local that the caller computed as one flat float32 vector (Swarm.outer_step); it is only read,
        and a copy is kept where the sequence needs it past this call (overlapped, or carried work). `done`: the
        share of a full inner loop that this one trained (less than 1 for a loop cut short); overlapped, a round in
        flight that lands only after the loop ended merges by it (see shift_inner_loop).

        Returns the reports of the rounds finished by this call, oldest first, one per earlier call: blocking, this
        call's; overlapped, the previous call's round (none on the first call), then this call's own if it ran no
        round (it sat out or resynced)."""
        swarm = self.swarm
        if len(local) != len(swarm.params):
            raise ValueError(f"got {len(local)} local tensors for {len(swarm.params)} global parameters")
        if tokens < 0 or not math.isfinite(tokens) or (tokens == 0 and not self.carries_work):
            raise ValueError(f"tokens must be positive (or 0 with carried work), got {tokens}")
        now = time.perf_counter()
        inner_seconds = None if self._last_call is None else now - self._last_call
        self._last_call = now
        previous = await self.finish()
        reports = [] if previous is None else [previous]
        swarm.round_called.clear()
        step = swarm.global_step
        started = time.perf_counter()
        # A model-size pass or two: in a thread, while the event loop serves the swarm.
        delta, owned, tokens, error = await asyncio.to_thread(self._contribution, local, tokens, delta, done)

        bad = await asyncio.to_thread(lambda: 0 if all_finite(delta) else int((~torch.isfinite(delta)).sum()))
        bad_per_worker = await self.workers.all_gather(bad)
        if any(bad_per_worker):
            where = ", ".join(f"worker {i}: {n}" for i, n in enumerate(bad_per_worker) if n)
            error = f"pseudo-gradient of outer step {step} has NaN/inf ({where}): not sent, sitting this round out"
            logger.error(error)
            # Sit the round out without making anyone wait, and start the next inner loop from the round's result.
            await self._rejoin(wait_for_round=True)
            self._next_round(swarm.global_step)
            status, next_step = StepStatus.NONFINITE, swarm.global_step == step
            return [*reports, await self._report(status, 0, started, error=error, next_step=next_step)]

        # The run may have moved on without us (we were too slow for its rounds, or away): then our Δ is against a θ
        # it left. Up to MAX_STALE_ROUNDS behind, it is still our work on nearly the run's θ: we take the run's θ
        # and bring the work to its current round (or, if that round went ahead without us too, to the next one).
        # Further behind, or when our θ drifted from our group's (repair_drift), the work is dropped.
        read = await swarm.read_run(declarations=self.workers.rank == 0)  # the checks below, their reads at once
        caught_up = await self.catch_up(read=read)
        repaired = not caught_up and await self.repair_drift(read)
        if repaired or swarm.global_step - step > MAX_STALE_ROUNDS:
            if not repaired:
                logger.warning(
                    f"the run is {swarm.global_step - step} rounds ahead of this peer's work: dropped (it averages"
                    f" work at most {MAX_STALE_ROUNDS} rounds old)"
                )
            await self._rejoin()
            return [*reports, await self._report(StepStatus.RESYNCED, 0, started, next_step=False)]
        missed = await swarm.missed_round(swarm.global_step, read) if self.workers.rank == 0 else None
        if await self.workers.broadcast(missed):
            logger.info(f"outer step {swarm.global_step + 1}: formed without this peer; taking its result")
            await self._rejoin(wait_for_round=True)
            if swarm.global_step - step <= MAX_STALE_ROUNDS:
                self._work = _Work(delta if owned else await asyncio.to_thread(delta.clone), "carried", tokens, None)
            return [*reports, await self._report(StepStatus.RESYNCED, 0, started, next_step=False)]
        step = swarm.global_step

        alone = await self._expect_alone() if self.overlap else None
        if self.overlap and not owned:  # overlapped, the guess is written over it while the caller's memory moves on
            delta = await asyncio.to_thread(delta.clone)
        self._work = _Work(delta, "flight", tokens, alone, guessed_at=step)
        self.shift_ready.clear()
        self._next_round(step + 1)
        budget = self._matchmaking_budget(inner_seconds)
        self.round_over.clear()
        self._round = asyncio.create_task(self._run_round(step, delta, tokens, started, budget, error))
        self._round.add_done_callback(lambda _: self.round_over.set())
        if not self.overlap:
            reports.append(await self.finish())
        return reports

    @property
    def carries_work(self) -> bool:
        """Whether we hold work that no round took yet (a failed round's, or one that went ahead without us): the
        next round is worth joining with it even before a new inner step."""
        return self._work is not None and self._work.state == "carried"

    async def finish(self) -> OuterStepReport | None:
        """Wait for the round in flight, if any, and return its report (θ is updated by then)."""
        if self._round is None:
            return None
        task, self._round = self._round, None
        return await task

    def _contribution(
        self, local: Sequence[torch.Tensor], tokens: int, delta: torch.Tensor | None, done: float = 1.0
    ) -> tuple[torch.Tensor, bool, int, torch.Tensor | None]:
        """The pseudo-gradient of the inner loop that ended at `local`, plus any carried work; whether the sequence
        owns that vector (False: it is the caller's `delta`, θ - local, only to be read); its tokens; and the error
        s of our guess of the θ that the loop merged onto, if the round was a group's and the all-reduce audits its
        parts (see `_judged`)."""
        work, self._work = self._work, None
        params = self.swarm.params
        if work is None:  # the inner loop started from θ
            return (difference(params, local), True, tokens, None) if delta is None else (delta, False, tokens, None)
        segments = unflatten(work.vector, params)
        given = None if delta is None else unflatten(delta, params)
        # A round that landed only now merges as if at the loop's end: by the share of a loop it trained, so that a
        # loop cut short after a few steps (a slow peer awaited), which undid little of the guess's error, shifts
        # nearly all the way, as it would have mid-loop.
        share = self._merge_share(work, min(1.0, max(0.0, done)))
        error = None
        # work.vector is s, θ minus the guess, until below; kept only for the audit (robust averaging) to judge by.
        if work.state == "landed" and not work.landed_alone and self.swarm.averager.robust:
            if self._error is None or self._error.numel() != work.vector.numel():
                self._error = torch.empty_like(work.vector)
            error = self._error.copy_(work.vector)
        for i, (seg, x) in enumerate(zip(segments, local, strict=True)):
            theta = params[i].reshape(seg.shape)
            if given is not None:  # the caller's θ − where the loop ended
                ended = given[i].reshape(seg.shape)
                if work.state == "landed" and work.shifted:
                    seg.copy_(ended)
                elif work.state == "landed":  # θ − (where it ended + c·s): the merge as at the loop's end
                    seg.mul_(-share).add_(ended)
                elif work.alone is None:
                    seg.add_(ended)
                else:
                    seg.add_(self._start_of(work, i, seg)).sub_(theta).add_(ended)
                continue
            x = x.detach().to(device="cpu", dtype=torch.float32).reshape(seg.shape)
            if work.state == "landed":  # θ − (where the loop ended, merged onto θ if it was not yet)
                if work.shifted:
                    seg.copy_(theta).sub_(x)
                else:
                    seg.mul_(-share).add_(theta).sub_(x)
            else:  # carried: where the loop started, plus the carried pseudo-gradient, minus where it ended
                seg.add_(self._start_of(work, i, seg)).sub_(x)
        return work.vector, True, tokens + work.tokens_carried, error

    def _start_of(self, work: _Work, index: int, segment: torch.Tensor) -> torch.Tensor:
        """Where the inner loop started, for parameter `index`, while `work` holds a pseudo-gradient."""
        theta = self.swarm.params[index]
        if work.alone is None:
            return theta.reshape(segment.shape)
        start = segment.clone()
        to_start_point(self.swarm.outer, index, start, work.alone, work.guessed_at)
        return start

    async def start_inner_loop(self, local: Sequence[torch.Tensor]) -> None:
        """Overlapped: write where the next inner loop starts into `local`: our guess of θ after the round in flight
        (swarm.overlap), or θ itself when no round is in flight or it has landed already. In a thread, holding the
        swarm's state lock: the round in flight lands either before (we start from its θ) or after (we start from
        the guess, and shift later), never halfway through. Blocking, the caller restarts from θ when the report
        says so (`restart_from_global`)."""
        if not self.overlap:
            return
        async with self.swarm.state_lock:
            work = self._work
            if work is not None and work.state == "landed":
                work.shifted = True  # we start on θ: nothing to shift
            await asyncio.to_thread(self._write_start, local, work)

    @torch.no_grad()
    def _write_start(self, local: Sequence[torch.Tensor], work: _Work | None) -> None:
        params = self.swarm.params
        if work is None or work.state == "landed" or work.alone is None:
            for x, p in zip(local, params, strict=True):
                x.copy_(p.reshape(x.shape))
            return
        for i, (x, seg) in enumerate(zip(local, unflatten(work.vector, params), strict=True)):
            x.copy_(self._start_of(work, i, seg).reshape(x.shape))

    def shift_inner_loop(self, local: Sequence[torch.Tensor], done: float = 1.0) -> bool:
        """Between two inner steps, once the round in flight has landed (`shift_ready`): merge the inner loop onto
        θ (swarm.overlap.merge), `done` being the share of the inner loop trained since it started from our guess.
        θ stays as it is until our next `submit`: only a round landing or a catch-up changes it, both within one.
        For the inner loop's thread; True if it moved."""
        work = self._work
        if not self.shift_ready.is_set() or work is None or work.state != "landed" or work.shifted:
            return False
        share = self._merge_share(work, done)
        for x, seg in zip(local, unflatten(work.vector, self.swarm.params), strict=True):
            merge(x, seg.reshape(x.shape).to(device=x.device, dtype=x.dtype), share)
        work.shifted = True
        return True

    def settle(self, local: Sequence[torch.Tensor], tokens: int, done: float) -> int:
        """On the way out, once no round is in flight: write into `local` θ minus all the work that no round
        applied (an interrupted loop's, merged onto θ as a hand-over would, plus any carried work), so that the
        caller keeps it in its model: the next Δ against θ (after a restart, too) carries it. `tokens`: those of the
        work in `local`; `done`: the share of a full inner loop it trained (0 if none ran since the last hand-over).
        Returns the tokens of all the work kept. For the caller's thread."""
        if self._round is not None:
            raise RuntimeError("finish the round in flight before settling")
        if self._work is None:
            return tokens  # the loop started from θ: `local` is θ minus its work already
        delta, _, tokens, _ = self._contribution(local, tokens, None, done)
        for x, p, seg in zip(local, self.swarm.params, unflatten(delta, self.swarm.params), strict=True):
            x.copy_((p.reshape(seg.shape) - seg).reshape(x.shape))
        return tokens

    @staticmethod
    def _merge_share(work: _Work, done: float) -> float:
        """c of the merge onto θ (swarm.overlap), the share of the guess's error the model takes: all of it after a
        round that applied our own Δ alone, where that error is not noise that the loop has undone but the outer
        step's extrapolation of our own Δ (none at all when we guessed that we would be alone)."""
        return 1.0 if work.landed_alone else merge_share(done)

    async def _expect_alone(self) -> bool:
        """Whether we expect this round to have nobody else: our last round had nobody, or before any, no other peer
        of the run is live. Worker 0 decides for the peer."""
        alone = None
        if self.workers.rank == 0:
            alone = self._alone if self._alone is not None else await self.swarm.live_others() == 0
        return await self.workers.broadcast(alone)

    def _matchmaking_budget(self, inner_seconds: float | None) -> float | None:
        """How long an overlapped round may look for its group: its result is due when our next inner loop ends,
        about as long as the last one; half of that goes to matchmaking, the rest is left for the all-reduce. A late
        peer (see Swarm.round_called) that misses it averages its work in the next round. Blocking, or before we
        know how long an inner loop takes: the matchmaking timeout."""
        if not self.overlap or inner_seconds is None:
            return None
        timeout = self.swarm.config.matchmaking.timeout_seconds
        return min(timeout, max(MIN_MATCHMAKING_BUDGET_SECONDS, 0.5 * inner_seconds))

    async def _run_round(
        self,
        step: int,
        delta: torch.Tensor,
        tokens: int,
        started: float,
        budget: float | None,
        error: torch.Tensor | None = None,
    ) -> OuterStepReport:
        swarm, workers = self.swarm, self.workers.rounds
        contribution, residual = delta, None
        if swarm.residual is not None:
            contribution, residual = delta + swarm.residual, torch.empty_like(delta)
        judged = None if error is None else await asyncio.to_thread(self._judged, contribution, error)
        excluded: set = set()
        # Whom we expect at this round even if the DHT does not show them: our last group, then this round's group.
        known = set(swarm._last_group[1]) if swarm._last_group is not None else set()
        regroup: set = set()  # the other members of this round's failed try
        attempt = 0
        while True:
            group = None
            if workers.rank == 0:
                group = await swarm.matchmaker.form_group(
                    step, exclude=excluded, known=known, timeout=budget, regroup=regroup
                )
            group = await workers.broadcast(group)
            if isinstance(group, RoundHeld):
                return await self._held_without_us(step, delta, tokens, started, attempt)
            if group is None or group.size == 1:
                timeout = budget or swarm.config.matchmaking.timeout_seconds
                why = f"no group within {timeout:.0f}s" if group is None else "no other peer"
                logger.info(f"outer step {step + 1}: {why}, applying this peer's own pseudo-gradient")
                await self._land(delta, delta, alone=True)
                return await self._report(StepStatus.ALONE, 1, started, attempts=attempt)
            attempt += 1
            outcome, result, shard_group = await self._average_shard(
                group, contribution, float(tokens), residual, judged
            )
            outcomes = await workers.all_gather(outcome)
            if workers.rank == 0:  # it finds our groups: caught in any shard's round, a peer shares none again
                swarm.ban(group, {i: reason for *_, caught in outcomes for i, reason in caught.items()})
            if all(ok for ok, *_ in outcomes):
                break
            suspects = {group.peer_ids[i] for _, lost, *_ in outcomes for i in lost}
            if workers.size == 1:
                errors = outcomes[0][2]
            else:
                errors = "; ".join(f"shard {i}: {err}" for i, (ok, _, err, _) in enumerate(outcomes) if not ok)
            if attempt > swarm.config.allreduce_retries:
                error = f"outer step {step}: all-reduce with {group.size} peers failed ({errors}); θ unchanged"
                logger.warning(f"{error}, work carried into the next step")
                self._failed()
                return await self._report(
                    StepStatus.ALLREDUCE_FAILED, group.size, started, error=error, attempts=attempt
                )
            excluded |= suspects
            known = regroup = set(group.peer_ids) - excluded
            lost = ", ".join(str(p) for p in suspects) or "none identified"
            logger.warning(
                f"outer step {step}: all-reduce with {group.size} peers failed ({errors}); lost or caught members:"
                f" {lost}; forming a new group without them"
            )
        # Before landing: from θ's change to the step's advance (_report) nothing waits, so whoever reads θ under the
        # state lock (Swarm.reading_state) sees θ and the outer step that go together.
        traffic = await workers.all_gather((result.bytes_sent, result.bytes_received))
        await self._land(delta, result.averaged, alone=False)
        swarm._last_group = (step + 1, shard_group.peer_ids)
        if residual is not None:
            swarm.residual = residual
        return await self._report(
            StepStatus.AVERAGED,
            group.size,
            started,
            sum(s for s, _ in traffic),
            sum(r for _, r in traffic),
            group_id=group.group_id.hex(),
            attempts=attempt,
            members=[p.to_base58() for p in group.peer_ids],  # the peers (their worker 0), not our shard's nodes
        )

    async def _held_without_us(
        self, step: int, delta: torch.Tensor, tokens: int, started: float, attempts: int
    ) -> OuterStepReport:
        """The round went ahead without us while we looked for it (matchmaking.RoundHeld): nothing is applied, and
        our work goes into the next round, as after a failed round. Blocking, we take the run's θ at once, so that
        the next inner loop starts where the others' do; overlapped, our next inner loop already started from a
        guess made against our θ, so the hand-over computes the contribution against it and then catches up."""
        logger.info(f"outer step {step + 1}: held without this peer; its work goes into the next round")
        if self.overlap:
            self._failed()
        else:
            # Our Δ may be the caller's memory, into which the caller now copies θ.
            self._work = _Work(await asyncio.to_thread(delta.clone), "carried", tokens, None)
            await self.catch_up()
        return await self._report(StepStatus.MISSED, 0, started, attempts=attempts, next_step=False)

    async def _report(self, *args, **kwargs) -> OuterStepReport:
        report = await self.swarm._advance(*args, **kwargs)
        report.overlapped = self.overlap
        report.carried_tokens = 0 if self._work is None else self._work.tokens_carried
        self.swarm.publish_later(report)
        return report

    async def _land(self, delta: torch.Tensor, average: torch.Tensor, alone: bool) -> None:
        """Apply the round's outcome to θ (the group's `average`, or `alone` our own Δ). Overlapped, our inner loop
        started from a guess of that θ: keep, in place of our pseudo-gradient, the shift from the guess (computed
        from the θ and momentum it was made with) to the new θ, and let the inner loop merge with it. The model-size
        work runs in a thread, as one change of the state (Swarm._changing_state)."""
        swarm, work = self.swarm, self._work
        ours = work is not None and work.vector is delta and work.alone is not None
        if not ours and work is not None and work.vector is delta:
            self._work = None  # blocking: the next inner loop starts from the new θ
        await swarm._changing_state(self._land_in_place, work if ours else None, average, alone)
        swarm.let_go_of_average(average)
        self._alone = alone
        if ours:
            work.state, work.landed_alone = "landed", alone
            self.shift_ready.set()

    def _land_in_place(self, work: _Work | None, average: torch.Tensor, alone: bool) -> None:
        swarm = self.swarm
        if work is not None and average is work.vector:
            average = average.clone()  # alone, our Δ is what θ takes: keep it from the guess written over it
        if work is not None:
            for i, seg in enumerate(unflatten(work.vector, swarm.params)):
                to_start_point(swarm.outer, i, seg, work.alone, work.guessed_at)
                seg.neg_()
        swarm._apply(average, alone=alone)
        if work is not None:
            for seg, p in zip(unflatten(work.vector, swarm.params), swarm.params, strict=True):
                seg.add_(p.reshape(seg.shape))

    def _failed(self) -> None:
        """Nothing applied: θ stays, and our pseudo-gradient goes into the next contribution. Blocking, it is in the
        caller's local parameters still, which the next Δ covers; overlapped, the swarm keeps it."""
        if self.overlap and self._work is not None:
            self._work.state = "carried"
        else:
            self._work = None

    @staticmethod
    def _judged(contribution: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """What the audit judges the round's averaged parts by (swarm.audit): our contribution with the direction of
        our guess's error s taken out, written over `error`.

        Every member's guess was off by its own last Δ's distance from the group's mean, so the errors cancel one
        another by construction: the others' Δ's carry their shares of theirs, which sum to about -s times ours.
        Judged against its Δ, a member whose Δ lies along s (its share (1 − c)·s of the error, and a loop cut short
        after a step or two, whose update mostly carries on the last loop's direction through AdamW's momentum) sees
        the honest average lean away from it: in CI a sharded peer cut after 1 of 4 steps took its partner's honest
        average for a lie (lean -0.07, floor 0.039), and with the error share alone taken out, a newcomer's peer cut
        after 1 of 10 steps still did (-0.184, floor -0.091). Along every other direction the others' Δ's share with
        ours what a blocking round's do."""
        along = float(torch.dot(contribution, error))
        length = float(torch.dot(error, error))
        if not length > 0:
            return error.copy_(contribution)
        return error.mul_(-along / length).add_(contribution)

    async def _average_shard(self, group, contribution, weight, residual, judged=None):
        """(ok, indices of lost members, error, {index: why} of members caught sending garbage) and the result of
        this worker's shard round. Indices are the members' in `group`: a shard group lists the same peers' nodes."""
        swarm = self.swarm
        try:
            shard_group = group.for_shard(self.workers.rank)
        except ProtocolError as e:
            return (False, [], str(e), {}), None, None
        try:
            out = swarm.average_buffer(contribution.numel())
            result = await swarm.averager.all_reduce(shard_group, contribution, weight, residual, out, judged=judged)
            return (True, [], "", swarm.caught_in(shard_group)), result, shard_group
        except AllReduceError as e:
            swarm._average = None  # a failed round's decoder threads may still write into it
            lost = [shard_group.peer_ids.index(p) for p in e.suspects if p in shard_group.peer_ids]
            return (False, lost, str(e), swarm.caught_in(shard_group)), None, shard_group

    async def close(self) -> None:
        """Stop a round still in flight: the peer leaves without it (nothing of it is applied)."""
        task, self._round = self._round, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=10)


class SequenceMethods:
    """The outer-step methods of a peer's swarm: `Swarm` (one worker) and `ShardedSwarm` (each worker of a sharded
    peer) both hand them to their `OuterSequence`, so the two expose the same calls, written once."""

    sequence: OuterSequence

    async def outer_step(
        self, local: Sequence[torch.Tensor], tokens: int, delta: torch.Tensor | None = None
    ) -> OuterStepReport | None:
        """One DiLoCo outer step from this worker's parameters after the inner loop; `tokens` (the whole peer's)
        weighs its contribution.

        `delta`, if given, is Δ = θ - local computed by the caller as one flat float32 vector (a CPU peer computes it
        over its own parameters' memory, and saves the 4 bytes per parameter of a separate Δ); it is only read.

        Blocking, the report of this step's round. Overlapped (SwarmConfig.overlap), the newest report of a round
        finished by this call (None on the first call): the round of the previous call, usually; then
        `start_inner_loop` says where the next inner loop starts. `submit` gives every report."""
        reports = await self.sequence.submit(local, tokens, delta)
        return reports[-1] if reports else None

    async def submit(
        self, local: Sequence[torch.Tensor], tokens: int, delta: torch.Tensor | None = None, done: float = 1.0
    ) -> list[OuterStepReport]:
        """Hand over the inner loop's result; the reports of the rounds this call finished (OuterSequence.submit)."""
        return await self.sequence.submit(local, tokens, delta, done)

    async def start_inner_loop(self, local: Sequence[torch.Tensor]) -> None:
        """Write where the next inner loop starts into `local` (θ, or overlapped, θ plus our share of the round in
        flight)."""
        await self.sequence.start_inner_loop(local)

    def shift_inner_loop(self, local: Sequence[torch.Tensor], done: float = 1.0) -> bool:
        """Between two inner steps, once the round in flight has landed (`shift_ready`): merge `local` onto θ,
        `done` being the share of the inner loop trained since it started from our guess (swarm.overlap). True if
        it moved."""
        return self.sequence.shift_inner_loop(local, done)

    def settle(self, local: Sequence[torch.Tensor], tokens: int, done: float) -> int:
        """On the way out: keep all the work no round applied in `local`, against θ (OuterSequence.settle); its
        tokens."""
        return self.sequence.settle(local, tokens, done)

    @property
    def shift_ready(self) -> threading.Event:
        return self.sequence.shift_ready

    @property
    def round_over(self) -> threading.Event:
        """Set while no round is in flight (OuterSequence.round_over)."""
        return self.sequence.round_over

    async def finish(self) -> OuterStepReport | None:
        """Wait for the round in flight (overlapped), if any; its report."""
        return await self.sequence.finish()

    @property
    def carries_work(self) -> bool:
        """Whether work of ours waits for a round (see OuterSequence.carries_work): an inner loop called by the
        round may end before its first step."""
        return self.sequence.carries_work

    async def catch_up(self, timeout_seconds: float = 60.0) -> bool:
        """If live peers of the run are ahead of us, take over their θ, momentum and outer step (every worker its
        shard of the same state, or none does). True if we did."""
        return await self.sequence.catch_up(timeout_seconds)

    async def join_run(self, timeout_seconds: float = 60.0) -> bool:
        """On start: take over the run's state if it is ahead, and line up with its next round. True if taken
        (OuterSequence.join_run)."""
        return await self.sequence.join_run(timeout_seconds)
