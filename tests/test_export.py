"""swarm-export on checkpoints of real swarm-peer runs: stock transformers loads the export with the peer's logits."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from peers.launch import _program, read_metrics, start_bootstrap, start_peer, stop
from peers.model import ByteTokenizer, load_model
from swarm import records

FAST = ["--inner-steps", "4", "--batch-size", "4", "--seq-len", "64", "--matchmaking-timeout", "20"]
TEXT = "Grüße aus Köln — 世界 🚀, tabs\tand  spaces , before . punctuation\n"
TOKENS_PER_STEP = 4 * 4 * 64


def run_export(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_program("swarm-export"), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def train_two_peers(workdir: str, *extra: str) -> list[list[dict]]:
    """Two swarm-peer processes of run `export` that average 2 outer steps; checkpoints in {workdir}/ck{i}."""
    boot = start_bootstrap(workdir, "--run-id", "export")
    peers = []
    try:
        for i in range(2):
            args = ["--run-id", "export", "--outer-steps", "2", "--checkpoint-dir", f"{workdir}/ck{i}",
                    "--metrics-file", f"{workdir}/m{i}.jsonl", *FAST, *extra]  # fmt: skip
            peers.append(start_peer(workdir, f"p{i}", boot.maddrs, *args))
        codes = [p.wait(240) for p in peers]
        assert codes == [0, 0], [open(f"{workdir}/p{i}.log").read()[-3000:] for i in range(2)]
    finally:
        for p in peers:
            stop(p)
        stop(boot.process)
    metrics = [read_metrics(f"{workdir}/m{i}.jsonl") for i in range(2)]
    assert [[r["group_size"] for r in m] for m in metrics] == [[2, 2], [2, 2]], metrics
    return metrics


def peer_model_logits(theta: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The peer's own model (peers.model, as swarm-peer builds it) holding θ."""
    model = load_model("embedded", 0).model.eval()
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta, strict=True):
            p.copy_(t)
        return model(input_ids=ids).logits


