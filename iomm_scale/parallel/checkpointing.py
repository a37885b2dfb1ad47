"""Activation checkpointing applied from outside the model files.

    none      keep every activation
    full      recompute every block of `generator.blocks()` in backward but the last
    every_k   recompute blocks 0, k, 2k, ... but the last (a memory / compute dial)

The model's last block is never checkpointed: its backward starts right after the forward
(only the output head and the loss come between), so recomputing it would rebuild the very
activations a plain forward has just made, at the same peak memory. Keeping them saves 1/N
of the recompute (measured: docs/PARALLEL.md). The only extra is that the head's and the
loss's activations now coexist with the last block's, a few residual-stream tensors.
Under pipeline parallelism this applies to the last stage alone, where each micro-batch's
backward also follows its forward directly.

plus, separately, the frozen MLLM forward of the conditioner (`checkpoint_mllm`): it has
no trainable weights but gradients flow through it into the RQA, so its activations
are kept unless it is checkpointed too.

torch.utils.checkpoint with use_reentrant=False: it works with inputs that do not require
grad, with keyword arguments, with megatron's TP collectives inside the block (they are
re-run in the same order on every TP rank during recompute) and with DeepSpeed ZeRO-3
(its parameter fetch hooks fire again for the submodules during recompute). The RNG
state is restored on recompute, so dropout-style randomness replays identically.

The block's own `forward` is wrapped on the instance, so module names, state-dict keys,
hooks and `blocks()` identity are untouched.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(original, *args, **kwargs):
    return checkpoint(original, *args, use_reentrant=False, **kwargs)


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Recompute `module`'s forward in backward. Idempotent."""
    if getattr(module, "_iomm_checkpointed", False):
        return module
    original = module.forward
    module.forward = functools.partial(_checkpointed_forward, original)
    module._iomm_checkpointed = True
    module._iomm_original_forward = original
    return module


def uncheckpoint_module(module: nn.Module) -> nn.Module:
    if getattr(module, "_iomm_checkpointed", False):
        del module.forward  # back to the class's forward
        del module._iomm_original_forward
        module._iomm_checkpointed = False
    return module


def select_blocks(num_blocks: int, mode: str, every_k: int = 1, includes_last: bool = True) -> list[int]:
    """Indices of the blocks to checkpoint among `num_blocks`; `includes_last`: the model's
    last block is among them (then it is left out, see above)."""
    if mode == "none":
        return []
    if mode == "full":
        every_k = 1
    elif mode != "every_k":
        raise ValueError(f"activation_checkpointing must be none | full | every_k, got {mode!r}")
    if every_k < 1:
        raise ValueError(f"checkpoint_every_k must be >= 1, got {every_k}")
    end = num_blocks - 1 if includes_last else num_blocks
    return list(range(0, end, every_k))


def apply_activation_checkpointing(generator: nn.Module, mode: str = "full", every_k: int = 1,
                                   blocks: list[nn.Module] | None = None, includes_last: bool = True) -> list[int]:
    """Checkpoint the selected blocks of `generator.blocks()` (or of `blocks`, a pipeline
    stage's share, `includes_last` saying whether it ends with the model's last block);
    returns their indices."""
    blocks = list(blocks if blocks is not None else generator.blocks())
    chosen = select_blocks(len(blocks), mode, every_k, includes_last)
    for i, block in enumerate(blocks):
        if i in chosen:
            checkpoint_module(block)
        else:
            uncheckpoint_module(block)
    return chosen


def find_mllm(model: nn.Module) -> nn.Module | None:
    """The frozen MLLM inside an IOMM model / conditioner, by the conventional names."""
    for owner in (model, getattr(model, "conditioner", None)):
        if owner is None:
            continue
        for name in ("mllm", "language_model", "llm"):
            m = getattr(owner, name, None)
            if isinstance(m, nn.Module):
                return m
    return None


def mllm_decoder_layers(mllm: nn.Module) -> list[nn.Module]:
    """The frozen LLM's decoder layers (InternVL: mllm.model.language_model.layers)."""
    lm = getattr(getattr(mllm, "model", mllm), "language_model", None)
    layers = getattr(lm, "layers", None) if lm is not None else None
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"cannot find the decoder layers of {type(mllm).__name__} (expected .model.language_model.layers)")
    return list(layers)


def apply_to_model(model: nn.Module, mode: str, every_k: int = 1, checkpoint_mllm: bool = False) -> dict:
    """Apply the `parallel.activation_checkpointing` settings to an IOMM model (with
    `.generator`) or to a bare generator. Returns what was wrapped."""
    generator = getattr(model, "generator", model)
    done = {"blocks": apply_activation_checkpointing(generator, mode, every_k), "mllm": False}
    if checkpoint_mllm:
        mllm = find_mllm(model)
        if mllm is None:
            raise ValueError("parallel.checkpoint_mllm is true but the model has no conditioner MLLM "
                             "(looked for .mllm / .conditioner.mllm / .language_model)")
        # Per decoder layer: the conditioner calls the language model directly (not mllm.forward),
        # and one checkpoint around the whole LLM would only move its activation peak into backward.
        for layer in mllm_decoder_layers(mllm):
            checkpoint_module(layer)
        done["mllm"] = True
    return done
