"""Private swarms (--swarm-key): members train together; a node without the key gets nothing and is told why."""

import asyncio
import time

import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.proto import dht_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from peers.launch import read_metrics, start_bootstrap, start_peer, stop
from swarm import NodeConfig, StepStatus, Swarm, SwarmNode, records
from swarm.access import PROOF_BYTES, Access, KeyAuthorizer, load_key
from swarm.node import SwarmAccessError
from swarm.wire import write_frame
from tests.test_programs import FAST, run_peer_cli
from tests.test_swarm import config, make_params, perturbed

KEY = b"0123456789abcdef" * 4
OTHER_KEY = b"fedcba9876543210" * 4


async def _refused(reader) -> bool:
    """Whether the other side closed the stream without answering."""
    try:
        data = await asyncio.wait_for(reader.read(1), 10)
    except (ConnectionError, OSError):
        return True
    return data == b""


@pytest.mark.timeout(120)
async def test_private_swarm_trains_and_an_uninvited_node_can_do_nothing():
    bootstrap = await SwarmNode.create(NodeConfig(swarm_key=KEY))
    maddrs = await bootstrap.visible_maddrs()
    nodes = [await SwarmNode.create(NodeConfig(initial_peers=maddrs, swarm_key=KEY)) for _ in range(2)]
    stranger = await SwarmNode.create(NodeConfig())  # a swarm of its own: its start-up check would refuse it
    params = make_params()
    swarms = [await Swarm.create(node, params, config(run_id="private")) for node in nodes]
    try:
        victim = nodes[0]
        await stranger.p2p._client.connect(
            victim.peer_id, [Multiaddr(m.split("/p2p/")[0]) for m in await victim.visible_maddrs()]
        )

        # The DHT: no ping, no store, no read.
        assert await stranger.dht.protocol.call_ping(victim.peer_id) is None
        key = DHTID.generate(source="private.stranger")
        stored = await stranger.dht.protocol.call_store(
            victim.peer_id, [key], [msgpack.packb({"step": 9})], get_dht_time() + 60
        )
        assert stored is None
        assert victim.dht.protocol.storage.get(key) is None
        heartbeats = DHTID.generate(source=records.peers_key("private"))
        assert victim.dht.protocol.storage.get(heartbeats) is not None, "the members' own records are there"
        assert await stranger.dht.protocol.call_find(victim.peer_id, [heartbeats]) is None

        # Join a group, send a part, fetch state: each stream is closed after the 32 bytes of a proof it lacks.
        requests = {
            swarms[0].matchmaker._protocol: {"type": "join", "step": 0, "schema": swarms[0].schema, "deadline": 1e12},
            swarms[0].averager._protocol: {"type": "part", "group_id": b"g" * 16, "sender": 1, "weight": 1.0},
            swarms[0].state_server.protocol: {"type": "manifest", "schema": swarms[0].schema},
        }
        for protocol, header in requests.items():
            _, reader, writer = await stranger.p2p.call_binary_stream_handler(victim.peer_id, protocol)
            try:  # the refusal may come while we are still writing the payload it never reads
                await write_frame(writer, header, b"\x7f" * (1 << 20))
                refused = await _refused(reader)
            except (ConnectionError, OSError):
                refused = True
            assert refused, protocol
            writer.close()
        assert victim.access.refused[stranger.peer_id] == len(requests)
        assert not swarms[0].averager._rounds, "a refused part must not even open a round"
        assert swarms[0].matchmaker._looking is None

        # The members average as usual, over the direct data plane, whose secrets include the key.
        locals_ = [perturbed(params, i) for i in range(2)]
        reports = await asyncio.gather(*(s.outer_step(local, 100) for s, local in zip(swarms, locals_)))
        assert [r.status for r in reports] == [StepStatus.AVERAGED] * 2
        assert reports[0].params_sha256 == reports[1].params_sha256
        assert stranger.peer_id.to_base58() not in reports[0].members
        assert sum(s.averager.streams["direct"] for s in swarms) > 0
    finally:
        for s in swarms:
            await s.close()
        for node in [*nodes, stranger, bootstrap]:
            await node.close()