def check_export(out: str, theta: list[torch.Tensor], metrics: list[dict], other_peer: str) -> None:
    """The export loads with stock transformers, gives the peer's logits, holds θ, and its card tells the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith(".") for n in os.listdir(os.path.dirname(out))), "a staging directory was left"

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, peer_model_logits(theta, ids), rtol=0, atol=1e-5)
    # What was exported is the θ the run agreed on: its hash is the one the peer recorded for the last step.
    mine = [p.detach() for p in exported.parameters()]
    assert records.theta_sha256([records.row_digests(p) for p in mine]) == metrics[-1]["theta_sha256"]

    # The tokenizer is the peer's byte tokenizer: same ids, and it decodes back.
    assert tokenizer(TEXT)["input_ids"] == ByteTokenizer().encode(TEXT)
    assert tokenizer.decode(ByteTokenizer().encode(TEXT)) == TEXT
    assert tokenizer.eos_token_id == ByteTokenizer.eos_token_id == exported.config.eos_token_id
    assert GenerationConfig.from_pretrained(out).eos_token_id == ByteTokenizer.eos_token_id

    card = open(f"{out}/README.md", encoding="utf-8").read()
    assert card.startswith("---\nlibrary_name: transformers\n") and "tags:" in card.split("---")[1]
    assert "| run id | `export` |" in card and "| outer step | 2 |" in card
    assert f"| tokens trained by this peer | {sum(r['tokens'] for r in metrics):,} |" in card
    assert f"| peers averaged with | 1: `{other_peer}` |" in card
    assert f"| last training loss | {metrics[-1]['loss']:.4f} |" in card
    if metrics[-1].get("eval_loss") is not None:
        assert f"| last held-out loss | {metrics[-1]['eval_loss']:.4f} |" in card
    assert metrics[-1]["theta_sha256"] in card


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one-worker"))
    # Blocking, so that each outer step leaves a checkpoint of its own for --step and the fallbacks below to pick:
    # overlapped, a round that lands before the previous step's checkpoint is written makes that one a checkpoint of
    # the later step.
    metrics = train_two_peers(workdir, "--no-overlap")
    return workdir, metrics


@pytest.mark.timeout(420)
def test_one_worker_checkpoint_exports_the_runs_theta(one_worker_run, tmp_path):
    workdir, metrics = one_worker_run
    assert metrics[0][-1]["theta_sha256"] == metrics[1][-1]["theta_sha256"]
    out = str(tmp_path / "export")
    result = run_export("--checkpoint-dir", f"{workdir}/ck0", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "exported outer step 2" in result.stdout

    state = torch.load(f"{workdir}/ck0/step-00000002.pt", weights_only=True)
    assert state["export"]["run"]["peers_seen"] == [metrics[1][0]["peer_id"]]
    check_export(out, state["swarm"]["params"], metrics[0], metrics[1][0]["peer_id"])

    # --step picks an older checkpoint; a non-empty --out is refused without --force and replaced with it.
    refused = run_export("--checkpoint-dir", f"{workdir}/ck0", "--out", out, "--step", "1")
    assert refused.returncode == 1 and "--out" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    older = run_export("--checkpoint-dir", f"{workdir}/ck0", "--out", out, "--step", "1", "--force")
    assert older.returncode == 0, older.stderr
    assert "| outer step | 1 |" in open(f"{out}/README.md", encoding="utf-8").read()


@pytest.mark.timeout(420)
def test_run_facts_survive_a_restart(one_worker_run, tmp_path):
    """A peer restarted from its checkpoint keeps counting: tokens, outer steps and peers seen before the restart."""
    workdir, metrics = one_worker_run
    ckpt = str(tmp_path / "ck")
    shutil.copytree(f"{workdir}/ck0", ckpt)
    w = str(tmp_path)
    alone = ["--min-group-size", "1", "--matchmaking-timeout", "2"]
    peer = start_peer(w, "again", [], "--run-id", "export", "--outer-steps", "1", "--checkpoint-dir", ckpt,
                      "--metrics-file", f"{w}/m.jsonl", *FAST, *alone)  # fmt: skip
    try:
        assert peer.wait(200) == 0, open(f"{w}/again.log").read()[-3000:]
    finally:
        stop(peer)
    after = read_metrics(f"{w}/m.jsonl")
    assert [r["outer_step"] for r in after] == [3] and after[0]["group_size"] == 1
    out = str(tmp_path / "export")
    result = run_export("--checkpoint-dir", ckpt, "--out", out)
    assert result.returncode == 0, result.stderr
    card = open(f"{out}/README.md", encoding="utf-8").read()
    assert "| outer step | 3 |" in card and "| outer steps this peer trained | 3 |" in card
    # What the peer's records say it trained: an inner loop the other peer's round called may have ended a step or
    # more before H (peers.inner), so not always 3 x H x batch x seq-len.
    tokens = sum(r["tokens"] for r in metrics[0]) + after[0]["tokens"]
    assert tokens <= 3 * TOKENS_PER_STEP
    assert f"| tokens trained by this peer | {tokens:,} |" in card
    assert f"| peers averaged with | 1: `{metrics[1][0]['peer_id']}` |" in card
    assert f"| last training loss | {after[0]['loss']:.4f} |" in card


@pytest.mark.timeout(420)
def test_checkpoint_without_export_facts_needs_and_takes_model(one_worker_run, tmp_path):
    """A checkpoint saved before checkpoints carried export facts: refused with what to pass, exported with it."""
    workdir, metrics = one_worker_run
    old = tmp_path / "old"
    old.mkdir()
    state = torch.load(f"{workdir}/ck1/step-00000002.pt", weights_only=True)
    del state["export"]
    torch.save(state, old / "step-00000002.pt")
    out = str(tmp_path / "export")
    refused = run_export("--checkpoint-dir", str(old), "--out", out)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--model" in refused.stderr and "model config" in refused.stderr and "parameter names" in refused.stderr
    assert not os.path.exists(out)

    result = run_export("--checkpoint-dir", str(old), "--out", out, "--model", "embedded")
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([ByteTokenizer().encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids).logits, peer_model_logits(state["swarm"]["params"], ids), rtol=0, atol=1e-5
        )
    card = open(f"{out}/README.md", encoding="utf-8").read()
    assert "| outer step | 2 |" in card and "unknown" in card


@pytest.mark.timeout(420)
def test_two_worker_checkpoints_are_joined_offline(tmp_path):
    """Two `swarm-peer --nproc-per-node 2` that average: the export of one joins its two shards into the full θ."""
    workdir = str(tmp_path)
    metrics = train_two_peers(workdir, "--nproc-per-node", "2", "--no-overlap")  # a checkpoint per step (see above)
    assert metrics[0][-1]["workers"] == 2 and metrics[0][-1]["theta_sha256"] == metrics[1][-1]["theta_sha256"]
    shards = [torch.load(f"{workdir}/ck0/step-00000002.shard{r}of2.pt", weights_only=True) for r in range(2)]
    assert [s["export"]["shard"] for s in shards] == [[0, 2], [1, 2]]
    assert shards[0]["export"]["run"]["peers_seen"] == [metrics[1][0]["peer_id"]]
    # The full θ, from the shards' rows: the hash the workers computed without ever gathering it.
    theta = [torch.cat([a, b]) for a, b in zip(shards[0]["swarm"]["params"], shards[1]["swarm"]["params"])]
    assert [list(t.shape) for t in theta] == shards[0]["export"]["full_shapes"]
    assert records.theta_sha256([records.row_digests(t) for t in theta]) == metrics[0][-1]["theta_sha256"]

    out = str(tmp_path / "export")
    result = run_export("--checkpoint-dir", f"{workdir}/ck0", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "joined from 2 shards" in result.stdout
    check_export(out, theta, metrics[0], metrics[1][0]["peer_id"])

    # A step whose shard set is incomplete: --step says which shard is missing; the default takes the older step.
    partial = tmp_path / "partial"
    shutil.copytree(f"{workdir}/ck0", partial)
    os.remove(partial / "step-00000002.shard1of2.pt")
    refused = run_export("--checkpoint-dir", str(partial), "--out", str(tmp_path / "x"), "--step", "2")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "incomplete shard set" in refused.stderr and "step-00000002.shard1of2.pt" in refused.stderr
    assert not os.path.exists(tmp_path / "x")
    fallback = run_export("--checkpoint-dir", str(partial), "--out", str(tmp_path / "y"))
    assert fallback.returncode == 0, fallback.stderr
    assert "exported outer step 1" in fallback.stdout and "incomplete shard set" in fallback.stderr


@pytest.mark.timeout(300)
def test_a_models_own_transformers_tokenizer_is_exported(tmp_path):
    """--model DIR with a config and a transformers tokenizer of its own (an extra special token): export saves it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peers.export import byte_tokenizer
    from peers.model import embedded_config

    model_dir = tmp_path / "model"
    config = embedded_config()
    config.vocab_size, config.num_hidden_layers = 258, 1
    config.save_pretrained(model_dir)
    own = byte_tokenizer(512)
    own.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    own.save_pretrained(model_dir)
    w = str(tmp_path)
    peer = start_peer(w, "solo", [], "--run-id", "own-tok", "--model", str(model_dir), "--outer-steps", "1",
                      "--min-group-size", "1", "--checkpoint-dir", f"{w}/ck", *FAST)  # fmt: skip
    try:
        assert peer.wait(200) == 0, open(f"{w}/solo.log").read()[-3000:]
    finally:
        stop(peer)
    out = str(tmp_path / "export")
    result = run_export("--checkpoint-dir", f"{w}/ck", "--out", out)
    assert result.returncode == 0, result.stderr

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("é<|sep|>b")["input_ids"] == [0xC3, 0xA9, 257, 98] == own("é<|sep|>b")["input_ids"]
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == 1 and exported.config.vocab_size == 258
    theta = torch.load(f"{w}/ck/step-00000001.pt", weights_only=True)["swarm"]["params"]
    peer_model = load_model(str(model_dir), 0).model.eval()
    with torch.no_grad():
        for p, t in zip(peer_model.parameters(), theta, strict=True):
            p.copy_(t)
        ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
        torch.testing.assert_close(exported(input_ids=ids).logits, peer_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert "the tokenizer the peer trained with" in open(f"{out}/README.md", encoding="utf-8").read()


@pytest.mark.timeout(120)
def test_missing_or_empty_checkpoint_dir_is_a_clear_error(tmp_path):
    missing = run_export("--checkpoint-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a checkpoint")
    empty = run_export("--checkpoint-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert empty.returncode == 1 and "holds no checkpoint" in empty.stderr and "Traceback" not in empty.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "step-00000004.pt").write_bytes(b"not a torch file")
    bad = run_export("--checkpoint-dir", str(tmp_path / "bad"), "--out", str(tmp_path / "out"))
    assert bad.returncode == 1 and "no loadable checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    assert not os.path.exists(tmp_path / "out")
    usage = run_export("--out", str(tmp_path / "out"))
    assert usage.returncode == 2 and "--checkpoint-dir" in usage.stderr


@pytest.mark.timeout(420)
def test_full_disk_is_reported_and_leaves_nothing_behind(one_worker_run, tmp_path):
    """--out on a 256 KiB tmpfs (in a private mount namespace): the 1.7 MB of weights do not fit."""
    workdir, _ = one_worker_run
    disk = tmp_path / "disk"
    disk.mkdir()
    export = [*_program("swarm-export"), "--checkpoint-dir", f"{workdir}/ck0", "--out", f"{disk}/model"]
    script = f'mount -t tmpfs -o size=256k tmpfs "{disk}" && "$@"; code=$?; ls -A "{disk}"; exit $code'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *export], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "could not write the export" in result.stderr and "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == "", "the failed export left files on the disk: " + result.stdout
