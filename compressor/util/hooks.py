"""Forward hooks shared by the code that reads hidden states: stopping a forward early, recording
what a block or its MLP projection produced, handing a block another input. Callers register them
and remove the handles in `finally`."""

from __future__ import annotations

import torch


class StopForward(Exception):
    """Raised by a forward hook once every hidden state a caller needs has been seen: the forward
    ends there (the caller catches it), so the blocks after it and the head do not run."""


def hidden_of(output):
    """A block's output hidden states (blocks return a tensor or a tuple that starts with it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def forward_until_stop(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Run the model on a batch (no grad, no cache) until a hook raises StopForward, or to the end."""
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        try:
            model(input_ids=ids.to(device), use_cache=False,
                  **({} if mask is None else {"attention_mask": mask.to(device)}))
        except StopForward:
            pass


def stop_forward(module, args, output):
    """A forward hook that ends the forward pass after its module (`forward_until_stop` catches it)."""
    raise StopForward


def block_recorder(seen: dict, i: int, stop: bool):
    def hook(module, args, output):
        seen[f"h{i}"] = hidden_of(output).detach().clone()  # some blocks update in place
        if stop:
            raise StopForward

    return hook


def projection_recorder(seen: dict, i: int, inputs: bool):
    def hook(module, args, output):
        seen[f"m{i}"] = output.detach().clone()
        if inputs:
            seen[f"a{i}"] = args[0].detach().clone()

    return hook


def injector(seen: dict):
    """A pre-hook that hands the block seen["resume"] as its input hidden states."""
    def hook(module, args, kwargs):
        if args:
            return (seen["resume"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": seen["resume"]}

    return hook
