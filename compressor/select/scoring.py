"""Measured calibration loss of a model as a plan would leave it, without copying or editing it.

`Scorer` holds a few held-out calibration windows. `loss(drop, maps)` runs the model with blocks
removed and maps applied (`compressor.select.maps.modified`). Searches ask the same question for
many candidates that differ only from some block on, so `capture` records hidden states once per
round and `loss_from` restarts the forward at a block from a given state: the blocks before it
are not run again. Every call counts as one loss evaluation, reported in the plan's cost.

Under torch.distributed (torchrun) each rank runs only its shard of the windows, [rank::world]
(uneven, possibly empty), and `loss`/`loss_from` all-reduce the float64 (nll sum, token count),
so every rank gets the same global mean and a search makes the same choices on every rank.
`capture` stays per rank: it records the states of the rank's own batches, which its
`loss_from` consumes. Alone, nothing of this applies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from compressor.adapters import get_adapter
from compressor.evaluate.loss import next_token_nll, real_targets
from compressor.select.maps import modified
from compressor.util.hooks import forward_until_stop, stop_forward
from compressor.util.parallel import all_reduce_sum, shard

log = logging.getLogger(__name__)


class Scorer:
    """Mean next-token loss (nats) over fixed windows [N, T], for models modified on the fly
    (under torch.distributed, over all ranks' windows; each rank runs its shard)."""

    def __init__(self, model, windows: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 batch_size: int = 4):
        self.model = model
        self.windows = windows
        self.mask = attention_mask
        self.batch_size = batch_size
        self.adapter = get_adapter(model)
        self.num_blocks = self.adapter.num_blocks(model)
        self.evaluations = 0
        self.seconds = 0.0

    @property
    def tokens(self) -> int:
        return int(self.windows.numel() if self.mask is None else self.mask.sum())

    def _batches(self):
        """(batch number, ids, mask) over this rank's shard of the windows (all of them alone)."""
        windows, masks = shard(self.windows), shard(self.mask)
        for b in range(0, windows.shape[0], self.batch_size):
            ids = windows[b:b + self.batch_size]
            mask = None if masks is None else masks[b:b + self.batch_size]
            yield b // self.batch_size, ids, mask

    def _forward_loss(self, ids, mask) -> tuple[float, int]:
        device = self.model.get_input_embeddings().weight.device
        kwargs = {} if mask is None else {"attention_mask": mask.to(device)}
        logits = self.model(input_ids=ids.to(device), use_cache=False, **kwargs).logits
        nll = next_token_nll(logits, ids)
        if mask is not None:
            real = real_targets(mask).to(nll.device)
            return float(nll[real].sum()), int(real.sum())
        return float(nll.sum()), nll.numel()

    def loss(self, drop: Iterable[int] = (), maps: dict[int, torch.Tensor] | None = None) -> float:
        """Loss of the model with `drop` removed and `maps` applied (original numbering)."""
        start = time.perf_counter()
        total, count = 0.0, 0
        with torch.no_grad(), modified(self.model, drop, maps):
            for _, ids, mask in self._batches():
                nll, n = self._forward_loss(ids, mask)
                total, count = total + nll, count + n
        return self._mean(total, count, start)

    def capture(self, drop: Iterable[int], maps: dict[int, torch.Tensor] | None, inputs: Iterable[int],
                projections: Iterable[int] = ()) -> dict[str, list[torch.Tensor]]:
        """Per batch, the input of each block in `inputs` ("h{i}") and the MLP output projection's
        output of each block in `projections` ("m{i}"), on the modified model (all kept blocks).
        Batches of this rank's shard only (no communication)."""
        blocks = self.adapter.blocks_of(self.model)
        inputs, projections = set(inputs), set(projections)
        deepest = max(inputs | projections)
        store: dict[str, list[torch.Tensor]] = {f"h{i}": [] for i in inputs} | {f"m{i}": [] for i in projections}

        def pre_hook(i):
            def hook(module, args, kwargs):
                store[f"h{i}"].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            return hook

        def proj_hook(i):
            def hook(module, args, output):
                # clone: some blocks (Falcon) add to the projection's output in place
                store[f"m{i}"].append(output.detach().clone())
            return hook

        handles = []
        try:
            with torch.no_grad(), modified(self.model, drop, maps):
                for i in inputs:
                    handles.append(blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
                for i in projections:
                    handles.append(self.adapter.mlp_out_of(blocks[i]).register_forward_hook(proj_hook(i)))
                handles.append(blocks[deepest].register_forward_hook(stop_forward))
                for _, ids, mask in self._batches():
                    forward_until_stop(self.model, ids, mask)
        finally:
            for h in handles:
                h.remove()
        return store

    def loss_from(self, drop: Iterable[int], maps: dict[int, torch.Tensor] | None, block: int | None,
                  states: list[torch.Tensor]) -> float:
        """Loss when the modified model's block `block` receives `states` (one tensor per batch) as
        its input; block None means `states` leave the last block (only the head runs)."""
        start = time.perf_counter()
        drop = set(drop)
        kept = [i for i in range(self.num_blocks) if i not in drop]
        blocks = self.adapter.blocks_of(self.model)
        current: list[torch.Tensor] = []
        if block is None:
            anchor = kept[-1]
            skip = set(range(anchor)) | drop

            def hook(module, args, output):
                return (current[0], *output[1:]) if isinstance(output, tuple) else current[0]

            handle = blocks[anchor].register_forward_hook(hook)
        else:
            skip = set(range(block)) | drop

            def hook(module, args, kwargs):
                if args:
                    return (current[0], *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": current[0]}

            handle = blocks[block].register_forward_pre_hook(hook, with_kwargs=True)
        total, count = 0.0, 0
        try:
            with torch.no_grad(), modified(self.model, skip, maps):
                for b, ids, mask in self._batches():
                    current[:] = [states[b]]
                    nll, n = self._forward_loss(ids, mask)
                    total, count = total + nll, count + n
        finally:
            handle.remove()
        return self._mean(total, count, start)

    def _mean(self, total: float, count: int, start: float) -> float:
        """The mean over every rank's tokens (summed across ranks under torch.distributed)."""
        total, count = all_reduce_sum([total, count])
        self._count(start)
        return total / max(count, 1)

    def _count(self, start: float) -> None:
        self.evaluations += 1
        self.seconds += time.perf_counter() - start
