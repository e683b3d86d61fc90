"""`swarm-export`: a peer's checkpoint as a `save_pretrained` directory that stock transformers loads.

It exports the run's global parameters θ (what every member of the peer's last group agreed on), not the peer's
local weights, which hold its unaveraged inner-loop work. A sharded peer's checkpoint is one file per worker, each
with its rows of θ; they are joined here, offline, so training never gathers the model. Everything needed besides
θ (model config, parameter names, shapes and row split, tokenizer, run facts) comes from the checkpoint's "export"
entry (peers.exportable); checkpoints saved before it existed are exported with `--model`.

The output is staged in a sibling directory and moved into place at the end: a failure (a full disk) leaves no
half-written export behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import click
import torch

from peers.checkpoint import _os_reason

_FILE = re.compile(r"^step-(\d{8})(?:\.shard(\d+)of(\d+))?\.pt$")
_STALE_WEIGHTS = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?)$")
EOS_TOKEN = "<|endoftext|>"


class ExportError(RuntimeError):
    """Export cannot go on; the message says why and what to do."""


@dataclass
class Checkpoint:
    step: int
    paths: list[str]
    """One file, or the shard files in worker order."""
    states: list[dict]
    """Per file: run_id, layout, swarm params and step, and the export facts (the training-only rest dropped)."""


# ---- finding and loading ----------------------------------------------------------------------------------------


def _listing(directory: str) -> dict[int, dict]:
    """{step: {"whole": path or None, "shards": {count: {index: path}}}} of the checkpoint files in `directory`."""
    if not os.path.isdir(directory):
        raise ExportError(f"--checkpoint-dir {directory} does not exist or is not a directory")
    steps: dict[int, dict] = {}
    for name in sorted(os.listdir(directory)):
        match = _FILE.match(name)
        if not match:
            continue
        entry = steps.setdefault(int(match.group(1)), {"whole": None, "shards": {}})
        path = os.path.join(directory, name)
        if match.group(2) is None:
            entry["whole"] = path
        else:
            entry["shards"].setdefault(int(match.group(3)), {})[int(match.group(2))] = path
    return steps


def _load(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path} is unreadable ({_os_reason(e)})") from e
    if not isinstance(state, dict) or not isinstance(state.get("swarm"), dict) or "params" not in state["swarm"]:
        raise ExportError(f"{path} is not a swarm checkpoint (no θ in it)")
    swarm = state["swarm"]
    return {
        "run_id": state.get("run_id"),
        "layout": state.get("layout"),
        "params": swarm["params"],
        "step": int(swarm.get("step", 0)),
        "export": state.get("export"),
    }


def _load_step(step: int, entry: dict) -> Checkpoint:
    """The loaded checkpoint of one step: its one-worker file, else a complete set of shard files."""
    problems = []
    if entry["whole"] is not None:
        try:
            return Checkpoint(step, [entry["whole"]], [_load(entry["whole"])])
        except ExportError as e:
            problems.append(str(e))
    for count, files in sorted(entry["shards"].items()):
        missing = [i for i in range(count) if i not in files]
        if missing:
            have = ", ".join(str(i) for i in sorted(files))
            problems.append(
                f"incomplete shard set: {len(files)} of {count} shard files (have {have}; missing"
                f" {', '.join(str(i) for i in missing)}), e.g. step-{step:08d}.shard{missing[0]}of{count}.pt"
            )
            continue
        paths = [files[i] for i in range(count)]
        try:
            states = [_load(p) for p in paths]
        except ExportError as e:
            problems.append(str(e))
            continue
        return Checkpoint(step, paths, states)
    raise ExportError(f"outer step {step}: " + "; ".join(problems))


def find_checkpoint(directory: str, step: int | None = None) -> Checkpoint:
    """The checkpoint of `step`, or the newest one that loads completely (older ones tried with a warning)."""
    steps = _listing(directory)
    if not steps:
        raise ExportError(f"--checkpoint-dir {directory} holds no checkpoint (no step-NNNNNNNN[.shardIofN].pt files)")
    if step is not None:
        if step not in steps:
            raise ExportError(f"--checkpoint-dir {directory} has no checkpoint of outer step {step} (it has steps"
                              f" {', '.join(str(s) for s in sorted(steps))})")  # fmt: skip
        return _load_step(step, steps[step])
    problems = []
    for candidate in sorted(steps, reverse=True):
        try:
            return _load_step(candidate, steps[candidate])
        except ExportError as e:
            click.echo(f"swarm-export: skipping {e}", err=True)
            problems.append(str(e))
    raise ExportError(f"no loadable checkpoint in {directory}: " + " | ".join(problems))


# ---- facts and θ ------------------------------------------------------------------------------------------------


def facts_of(checkpoint: Checkpoint, model_spec: str | None) -> dict:
    """The export facts of the checkpoint; for one saved before they existed, rebuilt from `--model`."""
    from peers.exportable import FORMAT, RunFacts, model_facts

    facts = checkpoint.states[0]["export"]
    if facts is not None:
        if int(facts.get("format", 0)) > FORMAT:
            raise ExportError(f"{checkpoint.paths[0]} was written by a newer swarm (export format {facts['format']})")
        return {**facts, "complete": True}
    if model_spec is None:
        raise ExportError(
            f"{checkpoint.paths[0]} was saved before checkpoints carried export facts: it lacks the model spec, the"
            " model config, the parameter names, the tokenizer and the run facts. Pass --model with the --model the"
            " peer trained with (e.g. --model embedded) to rebuild them"
        )
    from peers.model import ModelLoadError, load_model

    try:
        loaded = load_model(model_spec, 0)  # only the config and names matter: every parameter comes from θ
    except ModelLoadError as e:
        raise ExportError(str(e)) from e
    run = RunFacts(run_id=checkpoint.states[0]["run_id"] or "", outer_step=checkpoint.step)
    return {**model_facts(loaded, model_spec, 0), "run": run.to_dict(), "complete": False}


def join_theta(checkpoint: Checkpoint, facts: dict) -> list[torch.Tensor]:
    """θ of the whole model: the one file's, or every shard's rows joined along dim 0 in worker order."""
    count = len(checkpoint.states)
    shapes = [tuple(s) for s in facts["full_shapes"]]
    for index, (path, state) in enumerate(zip(checkpoint.paths, checkpoint.states, strict=True)):
        if len(state["params"]) != len(shapes):
            raise ExportError(f"{path} holds {len(state['params'])} tensors; the model has {len(shapes)}")
        if count > 1 and state["layout"] is not None and list(state["layout"]) != [index, count]:
            raise ExportError(f"{path} says it is shard {state['layout']}, not [{index}, {count}]")
        if state["run_id"] != checkpoint.states[0]["run_id"] or state["step"] != checkpoint.states[0]["step"]:
            raise ExportError(f"the shard files of outer step {checkpoint.step} are of different runs or steps")
    theta = []
    for k, shape in enumerate(shapes):
        parts = [state["params"][k] for state in checkpoint.states]
        if count == 1 or len(shape) == 0:
            whole = parts[0]
        else:
            _check_rows(checkpoint, k, shape)
            whole = torch.cat(parts, dim=0)
        if tuple(whole.shape) != shape:
            name = facts["param_names"][k]
            raise ExportError(f"{name}: θ in the checkpoint has shape {tuple(whole.shape)}, the model {shape}")
        theta.append(whole.to(torch.float32))
    return theta


def _check_rows(checkpoint: Checkpoint, k: int, shape: tuple) -> None:
    """The shards' row ranges of tensor k, where recorded, tile [0, rows) in worker order."""
    expected_start = 0
    for path, state in zip(checkpoint.paths, checkpoint.states, strict=True):
        rows = (state["export"] or {}).get("rows")
        if rows is None:
            return  # an older checkpoint: FSDP2's row chunks, checked through the joined shape
        start, stop = rows[k]
        if start != expected_start or stop - start != state["params"][k].shape[0]:
            raise ExportError(f"{path}: rows [{start}, {stop}) of tensor {k} do not follow the previous shard's")
        expected_start = stop
    if expected_start != shape[0]:
        raise ExportError(f"the shards hold {expected_start} rows of tensor {k}, the model {shape[0]}")


