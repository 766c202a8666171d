"""Data parallelism for the passes that only sum over windows (calibration, map fitting, plan scoring).

Under torchrun each rank takes every world-th window and the sums are all-reduced; alone, every
function here is the identity. Healing has its own runtime (compressor.heal.distributed).
"""

from __future__ import annotations

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor) -> None:
    """Sum `tensor` over ranks in place (through the GPU when the process group is NCCL)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buffer = tensor.to(device)
    dist.all_reduce(buffer)
    tensor.copy_(buffer)


def shard(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's rows [rank::world] under torch.distributed (possibly none); alone, all of them."""
    rank, world = rank_world()
    return tensor if tensor is None or world == 1 else tensor[rank::world]


def all_reduce_sum(values: list[float]) -> list[float]:
    """The sums of `values` over ranks, in float64, under torch.distributed; alone, the values."""
    if rank_world()[1] == 1:
        return list(values)
    buffer = torch.tensor(values, dtype=torch.float64)
    all_reduce_(buffer)
    return buffer.tolist()
