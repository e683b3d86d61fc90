"""The volunteer's training loop: inner loop in a thread, outer step in the swarm, metrics and checkpoints.

`Peer.run()` only sequences phases; each phase lives in its own module (inner.py, swarm.Swarm, checkpoint.py,
metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from peers import device as devices
from peers import memory
from peers.checkpoint import Checkpointer
from peers.data import EMBEDDED as EMBEDDED_DATA
from peers.data import TokenBatcher, data_seed, load_text_dataset
from peers.evaluate import EvalConfig, Evaluator
from peers.exportable import RunFacts, model_facts, shard_rows
from peers.inner import InnerConfig, InnerLoop, InnerResult, called_slack
from peers.looplag import LoopLag
from peers.metrics import MetricsWriter
from peers.model import EMBEDDED as EMBEDDED_MODEL
from peers.model import load_model
from peers.monitoring import PeerMonitor
from peers.prefetch import Prefetcher
from swarm import NodeConfig, OuterStepReport, StepStatus, Swarm, SwarmConfig, SwarmNode, records
from swarm.monitor import MonitorConfig
from swarm.plan import RoundPlan
from swarm.state import StateView

logger = logging.getLogger(__name__)


@dataclass
class PeerConfig:
    node: NodeConfig
    swarm: SwarmConfig
    inner: InnerConfig = field(default_factory=InnerConfig)
    inner_steps: int = 30
    """H: inner AdamW steps between outer steps."""
    batch_size: int = 8
    seq_len: int = 128
    model: str = EMBEDDED_MODEL
    dataset: str = EMBEDDED_DATA
    seed: int = 0
    """Seeds θ0 (the same on every peer of a run) and, mixed with the peer id, the data order."""
    outer_steps: int | None = None
    """Stop after this process trained this many outer steps' worth of rounds: outer_steps x inner_steps inner steps
    (early rounds are shorter, so more of them: swarm.plan); None trains until stopped."""
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    metrics_file: str | None = None
    progress: bool | None = None
    """Progress bar: True, False, or None for 'only on a terminal'."""
    precision: str = "fp32"
    """Precision of the inner steps' compute: fp32 or bf16. θ, the outer optimizer and AdamW's state stay fp32."""
    device: str = "auto"
    """Where the model, its gradients and AdamW's moments live: auto, cpu, cuda or cuda:N (peers.device). θ and the
    outer optimizer stay fp32 on the host."""
    workers: int = 1
    """Local workers the model is sharded over (FSDP); 1 trains the whole model in this process."""
    overlap_max_lag: float = 1.0
    """Overlapped (swarm.overlap): the share of an inner loop after which the loop waits for the round in flight if
    it has not landed yet. The later a round lands, the longer the loop trains from a guess of θ, and the more
    quality it costs (README, Overlap); 1: the loop never waits (the hand-over at its end does)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def data_position(state: dict) -> tuple[int, dict | None]:
    """(batches the peer had trained on, where its next batch starts) of a checkpoint; older ones have no cursor."""
    return int(state.get("data_position", 0)), state.get("data_cursor")


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.stop_requested = threading.Event()
        self.node: SwarmNode | None = None
        self.swarm: Swarm | None = None
        self.metrics: MetricsWriter | None = None
        self.monitor: PeerMonitor | None = None
        self.evaluator: Evaluator | None = None
        self.loop_lag: LoopLag | None = None
        self.checkpointer = (
            Checkpointer(config.checkpoint_dir, config.keep_checkpoints) if config.checkpoint_dir else None
        )
        self.loaded = load_model(config.model, config.seed)
        if self.loaded.max_positions is not None and config.seq_len > self.loaded.max_positions:
            raise ValueError(f"--seq-len {config.seq_len} exceeds the model's {self.loaded.max_positions} positions")
        config.inner.validate(config.batch_size)
        checkpointable = getattr(self.loaded.model, "supports_gradient_checkpointing", False)
        if config.inner.activation_checkpointing and not checkpointable:
            raise ValueError(f"--activation-checkpointing: {config.model} does not support it")
        self.device = devices.resolve(config.device)
        devices.configure(self.device)
        self.model = self.loaded.model.to(self.device)
        # A one-worker CPU peer keeps its parameters in one vector, where it computes Δ for the outer step in place.
        cpu_alone = self.device.type == "cpu" and config.workers == 1
        self._flat_params = devices.flatten_parameters(self.model) if cpu_alone else None
        self.dataset = load_text_dataset(config.dataset)
        self.completed_steps = 0
        self._pending_tokens = 0  # tokens of inner work not yet folded into θ (carried after a failed all-reduce)
        self._outer_peak_mb: float | None = None
        self._peak_rss_mb: float | None = None
        self._checkpoint_wait_seconds = 0.0  # how long the inner loop waited for checkpoint writes this step
        self._model_step: int | None = 0  # the outer step whose θ the model holds exactly; None: it holds local work
        self._model_facts = model_facts(self.loaded, config.model, config.seed)  # full shapes: before any sharding
        self._run_facts = RunFacts()
        self._unsaved = True  # something a checkpoint would hold changed since the last one was started
        self._loop_steps = 0  # inner steps taken in the loop under way: how far in a landing round finds it
        self.plan = config.swarm.round_plan or RoundPlan(config.inner_steps)
        if self.plan.inner_steps != config.inner_steps:
            raise ValueError(f"the round plan's H ({self.plan.inner_steps}) is not inner_steps ({config.inner_steps})")
        self._loop_length = config.inner_steps  # inner steps the loop under way (or the last one) was to train
        self._planned_steps = 0  # inner steps the loops this process started were to train, together
        self._lag_waited = 0.0  # how long the loop under way (or the last one) waited for the round in flight
        self._landed_at: float | None = None  # the share of that loop trained when its round in flight landed
        self._checkpoint_holds_model = False  # the checkpoint in flight holds the model's own parameters
        self._peak_flops = devices.peak_bf16_flops(self.device)
        self._params = sum(p.numel() for p in self.model.parameters())

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def start(self) -> list[str]:
        """Join the swarm; returns this peer's own addresses for others to join through."""
        self.loop_lag = LoopLag.start()
        self.node = await SwarmNode.create(self.config.node)
        params = [p.detach() for p in self.model.parameters()]
        self.swarm = await Swarm.create(self.node, params, self.config.swarm)
        self._serve_old_states_from_checkpoints()
        self._checkpoints_guard_state()
        data_position = await asyncio.to_thread(self._restore)  # gigabytes to read for a large model
        if await self.swarm.join_run():
            # The run is ahead of us (a newcomer, or a checkpoint older than the swarm): start from its θ.
            await asyncio.to_thread(self._load_global_into_model)
            self._pending_tokens = 0
        self._make_batches(*data_position)
        self.inner = self._make_inner_loop()
        if self._restored_inner_state is not None:
            self.inner.optimizer.load_state_dict(self._restored_inner_state)
        if self.config.metrics_file:
            self.metrics = MetricsWriter(self.config.metrics_file)
        await self._start_observing()
        return await self.node.visible_maddrs()

    async def _start_observing(self, speaks_for_peer: bool = True) -> None:
        """Held-out evaluation on every worker (a sharded model's forward pass needs them all); status records,
        Prometheus and the dashboard only where the peer speaks (worker 0 of a sharded peer)."""
        if self.config.eval.dataset is not None:
            self.evaluator = await asyncio.to_thread(
                Evaluator, self.config.eval, self.model, self.loaded.tokenizer, self.config.batch_size,
                self.config.seq_len, self.inner.device, self.inner.autocast_dtype,
            )  # fmt: skip
        if speaks_for_peer:
            swarm = getattr(self.swarm, "swarm", self.swarm)  # a ShardedSwarm speaks through worker 0's Swarm
            self.monitor = await PeerMonitor.create(self.config.monitor, self.node, swarm, self.config.swarm.run_id)

    def _checkpoints_guard_state(self) -> None:
        """θ and the momentum change only once the checkpoint being written from them is done (an overlapped round
        lands in the background, while the checkpoint of the round before may still be writing)."""
        if self.checkpointer is not None:
            getattr(self.swarm, "swarm", self.swarm).before_state_change = self.checkpointer.wait_async

    def _make_batches(self, position: int, cursor: dict | None) -> None:
        batcher = TokenBatcher(
            self.dataset,
            self.loaded.tokenizer,
            self.config.batch_size,
            self.config.seq_len,
            seed=data_seed(self.config.seed, self.node.peer_id.to_bytes()),  # every peer and worker: its own order
            skip_batches=position,  # only for a checkpoint without a cursor (older ones): replayed
            cursor=cursor,
        )
        self.batches = Prefetcher(batcher, self.device)

    def _make_inner_loop(self) -> InnerLoop:
        autocast = torch.bfloat16 if self.config.precision == "bf16" else None
        return InnerLoop(self.model, self.batches, self.config.inner, autocast_dtype=autocast)

    def _restore(self) -> tuple[int, dict | None]:
        """Load the newest checkpoint, if any; returns its data position (batches, and the cursor if it has one)."""
        self._restored_inner_state = None
        if self.checkpointer is None:
            return 0, None
        found = self.checkpointer.load_latest()
        if found is None:
            return 0, None
        state, path = found
        if state.get("run_id") != self.config.swarm.run_id:
            raise ValueError(
                f"--checkpoint-dir holds a checkpoint of run {state.get('run_id')!r}, not {self.config.swarm.run_id!r}:"
                " use another directory"
            )
        self.swarm.load_state_dict(state["swarm"])
        self._restore_model(state)
        self._restored_inner_state = state["inner_optimizer"]
        self._pending_tokens = int(state.get("pending_tokens", 0))
        self._run_facts = RunFacts.from_checkpoint(state)
        logger.info(f"resumed from {path} at outer step {self.swarm.global_step}")
        return data_position(state)

    def _serve_old_states_from_checkpoints(self) -> None:
        """A newcomer's transfer that outlasts our outer step finishes from our checkpoint of the step it started on,
        read in place (swarm.state.StateServer.archive): a large state is never copied in memory for it."""
        if self.checkpointer is not None:
            getattr(self.swarm, "swarm", self.swarm).state_server.archive = self._archived_state

    def _archived_state(self, step: int) -> StateView | None:
        """θ and the outer momentum of `step` from this process's checkpoint of it, mapped rather than loaded."""
        if self.checkpointer.writing:
            return None
        state = self.checkpointer.load(step, mmap=True)
        if state is None or int(state["swarm"].get("step", -1)) != step:
            return None
        params = list(state["swarm"]["params"])
        buffers = state["swarm"]["outer"].get("state", {})
        momentum = [buffers.get(i, {}).get("momentum_buffer") for i in range(len(params))]
        return StateView(step, -1, params, None if any(m is None for m in momentum) else momentum)

    def _restore_model(self, state: dict) -> None:
        """The model of a checkpoint: its own parameters, or θ where the checkpoint says the model held θ (then it
        stores only the model's buffers)."""
        model_is_theta = bool(state.get("model_is_theta", False))
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or (missing and not model_is_theta):
            raise ValueError(f"the checkpoint's model does not fit --model: missing {missing}, unexpected {unexpected}")
        if model_is_theta:
            self._load_global_into_model()
        else:
            self._model_step = None

    async def run(self) -> None:
        """Train until stopped or until the configured number of outer steps is done."""
        total = None if self.config.outer_steps is None else self.config.outer_steps * self.config.inner_steps
        bar = tqdm(total=total, unit="step", disable=self._progress_disabled(), dynamic_ncols=True)
        with logging_redirect_tqdm():  # log lines print above the bar instead of through it
            try:
                if self.loop_lag is not None:
                    self.loop_lag.take()  # the first step's figure covers the step, not the start
                await self._train(bar)
            finally:
                bar.close()
                await self._final_checkpoint()

    async def _train(self, bar: tqdm) -> None:
        """Inner loop, outer step, records: the phases in order. Overlapped (SwarmConfig.overlap), the round of an
        inner loop's work finishes during the next inner loop, so its record is written one loop later; the work
        waiting for its round queues in `waiting`, and each report that comes back closes the oldest."""
        waiting: list[tuple[InnerResult, float]] = []  # (inner loop result, when its outer step began)
        kept = None  # the interrupted inner loop, whose work the model keeps
        while not await self._stop_now():
            if (
                self.config.outer_steps is not None
                and self._planned_steps >= self.config.outer_steps * self.plan.inner_steps
            ):
                break
            bar.set_description(f"outer step {self.swarm.global_step + 1}")
            step_started = time.perf_counter()
            result = await self._combine(await asyncio.to_thread(self._inner_loop, bar))
            if self.checkpointer is not None:
                await self.checkpointer.wait_async()  # it reads the model and θ, which the outer step changes
            if result.interrupted:
                flight = "; finishing the round in flight" if waiting else ""
                logger.info(f"stopping: inner loop interrupted{flight}")
                kept = result
                break
            logger.info(
                f"outer step {self.swarm.global_step + 1}: inner loop done ({result.steps} steps,"
                f" {result.seconds:.1f}s), averaging"
            )
            waiting.append((result, step_started))
            waited = time.perf_counter()
            reports = await self._outer_step(result)
            wait = time.perf_counter() - waited
            for report in reports:
                # The round that flew during the loop: it merged into the model at _landed_at, or at the loop's end;
                # and the loop's wait for it.
                first = report is reports[0]
                landed = (1.0 if self._landed_at is None else self._landed_at) if first else None
                await self._close_step(*waiting.pop(0), report, wait + (self._lag_waited if first else 0.0), landed)
            await self._start_inner_loop()
        report = await self.swarm.finish()  # the round in flight finishes with its group before we leave
        # Work that no round applied (the interrupted loop's, or a failed round's that the swarm carries) stays in
        # the model, against θ, as a blocking peer's interrupted loop does: the checkpoint keeps it with its tokens,
        # and the next Δ (after a restart, too) carries it. Overlapped, the model starts where the loop started, or
        # at its guess when no loop ran after the last hand-over.
        keep = kept is not None or self.swarm.carries_work
        if keep:
            await self._before_model_change()
            tokens = self._pending_tokens + (0 if kept is None else kept.tokens)
            done = 0.0 if kept is None else self._loop_steps / self._loop_length
            self._pending_tokens = await asyncio.to_thread(self.swarm.settle, self._local_params(), tokens, done)
            self._model_step, self._unsaved = None, True
            what = "the interrupted inner loop's partial work" if kept is not None else "work no round applied"
            logger.info(f"stopping: {what} ({self._pending_tokens} tokens) is kept in the checkpoint")
        elif report is not None:  # overlapped: the model takes the θ of the round it waited for
            await self._after_round(report, sum(r.tokens for r, _ in waiting))
        if report is not None:
            await self._close_step(*waiting.pop(0), report, 0.0)

    async def _close_step(
        self, result: InnerResult, step_started: float, report: OuterStepReport, wait: float, landed=None
    ):
        """Evaluate, record and checkpoint the outer step whose round `report` describes. `landed`: overlapped, the
        share of the next inner loop trained when the round's θ merged into the model (None: no loop followed it)."""
        facts = await self._step_facts(report)
        facts["eval_loss"] = await self._evaluate(report)
        facts["tokens_per_second"] = round(result.tokens / max(time.perf_counter() - step_started, 1e-9), 2)
        facts["wait_seconds"] = round(wait, 4)
        if landed is not None and report.overlapped and report.status in (StepStatus.AVERAGED, StepStatus.ALONE):
            facts["landed_at"] = round(landed, 4)
        facts.update(self._throughput_facts(result))
        record = self._record(result, report, facts)
        if self.checkpointer is not None:
            # Under the state lock, in a thread: a round landing in the background (overlapped) has either changed θ
            # already or waits for this checkpoint (before_state_change), never writes θ while it is being read.
            await self.swarm.reading_state(self._save_checkpoint)
        if self.monitor is not None:
            await self.monitor.observe(record, self._run_facts.tokens)
        self.completed_steps += 1

    async def _start_inner_loop(self) -> None:
        """Overlapped: the model moves to where the next inner loop starts (swarm.sequence); blocking, it stays."""
        if not self.config.swarm.overlap:
            return
        await self._before_model_change()
        await self.swarm.start_inner_loop(self._local_params())
        self._model_step = None

    def _throughput_facts(self, result: InnerResult) -> dict:
        """Tokens per second of the inner loop alone, and on a GPU of known peak its model FLOP utilisation."""
        rate = result.tokens / max(result.seconds, 1e-9)
        facts = {"inner_tokens_per_second": round(rate, 2)}
        if self.loop_lag is not None:
            facts["event_loop_stall_seconds"] = round(self.loop_lag.take(), 3)  # the longest of this outer step
        if self.checkpointer is not None and self.checkpointer.last_write is not None:
            # The newest write that finished (the previous outer step's, written during this step's inner loop).
            facts["checkpoint_step"], seconds = self.checkpointer.last_write
            facts["checkpoint_seconds"] = round(seconds, 3)
            facts["checkpoint_wait_seconds"] = round(self._checkpoint_wait_seconds, 3)
            self._checkpoint_wait_seconds = 0.0
        if self._peak_flops is not None:
            peak, name = self._peak_flops
            # Every worker of a sharded peer has its own GPU: the peer's peak is theirs together.
            facts["mfu"] = round(devices.mfu(self._params_total(), rate, peak * self._workers()), 4)
            facts["device_name"] = name
        return facts

    def _params_total(self) -> int:
        """Parameters of the whole model (a sharded peer's workers each hold some of them)."""
        return self._params

    def _workers(self) -> int:
        return 1

    async def _stop_now(self) -> bool:
        """Whether to stop before the next outer step (a sharded peer's workers decide together)."""
        return self.stop_requested.is_set()

    async def _combine(self, result: InnerResult) -> InnerResult:
        """The peer's inner-loop result from this process's (a sharded peer combines its workers')."""
        return result

    def _progress_disabled(self) -> bool | None:
        return None if self.config.progress is None else not self.config.progress

    def _inner_loop(self, bar: tqdm) -> InnerResult:
        started = time.perf_counter()

        seen = {"tokens": 0, "shown": 0.0}

        def on_step(loss: torch.Tensor, tokens: int) -> None:
            seen["tokens"] += tokens
            self._loop_steps += 1
            bar.update(1)
            now = time.perf_counter()
            if bar.disable or now - seen["shown"] < 1.0:
                return  # reading the loss waits for the device: once a second, and only for a bar that shows
            seen["shown"] = now
            rate = seen["tokens"] / max(now - started, 1e-9)
            bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{rate:,.0f}", refresh=False)

        # The round this loop feeds: overlapped, the previous one may still be in flight, θ one step behind.
        first_step = self.plan.first_step(self.swarm.next_round)
        self._loop_length = self.plan.length(self.swarm.next_round)
        self._planned_steps += self._loop_length
        self._model_step, self._unsaved, self._loop_steps, self._lag_waited = None, True, 0, 0.0
        self._landed_at = None
        wait = self._wait_for_checkpoint if self.checkpointer is not None else None
        # This process's first loop is never called short: peers that start seconds apart are not slow, and a round
        # of one full loop among loops of a step or two looks like an outlier to the robust reducers, which caught
        # and excluded an honest peer that way (rounds of 10 steps, two peers called after one step).
        called = self._called_flag() if self._planned_steps > self._loop_length else None
        flags = (self._stop_flag(), on_step, first_step, called, self.swarm.carries_work)
        slack = called_slack(self._loop_length, self.plan.inner_steps)
        result = self.inner.run(
            self._loop_length, *flags, before_step=self._before_step, before_update=wait, slack=slack
        )
        memory.trim()  # the gradients are freed: let the outer step have their memory
        # Waiting for the round is not compute: the record counts it as waiting for the swarm.
        return replace(result, seconds=result.seconds - self._lag_waited)

    def _before_step(self) -> None:
        """Overlapped: once the round in flight has landed, the model merges onto its θ, by how much of the inner
        loop it has trained since (see swarm.overlap). At `overlap_max_lag` of the loop, it waits for the round."""
        if self.config.swarm.overlap and self._loop_steps == self._lag_steps():
            started = time.perf_counter()
            self._await_round()
            self._lag_waited = time.perf_counter() - started
            if self._lag_waited > 0.01:
                logger.debug(f"the round in flight landed {self._lag_waited:.2f}s after {self._loop_steps} steps")
        if self._shift_due():
            moved = self.swarm.shift_inner_loop(self._local_params(), self._loop_steps / self._loop_length)
            if self._landed_at is None:  # not moved at its first chance: the loop started on the round's θ
                self._landed_at = self._loop_steps / self._loop_length if moved else 0.0

    def _lag_steps(self) -> int:
        """The inner step before which the loop waits for the round in flight (none when it is the loop's end).

        An early round's short loop (swarm.plan) waits before its first step, so it starts from the round's θ as a
        blocking loop does: there the guess is furthest off, and a round that lands a step in costs most (the 5.6M
        model, seed 0: overlapped 1.9871 against blocking 1.9210, and 1.9851 against 1.9087 in one process)."""
        if self._loop_length < self.plan.inner_steps:
            return 0
        return math.ceil(self.config.overlap_max_lag * self._loop_length - 1e-9)

    def _await_round(self) -> None:
        """Wait until no round is in flight (a sharded peer's workers wait at the same step, then agree anew on
        whether to shift)."""
        self.swarm.round_over.wait()

    def _shift_due(self) -> bool:
        return self.swarm.shift_ready.is_set()

    def _wait_for_checkpoint(self) -> None:
        """Before an optimizer step: the checkpoint still being written reads the parameters and moments it changes."""
        if self.checkpointer.writing:
            started = time.perf_counter()
            self.checkpointer.wait()
            self._checkpoint_wait_seconds += time.perf_counter() - started

    def _stop_flag(self):
        """What the inner loop checks before every step (a sharded peer's workers must all stop at the same one)."""
        return self.stop_requested

    def _called_flag(self):
        """Set when the round this loop feeds is being formed and waits for us: the loop ends after its current step
        (at least one), so a slower peer is averaged in with the steps it managed rather than held up for."""
        return self.swarm.round_called

    def _local_params(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters()]

    def _theta_of(self, report: OuterStepReport) -> list[torch.Tensor]:
        """θ as of `report`: the model's copy when it holds it (overlapped, the swarm's θ may move on meanwhile, as
        the next round lands), else the swarm's."""
        return self._local_params() if self._model_step == report.outer_step else self.swarm.params

    async def _step_facts(self, report: OuterStepReport) -> dict:
        """What the metrics record says beyond the report: the layout-independent θ hash, the outer step's memory."""
        theta = self._theta_of(report)
        read = self.swarm.reading_state if theta is self.swarm.params else asyncio.to_thread
        digests = await read(lambda: [records.row_digests(p) for p in theta])
        return {
            "theta_sha256": records.theta_sha256(digests),
            "workers": 1,
            "outer_step_peak_mb": self._outer_peak_mb,
            "peak_rss_mb": self._peak_rss_mb,
        }

    async def _outer_step(self, result: InnerResult) -> list[OuterStepReport]:
        """Hand the inner loop's work to the swarm; the reports of the rounds that finished (see _train)."""
        local = self._local_params()
        tokens = self._pending_tokens + result.tokens
        if result.steps > 0 and not math.isfinite(result.loss):
            # Make sure a poisoned step never reaches anyone: NaN loss means NaN parameters or moments.
            logger.error(f"inner loss was not finite at outer step {self.swarm.global_step}")
        # The peak since the last reset: the inner loop, and the checkpoint written while it ran.
        inner_peak = memory.peak_rss_bytes()
        before = memory.rss_bytes()
        measured = await asyncio.to_thread(memory.reset_peak)  # clearing the page flags of GBs takes a moment
        delta = None
        if self._flat_params is not None and not self.config.swarm.overlap:
            # Blocking, Δ in the model's own memory. Overlapped, the swarm keeps a vector of its own for the work in
            # flight, which it computes from the model.
            delta = self._flat_params
            await asyncio.to_thread(self._delta_in_place)
        try:
            reports = await self.swarm.submit(local, tokens, delta, result.steps / self._loop_length)
        except BaseException:
            if delta is not None:
                self._local_from_delta()  # never leave Δ where the model's parameters belong
            raise
        if delta is not None and not any(r.restart_from_global for r in reports):
            await asyncio.to_thread(self._local_from_delta)
        peak = memory.peak_rss_bytes()
        # Memory the outer step added on top of what the process held before it (θ, model, optimizer states).
        self._outer_peak_mb = round((peak - before) / 2**20, 2) if measured and peak and before else None
        peaks = [b for b in (inner_peak, peak) if b]
        self._peak_rss_mb = round(max(peaks) / 2**20, 1) if peaks else None
        # Overlapped, the swarm keeps the work from now on; blocking, until a report says it took it.
        self._pending_tokens = 0 if self.config.swarm.overlap else tokens
        for report in reports:
            await self._after_round(report, tokens)
        return reports

    async def _after_round(self, report: OuterStepReport, tokens: int) -> None:
        """The model takes θ for evaluation and checkpoints (overlapped, `start_inner_loop` then moves it to where
        the next inner loop starts); blocking, a failed round leaves the work in the model, its tokens pending."""
        if report.restart_from_global:
            await self._load_theta()
            self._pending_tokens = 0
        else:
            self._pending_tokens = tokens
        if report.status == StepStatus.NONFINITE:
            self.inner.reset_optimizer()

    async def _evaluate(self, report: OuterStepReport) -> float | None:
        """Held-out loss of θ when it is due. After a failed all-reduce the model holds local work, not θ, and after
        the run moved on (a resync right after the round) the model holds a later θ: skipped."""
        if self.evaluator is None or self._model_step != report.outer_step:
            return None
        if not self.evaluator.config.due(self.plan.first_step(report.outer_step), self.plan.inner_steps):
            return None
        loss = await asyncio.to_thread(self.evaluator.loss)
        return loss if math.isfinite(loss) else None

    @torch.no_grad()
    def _delta_in_place(self) -> None:
        """Overwrite the model's parameters with Δ = θ - local (the same float operation the outer step would do)."""
        self._model_step = None
        for p, theta in zip(self.model.parameters(), self.swarm.params, strict=True):
            torch.sub(theta, p, out=p)

    @torch.no_grad()
    def _local_from_delta(self) -> None:
        """The local parameters back from Δ after a step that keeps them (θ unchanged): θ - Δ. Equal to what they were
        up to the last bit of θ's magnitude where θ - local was rounded; the next Δ carries this step's work."""
        for p, theta in zip(self.model.parameters(), self.swarm.params, strict=True):
            torch.sub(theta, p, out=p)

    @property
    def _model_is_theta(self) -> bool:
        """Whether the model holds θ exactly (built from the same seed, or θ copied into it)."""
        return self._model_step is not None

    async def _load_theta(self) -> None:
        """θ into the model, in a thread; a round landing in the background (overlapped) waits until it is copied."""
        await self._before_model_change()
        await self.swarm.reading_state(self._load_global_into_model)

    async def _before_model_change(self) -> None:
        """A checkpoint still writing out the model's own parameters (they were not θ) finishes first."""
        if self.checkpointer is not None and self._checkpoint_holds_model:
            await self.checkpointer.wait_async()

    @torch.no_grad()
    def _load_global_into_model(self) -> None:
        for p, g in zip(self.model.parameters(), self.swarm.params, strict=True):
            p.copy_(g)
        self._model_step = self.swarm.global_step

    def _record(self, result: InnerResult, report: OuterStepReport, facts: dict) -> dict:
        record = {
            "run_id": self.config.swarm.run_id,
            "peer_id": self.node.peer_id.to_base58(),
            "outer_step": report.outer_step,
            "loss": result.loss if math.isfinite(result.loss) else None,
            "tokens": result.tokens,
            "group_size": report.group_size,
            "status": report.status.value,
            "group": report.group_id,
            "attempts": report.attempts,
            "bytes_sent": report.bytes_sent,
            "bytes_received": report.bytes_received,
            "inner_steps": result.steps,
            "compute_seconds": round(result.seconds, 4),
            "comm_seconds": round(report.comm_seconds, 4),
            "overlapped": report.overlapped,
            "params_sha256": report.params_sha256,
            **facts,
            "time": time.time(),
        }
        if report.error:
            record["error"] = report.error
        if self.metrics is not None:
            self.metrics.write(record)
        held_out = f", held-out {facts['eval_loss']:.4f}" if facts.get("eval_loss") is not None else ""
        logger.info(
            f"outer step {report.outer_step}: loss {result.loss:.4f}{held_out},"
            f" group {report.group_size} ({report.status.value}),"
            f" sent {report.bytes_sent / 1e6:.2f} MB, received {report.bytes_received / 1e6:.2f} MB,"
            f" comm {report.comm_seconds:.2f}s, compute {result.seconds:.2f}s, θ {report.params_sha256[:12]}"
        )
        self._run_facts.remember(record, report.members)  # for the exported model card (peers.exportable)
        return record

    def _save_checkpoint(self) -> None:
        """Start writing a checkpoint of the current state in the background, from the live tensors (no copies).

        What it holds must not change until it is written: the inner loop waits for it before its first optimizer
        step, the outer step before it changes θ (see peers.checkpoint)."""
        if self.checkpointer is None or self.swarm is None or not hasattr(self, "inner"):
            return
        self._unsaved = False
        self._checkpoint_holds_model = not self._model_is_theta
        self.checkpointer.save_in_background(self._checkpoint_state(), self.swarm.global_step)

    async def _final_checkpoint(self) -> None:
        """On the way out: a checkpoint of what changed since the last one (e.g. an interrupted inner loop's work),
        and the write in flight finished."""
        if self.checkpointer is None:
            return
        await self.checkpointer.wait_async()
        if self._unsaved:
            self._save_checkpoint()
            await self.checkpointer.wait_async()

    def _checkpoint_state(self) -> dict:
        return {
            "run_id": self.config.swarm.run_id,
            **self._layout_state(),
            "swarm": self.swarm.state_dict(),
            # A model that holds θ exactly is not saved twice: a third less to write, and to hold while it is read.
            "model_is_theta": self._model_is_theta,
            "model": self._model_state(with_params=not self._model_is_theta),
            "inner_optimizer": self._optimizer_state(),
            "data_position": self.batches.position,
            "data_cursor": self.batches.cursor,
            "pending_tokens": self._pending_tokens,
            "export": self._export_facts(),
        }

    def _layout_state(self) -> dict:
        return {}

    def _model_state(self, with_params: bool) -> dict:
        """The model's state dict (live tensors), without its parameters when they are θ's (buffers only)."""
        params = {p.data_ptr() for p in self.model.parameters()}
        return {k: v for k, v in self.model.state_dict().items() if with_params or v.data_ptr() not in params}

    def _optimizer_state(self) -> dict:
        return self.inner.optimizer.state_dict()

    def _export_facts(self) -> dict:
        """What `swarm-export` needs besides θ: the model, which rows of it this checkpoint holds, the run's facts."""
        index, count = self._shard()
        local_shapes = [tuple(p.shape) for p in self.swarm.params]
        rows = shard_rows(self._model_facts["full_shapes"], local_shapes, index, count)
        return {**self._model_facts, "shard": [index, count], "rows": rows, "run": self._run_facts.to_dict()}

    def _shard(self) -> tuple[int, int]:
        """(index, count) of the part of θ this process holds: the whole of it here."""
        return 0, 1

    async def close(self) -> None:
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.close)
        if getattr(self, "batches", None) is not None:
            self.batches.close()
        if self.loop_lag is not None:
            await self.loop_lag.close()
        if self.monitor is not None:
            await self.monitor.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.swarm is not None:
            await self.swarm.close()
        if self.node is not None:
            await self.node.close()
