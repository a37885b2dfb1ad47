"""Rectified-flow objective and the Euler ODE sampler with classifier-free guidance.

Convention (the paper's Algorithm 1): x_t = (1 - t) x + t z with x the clean latent and
z ~ N(0, I); t = 0 is data, t = 1 is noise. The model predicts the velocity
v = dx_t/dt = z - x, trained with || F(x_t, t, h) - (z - x) ||^2. Sampling integrates
dx/dt = v from t = 1 to t = 0.

Timesteps: uniform on (0, 1) by default (the paper's choice); `logit_normal` (SD3) and a
timestep shift (t' = s t / (1 + (s - 1) t), s > 1 spends more steps near noise) are options;
`resolution_shift` picks s from the number of image tokens as FLUX does.

Classifier-free guidance: with probability `cond_dropout` a sample's condition is replaced
by the null condition during training (see conditioner.py: the aux prompt followed by
all-zero image tokens); sampling combines v = v_null + w (v_cond - v_null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass
class FlowConfig:
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # 1 = no shift
    resolution_shift: bool = False  # FLUX's token-count-dependent shift (overrides `shift`)
    base_shift: float = 0.5
    max_shift: float = 1.15
    cond_dropout: float = 0.1
    sample_steps: int = 30
    cfg_scale: float = 4.0

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            errors.append(("timestep_sampling", f"must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}"))
        if self.shift <= 0:
            errors.append(("shift", f"must be > 0, got {self.shift}"))
        if self.logit_std <= 0:
            errors.append(("logit_std", f"must be > 0, got {self.logit_std}"))
        if not 0.0 <= self.cond_dropout < 1.0:
            errors.append(("cond_dropout", f"must be in [0, 1), got {self.cond_dropout}"))
        if self.sample_steps < 1:
            errors.append(("sample_steps", f"must be >= 1, got {self.sample_steps}"))
        return errors


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's flow-matching loss [B]: the mean of (pred - target)^2 over all but the
    batch dimension, in float32 (or float64 when the target is), returned as float32."""
    err = (pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred) - target
    return err.pow(2).flatten(1).mean(1).float()


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, cfg: FlowConfig, base_tokens: int = 256, max_tokens: int = 4096) -> float:
    """FLUX's exp(mu) with mu linear in the image token count."""
    slope = (cfg.max_shift - cfg.base_shift) / (max_tokens - base_tokens)
    return math.exp(cfg.base_shift + slope * (num_tokens - base_tokens))


def effective_shift(cfg: FlowConfig, num_tokens: int) -> float:
    return resolution_shift(num_tokens, cfg) if cfg.resolution_shift else cfg.shift


def sample_timesteps(batch: int, cfg: FlowConfig, num_tokens: int, device=None, generator=None) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        t = torch.rand(batch, device=device, generator=generator)
    else:
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, device=device, generator=generator))
    return shift_timesteps(t, effective_shift(cfg, num_tokens))


def sampling_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 to 0 (uniform, then shifted)."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift).float()


@torch.no_grad()
def euler_sample(velocity: Callable, noise: torch.Tensor, steps: int, shift: float = 1.0,
                 cond=None, null_cond=None, cfg_scale: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v(x, t, cond) from t = 1 (x = noise) to t = 0 with Euler steps.

    `velocity(x, t, cond)` with t a [B] tensor. With cfg_scale != 1 and a null condition,
    both branches run in one batched call (two passes' worth of work per step).
    """
    times = sampling_schedule(steps, shift, noise.device)
    x = noise
    b = x.shape[0]
    guided = null_cond is not None and cfg_scale != 1.0
    for i in range(steps):
        t = times[i].expand(b)
        if guided:
            v_both = velocity(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, null_cond))
            v_cond, v_null = v_both.chunk(2)
            v = v_null + cfg_scale * (v_cond - v_null)
        else:
            v = velocity(x, t, cond)
        x = x + (times[i + 1] - times[i]) * v
    return x


def _cat_cond(a, b):
    """Batch two conditions (tensors, or (tensor, mask) pairs, padded to one length)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    (ca, ma), (cb, mb) = a, b
    if ca.shape[1] != cb.shape[1]:
        raise ValueError("conditional and null conditions must have the same length to be batched")
    if ma is None and mb is None:
        return torch.cat([ca, cb]), None
    ma = ma if ma is not None else torch.ones(ca.shape[:2], dtype=torch.bool, device=ca.device)
    mb = mb if mb is not None else torch.ones(cb.shape[:2], dtype=torch.bool, device=cb.device)
    return torch.cat([ca, cb]), torch.cat([ma, mb])
