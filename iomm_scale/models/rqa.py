"""Residual Query Adapter (RQA).

A set of learned query tokens cross-attends to the condition sequence c = [c_aux, c_img]
(with a key-padding mask over c) through a small stack of pre-norm layers. Its output is
*appended* to c ("residual" = appended, not added) and the whole sequence goes through the
frozen MLLM, so the RQA's gradient arrives through the frozen MLLM.

Size: the paper reports ~29M trainable parameters at InternVL3-2B width (1536) and gives
no layer count. Our default, 2 layers of (cross-attention + MLP with ratio 1), has
12 d^2 + small terms = 28.7M at d = 1536 (`iomm-params` prints the exact figure).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, none_if_unpadded
from .layers import linear


@dataclass
class RQAConfig:
    num_queries: int = 256
    num_layers: int = 2
    num_heads: int = 12
    mlp_ratio: float = 1.0

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.num_queries < 1:
            errors.append(("num_queries", f"must be >= 1, got {self.num_queries}"))
        if self.num_layers < 1:
            errors.append(("num_layers", f"must be >= 1, got {self.num_layers}"))
        if self.num_heads < 1:
            errors.append(("num_heads", f"must be >= 1, got {self.num_heads}"))
        return errors


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = linear(dim, dim, tp_style="column")
        self.kv = linear(dim, 2 * dim, tp_style="column", tp_fused_sizes=(dim, dim))
        self.out = linear(dim, dim, tp_style="row")
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = linear(dim, hidden, tp_style="column")
        self.fc2 = linear(hidden, dim, tp_style="row")

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = queries.shape
        head_dim = d // self.num_heads
        q = self.q(self.norm_q(queries)).unflatten(-1, (-1, head_dim))
        k, v = self.kv(self.norm_kv(context)).unflatten(-1, (2, -1, head_dim)).unbind(2)
        queries = queries + self.out(attention(q, k, v, context_mask, backend="sdpa").flatten(-2))
        return queries + self.fc2(F.gelu(self.fc1(self.norm_mlp(queries)), approximate="tanh"))


class ResidualQueryAdapter(nn.Module):
    def __init__(self, dim: int, cfg: RQAConfig):
        super().__init__()
        if dim % cfg.num_heads:
            raise ValueError(f"RQA width {dim} is not divisible by rqa.num_heads={cfg.num_heads}")
        self.cfg = cfg
        # Learned queries start at the scale of LLM token embeddings (std 0.02).
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, dim) * 0.02)
        self.layers = nn.ModuleList([CrossAttentionLayer(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_layers)])

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """context [B, L, D] (zeros at masked image tokens), context_mask [B, L] True = real token
        -> [B, num_queries, D] tokens to append to the context."""
        x = self.queries.to(context.dtype).unsqueeze(0).expand(context.shape[0], -1, -1)
        context_mask = none_if_unpadded(context_mask)
        for layer in self.layers:
            x = layer(x, context, context_mask)
        return x
