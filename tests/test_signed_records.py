"""Signed DHT records across real nodes: forged and tampered records are refused when stored and when read."""

import asyncio
import dataclasses
import os

import pytest
import torch
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm import NodeConfig, Swarm, SwarmNode, records, signing
from swarm.monitor import status as status_records
from tests.conftest import swarm_of
from tests.test_swarm import config, make_params, perturbed


def _held(node: SwarmNode, key: str, subkey) -> tuple[bytes, float] | None:
    """The signed bytes and expiration of `key`/`subkey` in `node`'s own storage or cache, if it keeps them."""
    for storage in (node.dht.protocol.storage, node.dht.protocol.cache):
        found = storage.get(DHTID.generate(source=key))
        if found is not None:
            for held_subkey, item in found.value.items():
                if held_subkey == subkey:
                    return item.value, item.expiration_time
    return None


async def _send_raw(sender: SwarmNode, targets, key: str, subkey, blob: bytes, expiration: float) -> list:
    """Ask each target to store exact bytes, past the sender's own signing and checks (as a hostile node would)."""
    key_id = DHTID.generate(source=key)
    replies = [await sender.dht.protocol.call_store(t.peer_id, [key_id], [blob], [expiration], subkeys=[subkey])
               for t in targets]  # fmt: skip
    return [None if r is None else r[0] for r in replies]


def _resigned(blob: bytes, value) -> bytes:
    """`blob`'s envelope (public key and signature) around another value: an old signature copied onto new data."""
    public_key, signature, _ = signing._split(blob)
    header = signing._HEADER.pack(signing.MAGIC, len(public_key), len(signature))
    return header + public_key + signature + MSGPackSerializer.dumps(value)


@pytest.mark.timeout(120)
async def test_record_under_another_peers_id_is_refused_when_stored_and_when_read():
    async with swarm_of(3) as (bootstrap, (a, b, c)):
        everyone = [bootstrap, a, b, c]
        key, victim = records.peers_key("signed"), a.peer_id.to_base58()
        expiration = get_dht_time() + 60

        # B signs with its own key a heartbeat under A's peer id: nobody keeps it, B itself included.
        assert not await b.dht.store(key, {"step": 7, "schema": "f" * 32}, expiration, subkey=victim)
        assert all(_held(node, key, victim) is None for node in everyone)

        # A's real heartbeat, then B copies A's signature onto another value and sends the bytes as they are.
        assert await a.dht.store(key, {"step": 1, "schema": "a" * 32}, expiration, subkey=victim)
        blob, held_expiration = _held(a, key, victim)
        forged = _resigned(blob, {"step": 7, "schema": "f" * 32})
        assert await _send_raw(b, [bootstrap, c], key, victim, forged, held_expiration + 1) == [False, False]
        # B's own signature under A's id, sent as raw bytes: refused too.
        own = b.dht.protocol.record_validator.sign_value(
            DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(victim),
                      MSGPackSerializer.dumps({"step": 7, "schema": "f" * 32}), held_expiration + 1)
        )  # fmt: skip
        assert await _send_raw(b, [bootstrap, c], key, victim, own, held_expiration + 1) == [False, False]

        # Smuggled straight into C's storage (as a hostile storage node would hold it): C's answer to a read is
        # dropped whole by the reader, and the reader sees only A's own record, from the others.
        c.dht.protocol.storage.store_subkey(DHTID.generate(source=key), victim, forged, held_expiration + 1)
        answer = await b.dht.protocol.call_find(c.peer_id, [DHTID.generate(source=key)])
        value, _ = answer[DHTID.generate(source=key)]
        assert value is None
        found = await b.dht.get(key, latest=True)
        assert [(h.peer_id, h.outer_step) for h in records.parse_heartbeats(found)] == [(a.peer_id, 1)]
        assert _held(b, key, victim)[0] == blob  # what B cached from the read is A's record, not the forgery


