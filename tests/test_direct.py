"""The direct TCP data plane: used when members can reach each other, refused without the group's secret, and
replaced by the relayed libp2p streams when a member cannot be reached directly."""

import asyncio
import socket
import time

import pytest
import torch

from swarm.direct import HELLO_TIMEOUT, group_mac
from swarm.matchmaking import Group
from swarm.wire import write_frame
from tests.conftest import swarm_of
from tests.test_swarm import assert_params_close, config, make_params, perturbed, reference_outer_step, running_swarms


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_step(swarms, theta):
    locals_ = [perturbed(theta, i) for i in range(len(swarms))]
    tokens = [100 + 10 * i for i in range(len(swarms))]
    reports = await asyncio.gather(*[s.outer_step(loc, t) for s, loc, t in zip(swarms, locals_, tokens)])
    assert [r.group_size for r in reports] == [len(swarms)] * len(swarms)
    expected, _ = reference_outer_step(theta, locals_, tokens)
    for s in swarms:
        assert_params_close(s.params, expected)
    assert len({r.params_sha256 for r in reports}) == 1


@pytest.mark.timeout(120)
async def test_members_that_reach_each_other_average_over_direct_connections():
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as swarms:
            assert all(s.averager.direct_endpoints for s in swarms)
            await one_step(swarms, theta)
            for s in swarms:
                assert s.averager.streams == {"direct": 2, "relayed": 0}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("endpoint", ["closed", "someone else", "another peer"])
async def test_a_member_without_a_reachable_endpoint_is_reached_through_the_daemons(endpoint):
    received = []

    async def stranger(reader, writer):  # another program on the announced address: it never welcomes us
        if endpoint == "another peer":  # a peer that knows no such group either: it would wait for it, then say so
            await write_frame(writer, {"type": "pending", "key": b"k" * 32})
        received.append(await reader.read(1 << 20))

    server = await asyncio.start_server(stranger, "127.0.0.1", 0)
    port = closed_port() if endpoint == "closed" else server.sockets[0].getsockname()[1]
    try:
        async with swarm_of(3) as (_, nodes):
            theta = make_params()
            async with running_swarms(nodes, theta, lambda i: config()) as swarms:
                # Peer 2 announces an address where it cannot be reached (a NAT, a private address seen from
                # elsewhere): the others fall back to the daemons for it, and send the stranger nothing but a hello.
                swarms[2].matchmaker.direct_endpoints = [("127.0.0.1", port)]
                started = time.monotonic()
                await one_step(swarms, theta)
                # Not the wait for a group the peer there will never learn of: its key says it is not peer 2.
                assert time.monotonic() - started < HELLO_TIMEOUT
                assert swarms[0].averager.streams == {"direct": 1, "relayed": 1}
                assert swarms[2].averager.streams == {"direct": 2, "relayed": 0}
                assert all(len(data) < 200 for data in received)
    finally:
        server.close()


@pytest.mark.timeout(60)
async def test_direct_connection_without_its_pairs_secret_is_refused():
    """Refused: a made-up MAC, a MAC under another group's secret, and a member of the group that knows the group's
    secret but claims to be another member (it cannot compute that member's pair secret)."""
    async with swarm_of(3) as (_, nodes):
        async with running_swarms(nodes, make_params(), lambda i: config()) as swarms:
            averager = swarms[0].averager
            keys = {node.peer_id: s.averager.direct_public_key() for node, s in zip(nodes, swarms)}
            members = tuple(node.peer_id for node in nodes)
            group = Group(b"g" * 16, 0, members, 0, secret=b"s" * 32, keys=keys)
            rnd = averager._round(group.group_id)
            rnd.group, rnd.part_numel = group, 4
            rnd.configured.set()
            impostor = swarms[2].averager.direct_key.pair_secret(group.secret, keys[nodes[0].peer_id])
            genuine = swarms[1].averager.direct_key.pair_secret(group.secret, keys[nodes[0].peer_id])
            assert genuine != impostor
            assert averager.direct_key.pair_secret(group.secret, keys[nodes[1].peer_id]) == genuine
            for mac in (
                b"x" * 32,
                group_mac(b"t" * 32, group.group_id, 1, 0),
                group_mac(group.secret, group.group_id, 1, 0),
                group_mac(impostor, group.group_id, 1, 0),
            ):
                reader, writer = await asyncio.open_connection(*averager.direct_endpoints[0])
                await write_frame(writer, {"type": "hello", "group_id": group.group_id, "sender": 1, "mac": mac})
                header = {"type": "part", "group_id": group.group_id, "sender": 1, "weight": 1.0, "numel": 4,
                          "codec": averager.codec.tag}  # fmt: skip
                await write_frame(writer, header, averager.codec.encode(torch.ones(4)))
                try:
                    answer = await asyncio.wait_for(reader.read(), 10)
                except ConnectionResetError:  # closed with our part unread: a reset instead of an orderly close
                    answer = b""
                assert answer == b""  # closed, not a word
                writer.close()
                assert 1 not in rnd.weights


@pytest.mark.timeout(120)
async def test_rounds_keep_only_what_a_late_member_may_fetch():
    """Contributions go once summed; a round's averaged parts stay (a member that missed one may fetch it) until
    the next round starts. A swarm stepping every few seconds must not hold every round's parts for the timeout."""
    async with swarm_of(3) as (_, nodes):
        theta = make_params()
        async with running_swarms(nodes, theta, lambda i: config()) as swarms:
            await one_step(swarms, theta)
            for s in swarms:
                (first,) = s.averager._rounds.values()
                assert first.contributions == {} and len(first.weights) == 3
                assert sorted(first.payloads) == [0, 1, 2]
            theta = [p.detach().clone() for p in swarms[0].params]
            reports = await asyncio.gather(*[s.outer_step(perturbed(theta, i), 100) for i, s in enumerate(swarms)])
            assert [r.group_size for r in reports] == [3, 3, 3]
            for s in swarms:
                first, second = s.averager._rounds.values()
                assert first.payloads == {} and first.values == {}
                assert second.contributions == {} and sorted(second.payloads) == [0, 1, 2]
