"""A member of the group dies in the middle of the all-reduce of outer step 3 (its p2p daemon is SIGKILLed, as when
its process is): the others complete the round within seconds, average only contributions that fully arrived,
stay identical, and go on training together."""

import asyncio
import contextlib
import os
import signal

import pytest
import torch

from swarm import NodeConfig, StepStatus, SwarmNode
from swarm.allreduce import Averager
from tests.conftest import swarm_of
from tests.test_swarm import assert_params_close, config, make_params, perturbed, reference_outer_step, running_swarms

FAULT_STEP = 3


def kill_daemon(node) -> None:
    """What the rest of the swarm sees of a SIGKILLed peer: its p2p daemon vanishes with every connection."""
    os.kill(node.p2p._child.pid, signal.SIGKILL)


class DiesAfterCollecting(Averager):
    """At the fault step, dies once every contribution to its part has arrived, before it answers anyone."""

    def __init__(self, base: Averager, step_of):
        super().__init__(base.node, base.run_id, base.codec, base.timeout_seconds)
        self.step_of = step_of

    async def _reduce(self, rnd) -> None:
        if self.step_of() == FAULT_STEP:
            await rnd.complete.wait()
            kill_daemon(self.node)
            return
        await super()._reduce(rnd)


class DiesAfterServingOne(Averager):
    """At the fault step, hands its averaged part to one member, then dies before the next one gets it."""

    def __init__(self, base: Averager, step_of):
        super().__init__(base.node, base.run_id, base.codec, base.timeout_seconds)
        self.step_of = step_of

    async def _serve_part(self, peer, header, payload, nbytes, reader, writer) -> None:
        if self.step_of() == FAULT_STEP and header.get("sender") == 1:
            writer = _DiesBeforeReplying(writer, self, header.get("group_id"))
        await super()._serve_part(peer, header, payload, nbytes, reader, writer)


class _DiesBeforeReplying:
    """A stream writer whose first reply never leaves: the owner dies once member 0 acknowledged its part."""

    def __init__(self, writer, averager: Averager, group_id: bytes):
        self.writer, self.averager, self.group_id = writer, averager, group_id

    def write(self, data) -> None:
        pass

    async def drain(self) -> None:
        # Polling: the averager has no event for "one member served", and this runs once per test.
        while self.averager._rounds[self.group_id].served < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        kill_daemon(self.averager.node)
        raise ConnectionResetError("killed")

    def close(self) -> None:
        self.writer.close()


async def run_until_fault(fault_class, group_size_at_fault: int, survivors_only: bool):
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        cfg = config(timeout=10)
        cfg.allreduce_timeout_seconds = 60  # detection must not rely on the bound
        # Peer 2 is the one that dies; give it the largest peer id so it reduces the last part.
        order = sorted(range(3), key=lambda i: nodes[i].peer_id.to_bytes())
        nodes = [nodes[i] for i in order]
        async with running_swarms(nodes, theta, lambda i: cfg) as swarms:
            doomed = swarms[2]
            await doomed.averager.close()
            doomed.averager = fault_class(doomed.averager, lambda: doomed.global_step)
            await doomed.averager.start()
            expected, momentum = theta, None
            for step in range(FAULT_STEP):
                locals_ = [perturbed([p.clone() for p in s.params], 10 * step + i) for i, s in enumerate(swarms)]
                reports = await asyncio.gather(
                    *[s.outer_step(loc, 100 + i) for i, (s, loc) in enumerate(zip(swarms, locals_))]
                )
                assert [r.group_size for r in reports] == [3, 3, 3]
                expected, momentum = reference_outer_step(expected, locals_, [100, 101, 102], momentum_buffers=momentum)

            locals_ = [perturbed([p.clone() for p in s.params], 10 * FAULT_STEP + i) for i, s in enumerate(swarms)]
            loop = asyncio.get_running_loop()
            started = loop.time()
            dying = asyncio.create_task(doomed.outer_step(locals_[2], 102))
            reports = await asyncio.gather(
                *[s.outer_step(loc, 100 + i) for i, (s, loc) in enumerate(zip(swarms[:2], locals_))]
            )
            took = loop.time() - started
            dying.cancel()
            with contextlib.suppress(BaseException):
                await dying
            for report in reports:
                assert report.status == StepStatus.AVERAGED, report
                assert report.group_size == group_size_at_fault
            assert took < 15, f"the round took {took:.1f}s"
            contributors = [0, 1] if survivors_only else [0, 1, 2]
            expected, momentum = reference_outer_step(
                expected, [locals_[i] for i in contributors], [100 + i for i in contributors], momentum_buffers=momentum
            )
            for s in swarms[:2]:
                assert_params_close(
                    s.params, expected, "survivors differ from DiLoCo over the contributions that arrived"
                )
                assert all(torch.isfinite(p).all() for p in s.params)
            assert reports[0].params_sha256 == reports[1].params_sha256

            # Training goes on without the dead peer.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(doomed.close(), 10)
            locals_ = [perturbed([p.clone() for p in s.params], 100 + i) for i, s in enumerate(swarms[:2])]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms[:2], locals_)])
            assert [r.group_size for r in reports] == [2, 2]
            assert reports[0].params_sha256 == reports[1].params_sha256
            return reports


