"""Worker i of a peer whose model is sharded over n local workers with FSDP2 (`swarm-peer --nproc-per-node n`).

The phases are the one-worker peer's (peers.runner), done by every worker in step with the others:
- the inner loop is FSDP: every worker trains on its own batches, gradients are reduced among the workers;
- the outer step is `swarm.sharded.ShardedSwarm`: every worker averages and updates only its own rows of θ;
- checkpoints: every worker saves its own shard (`step-N.shard{i}of{n}.pt`); on restart the workers agree on the
  newest step all of them can load;
- metrics: worker 0 writes one record per outer step for the peer, with the hash of the full θ (records.theta_sha256,
  computed from every worker's row digests, so the model is never gathered).

Every decision that could differ between workers (stop now or not, which checkpoint, the group) is agreed through
the peer's LocalGroup before anyone acts on it: FSDP's collectives hang if one worker takes a step the others skip.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import replace

import torch

from peers.checkpoint import Checkpointer
from peers.exportable import RunFacts
from peers.inner import InnerLoop, InnerResult
from peers.looplag import LoopLag
from peers.metrics import MetricsWriter
from peers.parallelize import local_shards, localize, optimizer_state_from_local, shard_model
from peers.runner import Peer, PeerConfig, data_position
from swarm import OuterStepReport, SwarmNode
from swarm.local import LocalGroup
from swarm.sharded import ShardedSwarm

logger = logging.getLogger(__name__)


def worker_node_config(node, rank: int):
    """Worker i's node: its own identity file and, for fixed ports, port + i (worker 0 keeps the given ones)."""
    if rank == 0:
        return node

    def shift(maddr: str) -> str:
        return re.sub(
            r"/tcp/(\d+)", lambda m: f"/tcp/{int(m.group(1)) + rank}" if m.group(1) != "0" else m.group(0), maddr
        )

    identity = None if node.identity_path is None else f"{node.identity_path}.worker{rank}"
    return replace(
        node,
        host_maddrs=[shift(m) for m in node.host_maddrs],
        announce_maddrs=[shift(m) for m in node.announce_maddrs],
        identity_path=identity,
    )


class _AgreedStop:
    """The inner loop's stop flag, true on every worker as soon as it is true on one (checked once per step), and
    with it, in the same collective: whether the round waits for the peer (only worker 0 hears it: `called`), and
    whether the round in flight has landed on every worker (`shift`: the workers shift their shards together)."""

    def __init__(self, local: LocalGroup, event, called, shift_ready):
        self.local, self.event, self.called, self.shift_ready = local, event, called, shift_ready
        self.enough, self.shift = _Cached(), _Cached()

    def is_set(self) -> bool:
        flags = self.event.is_set(), self.called.is_set(), not self.shift_ready.is_set()
        stop, self.enough.value, waiting = self.local.any_blocking(*flags)
        self.shift.value = not waiting
        return stop


class _Cached:
    """`_AgreedStop`'s second flag, as agreed in its last check (the inner loop checks the stop flag first)."""

    value = False

    def is_set(self) -> bool:
        return self.value


