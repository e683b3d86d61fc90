"""Matchmaking: the peers of a run that finished outer step t agree on one group to average with.

No coordinator: every peer looking for a group for step t declares itself under the DHT key `{run}.step{t}`. The
declared peer with the smallest peer id is the leader; the others open a join stream to it. The leader closes the
group as soon as every live peer of the run at step t has joined (heartbeats tell who is alive and where), or, at the
latest, shortly before the earliest deadline among its members. It then sends every member the same ordered member
list and a fresh group id. A peer that sees a smaller leader than its own leader-candidate redirects its followers
there, so groups converge on the smallest peer id; a leader that refuses, dies, or fails to answer is skipped and the
next one is tried (one that did not answer is taken back once it declares itself looking anew: a crashed peer
restarted with its identity is the same peer). A peer that finds no group before its deadline gets None and averages
alone; one that sees no other live peer of its run at all for a few seconds (`alone_after_seconds`) gets a group of
one at once instead; one that sees the round go ahead without it (peers done with the step are past it) gets
RoundHeld, and takes the run's θ rather than make a second θ of the step.

Join protocol (one binary stream per join, frames from `swarm.wire`):
  follower -> leader: {"type": "join", "step": t, "schema": s, "deadline": d, "direct": [[ip, port], ...],
                       "about": setup in words, "shards": [[id, endpoints], ...], "excludes": [ids]}
  leader -> follower: {"type": "accepted"} | {"type": "rejected", "reason": r} | {"type": "redirect", "leader": id}
  once accepted: {"type": "begin", "group_id": b, "peers": [ids], "secret": 32 bytes, "direct": {id: endpoints},
                  "keys": {id: direct key}, "shards": {id: [[id, endpoints, key], ...]}}
                 | {"type": "redirect", ...} | {"type": "disband"}
  ("direct", "keys" and "secret" set up the group's direct data plane: see swarm.direct; "shards" names the nodes of a
   sharded peer's other workers, which average their shards in parallel: see swarm.sharded; "excludes" names the
   peers the follower caught lying (Matchmaker.ban): the leader refuses a join that would put it in a group with
   one of them, either way round)
  leader -> peer it waits for: {"type": "ping", "step": the step it looks for a group for}
  peer -> leader: {"type": "pong", "step": its outer step, "looking": step it looks for a group for (-1: none),
                   "leading": whether it leads its own search, "next": the round its next contribution goes to}
  (a peer pinged for the round it feeds next ends its inner loop early: `on_awaited`, see swarm.sequence)

A leader pings the peers it waits for that have not joined yet. A peer that crashed leaves its heartbeat in the DHT for
a few seconds; the ping fails at once on its dead daemon, and nobody waits for it. The DHT can also be stale or
incomplete under churn, so a leader also waits for the members of the peer's previous group (`known`) until a ping
says where they are: at another step (not waited for), or leading a search of their own with a smaller peer id
(then we follow it). Either way two leaders never close two groups for one step without knowing of each other. After
a failed round, its members retry each when it learns of the failure: the first waits for the others (`regroup`),
although their declarations from the failed try say they are done with the step (one still stuck in the failed
all-reduce is waited for until it retries, or at most until the deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field

from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm import records
from swarm.direct import parse_endpoints
from swarm.node import SwarmNode
from swarm.wire import ProtocolError, close_writer, read_frame, require, write_frame

logger = logging.getLogger(__name__)

_MAX_EXCLUDES = 1024  # peers named in one join request's "excludes" (the newest bans), and read from one


@dataclass
class MatchmakingConfig:
    min_group_size: int = 2
    """Smallest group worth averaging in; with fewer peers a peer averages alone (group size 1)."""
    max_group_size: int | None = None
    """Largest group a leader closes; None takes every live peer of the run."""
    timeout_seconds: float = 30.0
    """How long a peer looks for a group before it averages alone."""
    poll_interval_seconds: float = 0.3
    """How often a looking peer re-reads the DHT."""
    heartbeat_interval_seconds: float = 2.0
    """How often a peer renews its liveness record; the record lives for three intervals."""
    request_timeout_seconds: float = 5.0
    """Bound on one join request's first answer."""
    alone_after_seconds: float | None = None
    """A peer that sees no other live peer of its run (same setup) for this long stops looking and averages alone
    instead of waiting out the timeout. None: three heartbeat intervals, the lifetime of a heartbeat record, so a
    live peer whose renewal one lookup missed still shows up in time."""

    @property
    def alone_after(self) -> float:
        if self.alone_after_seconds is not None:
            return self.alone_after_seconds
        return 3 * self.heartbeat_interval_seconds

    def validate(self) -> None:
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size must be at least 1, got {self.min_group_size}")
        if self.max_group_size is not None and self.max_group_size < self.min_group_size:
            raise ValueError(
                f"max_group_size ({self.max_group_size}) must be at least min_group_size ({self.min_group_size})"
            )
        if self.timeout_seconds <= 0:
            raise ValueError(f"matchmaking timeout must be positive, got {self.timeout_seconds}")
        if self.alone_after_seconds is not None and self.alone_after_seconds <= 0:
            raise ValueError(f"alone_after_seconds must be positive, got {self.alone_after_seconds}")


