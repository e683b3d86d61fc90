"""How far can hostile members move the honest update? Issue 14's attacks replayed through the library API.

    python benchmarks/attacks.py [--groups 3+1,5+2] [--no-plain]

Real nodes and p2p daemons on 127.0.0.1, one outer step each (int8), built from the same rounds the tests assert on
(tests/test_robust.py, tests/test_lying_reducer.py): honest members hold a shared signal plus 30% noise each, and
the "honest update" is what DiLoCo applies with the honest members alone. For every attack and group it prints how
far the update the honest members applied is from the honest update (as a multiple of the honest update's size),
whether the honest members hold bit-identical θ, and whom they caught. Attacks:
- a contributor: Δ scaled by 1e4; a token weight inflated 1e6x; a random Δ of 100x the honest norm; NaN; finite
  garbage bytes (scales at float32's largest);
- a reducer that lies about its averaged part: random values of the average's norm, the average x100, negated.
With robust averaging off (`plain`, the control), the first three as the issue measured them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import test_lying_reducer as lying  # noqa: E402
from tests import test_robust as robust  # noqa: E402
from tests.conftest import swarm_of  # noqa: E402
from tests.test_swarm import config, reference_outer_step, running_swarms  # noqa: E402

PLAIN_ATTACKS = ["scaled by 1e4", "weight inflated 1e6x", "random, 100x the norm"]


async def contributor_attack(honest: int, hostile: int, attack: str, robust_on: bool) -> tuple[float, bool, str]:
    applied, wanted, swarms, attackers = await robust._hostile_round(honest, hostile, attack, robust=robust_on)
    caught = sum(peer in s.averager.caught for s in swarms for peer in attackers)
    # _hostile_round fails unless the honest members' θ hashes are equal: reaching here means they were.
    return robust.moved(applied, wanted), True, f"{caught}/{len(swarms) * len(attackers)}"


async def lying_reducers(honest: int, lies: list[str]) -> tuple[float, bool, str]:
    """One outer step with `len(lies)` lying reducers; returns (moved, honest θ identical, caught by)."""
    size = honest + len(lies)
    theta = lying.make_theta()
    async with swarm_of(size) as (_, nodes):
        async with running_swarms(nodes, theta, lambda i: config(compression="int8", timeout=8)) as swarms:
            for swarm, lie in zip(swarms[honest:], lies):
                await lying.make_liar(swarm, lie)
            tokens = [100 + 10 * i for i in range(size)]
            locals_ = lying.locals_from(theta, lying.deltas(size, lying.numel_of(lying.SHAPES), seed=0))
            reports = await asyncio.gather(*[s.outer_step(x, t) for s, x, t in zip(swarms, locals_, tokens)])
            expected, _ = reference_outer_step(theta, locals_[:honest], tokens[:honest])
            applied = lying.flat(swarms[0].params) - lying.flat(theta)
            wanted = lying.flat(expected) - lying.flat(theta)
            identical = len({r.params_sha256 for r in reports[:honest]}) == 1
            liars = [s.node.peer_id for s in swarms[honest:]]
            caught = sum(peer in s.matchmaker.banned for s in swarms[:honest] for peer in liars)
            return lying.moved(applied, wanted), identical, f"{caught}/{honest * len(liars)}"


@click.command()
@click.option("--groups", default="3+1,5+2", help="Comma-separated honest+hostile member counts.")
@click.option("--plain/--no-plain", default=True, help="Also run the issue's attacks with robust averaging off.")
def main(groups: str, plain: bool) -> None:
    logging.basicConfig(level=logging.ERROR)
    sizes = [tuple(int(n) for n in g.split("+")) for g in groups.split(",")]
    print(f"{'group':<6} {'averaging':<10} {'attack':<26} {'moved':>10} {'identical':>10} {'caught':>8}", flush=True)
    for honest, hostile in sizes:
        rows = [("robust", attack) for attack in robust.ATTACKS] + [
            ("robust", f"lying reducer: {lie}") for lie in lying.LIES
        ]
        rows += [("plain", attack) for attack in PLAIN_ATTACKS] if plain else []
        for mode, attack in rows:
            if attack.startswith("lying reducer: "):
                round_ = lying_reducers(honest, [attack.removeprefix("lying reducer: ")] * hostile)
            else:
                round_ = contributor_attack(honest, hostile, attack, mode == "robust")
            moved, identical, caught = asyncio.run(round_)
            group = f"{honest}+{hostile}"
            print(f"{group:<6} {mode:<10} {attack:<26} {moved:9.3g}x {str(identical):>10} {caught:>8}", flush=True)


if __name__ == "__main__":
    main()