@pytest.mark.timeout(120)
async def test_a_missing_wrong_or_unwanted_key_is_a_clear_error_at_start():
    private = await SwarmNode.create(NodeConfig(swarm_key=KEY))
    public = await SwarmNode.create(NodeConfig())
    try:
        cases = [
            (await private.visible_maddrs(), None, "this swarm requires a key"),
            (await private.visible_maddrs(), OTHER_KEY, "the swarm key does not match"),
            (await public.visible_maddrs(), KEY, "this swarm has no key"),
        ]
        for maddrs, key, message in cases:
            started = time.monotonic()
            with pytest.raises(SwarmAccessError, match=message):
                await SwarmNode.create(NodeConfig(initial_peers=maddrs, swarm_key=key, connect_timeout_seconds=15))
            assert time.monotonic() - started < 15
    finally:
        await private.close()
        await public.close()


@pytest.mark.timeout(30)
async def test_dht_requests_are_authenticated_and_never_accepted_twice():
    authorizer, stranger = KeyAuthorizer(Access(KEY)), KeyAuthorizer(Access(OTHER_KEY))
    request = dht_pb2.PingRequest(validate=True)
    await authorizer.sign_request(request, None)
    assert len(request.auth.signature) == PROOF_BYTES
    tampered = dht_pb2.PingRequest()
    tampered.CopyFrom(request)
    tampered.validate = False
    assert not await authorizer.validate_request(tampered)
    assert not await stranger.validate_request(request)
    assert await authorizer.validate_request(request)
    assert not await authorizer.validate_request(request), "a replayed request must be refused"

    response = dht_pb2.PingResponse(available=True)
    await authorizer.sign_response(response, request)
    assert await authorizer.validate_response(response, request)
    assert not await stranger.validate_response(response, request)
    other = dht_pb2.PingRequest()
    await authorizer.sign_request(other, None)
    assert not await authorizer.validate_response(response, other), "an answer to another request"
    assert Access(KEY).direct_secret(b"s" * 32) != Access(None).direct_secret(b"s" * 32)


def test_key_files_are_checked(tmp_path):
    good, short = tmp_path / "swarm.key", tmp_path / "short.key"
    good.write_text(KEY.decode() + "\n")
    short.write_text("abc")
    assert load_key(str(good)) == KEY
    with pytest.raises(ValueError, match="at least 32"):
        load_key(str(short))
    with pytest.raises(ValueError, match="cannot read"):
        load_key(str(tmp_path / "missing.key"))


@pytest.mark.timeout(240)
def test_programs_with_and_without_the_key(tmp_path):
    key, wrong = tmp_path / "swarm.key", tmp_path / "wrong.key"
    key.write_bytes(KEY)
    wrong.write_bytes(OTHER_KEY)
    boot = start_bootstrap(str(tmp_path), "--run-id", "private", "--swarm-key", str(key))
    peers = []
    try:
        for name, extra in [("no-key", []), ("wrong-key", ["--swarm-key", str(wrong)])]:
            result = run_peer_cli("--initial-peers", boot.maddrs[0], "--run-id", "private", *extra, timeout=90)
            assert result.returncode == 1, (name, result.stderr)
            expected = "this swarm requires a key" if not extra else "the swarm key does not match"
            assert expected in result.stderr, (name, result.stderr)
        for i in range(2):
            metrics = str(tmp_path / f"p{i}.jsonl")
            peers.append(start_peer(str(tmp_path), f"p{i}", boot.maddrs, "--run-id", "private", "--outer-steps", "1",
                                    "--swarm-key", str(key), "--metrics-file", metrics, *FAST))  # fmt: skip
        codes = [p.wait(timeout=180) for p in peers]
        assert codes == [0, 0], [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
        records_ = [read_metrics(str(tmp_path / f"p{i}.jsonl"))[-1] for i in range(2)]
        assert records_[0]["group_size"] == records_[1]["group_size"] == 2
        assert records_[0]["params_sha256"] == records_[1]["params_sha256"]
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)
