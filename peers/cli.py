"""`swarm-peer`: join a training run (or start one) and train with DiLoCo until stopped."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import click

from peers.config import ConfigCommand, grouped, monitor_config, monitor_options
from peers.data import DataLoadError
from peers.inner import InnerConfig
from peers.model import ModelLoadError
from swarm import MatchmakingConfig, NodeConfig, SwarmConfig, SwarmConnectionError
from swarm.codec import CODECS
from swarm.entropy import MODES
from swarm.outer import DEFAULT_MOMENTUM_FINAL, MomentumRamp, final_round

logger = logging.getLogger("swarm-peer")


def _check_maddrs(flag: str, values) -> list[str]:
    from hivemind.utils.multiaddr import Multiaddr

    for value in values:
        try:
            Multiaddr(value)
        except Exception as e:
            raise click.BadParameter(f"{value!r} is not a multiaddr ({e})", param_hint=flag) from None
    return list(values)


network, training, data, observability, checkpoints = (
    grouped(g) for g in ("network", "training", "data", "observability", "checkpoints")
)


@click.command(
    cls=ConfigCommand,
    check=lambda flags: build_config(flags),
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@network(
    "--initial-peers",
    multiple=True,
    metavar="MADDR",
    help="Full multiaddr of a live node (a bootstrap node or any peer); repeat for several. None starts a new swarm.",
)
@network("--run-id", default="swarm-default", help="Training run to join; peers average only within a run.")
@network(
    "--host-maddrs", multiple=True, default=["/ip4/0.0.0.0/tcp/0"], help="Addresses to listen on; repeat for several."
)
@network("--announce-maddrs", multiple=True, help="Addresses to advertise instead of the listening ones.")
@network(
    "--identity",
    type=click.Path(dir_okay=False),
    default=None,
    help="Private key file: a stable peer id across restarts (created if missing).",
)
@network(
    "--swarm-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="Shared secret file of a private run: only nodes with the same key are admitted (see README).",
)
@network(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    help="Seconds to reach the initial peers before giving up.",
)
@network("--compression", type=click.Choice(sorted(CODECS)), default="int8", help="Wire format of pseudo-gradients.")
@network(
    "--entropy-coding",
    type=click.Choice(MODES),
    default="auto",
    help="Huffman code what this peer sends of each all-reduce, losslessly (3-8% fewer bytes, about 140 MB/s of one "
    "core): auto does while its last round sent at under 64 Mbit/s.",
)
@network(
    "--min-group-size",
    type=click.IntRange(min=1),
    default=2,
    help="Smallest group worth averaging with; below it a peer averages alone.",
)
@network(
    "--max-group-size",
    type=click.IntRange(min=1),
    default=None,
    help="Largest group; default: every live peer of the run.",
)
@network(
    "--matchmaking-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    help="Seconds to look for a group before averaging alone.",
)
@network(
    "--allreduce-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    help="Seconds one all-reduce may take once the group is formed.",
)
@network(
    "--direct/--no-direct",
    default=True,
    help="Send all-reduce bytes over direct TCP connections between group members when reachable (else through "
    "the p2p daemons).",
)
@network(
    "--allreduce-retries",
    type=click.IntRange(min=0),
    default=1,
    help="New groups tried for the same outer step, without the lost members, after a member was lost mid-round.",
)
@network(
    "--overlap/--no-overlap",
    default=True,
    help="Average each outer step's pseudo-gradient while the next inner loop trains, instead of before it (the "
    "inner loop starts from θ plus this peer's own share of the round in flight).",
)
@network(
    "--overlap-max-lag",
    type=click.FloatRange(0, 1),
    default=1.0,
    help="With --overlap: the share of the next inner loop after which it waits for the round in flight if that has "
    "not landed. 1 never waits within the loop: a round may take a whole inner loop (the hand-over waits for a "
    "longer one), which costs about +0.4% held-out loss at half the loop and +0.6% at its end; a smaller bound buys "
    "some of that back with waiting (+0.08% at 0.1).",
)
@training(
    "--inner-steps",
    type=click.IntRange(min=1),
    default=30,
    help="H: inner AdamW steps per outer step, at most; a peer still training when the others' round waits for it "
    "stops after its current step, and its fewer tokens weigh less.",
)
@training(
    "--early-steps",
    type=click.IntRange(min=0),
    default=None,
    help="Inner steps at the run's start trained in shorter rounds (--early-inner-steps), since replicas drift apart "
    "fastest there; rounded up to whole outer steps. Default: 6 x --warmup-steps (none without a warmup); 0: none.",
)
@training(
    "--early-inner-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Inner steps per round in the early phase (--early-steps). Default: a third of --inner-steps.",
)
@training("--batch-size", type=click.IntRange(min=1), default=8, help="Sequences per inner step.")
@training("--seq-len", type=click.IntRange(min=2), default=128, help="Tokens per sequence.")
@training("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Inner AdamW learning rate.")
@training(
    "--warmup-steps",
    type=click.IntRange(min=0),
    default=0,
    help="Inner steps of the run (all outer steps together) of linear learning-rate warmup.",
)
@training(
    "--decay-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Inner steps of the run after which a cosine decay reaches 10% of --lr; default: no decay.",
)
@training(
    "--outer-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=SwarmConfig.outer_lr,
    help="Outer SGD learning rate.",
)
@training(
    "--outer-momentum",
    type=click.FloatRange(0, 1, max_open=True),
    default=SwarmConfig.outer_momentum,
    help="Outer Nesterov momentum, in [0, 1); 0 is plain SGD (with --outer-lr 1, plain averaging).",
)
@training(
    "--outer-momentum-final",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DEFAULT_MOMENTUM_FINAL,
    help="Outer momentum at the end of the inner learning rate's decay: it rises from --outer-momentum as the rate"
    " decays. Only with --decay-steps and 0 < --outer-momentum < this; otherwise it stays at --outer-momentum.",
)
@training(
    "--final-mean/--no-final-mean",
    default=True,
    help="With --decay-steps: the round that ends the decay, and any after it, apply the group's mean as it is,"
    " without the outer step's extrapolation, so the run ends on the mean of its peers' models.",
)
@training(
    "--error-feedback/--no-error-feedback",
    default=False,
    help="Carry what compression lost of this peer's pseudo-gradient into its next contribution.",
)
@training(
    "--robust-averaging/--no-robust-averaging",
    default=True,
    help="Reduce this peer's part of each all-reduce robustly: weights bounded by the group's median, far-off "
    "contributions clipped, garbage dropped and its sender named in the log. Equal to the plain mean while "
    "everyone is honest.",
)
@training(
    "--model",
    default="embedded",
    help="'embedded' (small Llama-style config, no download), a config .json, a local model directory, "
    "or a transformers model id.",
)
@training("--seed", type=int, default=0, help="Seeds the initial parameters (same on every peer) and data order.")
@training(
    "--outer-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Exit 0 after this many outer steps; default: train until stopped.",
)
@training(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    help="Local workers to shard the model over with FSDP (gloo on CPU, nccl on GPUs); each averages its own shard. "
    "Peers average only with peers of the same count.",
)
@training(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    help="Compute precision of the inner steps; θ and both optimizers stay fp32.",
)
@training(
    "--device",
    default="auto",
    help="Where the model trains: auto (a GPU when CUDA works, else the CPU), cpu, cuda or cuda:N. θ and the outer "
    "optimizer stay fp32 on the host.",
)
@training(
    "--micro-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Sequences per forward/backward pass; gradients accumulate to --batch-size. Default: the whole batch.",
)
@training(
    "--activation-checkpointing/--no-activation-checkpointing",
    default=False,
    help="Recompute activations in the backward pass: less memory for about a third more compute.",
)
@data(
    "--dataset",
    default="embedded",
    help="'embedded' (English prose shipped with Python, no download), text/json/csv/parquet files or "
    "globs (comma-separated), a saved dataset directory, or a datasets name (streamed).",
)
@data(
    "--eval-dataset",
    metavar="SPEC",
    default="embedded",
    help="Held-out text to evaluate θ on, in the forms of --dataset; 'embedded' is the embedded corpus's held-out "
    "split, 'none' evaluates nothing.",
)
@observability(
    "--metrics-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append one JSON line per completed outer step.",
)
@observability("--progress/--no-progress", default=None, help="Progress bar; default: only on a terminal.")
@observability("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
@observability(
    "--eval-every",
    type=click.IntRange(min=1),
    metavar="N",
    default=1,
    help="Evaluate θ after every N outer steps of the run.",
)
@observability(
    "--eval-batches",
    type=click.IntRange(min=1),
    metavar="N",
    default=4,
    help="Batches of --batch-size x --seq-len tokens per evaluation.",
)
@monitor_options
@checkpoints(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Save a checkpoint after every outer step and resume from the newest one on start.",
)
def main(**flags) -> None:
    """Join a DiLoCo training run over the swarm and contribute to it until stopped."""
    from peers.workers import launch, worker_index

    worker = worker_index()
    level, prefix = flags["log_level"], ""
    if worker is not None:
        prefix = f"[worker {worker[0]}/{worker[1]}] "
        if worker[0] != 0 and level != "DEBUG":
            level = "WARNING"  # worker 0 speaks for the peer; the others only report problems
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", stream=sys.stderr
    )
    config = build_config(flags)
    if worker is not None:
        sys.exit(_run_worker(config, *worker))
    if config.workers > 1:
        sys.exit(launch(sys.argv[1:], config.workers))
    sys.exit(asyncio.run(_serve(config)))


def _run_worker(config, rank: int, count: int) -> int:
    """One worker of a sharded peer: join the other workers, then run the peer's phases in step with them."""
    import datetime

    import torch
    import torch.distributed as dist

    from peers.sharded import ShardedPeer
    from swarm.local import LocalGroup

    backend = "gloo"
    if config.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())  # one GPU per worker; --device then picks it
        backend = "nccl"
    if rank != 0:
        config.progress = False
    dist.init_process_group(backend, rank=rank, world_size=count, timeout=datetime.timedelta(minutes=30))
    try:
        local = LocalGroup()
        return asyncio.run(_serve(config, lambda: ShardedPeer(config, local)))
    finally:
        dist.destroy_process_group()


