"""Bad input over the network: malformed messages, incompatible peers, a member that never contributes."""

import asyncio
import os
import time

import msgpack
import pytest
import torch

from swarm import StepStatus, Swarm
from swarm.allreduce import AllReduceError
from swarm.direct import HELLO_TIMEOUT
from swarm.matchmaking import Group
from swarm.state import StateServer, download_state
from swarm.wire import read_frame, write_frame
from tests.conftest import swarm_of
from tests.test_swarm import (
    assert_params_close,
    config,
    make_params,
    perturbed,
    reference_outer_step,
    running_swarms,
)


async def _raw_request(node, peer_id, protocol: str, data: bytes) -> tuple[dict, bytes]:
    _, reader, writer = await node.p2p.call_binary_stream_handler(peer_id, protocol)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(read_frame(reader), 10)
    finally:
        writer.close()


@pytest.mark.timeout(120)
async def test_malformed_messages_are_refused_and_the_peer_keeps_working():
    async with swarm_of(2) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as swarms:
            target = nodes[0].peer_id
            garbage = b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1"  # a 5-byte header that is not msgpack
            for protocol in ("swarm/test/join/1", "swarm/test/reduce/1"):
                reply, _ = await _raw_request(nodes[1], target, protocol, garbage)
                assert reply["type"] in ("rejected", "error")
                assert "msgpack" in reply.get("reason", "")
            # A well-formed frame with fields of the wrong type.
            header = msgpack.packb({"type": "join", "step": "zero", "schema": 1, "deadline": None, "nbytes": 0})
            frame = len(header).to_bytes(4, "little") + header
            reply, _ = await _raw_request(nodes[1], target, "swarm/test/join/1", frame)
            assert reply["type"] == "rejected" and "step" in reply["reason"]
            # Both peers still average together afterwards.
            locals_ = [perturbed(theta, i) for i in range(2)]
            reports = await asyncio.gather(*[s.outer_step(loc, 10) for s, loc in zip(swarms, locals_)])
            assert [r.group_size for r in reports] == [2, 2]
            assert reports[0].params_sha256 == reports[1].params_sha256


@pytest.mark.timeout(60)
async def test_join_with_another_schema_gets_a_clear_refusal():
    async with swarm_of(2) as (_, nodes):
        theta = make_params()
        leader = await Swarm.create(nodes[0], theta, config(timeout=10))
        try:
            looking = asyncio.create_task(leader.outer_step(perturbed(theta, 0), 10))
            await asyncio.sleep(0.5)  # let it declare itself and start accepting joins
            _, reader, writer = await nodes[1].p2p.call_binary_stream_handler(nodes[0].peer_id, "swarm/test/join/1")
            await write_frame(writer, {"type": "join", "step": 0, "schema": "f" * 32, "deadline": 1e12})
            reply, _ = await asyncio.wait_for(read_frame(reader), 10)
            writer.close()
            assert reply["type"] == "rejected" and "incompatible setup" in reply["reason"]
            report = await looking
            assert report.group_size == 1
        finally:
            await leader.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("retries", [0, 1])
async def test_member_that_never_contributes_is_left_out_and_nothing_partial_is_applied(retries):
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        cfg = config()
        cfg.allreduce_timeout_seconds, cfg.allreduce_retries = 3, retries
        async with running_swarms(nodes, theta, lambda i: cfg) as swarms:
            # Fault: peer 2 joins the group of step 0, then goes silent (it never sends its part).
            async def silent_member():
                group = await swarms[2].matchmaker.form_group(0)
                assert isinstance(group, Group) and group.size == 3
                return group

            locals_ = [perturbed(theta, i) for i in range(2)]
            *reports, _ = await asyncio.gather(
                swarms[0].outer_step(locals_[0], 10), swarms[1].outer_step(locals_[1], 30), silent_member()
            )
            if retries == 0:
                for swarm, report in zip(swarms[:2], reports):
                    assert report.status == StepStatus.ALLREDUCE_FAILED and report.group_size == 3
                    assert not report.restart_from_global  # the caller keeps its local work for the next step
                    assert all(torch.equal(a, b) for a, b in zip(swarm.params, theta))  # θ untouched
                    assert report.outer_step == 1
            else:
                # The two that spoke form a new group without the silent one and average exactly their own work.
                expected, _ = reference_outer_step(theta, locals_, [10, 30])
                for swarm, report in zip(swarms[:2], reports):
                    assert report.status == StepStatus.AVERAGED and report.group_size == 2 and report.attempts == 2
                    assert_params_close(swarm.params, expected)
                assert reports[0].params_sha256 == reports[1].params_sha256


@pytest.mark.timeout(60)
async def test_all_reduce_refuses_bad_weights():
    async with swarm_of(2) as (_, nodes):
        swarm = await Swarm.create(nodes[0], make_params(), config())
        try:
            group = Group(b"x" * 16, 0, (nodes[0].peer_id, nodes[1].peer_id), 0)
            with pytest.raises(ValueError, match="weight"):
                await swarm.averager.all_reduce(group, torch.zeros(10), float("nan"))
            with pytest.raises(AllReduceError):
                # The other member runs no averager for this run: the round cannot complete.
                swarm.averager.timeout_seconds = 2
                await swarm.averager.all_reduce(group, torch.zeros(10), 1.0)
        finally:
            await swarm.close()


