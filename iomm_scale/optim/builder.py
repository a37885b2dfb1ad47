"""Optimizer, learning-rate schedule and EMA from the run config."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter (the paper's B/L recipe), or Muon for hidden
    matrices + AdamW for the rest (IOMM-XL). Frozen parameters never get optimizer state."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=fused_adamw_ok(params))
    from .muon import build_muon_optimizer

    return build_muon_optimizer(model, cfg)  # carries .routing_table (the trainer prints and saves it)


def fused_adamw_ok(params) -> bool | None:
    """True when every parameter is on a CUDA device: AdamW's fused kernel (one launch for all
    tensors, same maths) is then ~2x cheaper than the foreach default. None (torch's default)
    elsewhere, so CPU runs keep the path the reference tests compare with."""
    params = list(params)
    return True if params and all(p.is_cuda for p in params) else None


def lr_factor(step: int, cfg) -> float:
    """Multiplier on optim.lr at `step` (0-based): linear warm-up, then constant or cosine."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    total = max(cfg.train.steps - o.warmup_steps, 1)
    progress = min((step - o.warmup_steps) / total, 1.0)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg) -> float:
    lr = cfg.optim.lr * lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


class EMA:
    """Exponential moving average of the trainable parameters (kept in float32)."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        # one foreach kernel per dtype group rather than a Python loop of lerps (same values)
        names = list(named_params)
        torch._foreach_lerp_([self.shadow[n] for n in names], [named_params[n].detach().float() for n in names],
                             1 - self.decay)

    @torch.no_grad()
    def swap_into(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copy EMA weights into the model; returns the live weights to restore with `restore`."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        for n, v in self.shadow.items():
            params[n].copy_(v)
        return backup

    @torch.no_grad()
    def restore(self, model: nn.Module, backup: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        for n, v in backup.items():
            params[n].copy_(v)

    @torch.no_grad()
    def reset(self, named_params: dict[str, torch.Tensor]) -> None:
        """Start over from these weights (a resume from a checkpoint saved without an EMA)."""
        for n, v in named_params.items():
            self.shadow[n].copy_(v.detach())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """The saved shadow, copied into this EMA's tensors: they stay on the parameters' device
        (checkpoints are read to the CPU) and the decay stays this run's `optim.ema_decay` (as
        the launchers' EMA does; a changed decay in the config applies from the resumed step)."""
        copy_shadow(self.shadow, state["shadow"], "checkpoint", "the trainable parameters")


@torch.no_grad()
def copy_shadow(shadow: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], source: str, holder: str) -> None:
    """Copy a saved EMA into `shadow`'s own tensors (their device kept): the same names and
    shapes, or an error naming the difference (`holder`: what `shadow` covers, for the message)."""
    if set(saved) != set(shadow):
        diff = sorted(set(saved) ^ set(shadow))
        raise KeyError(f"{source}: EMA tensors differ from {holder}, e.g. {diff[:5]}")
    for n, v in saved.items():
        if v.shape != shadow[n].shape:
            raise ValueError(f"{source}: EMA of {n} has shape {tuple(v.shape)}, {holder} {tuple(shadow[n].shape)}")
        shadow[n].copy_(v)