@pytest.mark.timeout(120)
async def test_member_killed_before_answering_anyone_is_left_out_of_a_new_group():
    # Its part of the average reached nobody: the survivors form a new group without it and average their own work.
    await run_until_fault(DiesAfterCollecting, group_size_at_fault=2, survivors_only=True)


@pytest.mark.timeout(120)
async def test_member_killed_after_answering_one_member_costs_nothing():
    # Member 0 holds the dead reducer's part: member 1 gets it from member 0, and the round completes for all
    # three contributions, the dead one's included (it fully arrived).
    await run_until_fault(DiesAfterServingOne, group_size_at_fault=3, survivors_only=False)


@pytest.mark.timeout(120)
async def test_peer_killed_in_its_inner_loop_is_not_waited_for():
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(timeout=20)) as swarms:
            locals_ = [perturbed(theta, i) for i in range(3)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [3, 3, 3]
            # Peer 2 dies while training: its heartbeat still says "at step 1" in the DHT for a few seconds.
            kill_daemon(nodes[2])
            loop = asyncio.get_running_loop()
            started = loop.time()
            locals_ = [perturbed([p.clone() for p in s.params], 10 + i) for i, s in enumerate(swarms[:2])]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms[:2], locals_)])
            assert [r.group_size for r in reports] == [2, 2]
            assert reports[0].params_sha256 == reports[1].params_sha256
            # Without the ping the leader would wait for the dead peer's heartbeat to expire (3 intervals, 6 s).
            assert loop.time() - started < 4


@pytest.mark.timeout(120)
async def test_leader_killed_during_matchmaking_is_replaced():
    async with swarm_of(3) as (_, nodes):
        nodes = sorted(nodes, key=lambda n: n.peer_id.to_bytes())  # node 0 has the smallest id: it leads
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config(timeout=20)) as swarms:
            locals_ = [perturbed(theta, i) for i in range(3)]
            leader = asyncio.create_task(swarms[0].outer_step(locals_[0], 100))
            follower = asyncio.create_task(swarms[1].outer_step(locals_[1], 100))
            # Peer 2 is still in its inner loop: the leader holds the group open for it, with peer 1 joined.
            while not (swarms[0].matchmaker._looking and swarms[0].matchmaker._looking.followers):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling a test-only view of the leader's state
            kill_daemon(nodes[0])
            leader.cancel()
            loop = asyncio.get_running_loop()
            started = loop.time()
            reports = await asyncio.gather(follower, swarms[2].outer_step(locals_[2], 100))
            assert [r.group_size for r in reports] == [2, 2]
            assert reports[0].params_sha256 == reports[1].params_sha256
            expected, _ = reference_outer_step(theta, locals_[1:], [100, 100])
            assert_params_close(swarms[1].params, expected)
            assert loop.time() - started < 8
            with contextlib.suppress(BaseException):
                await leader


@pytest.mark.timeout(120)
async def test_bootstrap_node_killed_the_swarm_goes_on_and_takes_a_newcomer_through_a_peer():
    async with swarm_of(2) as (bootstrap, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as swarms:
            kill_daemon(bootstrap)  # the only address the peers were given
            for step in range(2):
                locals_ = [perturbed([p.clone() for p in s.params], 10 * step + i) for i, s in enumerate(swarms)]
                reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(swarms, locals_)])
                assert [r.group_size for r in reports] == [2, 2]
                assert reports[0].params_sha256 == reports[1].params_sha256
                for s, r in zip(swarms, reports):
                    await s.publish_hash(r)
            newcomer_node = await SwarmNode.create(NodeConfig(initial_peers=await nodes[0].visible_maddrs()))
            try:
                async with running_swarms([newcomer_node], theta, lambda i: config()) as (newcomer,):
                    assert await newcomer.join_run()
                    assert newcomer.global_step == 2 and newcomer.params_sha256() == swarms[0].params_sha256()
                    everyone = [*swarms, newcomer]
                    locals_ = [perturbed([p.clone() for p in s.params], 50 + i) for i, s in enumerate(everyone)]
                    reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(everyone, locals_)])
                    assert [r.group_size for r in reports] == [3, 3, 3]
                    assert len({r.params_sha256 for r in reports}) == 1
            finally:
                await newcomer_node.close()