@pytest.mark.timeout(90)
async def test_a_member_that_never_learned_of_its_group_fails_the_round_within_the_grace():
    """A leader cannot know that a follower got the group it sent: one that gave up a moment before averages alone
    or elsewhere, and never joins. Its reducers must fail the round within the grace a late member gets (naming it,
    so that a retry leaves it out), not wait out the all-reduce's bound."""
    async with swarm_of(2) as (_, nodes):
        swarms = [await Swarm.create(node, make_params(), config()) for node in nodes]
        try:
            peers = tuple(sorted((n.peer_id for n in nodes), key=lambda p: p.to_bytes()))
            group = Group(os.urandom(16), 0, peers, peers.index(nodes[0].peer_id))
            swarms[0].averager.timeout_seconds = 120
            started = time.monotonic()
            with pytest.raises(AllReduceError, match="never learned of it") as failed:
                await swarms[0].averager.all_reduce(group, torch.ones(1000), 1.0)
            assert time.monotonic() - started < HELLO_TIMEOUT + 15
            assert failed.value.suspects == {nodes[1].peer_id}
            # The peer that knew nothing of the group averages as before.
            locals_ = [perturbed(swarms[0].params, i) for i in range(2)]
            reports = await asyncio.gather(*[s.outer_step(loc, 10) for s, loc in zip(swarms, locals_)])
            assert [r.status for r in reports] == [StepStatus.AVERAGED] * 2
            assert reports[0].params_sha256 == reports[1].params_sha256
        finally:
            for swarm in swarms:
                await swarm.close()


@pytest.mark.timeout(90)
async def test_over_the_direct_plane_a_member_that_never_learned_of_its_group_is_lost_not_unreachable():
    """The same, when the part goes over the direct data plane: the reducer says at once that it is there and
    waiting for the group, then that it never learned of it. The round fails within the grace, naming that member,
    and the member stays reachable directly: the next round still sends it its part without the relay."""
    async with swarm_of(2) as (_, nodes):
        swarms = [await Swarm.create(node, make_params(), config()) for node in nodes]
        try:
            averagers = [s.averager for s in swarms]
            assert all(a.direct_endpoints for a in averagers)
            peers = tuple(sorted((n.peer_id for n in nodes), key=lambda p: p.to_bytes()))
            direct = {n.peer_id: a.direct_endpoints for n, a in zip(nodes, averagers)}
            keys = {n.peer_id: a.direct_public_key() for n, a in zip(nodes, averagers)}
            me = peers.index(nodes[0].peer_id)
            group = Group(os.urandom(16), 0, peers, me, secret=os.urandom(32), direct=direct, keys=keys)
            averagers[0].timeout_seconds = 120
            started = time.monotonic()
            with pytest.raises(AllReduceError, match="never learned of it") as failed:
                await averagers[0].all_reduce(group, torch.ones(1000), 1.0)
            assert time.monotonic() - started < HELLO_TIMEOUT + 1.5  # the grace, not a relayed retry after it
            assert failed.value.suspects == {nodes[1].peer_id}
            assert averagers[0].streams == {"direct": 0, "relayed": 0}  # it answered directly: nothing relayed
            # Both members of the next group: the part goes directly to the peer that knew nothing of the last one.
            group_id, secret = os.urandom(16), os.urandom(32)
            groups = [Group(group_id, 1, peers, peers.index(n.peer_id), secret, direct, keys=keys) for n in nodes]
            values = [torch.full((1000,), float(i)) for i in range(2)]
            results = await asyncio.gather(*[a.all_reduce(g, v, 1.0) for a, g, v in zip(averagers, groups, values)])
            for result in results:
                assert torch.allclose(result.averaged, torch.full((1000,), 0.5), atol=0.01)
            assert averagers[0].streams == {"direct": 1, "relayed": 0}
        finally:
            for swarm in swarms:
                await swarm.close()


class FaultyDonor(StateServer):
    """A state donor with a declared fault: it dies after `serve` requests, or corrupts every chunk it sends."""

    def __init__(self, server: StateServer, fault: str, serve: int = 3):
        super().__init__(server.node, "unused", server.schema, server._snapshot)
        self.protocol = server.protocol
        self.fault, self.serve, self.requests = fault, serve, 0

    async def _handle(self, stream_info, reader, writer) -> None:
        self.requests += 1
        if self.fault == "dies" and self.requests > self.serve:
            writer.close()  # gone mid-transfer: the stream just ends
            return
        if self.fault == "lies" and self.requests > 1:
            request, _ = await read_frame(reader, max_payload=0)
            state = self._snapshot()
            header = {"type": "chunk", "step": state.outer_step, "index": request["index"]}
            n = min(request["chunk"], state.numel - request["index"] * request["chunk"])
            await write_frame(writer, header, b"\x00" * (8 * n))
            writer.close()
            return
        await super()._handle(stream_info, reader, writer)


