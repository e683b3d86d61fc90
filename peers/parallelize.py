"""Applying FSDP2 to a model built by peers.model, which itself knows nothing about distribution.

Each transformer block becomes one FSDP unit (its parameters are gathered for its forward and backward only), then
the root module takes what is left (embeddings, final norm, head). Parameters are sharded along dim 0 over the
default process group: worker i holds rows [i*c, (i+1)*c) of every parameter, c = ceil(rows / workers).
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: the longest ModuleList in it (decoder layers)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of blocks to shard")
    return list(max(lists, key=len))


def shard_model(model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
    """Shard `model` in place with FSDP2, one unit per block. bf16 computes in bf16; parameters and gradient
    reduction stay fp32, so θ and both optimizers stay fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    policy = MixedPrecisionPolicy(param_dtype=PRECISIONS[precision], reduce_dtype=torch.float32)
    for block in blocks_of(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def local_shards(model: torch.nn.Module) -> list[torch.Tensor]:
    """This worker's rows of every parameter, in `model.parameters()` order (views, not copies)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]


def localize(tree):
    """A state tree (dicts, lists, tensors) with every DTensor replaced by this worker's local tensor, for saving.

    Views, not copies: the checkpoint is written from them before anything changes them (peers.checkpoint)."""
    if hasattr(tree, "to_local"):
        return tree.to_local().detach()
    if isinstance(tree, dict):
        return {k: localize(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [localize(v) for v in tree]
    return tree


def optimizer_state_from_local(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """An optimizer state dict saved with `localize`, with the local tensors made DTensors like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        param = params[int(index)]
        device = param.to_local().device if isinstance(param, DTensor) else param.device
        state[index] = {
            name: DTensor.from_local(
                v.to(device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            )
            if isinstance(v, torch.Tensor) and v.dim() > 0 and isinstance(param, DTensor)
            else v
            for name, v in values.items()
        }
    return {"state": state, "param_groups": saved["param_groups"]}
