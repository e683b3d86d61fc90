"""Tokens per second of the peer's inner loop against a minimal hand-written torch loop, same model, batch, device.

The hand-written loop is what anyone would write: random token batches made up front on the device, forward with
labels, backward, gradient clipping at 1.0 (the peer clips too), `torch.optim.AdamW` with its defaults. The peer's loop
is `peers.inner.InnerLoop` as `swarm-peer` runs it: real text tokenized and packed by `peers.data.TokenBatcher` in the
background (`peers.prefetch`), its AdamW (fused where torch has it), the learning-rate schedule and the device-side
loss sum. Rounds alternate between the two (the machine is shared and noisy); the figure is the median ratio.

    python benchmarks/inner_throughput.py --model benchmarks/models/llama-5m.json --batch-size 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peers.data import TokenBatcher, load_text_dataset  # noqa: E402
from peers.device import configure, resolve  # noqa: E402
from peers.inner import InnerConfig, InnerLoop  # noqa: E402
from peers.model import ByteTokenizer, load_model  # noqa: E402
from peers.prefetch import Prefetcher  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_written(model, device, batch_size, seq_len, steps, autocast) -> float:
    """Tokens/s of the plain loop over `steps` steps (after one untimed step)."""
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (batch_size, seq_len), device=device) for _ in range(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()

    def step(batch):
        with torch.autocast(device.type, autocast, enabled=autocast is not None):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step(batches[0])
    sync(device)
    started = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    sync(device)
    return steps * batch_size * seq_len / (time.perf_counter() - started)


def peer_loop(model, device, batch_size, seq_len, steps, autocast, micro_batch_size, checkpointing) -> float:
    """Tokens/s of the peer's InnerLoop over `steps` steps (after one untimed step), real data in the background."""
    batcher = TokenBatcher(load_text_dataset("embedded"), ByteTokenizer(), batch_size, seq_len, seed=0)
    batches = Prefetcher(batcher, device)
    config = InnerConfig(micro_batch_size=micro_batch_size, activation_checkpointing=checkpointing)
    loop = InnerLoop(model, batches, config, device=device, autocast_dtype=autocast)
    try:
        loop.run(1)
        sync(device)
        result = loop.run(steps)
        return result.tokens / result.seconds  # run() ends by reading the loss sum: the device is done
    finally:
        batches.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/llama-5m.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="peer loop only")
    parser.add_argument("--activation-checkpointing", action="store_true", help="peer loop only")
    args = parser.parse_args()

    device = resolve(args.device)
    configure(device)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    loaded = load_model(args.model, seed=0)
    params = sum(p.numel() for p in loaded.model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}: {params / 1e6:.1f}M parameters, batch {args.batch_size} x {args.seq_len}, {name}")
    ratios = []
    for r in range(args.rounds):
        # A fresh copy of the same θ0 for each loop and round: the same model, no state carried between them.
        plain = hand_written(
            copy.deepcopy(loaded.model).to(device), device, args.batch_size, args.seq_len, args.steps, autocast
        )
        ours = peer_loop(
            copy.deepcopy(loaded.model).to(device),
            device,
            args.batch_size,
            args.seq_len,
            args.steps,
            autocast,
            args.micro_batch_size,
            args.activation_checkpointing,
        )
        ratios.append(ours / plain)
        print(f"round {r + 1}: hand-written {plain:,.0f} tokens/s, peer's inner loop {ours:,.0f} ({ours / plain:.3f}x)")
    print(f"median ratio: {statistics.median(ratios):.3f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
