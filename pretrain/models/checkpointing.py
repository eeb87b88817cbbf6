"""Activation checkpointing and compilation applied to a model from outside (models stay architecture-only)."""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)


def _block_lists(model: nn.Module) -> tuple[nn.ModuleList, list[nn.ModuleList]]:
    """(encoder blocks, other block lists such as the MAE decoder's)."""
    encoder = getattr(model, "encoder", model)
    if not isinstance(getattr(encoder, "blocks", None), nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no encoder.blocks / blocks ModuleList to checkpoint")
    others = []
    decoder = getattr(model, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "blocks", None), nn.ModuleList):
        others.append(decoder.blocks)
    return encoder.blocks, others


def apply_activation_checkpointing(model: nn.Module, mode: str | int = "all") -> int:
    """Recompute block activations in backward to trade compute for memory; returns #blocks wrapped.

    ``mode``: ``"none"``; ``"all"`` (every encoder and decoder block); or an int N (the first N encoder
    blocks — the early ones hold the most tokens' activations longest). Uses torch's non-reentrant
    ``checkpoint_wrapper``; its state-dict hooks keep checkpoint keys unchanged.
    Call before wrapping the model for DeepSpeed/compile. Idempotent.
    """
    if mode == "none" or mode == 0:
        return 0
    enc_blocks, others = _block_lists(model)
    if mode == "all":
        lists = [(enc_blocks, len(enc_blocks))] + [(b, len(b)) for b in others]
    elif isinstance(mode, int) and not isinstance(mode, bool) and mode > 0:
        lists = [(enc_blocks, min(mode, len(enc_blocks)))]
    else:
        raise ValueError(
            f"activation checkpointing mode must be 'none', 'all' or a positive int, got {mode!r}"
        )
    wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    wrapped = 0
    for blocks, n in lists:
        for i in range(n):
            if not isinstance(blocks[i], CheckpointWrapper):
                blocks[i] = wrap(blocks[i])
            wrapped += 1
    return wrapped


def compile_model(model: nn.Module) -> int:
    """``torch.compile`` the model in place; returns how many modules were compiled.

    A transformer is compiled block by block (as torchtitan does): identical blocks share one compiled
    graph, and the step's data-dependent parts (mask ids, token gathers, the one host sync) stay eager
    instead of breaking a whole-model graph. Other models (the CNN families) are compiled whole.
    ``Module.compile`` keeps parameter names, so checkpoints load with or without it. Call after
    activation checkpointing and PEFT wrapping, before DeepSpeed.
    """
    try:
        enc_blocks, others = _block_lists(model)
    except TypeError:
        model.compile()
        return 1
    n = 0
    for blocks in (enc_blocks, *others):
        for block in blocks:
            block.compile()
            n += 1
    return n
