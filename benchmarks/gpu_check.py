"""The GPU check, prepared for a machine with CUDA: two `swarm-peer` processes train a 352M-parameter Llama config
on the GPU with `--precision bf16` for three outer steps and average as a pair every step.

    python benchmarks/gpu_check.py [--model benchmarks/models/llama-350m.json] [--outer-steps 3] [--inner-steps 20]
                                   [--batch-size 16] [--micro-batch-size 8] [--seq-len 1024]

It prints, per outer step and peer, the inner loop's tokens per second and MFU (6 x parameters x tokens/s over the
GPU's peak bf16 FLOP/s from the table in peers.device; both peers share one GPU when there is one, so their MFUs add
up), the status and group size, and whether the two peers' θ hashes agree; it exits 1 if they do not, or if a step
was not averaged as a pair. Without CUDA it refuses to start (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from peers.launch import read_metrics, run_to_end  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/llama-350m.json")
    parser.add_argument("--outer-steps", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory(prefix="swarm-gpu-") as scratch:
        workdir = args.workdir or scratch
        common = [
            "--run-id", "gpu-check", "--model", args.model, "--device", args.device, "--precision", "bf16",
            "--outer-steps", str(args.outer_steps), "--inner-steps", str(args.inner_steps),
            "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
            "--seq-len", str(args.seq_len), "--eval-dataset", "none", "--min-group-size", "2",
            "--matchmaking-timeout", "120", "--allreduce-timeout", "300",
        ]  # fmt: skip
        peers = [[*common, "--metrics-file", os.path.join(workdir, f"peer{i}.jsonl")] for i in range(2)]
        run_to_end(workdir, peers, timeout=540)
        records = [read_metrics(os.path.join(workdir, f"peer{i}.jsonl")) for i in range(2)]
    ok = True
    print(f"{'step':>4} {'peer':>4} {'status':>9} {'group':>5} {'tokens/s':>10} {'MFU':>6} {'θ':>13}")
    for step in range(1, args.outer_steps + 1):
        got = [next((r for r in rs if r["outer_step"] == step), None) for rs in records]
        for i, r in enumerate(got):
            if r is None:
                print(f"{step:>4} {i:>4} missing")
                ok = False
                continue
            mfu = r.get("mfu")
            print(
                f"{step:>4} {i:>4} {r['status']:>9} {r['group_size']:>5} {r['inner_tokens_per_second']:>10,.0f}"
                f" {'-' if mfu is None else f'{mfu:.1%}':>6} {r['params_sha256'][:12]:>13}"
            )
            ok &= r["group_size"] == 2
        agree = None not in got and len({r["params_sha256"] for r in got}) == 1
        total = sum(r.get("mfu") or 0 for r in got if r is not None)
        print(f"step {step}: θ hashes agree: {agree}; MFU of the GPU (both peers) {total:.1%}")
        ok &= agree
    print("GPU check passed" if ok else "GPU check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
