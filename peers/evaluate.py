"""Held-out loss of the global parameters θ: the same fixed batches on every peer, so peers' figures compare."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalConfig:
    dataset: str | None = "embedded"
    """Held-out text, same forms as --dataset; "embedded" is the embedded corpus's held-out split (every tenth
    pydoc topic, which the embedded training data never contains); None evaluates nothing."""
    every_outer_steps: int = 1
    """Evaluate θ after every this many outer steps of the run, of H inner steps each: the early phase's shorter
    rounds (swarm.plan) are evaluated where a round of H would end, so evaluation costs no more there."""
    batches: int = 4
    """Batches of --batch-size x --seq-len tokens per evaluation."""

    def due(self, step: int, inner_steps: int) -> bool:
        """Whether θ is due an evaluation at the run's inner step `step` (where its last round ended)."""
        return step > 0 and step % (self.every_outer_steps * inner_steps) == 0


EVAL_SEED = 0
"""Every peer draws the same held-out batches: figures of different peers, and of data-parallel baselines, compare."""


class Evaluator:
    """The held-out loss of a model, on fixed batches drawn once at start."""

    def __init__(self, config: EvalConfig, model, tokenizer, batch_size: int, seq_len: int, device, autocast_dtype):
        from peers.data import TokenBatcher, load_text_dataset

        self.config, self.model = config, model
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype
        dataset = load_text_dataset(config.dataset, split="heldout")
        # One lane per row, as before lanes were pooled: the held-out batches stay the ones every figure measured.
        batcher = TokenBatcher(dataset, tokenizer, batch_size, seq_len, seed=EVAL_SEED, lanes=batch_size)
        self.batches = [next(batcher) for _ in range(config.batches)]

    @torch.no_grad()
    def loss(self) -> float:
        """Mean loss over the held-out batches. Every worker of a sharded peer must call it together (FSDP)."""
        was_training = self.model.training
        self.model.eval()
        try:
            total = 0.0
            for batch in self.batches:
                batch = batch.to(self.device)
                with torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    total += float(self.model(input_ids=batch, labels=batch).loss)
            return total / len(self.batches)
        finally:
            self.model.train(was_training)
            # FSDP2 leaves parameters gathered after a forward pass with no backward: shard them again, or the
            # next checkpoint would save full tensors where each worker holds only its rows.
            for module in self.model.modules():
                if hasattr(module, "reshard") and hasattr(module, "unshard"):
                    module.reshard()
