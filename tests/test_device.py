"""A volunteer's device and a real model size: device choice, micro-batches, checkpoints off the event loop."""

import asyncio
import subprocess
import sys
import time

import pytest
import torch

from peers.checkpoint import Checkpointer
from peers.device import DeviceError, lookup_peak, mfu, resolve
from peers.inner import InnerConfig, InnerLoop
from peers.model import load_model


def run_peer_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = "import sys; from peers.cli import main; sys.argv[0] = 'swarm-peer'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_auto_picks_the_gpu_when_cuda_works_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve("auto").type == expected
    assert resolve("cpu") == torch.device("cpu")
    for bad in ("tpu", "cpu:0", "cuda:x", ""):
        with pytest.raises(DeviceError, match="is not a device"):
            resolve(bad)


def test_cuda_names_resolve_as_on_a_machine_with_two_gpus(monkeypatch):
    """The CUDA branches, run here without a GPU: torch's answers about the machine are replaced, nothing else."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve("auto") == torch.device("cuda", 1) == resolve("cuda")
    assert resolve("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="has 2 CUDA device"):
        resolve("cuda:2")


@pytest.mark.timeout(60)
def test_a_device_the_machine_lacks_is_a_usage_error_naming_the_flag():
    # Without CUDA, "cuda" itself is missing; with it, a GPU index past the last one.
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    result = run_peer_cli("--device", missing)
    assert result.returncode == 2, result.stderr
    assert "--device" in result.stderr and ("no usable CUDA" in result.stderr or "CUDA device(s)" in result.stderr)
    result = run_peer_cli("--batch-size", "4", "--micro-batch-size", "8")
    assert (
        result.returncode == 2
        and "--micro-batch-size" in result.stderr
        and "larger than --batch-size 4" in (result.stderr)
    )


def test_mfu_comes_from_a_table_of_known_gpus():
    assert lookup_peak("NVIDIA H100 80GB HBM3") == (989.4e12, "NVIDIA H100 80GB HBM3")
    assert lookup_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert lookup_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert lookup_peak("Some Future Accelerator") is None
    # 6 x 350M parameters x 100K tokens/s = 210 TFLOP/s: 21% of a 989 TFLOP/s H100.
    assert mfu(350_000_000, 100_000, 989.4e12) == pytest.approx(0.2123, abs=1e-4)


def _gradients(model, batch, micro_batch_size):
    loop = InnerLoop(model, iter(()), InnerConfig(micro_batch_size=micro_batch_size))
    model.zero_grad(set_to_none=True)
    loss = loop.accumulate_gradients(batch)
    return float(loss), [p.grad.clone() for p in model.parameters()]


@pytest.mark.timeout(60)
def test_micro_batches_give_the_gradient_of_the_whole_batch():
    model = load_model("embedded", seed=0).model
    batch = torch.randint(0, 257, (7, 48), generator=torch.Generator().manual_seed(1))
    whole_loss, whole = _gradients(model, batch, None)
    for size in (1, 3):  # 7 sequences as 7 x 1 and as 3 + 3 + 1: uneven micro-batches weigh by their share
        loss, grads = _gradients(model, batch, size)
        assert loss == pytest.approx(whole_loss, rel=1e-5)
        for g, w in zip(grads, whole, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="micro_batch_size"):
        InnerConfig(micro_batch_size=9).validate(batch_size=8)


@pytest.mark.timeout(120)
async def test_the_event_loop_keeps_answering_while_a_large_checkpoint_is_written(tmp_path):
    """1.6 GB of live tensors (a 400M-parameter θ): over a second to write and fsync here; the loop's ticker, due
    every 10 ms, must never be late by more than the bound."""
    state = {"swarm": {"params": [torch.full((100_000_000,), float(i)) for i in range(4)], "step": 7}}
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    late, done = 0.0, False

    async def ticker():
        nonlocal late
        while not done:
            due = time.perf_counter() + 0.01
            await asyncio.sleep(0.01)
            late = max(late, time.perf_counter() - due)

    ticking = asyncio.create_task(ticker())
    try:
        started = time.perf_counter()
        checkpointer.save_in_background(state, 7)
        assert checkpointer.writing
        await checkpointer.wait_async()
        seconds = time.perf_counter() - started
    finally:
        done = True
        await ticking
        checkpointer.close()
    assert seconds > 1.0, f"the write took {seconds:.2f}s: too small a checkpoint to show anything"
    assert late < 0.25, f"the event loop stalled {late:.3f}s during a {seconds:.2f}s checkpoint write"
    assert checkpointer.last_write[0] == 7 and [p.name for p in tmp_path.iterdir()] == ["step-00000007.pt"]
    loaded, _ = checkpointer.load_latest()
    assert loaded["swarm"]["step"] == 7 and float(loaded["swarm"]["params"][3][-1]) == 3.0