@dataclass(frozen=True)
class Group:
    group_id: bytes
    outer_step: int
    peer_ids: tuple[PeerID, ...]
    """Members in the order every member uses: part i of the vector is reduced by peer_ids[i]."""
    my_index: int
    secret: bytes = field(default=b"", repr=False, compare=False)
    """Random per group, known only to its members: authenticates direct connections (swarm.direct)."""
    direct: dict = field(default_factory=dict, repr=False, compare=False)
    """Peer id -> direct endpoints [(ip, port)] it announced; peers without any are reached through p2p only."""
    shards: dict = field(default_factory=dict, repr=False, compare=False)
    """Peer id -> [(node id, endpoints, key)] of its workers 1..N-1, for peers sharded over N workers."""
    keys: dict = field(default_factory=dict, repr=False, compare=False)
    """Peer id -> the X25519 public key it announced for direct connections (swarm.direct.DirectKey)."""

    @property
    def size(self) -> int:
        return len(self.peer_ids)

    def for_shard(self, index: int) -> Group:
        """The group in which worker `index` of every member averages its shard: same members, same order.

        Its id and secret derive from this group's, so the shard rounds of one group never mix with another's.
        """
        if index == 0:
            return self
        nodes = []
        for peer in self.peer_ids:
            workers = self.shards.get(peer, [])
            if len(workers) < index:
                raise ProtocolError(f"member {peer} did not name its worker {index}: it is not sharded like us")
            nodes.append(workers[index - 1])
        tag = b"shard" + index.to_bytes(4, "big")
        group_id = hashlib.sha256(self.group_id + tag).digest()[:16]
        secret = hmac.new(self.secret, tag, hashlib.sha256).digest() if self.secret else b""
        direct = {node: endpoints for node, endpoints, _ in nodes if endpoints}
        keys = {node: key for node, _, key in nodes if key}
        ids = tuple(node for node, _, _ in nodes)
        if len(set(ids)) != len(ids):
            raise ProtocolError("members named the same worker node twice")
        return Group(group_id, self.outer_step, ids, self.my_index, secret, direct, keys=keys)


def parse_shard_nodes(value) -> list[tuple[PeerID, list, bytes]]:
    """[(node id, endpoints, direct key)] from a join request or begin message; malformed entries raise
    ProtocolError."""
    if not isinstance(value, list) or len(value) > 1024:
        raise ProtocolError("shards must be a list")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str):
            raise ProtocolError("each shard node is [peer id, endpoints, direct key]")
        try:
            node = PeerID.from_base58(item[0])
        except Exception as e:
            raise ProtocolError(f"bad shard node id {item[0]!r}") from e
        out.append((node, parse_endpoints(item[1]), parse_key(item[2])))
    return out


def parse_key(value) -> bytes:
    """A direct key from a message: 32 bytes, or empty for a member without a direct data plane."""
    if not isinstance(value, bytes) or len(value) not in (0, 32):
        raise ProtocolError("a direct key is 32 bytes")
    return value


def parse_excludes(value) -> frozenset:
    """The peer ids a join request names as excluded (see Matchmaker.ban); malformed ones raise ProtocolError."""
    if not isinstance(value, list) or len(value) > _MAX_EXCLUDES or not all(isinstance(p, str) for p in value):
        raise ProtocolError(f"excludes must be a list of at most {_MAX_EXCLUDES} peer ids")
    try:
        return frozenset(PeerID.from_base58(p) for p in value)
    except Exception as e:
        raise ProtocolError(f"bad peer id in excludes: {e}") from None


def _shard_nodes_value(nodes) -> list:
    return [[node.to_base58(), [list(e) for e in endpoints], key] for node, endpoints, key in nodes]


@dataclass(frozen=True)
class RoundHeld:
    """form_group's answer when the round was held without us while we looked for it: peers that were done with it
    are past it. Averaging alone now would make a second θ of the step; the caller takes the run's θ instead and
    carries its work into the next round (swarm.sequence)."""

    outer_step: int
    past: tuple[PeerID, ...]
    """The peers done with the round and past it: they hold its θ."""