def build_model(facts: dict, theta: list[torch.Tensor]):
    """A transformers model built from the saved config, holding θ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads(facts["config_json"])
    try:
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    except Exception as e:
        raise ExportError(f"could not build the model from the checkpoint's config: {e}") from e
    names = [name for name, _ in model.named_parameters()]
    if names != list(facts["param_names"]):
        raise ExportError(
            f"the model built from the saved config has other parameters than the peer's ({len(names)} vs"
            f" {len(facts['param_names'])}; first difference at {_first_difference(names, facts['param_names'])})"
        )
    if type(model).__name__ != facts["architecture"]:
        built, trained = type(model).__name__, facts["architecture"]
        raise ExportError(f"the saved config builds a {built}, the peer trained a {trained}")
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta, strict=True):
            p.copy_(t)
    return model.eval()


def _first_difference(a, b) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x!r} vs {y!r}"
    return "the end of the shorter list"


# ---- tokenizer and model card -----------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, which the `tokenizers` byte-level pre-tokenizer produces."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(max_length: int | None):
    """peers.model.ByteTokenizer as a transformers tokenizer: token b is UTF-8 byte b, 256 is end-of-text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab[EOS_TOKEN] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every byte stays its own token
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    extra = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False, **extra
    )


def write_tokenizer(facts: dict, config, directory: str) -> str:
    """Write the model's tokenizer into `directory`; returns what was written, for the model card."""
    tokenizer = facts["tokenizer"]
    if tokenizer["kind"] == "bytes":
        from peers.model import _max_positions

        byte_tokenizer(_max_positions(config)).save_pretrained(directory)
        return "byte-level (UTF-8 bytes as tokens 0-255, `<|endoftext|>` = 256)"
    if tokenizer["kind"] == "transformers":
        for name, data in tokenizer["files"].items():
            with open(os.path.join(directory, os.path.basename(name)), "wb") as f:
                f.write(data)
        return "the tokenizer the peer trained with"
    return "none (the peer's tokenizer is not a transformers tokenizer)"