@pytest.mark.timeout(120)
async def test_signed_record_with_one_byte_or_its_expiration_changed_is_refused():
    async with swarm_of(2) as (bootstrap, (a, b)):
        key, subkey = records.hash_key("signed", 3), a.peer_id.to_base58()
        expiration = get_dht_time() + 60
        assert await a.dht.store(key, "0" * 64, expiration, subkey=subkey)
        blob, held_expiration = _held(a, key, subkey)

        # Every byte region of the envelope: header, public key, signature, value.
        public_key, signature, value = signing._split(blob)
        offsets = {
            "header": 5,
            "public key": signing._HEADER.size + len(public_key) // 2,
            "signature": signing._HEADER.size + len(public_key) + 10,
            "value": len(blob) - 1,
        }
        for where, offset in offsets.items():
            tampered = bytearray(blob)
            tampered[offset] ^= 0x01
            assert await _send_raw(b, [bootstrap], key, subkey, bytes(tampered), held_expiration + 1) == [False], where
        # The right bytes with a later expiration (to outlive the owner's record): refused.
        assert await _send_raw(b, [bootstrap], key, subkey, blob, held_expiration + 30) == [False]
        # The right bytes moved to another key (A's hash of step 3 offered as its hash of step 4): refused.
        assert await _send_raw(b, [bootstrap], records.hash_key("signed", 4), subkey, blob, held_expiration) == [False]
        # The unchanged record, sent by B to a node that lost it: accepted (a replay changes nothing: swarm.signing).
        del bootstrap.dht.protocol.storage[DHTID.generate(source=key)]
        assert await _send_raw(b, [bootstrap], key, subkey, blob, held_expiration) == [True]
        found = await b.dht.get(key, latest=True)
        assert records.parse_hashes(found) == {a.peer_id: "0" * 64}


@pytest.mark.timeout(120)
async def test_valid_records_are_stored_and_read_back_with_their_original_values():
    async with swarm_of(2) as (bootstrap, (a, b)):
        expiration = get_dht_time() + 60
        heartbeat = records.Heartbeat(a.peer_id, 4, "s" * 32, 0.0, "about").to_value()
        assert await a.dht.store(records.peers_key("signed"), heartbeat, expiration, subkey=a.peer_id.to_base58())
        # Subkeys that are not peer ids (the monitor's run list) and records without subkeys: any signer's.
        status = status_records.PeerStatus(4, 2.5, None, 10.0, 400, 1, 2, 2, 0, 0, "v", 1, get_dht_time())
        await status_records.publish(b.dht, b.peer_id.to_base58(), "signed", status)
        assert await b.dht.store("signed.plain", [1, 2.5, "x"], expiration)

        for reader in (bootstrap, a, b):
            (read,) = records.parse_heartbeats(await reader.dht.get(records.peers_key("signed"), latest=True))
            assert (read.peer_id, read.outer_step, read.schema, read.about) == (a.peer_id, 4, "s" * 32, "about")
            assert read.expiration == expiration
            found = await reader.dht.get(status_records.status_key("signed"), latest=True)
            assert found.value[b.peer_id.to_base58()].value == status.to_value()
            found = await reader.dht.get(status_records.RUNS_KEY, latest=True)
            assert status_records.parse_runs(found) == ["signed"]
            assert (await reader.dht.get("signed.plain", latest=True)).value == [1, 2.5, "x"]


@pytest.mark.timeout(60)
async def test_a_node_signs_with_its_identity_key_and_keeps_no_temporary_key_file(tmp_path):
    path = str(tmp_path / "peer.key")
    async with await SwarmNode.create(NodeConfig(identity_path=path)) as node:
        assert node.peer_id == PeerID.from_identity((tmp_path / "peer.key").read_bytes())
        assert node.dht.protocol.record_validator.peer_id == node.peer_id
        first = node.peer_id
    async with await SwarmNode.create(NodeConfig(identity_path=path)) as node:
        assert node.peer_id == first  # the same file, the same id and signing key

    async with await SwarmNode.create(NodeConfig()) as node:
        assert node.dht.protocol.record_validator.peer_id == node.peer_id
        # The fresh key file p2pd started from is gone as soon as it started: the key lives on in memory only.
        with open(f"/proc/{node.p2p._child.pid}/cmdline", "rb") as f:  # noqa: ASYNC230 (procfs: never blocks)
            (key_file,) = [arg[4:] for arg in f.read().decode().split("\0") if arg.startswith("-id=")]
        assert os.path.basename(os.path.dirname(key_file)).startswith("swarm-identity-")
        assert not os.path.exists(os.path.dirname(key_file))

    (tmp_path / "garbage.key").write_bytes(b"\xff" * 40)
    with pytest.raises(ValueError, match="not a libp2p private key"):
        await SwarmNode.create(NodeConfig(identity_path=str(tmp_path / "garbage.key")))