@dataclass
class _Follower:
    deadline: float
    direct: list = field(default_factory=list)
    key: bytes = b""
    shards: list = field(default_factory=list)
    excludes: frozenset = frozenset()
    """The peers it will not share a group with (see Matchmaker.banned)."""
    outcome: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Looking:
    """This peer's matchmaking state for one outer step."""

    outer_step: int
    deadline: float
    leader: PeerID | None = None  # whom we follow; None while we lead (possibly a group of one)
    followers: dict[PeerID, _Follower] = field(default_factory=dict)
    excluded: dict[PeerID, float] = field(default_factory=dict)
    """Peers not to try as leader, until the given DHT time. Skipping a leader never means not waiting for it."""
    dead: set[PeerID] = field(default_factory=set)
    """Peers not to wait for: they did not answer a ping, or were lost in a failed round of this step."""
    known: set[PeerID] = field(default_factory=set)
    """Peers expected at this step whatever the DHT says (e.g. the last group), until a ping says otherwise."""
    regroup: set[PeerID] = field(default_factory=set)
    """The other members of a failed round of this step: expected even though their declaration says they are done
    with this step (they made it before the round failed, and may not have seen it fail yet), until a ping says
    they moved on."""
    declared: dict[PeerID, float] = field(default_factory=dict)
    """The deadline of each peer's latest "looking" declaration we read."""
    unreachable: dict[PeerID, float] = field(default_factory=dict)
    """Peers we gave up on because they did not answer, with the deadline of the declaration we knew then: a
    declaration made after that (a restarted peer with the same identity, or a new try) brings them back."""
    lost: frozenset = frozenset()
    """The caller's `exclude` (members lost in a failed round of this step): never waited for, even once back."""
    taken_back: set[PeerID] = field(default_factory=set)
    """Peers brought back by a new declaration: if one fails to answer again, it is skipped only for a while (its
    first answer may still meet the dial backoff that its crash left), not for the rest of the search."""
    heard: dict[PeerID, dict] = field(default_factory=dict)
    """The latest pong of each pinged peer."""
    better_leader: PeerID | None = None
    probes: dict[PeerID, asyncio.Task] = field(default_factory=dict)
    closed: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Matchmaker:
    def __init__(
        self, node: SwarmNode, run_id: str, schema: str, config: MatchmakingConfig | None = None, about: str = ""
    ):
        self.node, self.run_id, self.schema, self.about = node, records.validate_namespace(run_id), schema, about
        self._warned_incompatible: set[PeerID] = set()
        self.banned: dict[PeerID, str] = {}
        """Peers caught sending garbage to our all-reduces, with the reason: never in a group with us again in this
        run (in memory only: a restart forgets). See `ban`."""
        self.config = config or MatchmakingConfig()
        self.config.validate()
        self.outer_step = 0
        self._protocol = f"swarm/{run_id}/join/1"
        self._looking: _Looking | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._heartbeat_now = asyncio.Event()
        self._closing = False
        self.direct_endpoints: list[tuple[str, int]] = []
        """This peer's direct data-plane endpoints, announced when it joins a group (set by its averager)."""
        self.direct_key: bytes = b""
        """The public key that authenticates this peer's direct connections (set by its averager)."""
        self.shard_nodes: list[tuple[PeerID, list, bytes]] = []
        """Nodes (and direct endpoints) of this peer's workers 1..N-1 when it is sharded over N workers."""
        self.next_round: int | None = None
        """The round this peer's next contribution goes to (set by its outer-step sequence). An overlapped peer
        trains for round t while its round t-1 may still be in flight, its outer step still t-1."""
        self.on_awaited = None
        """Called with the step when a leader looking for a group for `next_round` pings us: it waits for us."""

    @property
    def peer_id(self) -> PeerID:
        return self.node.peer_id

    async def start(self) -> None:
        await self.node.add_stream_handler(self._protocol, self._handle_join)
        # The first heartbeat is stored before start returns: a peer that has started is one the run's leaders wait
        # for. Were it stored in the background, peers that start together and look for a group at once could close
        # one without it (a leader takes every live peer it sees, and sees it only once its heartbeat is stored).
        await self._beat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())

    async def close(self) -> None:
        self._closing = True
        self._heartbeat_now.set()
        if self._heartbeat_task is not None:
            # Python 3.11's wait_for can swallow a cancellation that races with its inner future: the flag above
            # ends the loop either way, and the wait below is bounded.
            self._heartbeat_task.cancel()
            await asyncio.wait({self._heartbeat_task}, timeout=5)
            self._heartbeat_task = None
        with contextlib.suppress(Exception):
            await self.node.remove_stream_handler(self._protocol)

    def ban(self, peer: PeerID, reason: str) -> None:
        """Never group with `peer` again in this run: we lead no group with it, and follow no leader whose group
        holds it. Only for a peer caught lying (a lost or slow one is merely left out of one step's retries)."""
        if peer == self.peer_id or peer in self.banned:
            return
        self.banned[peer] = reason
        logger.warning(f"excluding {peer} from this peer's groups for the rest of run {self.run_id!r}: {reason}")

    def set_outer_step(self, outer_step: int) -> None:
        """Tell the swarm (at once) which outer step this peer now works on."""
        self.outer_step = outer_step
        self._heartbeat_now.set()

    # ---- liveness -------------------------------------------------------------------------------------------------

    async def _beat(self) -> None:
        """Store this peer's heartbeat: its outer step, setup and liveness for three heartbeat intervals."""
        interval = self.config.heartbeat_interval_seconds
        self._heartbeat_now.clear()
        value = records.Heartbeat(self.peer_id, self.outer_step, self.schema, 0.0, self.about).to_value()
        store = self.node.dht.store(
            records.peers_key(self.run_id), value, get_dht_time() + 3 * interval, subkey=self.peer_id.to_base58()
        )
        try:  # bounded: a record stored later than its own lifetime is of no use
            await asyncio.wait_for(store, 3 * interval)
        except Exception as e:  # a DHT hiccup must not kill the peer; the next beat retries
            logger.debug(f"heartbeat failed: {e!r}")

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._heartbeat_now.wait(), self.config.heartbeat_interval_seconds)
            if not self._closing:
                await self._beat()

    async def live_peers(self) -> list[records.Heartbeat]:
        found = await self.node.dht.get(records.peers_key(self.run_id), latest=True)
        now = get_dht_time()
        live = [h for h in records.parse_heartbeats(found) if h.expiration > now]
        for h in live:
            if h.schema != self.schema and h.peer_id not in self._warned_incompatible:
                self._warned_incompatible.add(h.peer_id)
                logger.warning(
                    f"peer {h.peer_id} of run {self.run_id!r} is incompatible and will never average with this peer:"
                    f" it runs {h.about or 'an unknown setup'}; this peer runs {self.about}"
                )
        return live

    async def declarations(self, outer_step: int) -> list[records.Declaration]:
        found = await self.node.dht.get(records.step_key(self.run_id, outer_step), latest=True)
        return records.parse_declarations(found)

    async def _declare(self, state: _Looking, looking: bool) -> None:
        decl = records.Declaration(self.peer_id, self.schema, state.deadline, looking)
        # A later expiration overrides the earlier record, so "no longer looking" replaces "looking".
        expiration = state.deadline + (0.0 if looking else 1e-3)
        with contextlib.suppress(Exception):
            await self.node.dht.store(
                records.step_key(self.run_id, state.outer_step),
                decl.to_value(),
                expiration,
                subkey=self.peer_id.to_base58(),
            )

    # ---- looking for a group --------------------------------------------------------------------------------------

    async def sit_out(self, outer_step: int) -> None:
        """Tell leaders of `outer_step` not to wait for us: we contribute nothing to that round."""
        state = _Looking(outer_step, get_dht_time() + self.config.timeout_seconds)
        await self._declare(state, looking=False)

    async def form_group(
        self, outer_step: int, exclude=(), known=(), timeout: float | None = None, regroup=()
    ) -> Group | RoundHeld | None:
        """Find a group for `outer_step` within `timeout` (default: the configured one); None if this peer should
        average alone; RoundHeld if the round went ahead without us meanwhile (see round_progress).

        A group of this peer alone comes back early when no other peer of the run is alive (see alone_after_seconds).

        Peers in `exclude` (e.g. members lost in a failed round of this step) are not waited for. Peers in `known`
        (e.g. the members of our previous group) are waited for until they join or a ping says they are elsewhere.
        Peers in `regroup` (the other members of a failed round of this step) are waited for in the same way, even
        though they declared themselves done with this step: each member learns that the round failed at its own
        moment, and the first to retry must not close a group without the others, or the step splits in two θs.
        Banned peers (see `ban`) are never in the group.
        """
        if self._looking is not None:
            raise RuntimeError("form_group is already running on this peer")
        # Not waited for, but still followed if they lead: a peer we wrongly took for lost loses nothing.
        # Banned peers are neither waited for nor followed, nor let in when we lead (see _handle_join).
        deadline = get_dht_time() + (self.config.timeout_seconds if timeout is None else timeout)
        state = _Looking(outer_step, deadline, dead=set(exclude) | set(self.banned), lost=frozenset(exclude))
        state.excluded.update(dict.fromkeys(self.banned, float("inf")))
        state.regroup = set(regroup) - state.dead - {self.peer_id}
        state.known = (set(known) | state.regroup) - state.dead - {self.peer_id}
        self._looking = state
        try:
            await self._declare(state, looking=True)
            return await self._look(state)
        finally:
            state.closed = True
            for probe in state.probes.values():
                probe.cancel()
            for follower in state.followers.values():
                if not follower.outcome.done():
                    follower.outcome.set_result({"type": "disband"})
            self._looking = None
            await self._declare(state, looking=False)

    async def _look(self, state: _Looking) -> Group | None:
        margin = min(1.0, 0.1 * self.config.timeout_seconds)
        target: PeerID | None = None
        last_seen_other = get_dht_time()  # when we last saw any other live peer we could average with
        while True:
            now = get_dht_time()
            if now >= state.deadline - margin:
                break
            if target is None:
                decls, live = await asyncio.gather(self.declarations(state.outer_step), self.live_peers())
                self._note_declarations(state, decls)
                candidates = [
                    d.peer_id
                    for d in decls
                    if d.looking
                    and d.schema == self.schema
                    and d.deadline > now
                    and state.excluded.get(d.peer_id, 0) <= now
                ]
                best = min([self.peer_id, *candidates], key=lambda p: p.to_bytes())
                if best != self.peer_id:
                    target = best
                else:
                    # Before closing: late peers that closed a group of their own would split the step in two θs.
                    held = self._held_without_us(state, decls, live, now)
                    if held is not None:
                        return held
                    group = self._maybe_close_group(state, decls, live, now)
                    if group is not None:
                        return group
                    if self._anyone_else(state, decls, live, now):
                        last_seen_other = now
                    elif now - last_seen_other >= self.config.alone_after:
                        # Nobody else is alive in this run: waiting out the timeout would only delay our step.
                        logger.debug(f"no other live peer of the run for step {state.outer_step}")
                        return self._close_group(state)  # a group of one: the caller averages alone
                    if state.better_leader is not None and state.excluded.get(state.better_leader, 0) <= now:
                        target, state.better_leader = state.better_leader, None
                        continue
                    state.changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(state.changed.wait(), self.config.poll_interval_seconds)
                    continue
            if state.followers:
                # A smaller leader exists: bring our followers along rather than splitting the run in two groups.
                self._release_followers(state, {"type": "redirect", "leader": target.to_base58()})
            group, target = await self._follow(state, target)
            if group is not None:
                return group
        # Deadline: close what we have if it is big enough, else everyone averages alone.
        if len(state.followers) + 1 >= self.config.min_group_size and len(state.followers) > 0:
            return self._close_group(state)
        return None

    def _note_declarations(self, state: _Looking, decls) -> None:
        """Remember who declares itself looking, and take back a peer we gave up on that declared itself anew: a
        peer killed and restarted with the same identity is the same peer, and must not be shunned for the rest of
        the search (it would lead or wait on its own, and the step would split)."""
        for d in decls:
            if not d.looking:
                continue
            gave_up = state.unreachable.get(d.peer_id)
            if gave_up is not None and d.deadline > gave_up and d.peer_id not in self.banned:
                logger.info(f"{d.peer_id} looks for a group for step {state.outer_step} again: taking it back")
                del state.unreachable[d.peer_id]
                if d.peer_id not in state.lost:  # lost in a failed round of this step: followed, never waited for
                    state.dead.discard(d.peer_id)
                state.excluded.pop(d.peer_id, None)
                state.heard.pop(d.peer_id, None)
                state.taken_back.add(d.peer_id)
            state.declared[d.peer_id] = d.deadline

    def _unreachable(self, state: _Looking, peer: PeerID) -> None:
        """Neither wait for `peer` nor follow it, until it declares itself looking anew (_note_declarations); one
        taken back before is tried as a leader again after a while."""
        state.dead.add(peer)
        again = peer in state.taken_back
        state.excluded[peer] = get_dht_time() + self.config.request_timeout_seconds if again else float("inf")
        state.unreachable[peer] = state.declared.get(peer, float("-inf"))

    def _maybe_close_group(self, state: _Looking, decls, live, now: float) -> Group | None:
        members = {self.peer_id, *state.followers}
        size = len(members)
        cfg = self.config
        if cfg.max_group_size is not None and size >= cfg.max_group_size:
            return self._close_group(state)
        if size < cfg.min_group_size:
            return None
        done = {d.peer_id for d in decls if not d.looking} - state.regroup
        expected = {h.peer_id for h in live if h.outer_step == state.outer_step and h.schema == self.schema} | {
            d.peer_id for d in decls if d.looking and d.schema == self.schema and d.deadline > now
        }
        # Leaders we skipped are still waited for: one that redirected us may lead a moment later, and closing
        # without it would split the step into two groups that never meet.
        expected |= state.known
        expected -= done | state.dead
        for peer in list(expected - members):
            heard = state.heard.get(peer)
            coming = (heard.get("step"), heard.get("looking"), heard.get("next")) if heard is not None else ()
            if heard is not None and state.outer_step not in coming:
                expected.discard(peer)  # it said it is at another step: not coming to this round
        if expected <= members:
            return self._close_group(state)
        for peer in expected - members:
            self._probe_later(state, peer)
        earliest = min([state.deadline, *(f.deadline for f in state.followers.values())])
        if now >= earliest - min(1.0, 0.1 * cfg.timeout_seconds) - cfg.poll_interval_seconds:
            return self._close_group(state)
        return None

    def round_progress(self, step: int, decls, live, now: float, ignore=()) -> tuple[str | None, frozenset]:
        """Where round `step` stands for a peer that comes to it only now, from the round's declarations and the
        heartbeats: ("held", the peers past it) when nobody looks for it any more and peers of the run are past it
        (it went ahead without us); ("in flight", ()) when enough peers to form a group are done with it and nobody
        looks for it any more (it was formed without us, its all-reduce is under way); (None, ()) while we may still
        take part. A peer that merely sat the round out (a NaN) is done with it too, but it is neither a group nor
        past the round. Peers in `ignore` (our followers, and peers we gave up on) count for neither. A peer past
        the round counts without a declaration: "done" records expire with their search's deadline, which can come
        before a slow round lands."""
        me = self.peer_id
        others = [d for d in decls if d.schema == self.schema and d.peer_id != me and d.peer_id not in ignore]
        if any(d.looking and d.deadline > now for d in others):
            return None, frozenset()
        done = {d.peer_id for d in others if not d.looking}
        past = {h.peer_id for h in live if h.schema == self.schema and h.outer_step > step} - {me, *ignore}
        if past:
            return "held", frozenset(past)
        if len(done) >= max(2, self.config.min_group_size):
            return "in flight", frozenset()
        return None, frozenset()

    def _held_without_us(self, state: _Looking, decls, live, now: float) -> RoundHeld | None:
        """RoundHeld if the round went ahead without us while we led a search for it (see round_progress).

        Waiting on would only end in averaging alone at the deadline: one step, two θs. Not after a failed try of
        the round: its members declared themselves done before it failed and retry each when it learns of it; nor
        with a largest group size (--max-group-size): another group of the step may have gone ahead legitimately."""
        if state.regroup or self.config.max_group_size is not None:
            return None
        progress, past = self.round_progress(state.outer_step, decls, live, now, ignore={*state.followers, *state.dead})
        if progress != "held":
            return None
        logger.info(
            f"round {state.outer_step} went ahead without this peer ({len(past)} peer(s) done with it are past it):"
            " taking the run's state instead of averaging alone"
        )
        return RoundHeld(state.outer_step, tuple(sorted(past, key=lambda p: p.to_bytes())))

    def _anyone_else(self, state: _Looking, decls, live, now: float) -> bool:
        """Whether any other peer we could average with is alive in the run, at this step or any other.

        A peer behind us (still in its inner loop, just started) counts: it may come to this round. The peers we
        would wait for at this round are pinged, so one that died is dropped at once, not when its heartbeat expires.
        """
        if state.followers:
            return True
        at_step = {h.peer_id for h in live if h.schema == self.schema and h.outer_step == state.outer_step}
        waited_for = (at_step | state.known) - state.dead - {self.peer_id}
        for peer in waited_for:
            self._probe_later(state, peer)
        others = {h.peer_id for h in live if h.schema == self.schema} | waited_for
        others |= {d.peer_id for d in decls if d.looking and d.schema == self.schema and d.deadline > now}
        return bool(others - state.dead - {self.peer_id})

    def _probe_later(self, state: _Looking, peer: PeerID) -> None:
        """Ping a peer we wait for (one ping in flight, one per two polls); stop waiting for it if it is dead."""
        probe = state.probes.get(peer)
        if probe is not None and not probe.done():
            return
        if probe is not None and probe.result() + 2 * self.config.poll_interval_seconds > get_dht_time():
            return

        async def ping() -> float:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    self.node.open_stream(peer, self._protocol), self.config.request_timeout_seconds
                )
                await write_frame(writer, {"type": "ping", "step": state.outer_step})
                reply, _ = await asyncio.wait_for(
                    read_frame(reader, max_payload=0), self.config.request_timeout_seconds
                )
                if reply.get("type") == "pong":
                    state.heard[peer] = reply
                    smaller = peer.to_bytes() < self.peer_id.to_bytes()
                    if reply.get("looking") == state.outer_step and reply.get("leading") is True and smaller:
                        state.better_leader = peer  # it leads a search of its own that the DHT did not show us
                    state.changed.set()
            except Exception as e:
                logger.info(f"not waiting for {peer} at step {state.outer_step}: it does not answer ({e!r})")
                self._unreachable(state, peer)
                state.changed.set()
            finally:
                if writer is not None:
                    close_writer(writer)
            return get_dht_time()

        state.probes[peer] = asyncio.create_task(ping())

    def _close_group(self, state: _Looking) -> Group:
        peers = sorted([self.peer_id, *state.followers], key=lambda p: p.to_bytes())
        # Random bytes make every group distinct, even the same members meeting again after a failed round.
        seed = [self.run_id.encode(), str(state.outer_step).encode(), os.urandom(16), *(p.to_bytes() for p in peers)]
        group_id = hashlib.sha256(b"".join(seed)).digest()[:16]
        direct = {peer: follower.direct for peer, follower in state.followers.items() if follower.direct}
        if self.direct_endpoints:
            direct[self.peer_id] = self.direct_endpoints
        secret = os.urandom(32)
        shards = {peer: follower.shards for peer, follower in state.followers.items() if follower.shards}
        if self.shard_nodes:
            shards[self.peer_id] = self.shard_nodes
        keys = {peer: follower.key for peer, follower in state.followers.items() if follower.key}
        if self.direct_key:
            keys[self.peer_id] = self.direct_key
        message = {
            "type": "begin",
            "group_id": group_id,
            "peers": [p.to_base58() for p in peers],
            "secret": secret,
            "direct": {p.to_base58(): [list(e) for e in endpoints] for p, endpoints in direct.items()},
            "shards": {p.to_base58(): _shard_nodes_value(nodes) for p, nodes in shards.items()},
            "keys": {p.to_base58(): key for p, key in keys.items()},
        }
        state.closed = True
        self._release_followers(state, message)
        logger.debug(f"{self.peer_id} leads group {group_id.hex()} of {len(peers)} for step {state.outer_step}")
        return Group(group_id, state.outer_step, tuple(peers), peers.index(self.peer_id), secret, direct, shards, keys)

    def _release_followers(self, state: _Looking, message: dict) -> None:
        for follower in state.followers.values():
            if not follower.outcome.done():
                follower.outcome.set_result(message)
        state.followers.clear()

    async def _follow(self, state: _Looking, leader: PeerID) -> tuple[Group | None, PeerID | None]:
        """Join `leader`. Returns (group, None) on success, (None, next_leader) on redirect, (None, None) on failure."""
        state.leader = leader
        writer = None
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    self.node.open_stream(leader, self._protocol),
                    self.config.request_timeout_seconds,
                )
            except Exception as e:  # unreachable: neither follow it nor wait for it
                logger.debug(f"cannot reach {leader} for step {state.outer_step}: {e!r}")
                self._unreachable(state, leader)
                return None, None
            request = {"type": "join", "step": state.outer_step, "schema": self.schema, "deadline": state.deadline}
            request["direct"] = [list(e) for e in self.direct_endpoints]
            request["direct_key"] = self.direct_key
            request["about"] = self.about
            if self.shard_nodes:
                request["shards"] = _shard_nodes_value(self.shard_nodes)
            if self.banned:  # so that the leader puts us in no group with them, rather than we leave it later
                request["excludes"] = [p.to_base58() for p in list(self.banned)[-_MAX_EXCLUDES:]]
            await write_frame(writer, request)
            reply, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), self.config.request_timeout_seconds)
            if reply.get("type") == "accepted":
                remaining = max(0.1, state.deadline - get_dht_time() + self.config.request_timeout_seconds)
                reply, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), remaining)
            kind = reply.get("type")
            if kind == "begin":
                group = self._parse_begin(state, leader, reply)
                shunned = [p for p in group.peer_ids if p in self.banned]
                if not shunned:
                    return group, None
                # A leader that ignored our excludes: we take no part (its round fails over us, and it retries
                # without us) and look on for another leader, or lead.
                logger.info(f"left the group of {leader} for step {state.outer_step}: it holds {shunned[0]}, excluded")
                state.excluded[leader] = float("inf")
                return None, None
            if kind == "redirect":
                # It follows someone else right now; it may lead later (if its own leader fails): skip it briefly.
                state.excluded[leader] = get_dht_time() + 3 * self.config.poll_interval_seconds
                next_leader = PeerID.from_base58(require(reply, "leader", str))
                skip = state.excluded.get(next_leader, 0) > get_dht_time() or next_leader == self.peer_id
                return None, (None if skip else next_leader)
            reason = str(reply.get("reason", "no reason given")) if kind == "rejected" else f"sent {kind!r}"
            level = logging.WARNING if "incompatible" in reason else logging.DEBUG
            logger.log(level, f"peer {leader} refused us for step {state.outer_step}: {reason}")
            if "not looking" in reason:
                # Not (or no longer, or not yet) looking for this step: it may be soon, so skip it only briefly.
                state.excluded[leader] = get_dht_time() + 3 * self.config.poll_interval_seconds
            else:
                state.excluded[leader] = float("inf")
            return None, None
        except Exception as e:  # a late answer, a stream cut, a malformed reply: try another leader for a while
            logger.debug(f"joining {leader} for step {state.outer_step} failed: {e!r}")
            state.excluded[leader] = get_dht_time() + self.config.request_timeout_seconds
            return None, None
        finally:
            state.leader = None
            if writer is not None:
                close_writer(writer)

    def _parse_begin(self, state: _Looking, leader: PeerID, reply: dict) -> Group:
        group_id = require(reply, "group_id", bytes)
        peers = tuple(PeerID.from_base58(p) for p in require(reply, "peers", list))
        if self.peer_id not in peers or leader not in peers or len(set(peers)) != len(peers):
            raise ProtocolError(f"leader {leader} sent a group that does not hold both of us")
        secret = reply.get("secret", b"")
        direct = {}
        if isinstance(secret, bytes) and len(secret) == 32 and isinstance(reply.get("direct"), dict):
            for peer, endpoints in reply["direct"].items():
                peer_id = PeerID.from_base58(peer) if isinstance(peer, str) else None
                if peer_id in peers:
                    direct[peer_id] = parse_endpoints(endpoints)
        else:
            secret = b""  # an older leader or a malformed offer: the relayed streams work without it
        keys = {}
        if secret and isinstance(reply.get("keys"), dict):
            for peer, key in reply["keys"].items():
                peer_id = PeerID.from_base58(peer) if isinstance(peer, str) else None
                if peer_id in peers:
                    keys[peer_id] = parse_key(key)
        shards = {}
        offered = reply.get("shards", {})
        if isinstance(offered, dict):
            for peer, nodes in offered.items():
                peer_id = PeerID.from_base58(peer) if isinstance(peer, str) else None
                if peer_id in peers:
                    shards[peer_id] = parse_shard_nodes(nodes)
        return Group(group_id, state.outer_step, peers, peers.index(self.peer_id), secret, direct, shards, keys)

    # ---- serving join requests ------------------------------------------------------------------------------------

    def _excluding(self, state: _Looking, peer: PeerID, excludes: frozenset) -> str | None:
        """Why `peer` cannot join our group: it excludes one of its members, or one of them excludes it; else None.

        The first to join keeps its place: a liar that joins first and names honest peers keeps them out of this
        group only (they lead or follow another), never out of the run. A peer refused so is not waited for."""
        member = next((p for p in [self.peer_id, *state.followers] if p in excludes), None)
        shunner = next((p for p, f in state.followers.items() if peer in f.excludes), None)
        if member is None and shunner is None:
            return None
        state.dead.add(peer)
        state.changed.set()
        if member is not None:
            return f"you exclude {member}, a member of this group"
        return f"{shunner}, a member of this group, excludes you"

    async def _handle_join(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id
        try:
            request, _ = await asyncio.wait_for(read_frame(reader, max_payload=0), self.config.request_timeout_seconds)
            if request.get("type") == "ping":
                looking = self._looking
                active = looking is not None and not looking.closed
                await write_frame(
                    writer,
                    {
                        "type": "pong",
                        "step": self.outer_step,
                        "looking": looking.outer_step if active else -1,
                        "leading": active and looking.leader is None,
                        "next": self.next_round,
                    },
                )
                step = request.get("step")
                if step == self.next_round and not active and self.on_awaited is not None and isinstance(step, int):
                    self.on_awaited(step)
                return
            step = require(request, "step", int)
            schema = require(request, "schema", str)
            deadline = float(require(request, "deadline", (int, float)))
            state = self._looking
            reason = None
            if request.get("type") != "join":
                reason = f"unexpected message type {request.get('type')!r}"
            elif schema != self.schema:
                theirs = str(request.get("about", ""))[:200] or "an unknown setup"
                reason = (
                    f"incompatible setup: this peer runs {self.about or self.schema}; you run {theirs}"
                    " (other model, codec, version or worker layout)"
                )
                logger.warning(f"refused {peer} for step {step}: {reason}")
            elif peer in self.banned:
                reason = f"this peer excludes you from its groups for the rest of the run: {self.banned[peer]}"
            elif state is None or state.outer_step != step:
                reason = f"not looking for a group for step {step}"
            elif state.closed:
                reason = "group already closed"
            elif state.leader is not None:
                await write_frame(writer, {"type": "redirect", "leader": state.leader.to_base58()})
                return
            elif self.config.max_group_size is not None and len(state.followers) + 1 >= self.config.max_group_size:
                reason = "group is full"
            else:
                reason = self._excluding(state, peer, parse_excludes(request.get("excludes", [])))
            if reason is not None:
                await write_frame(writer, {"type": "rejected", "reason": reason})
                return
            follower = _Follower(
                deadline=deadline,
                direct=parse_endpoints(request.get("direct", [])),
                key=parse_key(request.get("direct_key", b"")),
                shards=parse_shard_nodes(request.get("shards", [])),
                excludes=parse_excludes(request.get("excludes", [])),
            )
            state.followers[peer] = follower
            await write_frame(writer, {"type": "accepted"})
            state.changed.set()
            # Wait for the group to close, the follower to go away, or our own search to end.
            gone = asyncio.create_task(reader.read(1))
            try:
                await asyncio.wait({follower.outcome, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if follower.outcome.done():
                await write_frame(writer, follower.outcome.result())
            elif state.followers.get(peer) is follower:
                del state.followers[peer]
                state.changed.set()
        except (ProtocolError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            logger.debug(f"bad join request from {peer}: {e!r}")
            with contextlib.suppress(Exception):
                await write_frame(writer, {"type": "rejected", "reason": f"malformed request: {e}"})
        except Exception as e:
            logger.debug(f"join stream from {peer} failed: {e!r}")
        finally:
            close_writer(writer)