def model_card(facts: dict, checkpoint: Checkpoint, theta_sha256: str, numel: int, tokenizer: str) -> str:
    run = facts["run"]
    unknown = "unknown (checkpoint saved before checkpoints carried run facts)"

    def known(value, fmt=str):
        if not facts["complete"] and not value:
            return unknown
        return "none recorded" if value is None else fmt(value)

    peers = run.get("peers_seen") or []
    peers_text = f"{len(peers)}" + (f": {', '.join(f'`{p}`' for p in peers)}" if peers else "")
    run_id = run.get("run_id") or checkpoint.states[0]["run_id"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- swarm",
        "- diloco",
        "- peer-to-peer",
        "- text-generation",
        "---",
        "",
        f"# {run_id}, outer step {checkpoint.step}",
        "",
        "The global parameters θ of a peer-to-peer DiLoCo training run (swarm), exported by `swarm-export` from",
        "one peer's checkpoint: what the members of its last averaging group agreed on, not its local weights.",
        "",
        "| fact | value |",
        "|---|---|",
        f"| run id | `{run_id}` |",
        f"| outer step | {checkpoint.step} |",
        f"| exporting peer | {known(run.get('peer_id'), lambda p: f'`{p}`')} |",
        f"| tokens trained by this peer | {known(run.get('tokens'), lambda n: f'{n:,}')} |",
        f"| outer steps this peer trained | {known(run.get('outer_steps_trained'))} |",
        f"| peers averaged with | {peers_text if facts['complete'] else unknown} |",
        f"| last training loss | {known(run.get('loss'), lambda x: f'{x:.4f}')} |",
        f"| last held-out loss | {known(run.get('eval_loss'), lambda x: f'{x:.4f}')} |",
        f"| model | `{facts['model_spec']}` ({facts['architecture']}, {numel:,} parameters) |",
        f"| tokenizer | {tokenizer} |",
        f"| θ sha256 (Merkle, as in the metrics' `theta_sha256`) | `{theta_sha256}` |",
        f"| checkpoint | {', '.join(os.path.basename(p) for p in checkpoint.paths)} |",
        f"| exported | {time.strftime('%Y-%m-%d %H:%M:%S %Z')} |",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
    ]
    return "\n".join(lines)


