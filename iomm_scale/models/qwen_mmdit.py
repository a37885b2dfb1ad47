"""Qwen-Image's double-stream MM-DiT (the 20B LoRA target).

Plain single-device PyTorch. The computation is diffusers' QwenImageTransformer2DModel's
exactly (base model: no zero_cond_t, no additional t condition, no layered RoPE); q|k|v of
each stream are fused into one projection. `adapters/qwen_image.py` maps the weights to and
from diffusers.

Differences from FLUX's double blocks are all outside the blocks: an RMSNorm on the
condition tokens before their projection, no pooled vector, a timestep embedding alone, no
single-stream blocks, and Qwen's centred 3-axis RoPE:
    image token (f, h, w) of an H x W token grid   (f, h - (H - H//2), w - (W - W//2))
        i.e. rows -(H - H//2) .. H//2 - 1, columns likewise (centred on 0)
    condition token j                               (m + j, m + j, m + j),  m = max(H//2, W//2)
Condition positions count the padded sequence, so real tokens must come first (the
pipeline's layout); padded tokens are masked out of attention.

The last block's condition-stream output projection and MLP feed nothing (as in diffusers and
the released checkpoint): they are computed as diffusers does but never get a gradient, so a
trainer must accept parameters whose .grad stays None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, none_if_unpadded
from .flux_mmdit import pack_latents, unpack_latents
from .layers import FeedForward, MLPEmbedder, RMSNorm, layer_norm_no_affine, linear, modulate, split_fused

EPS = 1e-6  # every norm of the model (layer norms, q/k norms, condition RMSNorm)


@dataclass
class QwenMMDiTConfig:
    in_channels: int = 64  # 16 latent channels packed 2x2
    out_channels: int | None = 16  # per-patch latent channels (output is patch^2 * out_channels wide)
    patch_size: int = 2
    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    context_dim: int = 3584  # width of the condition tokens (diffusers: joint_attention_dim)
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    attention_backend: str = "auto"

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // self.patch_size**2

    @property
    def latent_patch(self) -> int:  # latents are packed p x p into tokens
        return self.patch_size

    @property
    def out_dim(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if sum(self.axes_dims_rope) != self.head_dim:
            errors.append(("axes_dims_rope", f"must sum to head_dim={self.head_dim}, got {list(self.axes_dims_rope)}"))
        if any(d % 2 for d in self.axes_dims_rope):
            errors.append(("axes_dims_rope", "every axis needs an even number of dims"))
        if self.num_layers < 1:
            errors.append(("num_layers", "need at least one block"))
        if self.in_channels % self.patch_size**2:
            errors.append(("in_channels", f"must be latent channels x patch_size^2, got {self.in_channels}"))
        elif (self.out_channels or self.latent_channels) != self.latent_channels:
            errors.append(("out_channels", f"the IOMM interface predicts the input latent: must be "
                                           f"{self.latent_channels} (in_channels / patch_size^2), got {self.out_channels}"))
        return errors


class QwenDoubleBlock(nn.Module):
    """Separate weights for the condition ("txt") and image streams, one joint attention over
    [txt | img]; adaLN-Zero modulation (shift, scale, gate) x 2 per stream."""

    def __init__(self, cfg: QwenMMDiTConfig):
        super().__init__()
        dim, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.backend = cfg.attention_backend
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", linear(dim, 6 * dim, tp_fused_sizes=(dim,) * 6))
            setattr(self, f"{stream}_qkv", linear(dim, 3 * dim, tp_style="column", tp_fused_sizes=(dim,) * 3))
            setattr(self, f"{stream}_norm_q", RMSNorm(hd, eps=EPS))
            setattr(self, f"{stream}_norm_k", RMSNorm(hd, eps=EPS))
            setattr(self, f"{stream}_out", linear(dim, dim, tp_style="row"))
            setattr(self, f"{stream}_mlp", FeedForward(dim, int(dim * cfg.mlp_ratio)))

    def _qkv(self, stream: str, x: torch.Tensor, rope):
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in split_fused(getattr(self, f"{stream}_qkv")(x), (1, 1, 1)))
        q = getattr(self, f"{stream}_norm_q")(q, rope)  # normed and rotated (one fused kernel each on CUDA)
        k = getattr(self, f"{stream}_norm_k")(k, rope)
        return q, k, v

    def forward(self, img, txt, temb, img_rope, txt_rope, mask):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(F.silu(temb)).chunk(6, -1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(F.silu(temb)).chunk(6, -1)

        img_q, img_k, img_v = self._qkv("img", modulate(layer_norm_no_affine(img, EPS), img_shift1, img_scale1), img_rope)
        txt_q, txt_k, txt_v = self._qkv("txt", modulate(layer_norm_no_affine(txt, EPS), txt_shift1, txt_scale1), txt_rope)
        attn = attention(torch.cat([txt_q, img_q], 1), torch.cat([txt_k, img_k], 1), torch.cat([txt_v, img_v], 1),
                         mask, self.backend).flatten(-2)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = torch.addcmul(img, img_gate1.unsqueeze(1), self.img_out(img_attn))
        txt = torch.addcmul(txt, txt_gate1.unsqueeze(1), self.txt_out(txt_attn))
        img_mlp = self.img_mlp(modulate(layer_norm_no_affine(img, EPS), img_shift2, img_scale2))
        txt_mlp = self.txt_mlp(modulate(layer_norm_no_affine(txt, EPS), txt_shift2, txt_scale2))
        img = torch.addcmul(img, img_gate2.unsqueeze(1), img_mlp)
        txt = torch.addcmul(txt, txt_gate2.unsqueeze(1), txt_mlp)
        return img, txt


def qwen_timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers' Timesteps(256, flip_sin_to_cos=True, shift=0, scale=1000): [cos | sin] of
    (t * freqs) * 1000, multiplied in that order (not (t * 1000) * freqs) to match bit for bit.
    Always float32 (diffusers casts t to the model dtype first; in bf16 that costs precision)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000 * (t.float()[:, None] * freqs[None])
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def rope_tables(positions: torch.Tensor, axes_dims, theta: float) -> torch.Tensor:
    """positions [S, 3] -> complex rotations [S, sum(axes_dims) / 2]. As diffusers' Qwen-Image:
    frequencies and angles in float32 (the weights were trained with these tables)."""
    parts = []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=positions.device).to(torch.float32).div(dim))
        angles = positions[:, i].to(torch.float32)[:, None] * freqs
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, -1)


def qwen_positions(img_shapes, txt_len: int, device=None):
    """RoPE ids for the images of one sample [(F, H, W), ...] (in tokens; image i's frames start at
    i) and txt_len condition tokens, as diffusers' QwenEmbedRope(scale_rope=True)."""
    img_ids, m = [], 0
    for idx, (f, h, w) in enumerate(img_shapes):
        axes = (torch.arange(idx, idx + f, device=device), torch.arange(h, device=device) - (h - h // 2),
                torch.arange(w, device=device) - (w - w // 2))
        img_ids.append(torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3))
        m = max(m, h // 2, w // 2)
    txt_ids = (m + torch.arange(txt_len, device=device))[:, None].expand(txt_len, 3)
    return torch.cat(img_ids), txt_ids


class QwenMMDiT(nn.Module):
    # Modules that are not hidden matrices (optimizers such as Muon route them to AdamW).
    non_hidden_modules = ("img_in", "txt_norm", "txt_in", "time_embedder", "norm_out_mod", "proj_out")
    modulation_suffixes = ("_mod", ".mod")

    def __init__(self, cfg: QwenMMDiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.img_in = linear(cfg.in_channels, dim)
        self.txt_norm = RMSNorm(cfg.context_dim, eps=EPS)
        self.txt_in = linear(cfg.context_dim, dim)
        self.time_embedder = MLPEmbedder(256, dim)
        self.double_blocks = nn.ModuleList([QwenDoubleBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out_mod = linear(dim, 2 * dim)
        self.proj_out = linear(dim, cfg.out_dim)

    def blocks(self) -> list[nn.Module]:
        """Every transformer block in execution order (for checkpointing and pipeline stages)."""
        return list(self.double_blocks)

    # --- the token-level forward, argument for argument as diffusers' QwenImageTransformer2DModel ---
    def forward_tokens(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, timestep=None,
                       img_shapes=None):
        """hidden_states [B, N, in_channels] (packed latents); encoder_hidden_states [B, L, context_dim];
        encoder_hidden_states_mask [B, L] (1 / True = real); timestep [B] in [0, 1] (1 = noise);
        img_shapes: per sample a list of (F, H, W) token grids (diffusers uses the first sample's
        for the whole batch). Returns [B, N, patch^2 * out_channels]."""
        img = self.img_in(hidden_states)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        temb = self.time_embedder(qwen_timestep_embedding(timestep).to(img.dtype))

        shapes = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
        shapes = [shapes] if isinstance(shapes, tuple) else shapes
        img_ids, txt_ids = qwen_positions(shapes, txt.shape[1], img.device)
        img_rope = rope_tables(img_ids, self.cfg.axes_dims_rope, self.cfg.rope_theta)
        txt_rope = rope_tables(txt_ids, self.cfg.axes_dims_rope, self.cfg.rope_theta)
        mask = None
        if encoder_hidden_states_mask is not None:
            mask = torch.cat([encoder_hidden_states_mask.bool(), img.new_ones(img.shape[:2], dtype=torch.bool)], 1)
            mask = none_if_unpadded(mask)

        for block in self.double_blocks:
            img, txt = block(img, txt, temb, img_rope, txt_rope, mask)
        scale, shift = self.norm_out_mod(F.silu(temb)).chunk(2, -1)
        return self.proj_out(modulate(layer_norm_no_affine(img, EPS), shift, scale))

    # --- the IOMM interface shared by every family ---
    def forward(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None):
        """latents [B, C, H, W] -> predicted velocity (noise - x0) [B, C, H, W]; t [B] in [0, 1] with
        t = 1 pure noise, which is Qwen-Image's own convention (its pipeline feeds sigma and steps
        with the output as is). cond [B, L, context_dim] with cond_mask [B, L] (True = real token)."""
        p = self.cfg.patch_size
        tokens, _ = pack_latents(latents, p)
        cond, cond_mask = real_tokens_first(cond, cond_mask)
        shapes = [(1, latents.shape[2] // p, latents.shape[3] // p)]
        out = self.forward_tokens(tokens, cond, cond_mask, t, [shapes] * latents.shape[0])
        return unpack_latents(out, latents.shape, p)


def real_tokens_first(cond: torch.Tensor, mask: torch.Tensor | None):
    """Real tokens first (order kept), truncated to the longest real length: condition positions
    count from the first token, so this is the layout the pipeline trains and samples with.
    Returns (cond, mask or None when nothing is padded)."""
    if mask is None:
        return cond, None
    mask = mask.bool()
    lens = mask.sum(1)
    prefix = torch.arange(cond.shape[1], device=cond.device) < lens[:, None]
    if not bool((mask == prefix).all()):
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        cond = torch.gather(cond, 1, order[..., None].expand_as(cond))
    longest = int(lens.max())
    cond, prefix = cond[:, :longest], prefix[:, :longest]
    return cond, (None if bool(prefix.all()) else prefix)