@pytest.mark.timeout(180)
async def test_forged_majority_hash_with_a_poisoned_state_donor_is_not_adopted():
    """3 honest peers at outer step 1; an attacker holding a poisoned θ of that step tries to make it the majority.

    It writes θ-hash records for it under every honest peer's id (through its own DHT node and as raw bytes to
    every node), publishes it under its own id too (that one is valid: one vote of four), serves it from its
    state server and heartbeats at step 1, ahead of a newcomer at step 0. Unsigned, the forged records would
    replace the honest ones and the newcomer would take the poisoned θ (measured: it did).
    """
    async with swarm_of(5) as (bootstrap, nodes):
        theta, cfg = make_params(), config()
        honest = [await Swarm.create(node, theta, cfg) for node in nodes[:3]]
        attacker = newcomer = None
        try:
            reports = await asyncio.gather(*[s.outer_step(perturbed(theta, i), 100) for i, s in enumerate(honest)])
            assert [r.group_size for r in reports] == [3, 3, 3]
            for s, r in zip(honest, reports):
                await s.publish_hash(r)
            step, good = honest[0].global_step, reports[0].params_sha256

            attacker = await Swarm.create(nodes[3], [torch.full_like(p, 0.5) for p in theta], cfg, outer_step=step)
            poisoned = attacker.params_sha256()
            key = records.hash_key(cfg.namespace, step)
            expiration = get_dht_time() + 900  # outlives the honest records: unsigned, it would replace them
            validator = attacker.node.dht.protocol.record_validator
            for victim in honest:
                subkey = victim.node.peer_id.to_base58()
                assert not await attacker.node.dht.store(key, poisoned, expiration, subkey=subkey)
                blob = validator.sign_value(
                    DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                              MSGPackSerializer.dumps(poisoned), expiration)
                )  # fmt: skip
                targets = [bootstrap, *nodes[:3], nodes[4]]
                assert await _send_raw(attacker.node, targets, key, subkey, blob, expiration) == [False] * 5
            assert await attacker.node.dht.store(key, poisoned, expiration, subkey=attacker.node.peer_id.to_base58())

            newcomer = await Swarm.create(nodes[4], theta, cfg)
            published = records.parse_hashes(await newcomer.node.dht.get(key, latest=True))
            assert published == {**{s.node.peer_id: good for s in honest}, attacker.node.peer_id: poisoned}
            for _ in range(100):  # the attacker is a donor candidate: its heartbeat must be visible first
                if any(h.peer_id == attacker.node.peer_id for h in await newcomer.matchmaker.live_peers()):
                    break
                await asyncio.sleep(0.1)

            assert await newcomer.join_run(timeout_seconds=20)
            assert newcomer.global_step == step and newcomer.params_sha256() == good
            for s in honest:
                assert not await s.repair_drift(timeout_seconds=20)
                assert not await s.catch_up(timeout_seconds=20)
                assert s.params_sha256() == good
        finally:
            for s in [*honest, attacker, newcomer]:
                if s is not None:
                    await s.close()


@pytest.mark.timeout(30)
def test_validator_refuses_oversized_and_malformed_records_before_any_rsa_work():
    identity = signing.NodeIdentity.open(None)
    try:
        validator = identity.validator()
        key = DHTID.generate(source="signed.peers").to_bytes()
        subkey = MSGPackSerializer.dumps(validator.peer_id.to_base58())
        record = DHTRecord(key, subkey, MSGPackSerializer.dumps({"step": 1}), get_dht_time() + 60)
        signed = dataclasses.replace(record, value=validator.sign_value(record))
        assert validator.validate(signed)
        assert MSGPackSerializer.loads(validator.strip_value(signed)) == {"step": 1}

        big = dataclasses.replace(record, value=b"\x00" * (signing.MAX_VALUE_BYTES + 1))
        assert not validator.validate(dataclasses.replace(big, value=validator.sign_value(big)))
        assert not validator.validate(record)  # unsigned
        assert not validator.validate(dataclasses.replace(record, value=b"sws1\xff\xff\x00\x10" + b"\x00" * 64))
        assert not validator.validate(dataclasses.replace(record, value=signed.value[:100]))  # cut short
    finally:
        identity.close()
