"""Where a peer's model trains and how fast: device choice, throughput settings, host-to-device batches, and MFU.

θ and the outer optimizer always stay fp32 on the host (swarm.Swarm), so every peer computes the outer step to the
same bits whatever its accelerator; only the model, its gradients and AdamW's moments live on the device chosen here.
Nothing happens at import: `configure(device)` is called once by the peer that trains on `device`.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

DEVICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A --device the machine cannot honour (no CUDA, no such GPU, a malformed name)."""


def resolve(spec: str) -> torch.device:
    """The torch device of a --device value: `auto` is the current CUDA device when CUDA works, else the CPU."""
    match = _SPEC.match(spec.strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"{spec!r} is not a device: use {DEVICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        raise DeviceError(f"{spec!r}: this machine has no usable CUDA device (torch {torch.__version__}); use cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise DeviceError(f"{spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())


def configure(device: torch.device) -> None:
    """Throughput settings of the process that trains on `device`: TF32 matmuls and convolutions on CUDA.

    TF32 changes the inner steps' rounding only (θ and the outer step stay fp32 on the host); it is what every
    Ampere-or-newer training stack turns on, for up to 8x the fp32 matmul rate."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adamw(params, device: torch.device, **settings) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for `device` (CUDA, and the CPU since torch 2.4): one pass
    over each tensor and no full-size temporaries, where the default multi-tensor form allocates a few model-sized
    intermediate lists at every step (bytes of host memory per parameter on a CPU peer)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except (RuntimeError, ValueError, TypeError) as e:
        logger.debug(f"no fused AdamW on {device} ({e}); using the multi-tensor one")
        return torch.optim.AdamW(params, **settings)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` without waiting for the copy: batches from peers.prefetch are in pinned memory on CUDA
    machines, so the copy runs asynchronously and overlaps the previous step's kernels."""
    if batch.device == device:
        return batch
    return batch.to(device, non_blocking=batch.is_pinned())


def pin(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory for a batch bound to a CUDA device (what makes the copy non-blocking); as is else."""
    return batch.pin_memory() if device.type == "cuda" else batch


# Dense (no sparsity) peak bf16 tensor-core throughput with fp32 accumulation, in FLOP/s, from the vendors' data
# sheets: NVIDIA H100/H200 SXM 989.4 T (PCIe/NVL 756 T), A100 312 T, A10 125 T, A10G 70 T (AWS's variant), L4 121 T,
# L40S 362 T, L40 181 T, RTX 6000 Ada 364 T, RTX A6000 154.8 T, RTX 4090 165.2 T, RTX 3090 71 T, B200 2.25 P, GH200
# 989 T. Matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS = (
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 ADA", 364e12),
    ("RTX A6000", 154.8e12),
    ("4090", 165.2e12),
    ("3090", 71e12),
)


def peak_bf16_flops(device: torch.device) -> tuple[float, str] | None:
    """(peak bf16 FLOP/s, the GPU's name) for a GPU in PEAK_BF16_FLOPS; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return lookup_peak(name)


def lookup_peak(name: str) -> tuple[float, str] | None:
    upper = name.upper()
    for key, flops in PEAK_BF16_FLOPS:
        if key in upper:
            return flops, name
    return None


def mfu(params: int, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOP utilisation: 6 x parameters x tokens/s (forward and backward of a dense transformer, attention
    left out) over the device's peak bf16 FLOP/s."""
    return 6.0 * params * tokens_per_second / peak_flops


@torch.no_grad()
def flatten_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Move every parameter of `model` into one contiguous fp32 vector (each parameter becomes a view of it) and
    return the vector, in `model.parameters()` order: the order of θ.

    A one-worker CPU peer computes its pseudo-gradient Δ = θ - local over its own parameters in this vector, where the
    outer step reads it as one flat contribution: the separate Δ that the outer step would allocate otherwise is 4
    bytes per parameter at the moment memory peaks (the model, AdamW's moments, θ, the momentum and the average
    all alive). Call before the optimizer is made; gradients stay separate tensors."""
    params = list(model.parameters())
    if any(p.dtype != torch.float32 for p in params):
        raise ValueError("flatten_parameters needs float32 parameters")
    device = params[0].device if params else torch.device("cpu")
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=device)
    offset = 0
    for p in params:
        view = flat[offset : offset + p.numel()].view(p.shape)
        view.copy_(p)
        p.data = view
        offset += p.numel()
    return flat
