"""Building blocks shared by every generator family.

Every Linear in the model files is built through `linear()`. On one device it returns a
plain `nn.Linear`, tagged with how tensor parallelism should shard it:

    tp_style       "column" (split output features), "row" (split input features) or
                   "replicate" (keep whole on every rank)
    tp_fused_sizes for fused projections (q|k|v, or FLUX's q|k|v|mlp_in), the sizes of the
                   segments along the sharded dimension; each segment is split on its own so
                   that rank r holds [q_r | k_r | v_r | ...], not a contiguous slice of the
                   concatenation. Replicated AdaLN modulation layers carry their chunks
                   (shift | scale | gate ...) the same way, for Muon's per-segment updates.

`parallel/` reads the tags and swaps or shards the layers from outside; model files never
import anything distributed. `use_linear_factory` lets `parallel/` build sharded layers
directly (so a 20B model never exists whole on one rank).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import apply_complex_rope, apply_rope

TP_STYLES = ("column", "row", "replicate")

LinearFactory = Callable[..., nn.Module]
_factory: LinearFactory | None = None


@contextlib.contextmanager
def use_linear_factory(factory: LinearFactory | None):
    """Build every `linear()` inside this block with `factory(in, out, bias=, tp_style=, tp_fused_sizes=)`."""
    global _factory
    previous, _factory = _factory, factory
    try:
        yield
    finally:
        _factory = previous


def linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    tp_style: str = "replicate",
    tp_fused_sizes: Sequence[int] | None = None,
) -> nn.Module:
    if tp_style not in TP_STYLES:
        raise ValueError(f"tp_style must be one of {TP_STYLES}, got {tp_style!r}")
    if _factory is not None:
        return _factory(in_features, out_features, bias=bias, tp_style=tp_style, tp_fused_sizes=tp_fused_sizes)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.tp_style = tp_style
    layer.tp_fused_sizes = tuple(tp_fused_sizes) if tp_fused_sizes else None
    return layer


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 for numerically sensitive ops; float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def split_fused(x: torch.Tensor, sizes: Sequence[int], dim: int = -1) -> tuple[torch.Tensor, ...]:
    """Split the output of a fused projection into its segments.

    Under tensor parallelism a rank holds the same fraction of every segment, so the local
    segment sizes are the global ones scaled by local_width / global_width.
    """
    total = sum(sizes)
    local = x.shape[dim]
    if local == total:
        return torch.split(x, list(sizes), dim=dim)
    if any((s * local) % total for s in sizes):
        raise ValueError(f"cannot split width {local} into a uniform share of segments {tuple(sizes)}")
    return torch.split(x, [s * local // total for s in sizes], dim=dim)


def fused_kernels(x: torch.Tensor, weight: torch.Tensor | None):
    """models/fused_norm_rope when its kernel takes this q/k norm + RoPE call (CUDA, Triton,
    a supported shape), else None. CPU processes never import Triton; the CPU tests point this
    at the kernel under Triton's interpreter."""
    if not x.is_cuda:
        return None
    from . import fused_norm_rope

    return fused_norm_rope if fused_norm_rope.available(x, weight) else None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (the highest precision, as diffusers and Qwen do), cast back."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None
                ) -> torch.Tensor:
        """Normalise x; with `rope`, q/k head vectors x [B, S, H, D] are then rotated: by (cos, sin)
        tables (attention.rope_angles, FLUX) as attention.apply_rope does, or by complex angles
        [S, D/2] / [B, S, D/2] (S3-DiT, Qwen-Image) as attention.apply_complex_rope does; on
        CUDA in one fused Triton kernel (models/fused_norm_rope.py). Called through this module
        so that ZeRO-3's parameter gathering, which hooks module calls, sees the weight used."""
        if rope is not None:
            complex_angles = isinstance(rope, torch.Tensor)
            kernel = fused_kernels(x, self.weight)
            if kernel is not None:
                if complex_angles:
                    return kernel.rms_norm_complex_rope(x, self.weight, rope, self.eps)
                return kernel.rms_norm_rope(x, self.weight, rope[0], rope[1], self.eps)
            if complex_angles:
                return apply_complex_rope(self(x), rope.unsqueeze(-2))
            return apply_rope(self(x), *rope)
        dtype = x.dtype
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x32 = x32 * upcast(self.weight)
        return x32.to(dtype)


def layer_norm_no_affine(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation: x * (1 + scale) + shift, with per-sample [B, D] shift/scale."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, [cos | sin] order (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    exponent = -torch.log(torch.tensor(max_period)) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FeedForward(nn.Module):
    """The tanh-GELU MLP of FLUX and Qwen-Image blocks: fc1 column-parallel, fc2 row-parallel."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = linear(dim, hidden, tp_style="column")
        self.fc2 = linear(hidden, dim, tp_style="row")

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for timestep and pooled-condition embeddings."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = linear(in_dim, hidden_dim)
        self.linear_2 = linear(hidden_dim, out_dim or hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
