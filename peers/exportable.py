"""What a checkpoint carries so that `swarm-export` can turn it into a `save_pretrained` directory offline.

A checkpoint holds θ as a list of tensors (or, for worker i of a sharded peer, its rows of each). Without more, an
exporter would have to guess the model they belong to and how shards join. So every checkpoint also holds, under
"export": the model spec and its transformers config, the parameter names and full shapes in θ's order, which rows
of each tensor this file holds, the tokenizer's files, and the facts of the run this peer saw (for the model card).

Pure functions and one small class, so the one-worker and the sharded peer build these facts the same way.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

FORMAT = 1
"""Bumped when the layout of the "export" dict changes incompatibly."""


def model_facts(loaded, spec: str, seed: int) -> dict:
    """Facts of the model that never change during a run; call before the model is sharded (full shapes)."""
    model = loaded.model
    return {
        "format": FORMAT,
        "model_spec": spec,
        "seed": seed,
        "architecture": type(model).__name__,
        "config_json": model.config.to_json_string(use_diff=False),
        "param_names": [name for name, _ in model.named_parameters()],
        "full_shapes": [list(p.shape) for p in model.parameters()],
        "tokenizer": tokenizer_facts(loaded.tokenizer),
    }


def tokenizer_facts(tokenizer) -> dict:
    """The byte tokenizer by name (swarm-export writes a transformers equivalent); any other by its saved files."""
    from peers.model import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "bytes", "vocab_size": ByteTokenizer.vocab_size, "eos_token_id": ByteTokenizer.eos_token_id}
    if not hasattr(tokenizer, "save_pretrained"):
        return {"kind": "none", "type": type(tokenizer).__name__}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
    return {"kind": "transformers", "files": files}


def shard_rows(full_shapes, local_shapes, index: int, count: int) -> list[list[int] | None]:
    """[start, stop) of dim-0 rows of each tensor that shard `index` of `count` holds (FSDP2: chunks of
    ceil(rows / count) rows, the last ones shorter or empty); None for a 0-dim tensor, which every shard holds whole."""
    rows = []
    for full, local in zip(full_shapes, local_shapes, strict=True):
        if len(full) == 0:
            rows.append(None)
            continue
        chunk = math.ceil(full[0] / count)
        start = min(index * chunk, full[0])
        rows.append([start, start + int(local[0])])
    return rows


@dataclass
class RunFacts:
    """What this peer saw of its run, for the exported model card; kept across restarts through the checkpoint."""

    run_id: str = ""
    peer_id: str = ""
    outer_step: int = 0
    tokens: int = 0
    """Tokens this peer trained on, over all its outer steps (all workers of a sharded peer together)."""
    outer_steps_trained: int = 0
    peers_seen: list[str] = field(default_factory=list)
    """Base58 ids of the peers whose pseudo-gradients were averaged with this peer's."""
    loss: float | None = None
    eval_loss: float | None = None

    def remember(self, record: dict, members) -> None:
        """Fold in one outer step's metrics record and the members of the group whose average was applied."""
        self.run_id, self.peer_id = record["run_id"], record["peer_id"]
        self.outer_step = int(record["outer_step"])
        self.tokens += int(record.get("tokens") or 0)
        self.outer_steps_trained += 1
        if record.get("loss") is not None:
            self.loss = float(record["loss"])
        if record.get("eval_loss") is not None:
            self.eval_loss = float(record["eval_loss"])
        seen = set(self.peers_seen) | {m for m in members if m != self.peer_id}
        self.peers_seen = sorted(seen)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunFacts:
        """The facts a checkpoint carried, or fresh ones for a checkpoint saved before they existed."""
        saved = (state.get("export") or {}).get("run") or {}
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        return cls(**known)
