"""Do more peers train a better model? Held-out loss against tokens for a swarm, one peer and data-parallel, in one run.

    python benchmarks/quality.py [--peers 3] [--outer-steps 30] [--inner-steps 30] [--seeds 0,1]
        [--warmup-steps 45] [--decay-steps 900] [--model embedded] [--compression-check]

Arms, all with the same model and θ0 (from the seed), per-worker data (worker i of every arm reads what swarm peer i
reads: its order comes from the seed and that peer's id), per-worker batch, inner AdamW and inner schedule, and all
evaluated on the same held-out batches (the embedded corpus's held-out split) every `--inner-steps` steps (the
DiLoCo arms after every round, early rounds being shorter: swarm.plan):
- `one-peer`: one worker training with plain AdamW (a k-th of the swarm's tokens);
- `data-parallel`: k workers (torch.distributed, gloo) averaging gradients every step: the swarm's tokens, a k-times
  larger global batch; what the swarm would be with free communication;
- `diloco-m1`: DiLoCo with one replica: the same inner loop, then the outer optimizer (`swarm.outer`, with the
  settings a lone peer uses) every H steps; the same code path as a `swarm-peer` that averages alone;
- `diloco-ideal` (not run by default): k DiLoCo replicas in one process with the exact mean and no network, to tell
  the algorithm's gap from what the swarm adds to it (compression, grouping);
- `diloco-overlap` (not run by default): the same, overlapped (swarm.overlap): each replica's next inner loop starts
  from a guess of θ after the round (`--overlap-guess`), and the round lands after `--overlap-landing` of that inner
  loop (a fraction; 1: only when it ends), when the replica's model merges onto θ (`--overlap-share`); against
  `diloco-ideal`, the quality an overlapped swarm gives up for a round that takes that long;
- `swarm`: k real `swarm-peer` processes and a bootstrap node on 127.0.0.1, grouped as k every outer step, each
  evaluating the global θ after every outer step (`eval_loss` in its metrics); with `--rate` (root), each peer in a
  network namespace of its own behind a capped link (benchmarks/links.py, as benchmarks/wan.py), so that rounds
  take longer and, overlapped, land later in the next inner loop;
- with `--compression-check`, `swarm-none`: the same with `--compression none`.

Prints held-out loss against tokens (mean over seeds), the final loss per arm (mean and spread over seeds), the gap
of the swarm to data-parallel in percent, the share of data-parallel's gain over one peer that the swarm recovers,
DiLoCo M=1 against plain AdamW, and int8 against none. `--peer-args "..."` passes more flags to the swarm's peers
(e.g. "--outer-momentum 0.5"); `--outer-lr`/`--outer-momentum` set both the swarm's and the M=1 arm's.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from links import Links, Loopback  # noqa: E402  (beside this script)

from peers.launch import read_metrics, run_to_end  # noqa: E402

ARMS = ("one-peer", "data-parallel", "diloco-m1", "swarm", "diloco-ideal", "diloco-overlap")
GUESSES = ("own", "eager", "share", "theta", "last")
"""Where an overlapped replica's next inner loop starts: `own` the outer step with its own Δ as the group's mean
(swarm.overlap, what swarm-peer does); `eager` the outer step with its own fresh share of the mean and the others'
shares from the last round (the estimate of arXiv 2502.12996's eager updates); `share` θ plus its own share of the
mean (Δ / k, Nesterov's immediate coefficient); `theta` θ itself (the naive delayed update); `last` the outer step
with the last round's mean."""
DEFAULT_ARMS = ("one-peer", "data-parallel", "diloco-m1", "swarm")


def _setup(opts: dict, seed: int, worker: int):
    """Model, data stream, inner config and evaluator of one worker: the same recipe for every arm."""
    from peers.data import TokenBatcher, data_seed, load_text_dataset
    from peers.evaluate import EvalConfig, Evaluator
    from peers.inner import InnerConfig
    from peers.model import load_model

    torch.set_num_threads(1)
    loaded = load_model(opts["model"], seed)
    batches = TokenBatcher(
        load_text_dataset(opts["dataset"], "train"),
        loaded.tokenizer,
        opts["batch_size"],
        opts["seq_len"],
        seed=data_seed(seed, opts["worker_ids"][worker]),  # what swarm peer `worker` reads
    )
    inner = InnerConfig(lr=opts["lr"], warmup_steps=opts["warmup_steps"], decay_steps=opts["decay_steps"])
    evaluator = Evaluator(
        EvalConfig(batches=opts["eval_batches"]), loaded.model, loaded.tokenizer, opts["batch_size"], opts["seq_len"],
        "cpu", None,
    )  # fmt: skip
    return loaded.model, batches, inner, evaluator


def _data_parallel_worker(rank: int, world: int, port: int, opts: dict, seed: int, out: str) -> None:
    """Plain AdamW on `world` workers that average gradients every step (world 1: one peer alone)."""
    import torch.distributed as dist

    from peers.device import adamw

    model, batches, inner, evaluator = _setup(opts, seed, rank)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    params = [p for p in model.parameters() if p.requires_grad]
    # The peers' own AdamW (fused where torch has it): M=1 against plain AdamW then differs in the outer step only,
    # not also in the last bits of every inner step (on a 5.6M-parameter model, 360 steps grew the two apart by
    # 0.72% with torch's default AdamW here, 0.35% with the same one: README, Training quality).
    optimizer = adamw(params, torch.device("cpu"), lr=inner.lr, betas=inner.betas, weight_decay=inner.weight_decay)
    curve, tokens_per_step = [], opts["batch_size"] * opts["seq_len"] * world
    total_steps = opts["outer_steps"] * opts["inner_steps"]
    model.train()
    for step in range(total_steps):
        batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = inner.lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if inner.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, inner.max_grad_norm)
        optimizer.step()
        if rank == 0 and (step + 1) % opts["inner_steps"] == 0:
            curve.append(((step + 1) * tokens_per_step, evaluator.loss()))
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(curve, f)


def _peer_id(identities: str, i: int) -> bytes:
    """Swarm peer i's id (its identity file, made here if new): worker i of every arm reads the data that peer reads,
    so the arms differ in how they train, not in what they train on."""
    from swarm.signing import NodeIdentity, peer_id_of, public_key_bytes

    identity = NodeIdentity.open(os.path.join(identities, f"peer{i}.id"))
    return peer_id_of(public_key_bytes(identity.private_key)).to_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_data_parallel(opts: dict, seed: int, world: int, workdir: str) -> list:
    import torch.multiprocessing as mp

    out = os.path.join(workdir, f"dp{world}-seed{seed}.json")
    if world == 1:  # one worker needs no process group: train here
        _data_parallel_worker(0, 1, 0, opts, seed, out)
    else:
        mp.spawn(_data_parallel_worker, args=(world, _free_port(), opts, seed, out), nprocs=world, join=True)
    with open(out) as f:
        return [tuple(point) for point in json.load(f)]


def run_diloco(opts: dict, seed: int, replicas: int = 1, overlap: tuple[str, float, float | None] | None = None):
    """DiLoCo in one process, without the network: `replicas` inner loops, the exact token-weighted mean of their
    pseudo-gradients, and the outer optimizer (`swarm.outer`). One replica is what a `swarm-peer` that averages alone
    computes; k replicas are the swarm's algorithm without compression, matchmaking or timing.

    `overlap` (guess, landing, share): overlapped rounds. Each replica's next inner loop starts from its guess of θ
    after the round (GUESSES); after `landing` of that loop the round lands and the replica's model merges onto θ
    (swarm.overlap.merge, with c = `share`, or None: swarm-peer's merge_share); its next Δ is θ minus where the loop
    ends. θ itself takes every round's exact mean, as blocking."""
    from peers.inner import InnerLoop
    from swarm.flat import difference, flatten, unflatten
    from swarm.outer import DEFAULT_MOMENTUM_FINAL, MomentumRamp, OuterOptimizer, final_round
    from swarm.overlap import merge, merge_share, to_start_point
    from swarm.plan import RoundPlan

    workers = [_setup(opts, seed, i) for i in range(replicas)]
    evaluator = workers[0][3]
    inners = [InnerLoop(model, batches, config) for model, batches, config, _ in workers]
    models = [[p for p in model.parameters()] for model, *_ in workers]
    settings = dict(opts["outer"])
    final = settings.pop("momentum_final", DEFAULT_MOMENTUM_FINAL)
    h = opts["inner_steps"]
    # The rounds swarm-peer would train with the same flags (early ones shorter: swarm.plan).
    plan = RoundPlan.for_run(h, opts["warmup_steps"], opts.get("early_inner_steps"), opts.get("early_steps"))
    ramp = MomentumRamp.for_run(settings["momentum"], final, h, opts["warmup_steps"], opts["decay_steps"], plan)
    last = final_round(h, opts["decay_steps"], plan) if opts.get("final_mean", True) else None  # as swarm-peer
    outer = OuterOptimizer([p.detach().clone() for p in models[0]], **settings, ramp=ramp, final_round=last)
    shifts, last_mean, last_deltas, theta = [None] * replicas, None, [None] * replicas, None
    curve, tokens = [], 0
    for t in range(plan.round_at(opts["outer_steps"] * h - 1) + 1):
        deltas, weights = [], []
        length, first = plan.length(t), plan.first_step(t)
        for inner, params, shift in zip(inners, models, shifts):
            # An early round's loop waits for its round before its first step, as swarm-peer's (peers.runner).
            landing = length if shift is None else 0 if length < h else round(overlap[1] * length)
            result = inner.run(landing, first_step=first)
            taken = result.tokens
            if shift is not None:
                share = merge_share(landing / length) if overlap[2] is None else overlap[2]
                for p, e in zip(params, unflatten(shift, outer.params)):
                    merge(p.data, e, share)
                if length > landing:
                    taken += inner.run(length - landing, first_step=first + landing).tokens
            tokens += taken
            deltas.append(difference(outer.params, [p.detach() for p in params]))
            weights.append(taken)
        mean = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
        guesses = None
        if overlap is not None and replicas > 1:
            guesses = [
                _guess(outer, d, overlap[0], replicas, last_mean, last, t, to_start_point)
                for d, last in zip(deltas, last_deltas)
            ]
        if replicas == 1:  # what a peer that averages alone applies
            outer.step_alone(unflatten(mean, outer.params))
        else:
            outer.step(unflatten(mean, outer.params), at=t)
        last_mean, last_deltas = mean, deltas
        theta = flatten(outer.params)
        shifts = [None] * replicas if guesses is None else [theta - g for g in guesses]
        with torch.no_grad():
            for params, guess in zip(models, guesses or [theta] * replicas):
                for p, g in zip(params, unflatten(guess, outer.params)):
                    p.copy_(g)
        # The held-out loss of θ (replica 0's model holds its guess: θ goes in for the evaluation only).
        with torch.no_grad():
            kept = [p.detach().clone() for p in models[0]]
            for p, g in zip(models[0], outer.params):
                p.copy_(g)
            curve.append((tokens, evaluator.loss()))
            for p, k in zip(models[0], kept):
                p.copy_(k)
    return curve


def _guess(outer, delta, kind: str, replicas: int, last_mean, last_delta, step: int, to_start_point):
    """A replica's guess of θ after round `step` in flight, from θ and the momentum before it (see GUESSES)."""
    from swarm.flat import flatten, unflatten

    lr, mu = outer.settings(step)
    theta = flatten(outer.params)
    if kind == "theta":
        return theta
    if kind == "share":
        return theta - lr * (1 + mu) / replicas * delta
    if kind == "eager" and last_mean is not None:
        guess = last_mean + (delta - last_delta) / replicas  # equal weights here: every replica trains H steps
    else:
        guess = (delta if kind in ("own", "eager") or last_mean is None else last_mean).clone()
    for i, seg in enumerate(unflatten(guess, outer.params)):
        to_start_point(outer, i, seg, False, step)
    return guess


def _schedule_flags(opts: dict) -> list[str]:
    flags = ["--lr", str(opts["lr"]), "--warmup-steps", str(opts["warmup_steps"])]
    if opts["decay_steps"] is not None:
        flags += ["--decay-steps", str(opts["decay_steps"])]
    for key in ("early_steps", "early_inner_steps"):  # unset: swarm-peer's defaults, as the in-process arms take
        if opts.get(key) is not None:
            flags += [f"--{key.replace('_', '-')}", str(opts[key])]
    return flags


def run_swarm(opts: dict, seed: int, workdir: str, name: str, extra: list[str]) -> list:
    """k real `swarm-peer` processes; the curve is the mean over peers of the held-out loss of θ after each step."""
    rundir = os.path.join(workdir, f"{name}-seed{seed}")
    k, outer = opts["peers"], []
    if opts["outer"].get("lr") is not None:
        outer += ["--outer-lr", str(opts["outer"]["lr"])]
    if opts["outer"].get("momentum") is not None:
        outer += ["--outer-momentum", str(opts["outer"]["momentum"])]
    if opts["outer"].get("momentum_final") is not None:
        outer += ["--outer-momentum-final", str(opts["outer"]["momentum_final"])]
    if not opts.get("final_mean", True):
        outer += ["--no-final-mean"]
    peer_args = []
    for i in range(k):
        peer_args.append([
            "--run-id", f"quality-{name}-{seed}", "--seed", str(seed), "--model", opts["model"],
            "--dataset", opts["dataset"], "--identity", os.path.join(opts["identities"], f"peer{i}.id"),
            "--outer-steps", str(opts["outer_steps"]), "--inner-steps", str(opts["inner_steps"]),
            "--batch-size", str(opts["batch_size"]), "--seq-len", str(opts["seq_len"]),
            "--min-group-size", str(k), "--eval-batches", str(opts["eval_batches"]),
            "--metrics-file", os.path.join(rundir, f"peer{i}.jsonl"),
            *_schedule_flags(opts), *outer, *extra,
        ])  # fmt: skip
    # Node 0 is the bootstrap node (uncapped: it only introduces), nodes 1..k the peers.
    rate = opts.get("rate", "none")
    links = Loopback() if rate == "none" else Links(k + 1, [None] + [rate] * k, opts.get("delay_ms", 0.0))
    with links:
        run_to_end(rundir, peer_args, timeout=3 * 3600, place=links.place)
    records = [read_metrics(os.path.join(rundir, f"peer{i}.jsonl")) for i in range(k)]
    by_step: dict[int, list] = {}
    # A peer that resynced skipped steps and so runs past the others: the curve ends where every peer has been.
    last = min(rec[-1]["outer_step"] for rec in records)
    for rec in records:
        for r in rec:
            if r["outer_step"] <= last:
                by_step.setdefault(r["outer_step"], []).append(r)
    curve, tokens, partial = [], 0, 0
    for step in sorted(by_step):
        rows = by_step[step]
        partial += any(r["group_size"] != k for r in rows) or len({r["params_sha256"] for r in rows}) != 1
        tokens += sum(r["tokens"] for r in rows)
        losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        if losses:  # a step with no evaluation (a failed round, --eval-every) leaves no point
            curve.append((tokens, statistics.mean(losses)))
    if partial:
        print(f"warning: {name} seed {seed}: {partial} outer steps not averaged by all {k} peers", file=sys.stderr)
    return curve


def _mean_curve(curves: list[list]) -> list:
    n = min(len(c) for c in curves)
    return [(statistics.mean(c[i][0] for c in curves), statistics.mean(c[i][1] for c in curves)) for i in range(n)]


@click.command()
@click.option("--peers", type=click.IntRange(min=2), default=3, help="k: swarm peers and data-parallel workers.")
@click.option("--outer-steps", type=click.IntRange(min=1), default=30)
@click.option("--inner-steps", type=click.IntRange(min=1), default=30, help="H.")
@click.option("--seeds", default="0,1", help="Comma-separated seeds (θ0 and data order); every arm runs each.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--seq-len", type=click.IntRange(min=8), default=128)
@click.option("--lr", type=float, default=1e-3)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Default: 5% of the run.")
@click.option("--decay-steps", type=click.IntRange(min=1), default=None, help="Default: the run's length.")
@click.option("--constant-lr", is_flag=True, help="No decay after the warmup: what an open-ended run does.")
@click.option(
    "--early-steps", type=click.IntRange(min=0), default=None, help="Inner steps in early rounds: swarm-peer's flag."
)
@click.option(
    "--early-inner-steps", type=click.IntRange(min=1), default=None, help="Early rounds' length: swarm-peer's flag."
)
@click.option("--model", default="embedded")
@click.option("--dataset", default="embedded")
@click.option("--eval-batches", type=click.IntRange(min=1), default=16)
@click.option("--outer-lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Default: swarm-peer's.")
@click.option(
    "--outer-momentum", type=click.FloatRange(0, 1, max_open=True), default=None, help="Default: swarm-peer's."
)
@click.option(
    "--outer-momentum-final",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Where the outer momentum ends as the inner rate decays. Default: swarm-peer's.",
)
@click.option(
    "--final-mean/--no-final-mean",
    default=True,
    help="The run's last round applies the group's mean as it is (swarm-peer's default), in the swarm and in one "
    "process.",
)
@click.option("--peer-args", default="", help="More swarm-peer flags for the swarm arms.")
@click.option("--arms", default=",".join(DEFAULT_ARMS), help=f"Comma-separated subset of {', '.join(ARMS)}.")
@click.option(
    "--identities",
    default=os.path.join(os.path.expanduser("~"), ".cache", "swarm", "quality-identities"),
    help="Where the swarm peers' identity files live (made on first use). A peer's data order comes from its id and "
    "the seed, so runs that share them see the same data: their differences are the settings', not the data's.",
)
@click.option(
    "--rate",
    default="none",
    help="The swarm arms: each peer's link capped at this, both ways (tc syntax), in a network namespace of its own, "
    "as benchmarks/wan.py's (needs root); none: 127.0.0.1, uncapped. Slow links make overlapped rounds land late.",
)
@click.option(
    "--delay-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    help="With --rate: latency added to every packet each node sends (a user-space delay line): round trip 2x this.",
)
@click.option("--compression-check", is_flag=True, help="Also run the swarm with --compression none.")
@click.option("--overlap-guess", type=click.Choice(GUESSES), default="own", help="diloco-overlap: the start guess.")
@click.option(
    "--overlap-landing",
    type=click.FloatRange(0, 1),
    default=0.25,
    help="diloco-overlap: the share of the next inner loop after which the round lands (1: at its end).",
)
@click.option(
    "--overlap-share",
    type=click.FloatRange(0, 1),
    default=None,
    help="diloco-overlap: c of the merge onto θ when the round lands (1: shift all the way; default: swarm-peer's).",
)
def main(**opts) -> None:
    if opts["rate"] != "none" and os.geteuid() != 0:
        raise click.UsageError("--rate needs root: network namespaces, veth pairs and tc")
    if opts["rate"] == "none" and opts["delay_ms"] > 0:
        raise click.UsageError("--delay-ms needs the namespaces: give a --rate")
    total = opts["outer_steps"] * opts["inner_steps"]
    opts["warmup_steps"] = round(0.05 * total) if opts["warmup_steps"] is None else opts["warmup_steps"]
    if opts.pop("constant_lr"):
        if opts["decay_steps"] is not None:
            raise click.BadParameter("--constant-lr takes no --decay-steps", param_hint="'--decay-steps'")
        opts["decay_steps"] = None
    elif opts["decay_steps"] is None:
        opts["decay_steps"] = total
    opts["outer"] = {
        "lr": opts.pop("outer_lr"),
        "momentum": opts.pop("outer_momentum"),
        "momentum_final": opts.pop("outer_momentum_final"),
    }
    seeds = [int(s) for s in opts.pop("seeds").split(",")]
    arms = opts.pop("arms").split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise click.BadParameter(f"unknown arms {sorted(unknown)}", param_hint="'--arms'")
    extra = shlex.split(opts.pop("peer_args"))
    overlap = (opts.pop("overlap_guess"), opts.pop("overlap_landing"), opts.pop("overlap_share"))
    if opts.pop("compression_check"):
        arms.append("swarm-none")
    workdir = tempfile.mkdtemp(prefix="swarm-quality-")
    os.makedirs(opts["identities"], exist_ok=True)
    k = opts["peers"]
    opts["worker_ids"] = [_peer_id(opts["identities"], i) for i in range(k)]
    curves: dict[str, list] = {arm: [] for arm in arms}
    seconds: dict[str, float] = {arm: 0.0 for arm in arms}
    for seed in seeds:
        for arm in arms:
            started = time.perf_counter()
            if arm == "one-peer":
                curve = run_data_parallel(opts, seed, 1, workdir)
            elif arm == "data-parallel":
                curve = run_data_parallel(opts, seed, k, workdir)
            elif arm in ("diloco-m1", "diloco-ideal", "diloco-overlap"):
                from swarm import SwarmConfig
                from swarm.outer import DEFAULT_MOMENTUM_FINAL

                # Unset, the in-process arms take the settings swarm-peer runs with by default.
                defaults = {
                    "lr": SwarmConfig.outer_lr,
                    "momentum": SwarmConfig.outer_momentum,
                    "momentum_final": DEFAULT_MOMENTUM_FINAL,
                }
                outer = {key: defaults[key] if value is None else value for key, value in opts["outer"].items()}
                replicas = 1 if arm == "diloco-m1" else k
                curve = run_diloco(
                    {**opts, "outer": outer}, seed, replicas, overlap if arm == "diloco-overlap" else None
                )
            else:
                codec = ["--compression", "none"] if arm == "swarm-none" else []
                curve = run_swarm(opts, seed, workdir, arm, extra + codec)
            seconds[arm] += time.perf_counter() - started
            curves[arm].append(curve)
            print(f"seed {seed} {arm}: held-out {curve[-1][1]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)

    print()
    schedule = "constant" if opts["decay_steps"] is None else f"cosine to {opts['decay_steps']}"
    print(
        f"{k} peers, {opts['outer_steps']} outer steps x H={opts['inner_steps']}, batch {opts['batch_size']} x "
        f"{opts['seq_len']} per worker, lr {opts['lr']} warmup {opts['warmup_steps']}, {schedule},\n"
        f"  model {opts['model']}, seeds {seeds}, peer flags {extra or 'default'}"
    )
    print("held-out loss against tokens (mean over seeds):")
    mean = {arm: _mean_curve(c) for arm, c in curves.items()}
    ref = mean.get("swarm") or next(iter(mean.values()))
    marks = sorted({max(0, round(f * len(ref)) - 1) for f in (0.1, 0.25, 0.5, 0.75, 1.0)})
    print(f"{'tokens':>10} " + " ".join(f"{arm:>13}" for arm in arms))
    for i in marks:
        tokens = ref[i][0]
        row = []
        for arm in arms:
            # Arms with a k-th of the tokens per step: the point at the same token count, if they reached it.
            points = [p for p in mean[arm] if abs(p[0] - tokens) <= 0.01 * tokens]
            row.append(f"{points[0][1]:13.4f}" if points else f"{'-':>13}")
        print(f"{tokens:>10.0f} " + " ".join(row))
    print("final held-out loss (mean ± spread over seeds), tokens, seconds:")
    final = {}
    for arm in arms:
        values = [c[-1][1] for c in curves[arm]]
        final[arm] = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {arm:<14} {final[arm]:.4f} ± {spread:.4f}  {curves[arm][0][-1][0]:>10.0f}  {seconds[arm]:6.0f}")
    if {"swarm", "data-parallel"} <= final.keys():
        print(f"swarm vs data-parallel: {100 * (final['swarm'] / final['data-parallel'] - 1):+.2f}%")
    if {"swarm", "data-parallel", "one-peer"} <= final.keys():
        gain = final["one-peer"] - final["data-parallel"]
        if gain > 0:
            share = (final["one-peer"] - final["swarm"]) / gain
            print(f"share of data-parallel's gain over one peer the swarm recovers: {share:.0%}")
    if {"diloco-m1", "one-peer"} <= final.keys():
        print(f"DiLoCo M=1 vs plain AdamW: {100 * (final['diloco-m1'] / final['one-peer'] - 1):+.2f}%")
    if {"diloco-overlap", "diloco-ideal"} <= final.keys():
        change = 100 * (final["diloco-overlap"] / final["diloco-ideal"] - 1)
        share = "swarm-peer's merge" if overlap[2] is None else f"merge share {overlap[2]:g}"
        how = f"{overlap[0]} guess, landing after {overlap[1]:g} of the next inner loop, {share}"
        print(f"overlapped ({how}) vs blocking: {change:+.2f}%")
    if {"swarm", "swarm-none"} <= final.keys():
        codec = extra[extra.index("--compression") + 1] if "--compression" in extra else "int8"
        print(f"{codec} vs none: {100 * (final['swarm'] / final['swarm-none'] - 1):+.2f}%")
    print(f"logs: {workdir}")


if __name__ == "__main__":
    main()