class ShardedPeer(Peer):
    def __init__(self, config: PeerConfig, local: LocalGroup):
        self.local = local
        super().__init__(config)  # the model is on this worker's device (peers.device) from here
        shard_model(self.model, config.precision)
        if config.checkpoint_dir:
            self.checkpointer = Checkpointer(config.checkpoint_dir, config.keep_checkpoints, (local.rank, local.size))
        if local.rank != 0:
            self.config.metrics_file = None  # worker 0 writes the peer's record

    async def start(self) -> list[str]:
        self.loop_lag = LoopLag.start()
        self.node = await SwarmNode.create(worker_node_config(self.config.node, self.local.rank))
        full_shapes = [tuple(p.shape) for p in self.model.parameters()]
        shards = [t.detach().cpu() for t in local_shards(self.model)]
        self.swarm = await ShardedSwarm.create(self.node, shards, self.config.swarm, self.local, full_shapes)
        self._serve_old_states_from_checkpoints()
        self._checkpoints_guard_state()
        data_position = await self._restore_sharded()
        if await self.swarm.join_run():
            await asyncio.to_thread(self._load_global_into_model)
            self._pending_tokens = 0
        self._make_batches(*data_position)
        self.inner = self._make_inner_loop()
        if self._restored_inner_state is not None:
            self.inner.optimizer.load_state_dict(
                optimizer_state_from_local(self.inner.optimizer, self._restored_inner_state)
            )
        if self.config.metrics_file:
            self.metrics = MetricsWriter(self.config.metrics_file)
        await self._start_observing(speaks_for_peer=self.local.rank == 0)
        return await self.node.visible_maddrs()

    def _make_inner_loop(self) -> InnerLoop:
        # FSDP's mixed-precision policy sets the compute precision (peers.parallelize); no autocast on top.
        return InnerLoop(self.model, self.batches, self.config.inner, device=self.device)

    async def _restore_sharded(self) -> tuple[int, dict | None]:
        """Every worker loads its shard of the newest step that all workers can load; returns its data position."""
        self._restored_inner_state = None
        if self.checkpointer is None:
            return 0, None
        self.checkpointer.remove_stale()
        others = self.checkpointer.other_layouts() if not self.checkpointer.steps() else []
        everyone = await self.local.all_gather((self.checkpointer.steps(), others))
        common = set.intersection(*(set(steps) for steps, _ in everyone))
        if not common and any(o for _, o in everyone) and not any(steps for steps, _ in everyone):
            raise ValueError(
                f"--checkpoint-dir {self.config.checkpoint_dir} holds checkpoints of another worker layout"
                f" ({everyone[0][1][0]}, ...); use the --nproc-per-node they were saved with, or another directory"
            )
        for step in sorted(common, reverse=True):
            state = self.checkpointer.load(step)
            ok = state is not None and state.get("layout") == [self.local.rank, self.local.size]
            if ok and state.get("run_id") != self.config.swarm.run_id:
                raise ValueError(
                    f"--checkpoint-dir holds a checkpoint of run {state.get('run_id')!r},"
                    f" not {self.config.swarm.run_id!r}: use another directory"
                )
            if all(await self.local.all_gather(ok)):
                self.swarm.load_state_dict(state["swarm"])
                if state.get("model_is_theta", False):
                    self._load_global_into_model()
                else:
                    with torch.no_grad():
                        for shard, saved in zip(local_shards(self.model), state["model"], strict=True):
                            shard.copy_(saved)
                    self._model_step = None
                self._restored_inner_state = state["inner_optimizer"]
                self._pending_tokens = int(state.get("pending_tokens", 0))
                self._run_facts = RunFacts.from_checkpoint(state)
                theta = await self.swarm.theta_sha256()
                logger.info(f"resumed from outer step {step} ({self.local.size} shards), θ {theta[:12]}")
                return data_position(state)
            logger.warning(f"the checkpoint of outer step {step} is not loadable on every worker; trying older ones")
        return 0, None

    async def _stop_now(self) -> bool:
        return await asyncio.to_thread(self.local.any_blocking, self.stop_requested.is_set())

    def _stop_flag(self):
        self._agreed = _AgreedStop(self.local, self.stop_requested, self.swarm.round_called, self.swarm.shift_ready)
        return self._agreed

    def _called_flag(self):
        return self._agreed.enough

    def _shift_due(self) -> bool:
        return self._agreed.shift.is_set()

    def _await_round(self) -> None:
        # Every worker waits at the same step for its shard's round; they agreed on shifting before the wait, when
        # the round had not landed: they agree again, so that they shift at this step, together.
        super()._await_round()
        self._agreed.is_set()

    async def _combine(self, result: InnerResult) -> InnerResult:
        """The peer's inner loop: tokens of all workers, their mean loss, the slowest worker's time."""
        everyone = await self.local.all_gather(result)
        losses = [r.loss for r in everyone]
        loss = sum(losses) / len(losses) if all(math.isfinite(x) for x in losses) else math.nan
        return InnerResult(
            result.steps,
            loss,
            sum(r.tokens for r in everyone),
            max(r.seconds for r in everyone),
            any(r.interrupted for r in everyone),
        )

    def _local_params(self) -> list[torch.Tensor]:
        return [t.detach() for t in local_shards(self.model)]

    async def _step_facts(self, report: OuterStepReport) -> dict:
        theta = await self.swarm.theta_sha256(self._theta_of(report))
        report.params_sha256 = theta  # the peer's record hashes the full θ, not worker 0's shard
        peaks = await self.local.all_gather((self._outer_peak_mb, self._peak_rss_mb))
        return {
            "theta_sha256": theta,
            "workers": self.local.size,
            "outer_step_peak_mb": [outer for outer, _ in peaks],
            "peak_rss_mb": [peak for _, peak in peaks],
        }

    @torch.no_grad()
    def _load_global_into_model(self) -> None:
        for shard, theta in zip(local_shards(self.model), self.swarm.params, strict=True):
            shard.copy_(theta)
        self._model_step = self.swarm.global_step

    def _params_total(self) -> int:
        return sum(math.prod(shape) for shape in self._model_facts["full_shapes"])

    def _workers(self) -> int:
        return self.local.size

    def _shard(self) -> tuple[int, int]:
        return self.local.rank, self.local.size

    def _layout_state(self) -> dict:
        return {"layout": [self.local.rank, self.local.size]}

    def _model_state(self, with_params: bool) -> list[torch.Tensor] | None:
        """This worker's rows of every parameter (live views), or None when they are θ's."""
        return [t.detach() for t in local_shards(self.model)] if with_params else None

    def _optimizer_state(self) -> dict:
        return localize(self.inner.optimizer.state_dict())
