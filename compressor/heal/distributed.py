"""One process, or several through accelerate (DDP, or FSDP on GPUs), behind one small interface.

Launched with `torchrun --nproc_per_node N` or `accelerate launch`, WORLD_SIZE > 1 and healing runs
data-parallel through accelerate's Accelerator: each rank takes its slice of every global batch,
gradients are averaged, and only rank 0 writes. Alone, the same loop runs without accelerate.
State dicts go through torch.distributed.checkpoint's helpers, which give full, name-keyed tensors
whatever the wrapping (plain, DDP, FSDP), so a run saved on 2 ranks resumes on 1 and vice versa.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from compressor.adapters import get_adapter
from compressor.errors import CompressorError, require

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Runtime:
    """A single process: every collective is the identity."""

    world_size = 1
    rank = 0
    strategy = "single"

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model, parameters, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def raw_optimizer(self, optimizer):
        return getattr(optimizer, "optimizer", optimizer)

    # --- name-keyed, full state dicts for checkpoints -----------------------------------------
    def model_state(self, model, trainable_only: bool = True) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(ignore_frozen_params=trainable_only))

    def optimizer_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, self.raw_optimizer(optimizer), options=self._options())

    def load_state(self, model, optimizer, model_state: dict, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, self.raw_optimizer(optimizer), optimizer_state, options=options)

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=self.world_size > 1, **kw)

    def end(self) -> None:
        pass


class AccelerateRuntime(Runtime):
    """Several processes through accelerate: DDP, or FSDP2 with one shard unit per decoder block."""

    def __init__(self, strategy: str, block_class: str | None = None):
        accelerate = require("accelerate", "heal", "distributed healing")
        kwargs = {}
        if strategy == "fsdp":
            if not torch.cuda.is_available():
                raise CompressorError("FSDP through accelerate needs GPUs; on CPUs launch the same "
                                      "command with --distributed ddp")
            kwargs["fsdp_plugin"] = accelerate.FullyShardedDataParallelPlugin(
                fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=[block_class] if block_class else None,
                state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False,
            )
        # accelerate treats a CPU-only launch as distributed only when told it runs on CPUs.
        cpu = not torch.cuda.is_available()
        self.accelerator = accelerate.Accelerator(mixed_precision="no", cpu=cpu, **kwargs)
        if self.accelerator.num_processes != launched_world_size():
            raise CompressorError(f"accelerate sees {self.accelerator.num_processes} processes where "
                                  f"{launched_world_size()} were launched: check the launcher's environment")
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        self.strategy = "fsdp" if strategy == "fsdp" else "ddp"
        log.info("rank %d of %d (%s on %s)", self.rank, self.world_size, self.strategy, self.device)

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def no_sync(self, model):
        return self.accelerator.no_sync(model)

    def clip_grad_norm_(self, model, parameters, max_norm):
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def all_reduce(self, tensor, op="sum"):
        import torch.distributed as dist

        out = tensor.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return out

    def barrier(self):
        self.accelerator.wait_for_everyone()

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def end(self):
        self.accelerator.end_training()


def make_runtime(strategy: str, device: str | torch.device | None, model: torch.nn.Module) -> Runtime:
    """The runtime for how this process was launched: alone, or as one rank of torchrun/accelerate."""
    if launched_world_size() <= 1:
        if strategy == "fsdp":
            log.warning("--distributed fsdp ignored: this process was not launched with torchrun/accelerate")
        return Runtime(device)
    block_class = type(get_adapter(model).blocks_of(model)[0]).__name__
    return AccelerateRuntime("fsdp" if strategy == "fsdp" else "ddp", block_class)