def _swarm_key(path: str | None) -> bytes | None:
    from swarm.access import load_key

    try:
        return None if path is None else load_key(path)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--swarm-key'") from None


def _round_plan(flags: dict):
    from swarm.plan import RoundPlan

    short = flags["early_inner_steps"]
    if short is not None and short >= flags["inner_steps"] and flags["early_steps"] != 0:
        raise click.BadParameter(
            f"early rounds must be shorter than --inner-steps ({flags['inner_steps']}), got {short}",
            param_hint="'--early-inner-steps'",
        )
    return RoundPlan.for_run(flags["inner_steps"], flags["warmup_steps"], short, flags["early_steps"])


def build_config(flags: dict):
    """Validate flags that only make sense together; errors name the flag to fix."""
    from peers.evaluate import EvalConfig
    from peers.runner import PeerConfig

    if flags["max_group_size"] is not None and flags["max_group_size"] < flags["min_group_size"]:
        raise click.BadParameter(
            f"{flags['max_group_size']} is smaller than --min-group-size {flags['min_group_size']}",
            param_hint="'--max-group-size'",
        )
    if flags["decay_steps"] is not None and flags["decay_steps"] <= flags["warmup_steps"]:
        raise click.BadParameter(
            f"{flags['decay_steps']} must be larger than --warmup-steps {flags['warmup_steps']}",
            param_hint="'--decay-steps'",
        )
    if flags["announce_maddrs"]:
        for maddr in flags["announce_maddrs"]:
            if maddr.endswith("/tcp/0") or "/tcp/0/" in maddr:
                raise click.BadParameter(
                    f"{maddr!r}: announce an explicit port, not 0", param_hint="'--announce-maddrs'"
                )
    for maddr in flags["initial_peers"]:
        if "/p2p/" not in maddr:
            raise click.BadParameter(
                f"{maddr!r} lacks the peer id: pass the full address printed by the node, ending in /p2p/<id>",
                param_hint="'--initial-peers'",
            )
    from peers.device import DeviceError, resolve

    try:
        device = resolve(flags["device"])
    except DeviceError as e:
        raise click.BadParameter(str(e), param_hint="'--device'") from None
    if flags["micro_batch_size"] is not None and flags["micro_batch_size"] > flags["batch_size"]:
        raise click.BadParameter(
            f"{flags['micro_batch_size']} is larger than --batch-size {flags['batch_size']}",
            param_hint="'--micro-batch-size'",
        )
    if flags["nproc_per_node"] > 1:
        import torch

        if ":" in flags["device"]:
            raise click.BadParameter(
                f"{flags['device']!r} names one GPU, but --nproc-per-node {flags['nproc_per_node']} gives each worker"
                " its own: use cuda, auto or cpu",
                param_hint="'--device'",
            )
        gpus = torch.cuda.device_count() if torch.cuda.is_available() and device.type == "cuda" else 0
        if gpus and gpus < flags["nproc_per_node"]:
            raise click.BadParameter(
                f"{flags['nproc_per_node']} workers but only {gpus} GPUs: use at most one worker per GPU",
                param_hint="'--nproc-per-node'",
            )
    if flags["checkpoint_dir"] and os.path.isfile(flags["checkpoint_dir"]):
        raise click.BadParameter("is a file, not a directory", param_hint="'--checkpoint-dir'")
    from swarm.records import validate_run_id

    try:
        validate_run_id(flags["run_id"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--run-id'") from None
    node = NodeConfig(
        initial_peers=_check_maddrs("'--initial-peers'", flags["initial_peers"]),
        host_maddrs=_check_maddrs("'--host-maddrs'", flags["host_maddrs"]),
        announce_maddrs=_check_maddrs("'--announce-maddrs'", flags["announce_maddrs"]),
        identity_path=flags["identity"],
        connect_timeout_seconds=flags["connect_timeout"],
        swarm_key=_swarm_key(flags["swarm_key"]),
    )
    plan = _round_plan(flags)
    swarm = SwarmConfig(
        run_id=flags["run_id"],
        round_plan=plan,
        outer_lr=flags["outer_lr"],
        outer_momentum=flags["outer_momentum"],
        outer_momentum_ramp=MomentumRamp.for_run(
            flags["outer_momentum"],
            flags["outer_momentum_final"],
            flags["inner_steps"],
            flags["warmup_steps"],
            flags["decay_steps"],
            plan,
        ),
        outer_final_round=final_round(plan.inner_steps, flags["decay_steps"], plan) if flags["final_mean"] else None,
        compression=flags["compression"],
        matchmaking=MatchmakingConfig(
            min_group_size=flags["min_group_size"],
            max_group_size=flags["max_group_size"],
            timeout_seconds=flags["matchmaking_timeout"],
        ),
        allreduce_timeout_seconds=flags["allreduce_timeout"],
        allreduce_retries=flags["allreduce_retries"],
        direct_data_plane=flags["direct"],
        entropy_coding=flags["entropy_coding"],
        error_feedback=flags["error_feedback"],
        robust_averaging=flags["robust_averaging"],
        overlap=flags["overlap"],
    )
    return PeerConfig(
        node=node,
        swarm=swarm,
        inner=InnerConfig(
            lr=flags["lr"],
            warmup_steps=flags["warmup_steps"],
            decay_steps=flags["decay_steps"],
            micro_batch_size=flags["micro_batch_size"],
            activation_checkpointing=flags["activation_checkpointing"],
        ),
        inner_steps=flags["inner_steps"],
        batch_size=flags["batch_size"],
        seq_len=flags["seq_len"],
        model=flags["model"],
        dataset=flags["dataset"],
        seed=flags["seed"],
        outer_steps=flags["outer_steps"],
        checkpoint_dir=flags["checkpoint_dir"],
        metrics_file=flags["metrics_file"],
        progress=flags["progress"],
        precision=flags["precision"],
        device=flags["device"],
        workers=flags["nproc_per_node"],
        overlap_max_lag=flags["overlap_max_lag"],
        eval=EvalConfig(
            dataset=None if flags["eval_dataset"] == "none" else flags["eval_dataset"],
            every_outer_steps=flags["eval_every"],
            batches=flags["eval_batches"],
        ),
        monitor=monitor_config(flags),
    )


async def _serve(config, make_peer=None) -> int:
    import time

    from peers.runner import Peer

    loop = asyncio.get_running_loop()
    peer = None
    first_signal: list[float] = []
    # One stop can arrive twice within moments: a worker of a sharded peer gets it from its launcher and, when a
    # service manager signals every process of the service, directly too. Only a signal after this is a second one.
    same_stop_seconds = 1.0

    def on_signal(signum: int) -> None:
        now = time.monotonic()
        if not first_signal:
            first_signal.append(now)
            logger.info(f"{signal.Signals(signum).name}: finishing the current phase, saving, leaving the swarm")
            if peer is not None:
                peer.request_stop()
        elif now - first_signal[0] < same_stop_seconds:
            logger.debug(f"{signal.Signals(signum).name} again at once: the same stop request")
        else:
            logger.warning("second signal: leaving now without waiting")
            os._exit(130)

    # Before the model loads (seconds), so that a stop during the load is a clean stop too, not a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        peer = await asyncio.to_thread(make_peer or (lambda: Peer(config)))
    except (ModelLoadError, DataLoadError, ValueError) as e:
        logger.error(str(e))
        return 2
    if first_signal:
        peer.request_stop()  # it trains no step: it joins, saves and leaves
    try:
        try:
            addresses = await peer.start()
        except SwarmConnectionError as e:
            logger.error(str(e))
            return 1
        lines = "\n".join(f"  --initial-peers {a}" for a in addresses)
        logger.info(f"peer {peer.node.peer_id} in run {config.swarm.run_id!r}; others can join through:\n{lines}")
        await peer.run()
        logger.info(f"done: {peer.completed_steps} outer steps, now at the run's outer step {peer.swarm.global_step}")
        return 0
    finally:
        await peer.close()