@pytest.mark.timeout(120)
async def test_state_download_survives_a_donor_that_dies_and_one_that_lies(caplog):
    async with swarm_of(4) as (_, nodes):
        theta = make_params()
        cfg = config()
        cfg.state_chunk_values = 100  # about 23 chunks, so the transfer is in flight when the faults strike
        async with running_swarms(nodes[:3], theta, lambda i: cfg) as donors:
            locals_ = [perturbed(theta, i) for i in range(3)]
            reports = await asyncio.gather(*[s.outer_step(loc, 100) for s, loc in zip(donors, locals_)])
            for s, r in zip(donors, reports):
                await s.publish_hash(r)
            for donor, fault in zip(donors[:2], ["dies", "lies"]):
                await donor.state_server.close()
                donor.state_server = FaultyDonor(donor.state_server, fault, serve=2)
                await donor.state_server.start()
            async with running_swarms(nodes[3:], theta, lambda i: cfg) as (newcomer,):
                # All three donors must be visible at step 1 first, or the faults might never be exercised.
                for _ in range(100):
                    live = await newcomer.matchmaker.live_peers()
                    if sum(h.outer_step == 1 for h in live) == 3:
                        break
                    await asyncio.sleep(0.1)
                assert await newcomer.catch_up()
                assert newcomer.global_step == 1
                assert newcomer.params_sha256() == reports[0].params_sha256
                for a, b in zip(newcomer.outer.momentum(), donors[2].outer.momentum(), strict=True):
                    assert torch.equal(a, b)
            assert donors[0].state_server.requests > 2  # manifest, one chunk, then it died mid-transfer
            assert "does not match its hash" in caplog.text
            assert "the other donors take over" in caplog.text


@pytest.mark.timeout(120)
async def test_state_transfer_completes_when_the_donor_moves_on_meanwhile():
    async with swarm_of(2) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as (donor, newcomer):
            donor._apply(torch.full((sum(p.numel() for p in theta),), 0.01))
            donor.global_step = 5
            before = donor.params_sha256()
            numel = sum(p.numel() for p in theta)

            async def accept(step: int, digest: str) -> bool:
                # The donor finishes another outer step after the newcomer chose what to fetch, before any chunk.
                await donor._apply_off_loop(torch.full((numel,), 0.02))
                donor.global_step += 1
                return True

            state = await download_state(
                newcomer.node, newcomer.state_server.protocol, newcomer.schema, [donor.node.peer_id], numel, accept,
                chunk=256,
            )  # fmt: skip
            assert state is not None and state.outer_step == 5 and state.sha256() == before
            assert donor.global_step == 6 and donor.params_sha256() != before


@pytest.mark.timeout(120)
async def test_a_state_too_large_to_copy_is_finished_from_the_donors_checkpoint(tmp_path):
    """The donor moves on mid-transfer with a state above its copy bound: without an archive the transfer is refused
    and the receiver gets nothing; with its checkpoint of the step read in place, the transfer completes."""
    from peers.checkpoint import Checkpointer
    from swarm.state import StateView

    async with swarm_of(2) as (_, nodes):
        theta = make_params()
        cfg = config()
        cfg.keep_buffers_max_bytes = 0  # every state counts as large here
        async with running_swarms(nodes, theta, lambda i: cfg) as (donor, newcomer):
            numel = sum(p.numel() for p in theta)
            await donor._apply_off_loop(torch.full((numel,), 0.01))  # momentum exists from here
            donor.global_step = 5
            before = donor.params_sha256()
            checkpoints = Checkpointer(str(tmp_path))
            checkpoints.save({"swarm": donor.state_dict()}, 5)

            def archived(step: int):
                state = checkpoints.load(step, mmap=True)
                momentum = [state["swarm"]["outer"]["state"][i]["momentum_buffer"] for i in range(len(theta))]
                return StateView(step, -1, state["swarm"]["params"], momentum)

            async def fetch():
                async def accept(step: int, digest: str) -> bool:
                    await donor._apply_off_loop(torch.full((numel,), 0.02))  # the donor moves on before any chunk
                    donor.global_step += 1
                    return True

                return await download_state(
                    newcomer.node, newcomer.state_server.protocol, newcomer.schema, [donor.node.peer_id], numel,
                    accept, chunk=256,
                )  # fmt: skip

            assert await fetch() is None  # no copy, no archive: the chunks of step 5 are refused
            steps = [donor.global_step]
            donor.state_server.archive = lambda step: archived(step) if step in steps else None
            checkpoints.save({"swarm": donor.state_dict()}, steps[0])
            expected = donor.params_sha256()
            state = await fetch()
            assert state is not None and state.outer_step == steps[0] and state.sha256() == expected != before
            saved = torch.cat([m.reshape(-1) for m in archived(steps[0]).momentum])
            assert torch.equal(state.momentum, saved)  # the checkpoint's, not the donor's current momentum
