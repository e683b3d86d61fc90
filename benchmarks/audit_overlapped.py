"""How the lying-reducer check (swarm.audit) fares on overlapped rounds, each member judging by its Δ, or by its Δ with
the direction of its guess's error taken out (what swarm.sequence._judged hands the all-reduce).

On the synthetic rounds of tests/test_lying_reducer.py (`overlapped_round`): groups whose members trained a whole
loop, half of one or a step or two; updates with -0.3, 0 or 0.3 of their guess's error in them (a loop that undid
part of it, or one whose optimizer's momentum carried the last loop's direction on); errors 1x, 3x or 6x larger in
one half of the model than in the other. It prints, per case and in total, the honest verdicts that fail
(false alarms) and the lies caught (the average x100, negated, or random values of its size; every other member's
verdict on the liar's part).

    python benchmarks/audit_overlapped.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.codec import make_codec  # noqa: E402
from tests.test_lying_reducer import LIES, _honest_parts, _verdicts, overlapped_round  # noqa: E402

GROUPS = [  # (share of a loop each member trained, its weight)
    ([1.0, 0.25], [4.0, 1.0]),
    ([1.0, 0.1], [10.0, 1.0]),
    ([1.0, 1.0, 3 / 40], [160.0, 160.0, 48.0]),
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
    ([1.0, 0.5, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]),
]


def tally(done, weights, along, profile, by_delta: bool, seeds=2) -> tuple[int, int, int, int]:
    """(false alarms, honest verdicts, lies caught, lie verdicts) over `seeds` rounds."""
    codec = make_codec("int8")
    alarms = honest = caught = verdicts = 0
    for seed in range(seeds):
        xs, judged = overlapped_round(300_000, seed, done, along, profile)
        by = None if by_delta else judged
        bounds, parts = _honest_parts(xs, weights, codec)
        found = _verdicts(xs, weights, parts, bounds, judged=by)
        alarms, honest = alarms + sum(v is not None for v in found.values()), honest + len(found)
        g = torch.Generator().manual_seed(seed)
        for liar in range(len(xs)):
            for name in ("x100", "negated", "random"):
                found = _verdicts(xs, weights, parts, bounds, liar, LIES[name](parts[liar], g), by)
                on_liar = [v is not None for (_, i), v in found.items() if i == liar]
                caught, verdicts = caught + sum(on_liar), verdicts + len(on_liar)
    return alarms, honest, caught, verdicts


def main() -> None:
    totals = {True: [0, 0, 0, 0], False: [0, 0, 0, 0]}
    print("done | along | profile | judged by Δ: false alarms, lies caught | by Δ without its error's direction")
    for done, weights in GROUPS:
        for along in (-0.3, 0.0, 0.3):
            for profile in (1.0, 3.0, 6.0):
                row = []
                for by_delta in (True, False):
                    figures = tally(done, weights, along, profile, by_delta)
                    totals[by_delta] = [t + f for t, f in zip(totals[by_delta], figures, strict=True)]
                    row.append(f"{figures[0]}/{figures[1]}, {figures[2]}/{figures[3]}")
                print(f"{done} | {along} | {profile} | {row[0]} | {row[1]}")
    for by_delta, (alarms, honest, caught, verdicts) in totals.items():
        what = "Δ" if by_delta else "Δ without its error's direction"
        print(f"judged by {what}: {alarms}/{honest} false alarms, {caught}/{verdicts} lies caught")


if __name__ == "__main__":
    main()