# ---- writing ----------------------------------------------------------------------------------------------------


def _check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ExportError(f"--out {out} is not empty; pass --force to write into it, or choose another directory")


def _usual_modes(staging: str) -> None:
    """mkdtemp makes a 0700 directory, and writers may make 0600 files: give them the modes the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for name in os.listdir(staging):
        os.chmod(os.path.join(staging, name), 0o666 & ~umask)


def _move_into_place(staging: str, out: str) -> None:
    if not os.path.exists(out):
        os.replace(staging, out)
        return
    if not os.listdir(out):
        os.rmdir(out)
        os.replace(staging, out)
        return
    for name in os.listdir(out):  # --force: weights of an earlier export would shadow or mix with ours
        if _STALE_WEIGHTS.match(name):
            os.remove(os.path.join(out, name))
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)


def export(checkpoint_dir: str, out: str, step: int | None = None, model: str | None = None, force: bool = False):
    """Export a checkpoint of `checkpoint_dir` into `out`; returns (checkpoint, θ hash). Raises ExportError."""
    from transformers import GenerationConfig

    from swarm import records

    out = os.path.abspath(out)
    _check_out(out, force)
    checkpoint = find_checkpoint(checkpoint_dir, step)
    facts = facts_of(checkpoint, model)
    theta = join_theta(checkpoint, facts)
    built = build_model(facts, theta)
    theta_sha256 = records.theta_sha256([records.row_digests(t) for t in theta])
    numel = sum(t.numel() for t in theta)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as e:
        raise ExportError(f"could not create {out}: {_os_reason(e)}") from e
    try:
        built.generation_config = GenerationConfig.from_model_config(built.config)
        built.save_pretrained(staging)
        built.generation_config.save_pretrained(staging)
        tokenizer = write_tokenizer(facts, built.config, staging)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(facts, checkpoint, theta_sha256, numel, tokenizer))
        _usual_modes(staging)
        _move_into_place(staging, out)
    except BaseException as e:  # a full disk is an OSError, or a RuntimeError from the safetensors writer
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(e, Exception):
            raise  # Ctrl-C: nothing half-written is left behind
        raise ExportError(f"could not write the export to {out}: {_os_reason(e)}") from e
    return checkpoint, theta_sha256


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint-dir", required=True, help="A peer's --checkpoint-dir (one-worker or sharded).")
@click.option("--out", required=True, help="Directory to write the save_pretrained export into (empty or new).")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Outer step to export [default: newest].")
@click.option(
    "--model",
    default=None,
    help="The peer's --model, for checkpoints saved before they carried export facts; ignored otherwise.",
)
@click.option("--force", is_flag=True, help="Write into a non-empty --out, replacing an earlier export's files.")
def main(checkpoint_dir: str, out: str, step: int | None, model: str | None, force: bool) -> None:
    """Write a peer checkpoint's global parameters θ as a transformers model directory (safetensors, config,
    generation config, tokenizer, README model card)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one small file: a bar would only clutter the error stream
    try:
        checkpoint, theta_sha256 = export(checkpoint_dir, out, step, model, force)
    except ExportError as e:
        click.echo(f"swarm-export: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("swarm-export: interrupted; nothing was written to --out", err=True)
        sys.exit(130)
    except Exception as e:  # a bug, or something this program did not foresee: still one clear line
        click.echo(f"swarm-export: error: unexpected failure: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
    shards = "" if len(checkpoint.paths) == 1 else f", joined from {len(checkpoint.paths)} shards"
    click.echo(f"exported outer step {checkpoint.step}{shards} (θ {theta_sha256[:12]}) to {os.path.abspath(out)}")
