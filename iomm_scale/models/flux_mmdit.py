"""FLUX-style MM-DiT: double-stream blocks, then single-stream blocks (IOMM-B / IOMM-L).

Plain single-device PyTorch. The computation is FLUX.1's (and diffusers'
FluxTransformer2DModel's) exactly; weights are laid out as in Black Forest Labs'
reference code (fused q|k|v, and in single blocks one fused q|k|v|mlp_in projection),
which is cheaper on every device and what tensor parallelism wants.
`adapters/flux.py` maps these weights to and from diffusers.

Sequence layout inside the blocks: [condition tokens | image tokens], with 3-axis RoPE
over (0, row, col) ids; condition tokens get id (0, 0, 0) as in FLUX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, none_if_unpadded, rope_angles
from .layers import (FeedForward, MLPEmbedder, RMSNorm, layer_norm_no_affine, linear, modulate, split_fused,
                     timestep_embedding)


@dataclass
class FluxConfig:
    in_channels: int = 64  # 16 latent channels packed 2x2
    out_channels: int | None = None
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    num_heads: int = 24
    head_dim: int = 128
    context_dim: int = 4096  # width of the condition tokens (diffusers: joint_attention_dim)
    pooled_dim: int = 768  # width of the pooled condition vector
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    latent_patch: int = 2  # latents are packed p x p into tokens before the model
    attention_backend: str = "auto"

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // (self.latent_patch * self.latent_patch)

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if sum(self.axes_dims_rope) != self.head_dim:
            errors.append(("axes_dims_rope", f"must sum to head_dim={self.head_dim}, got {list(self.axes_dims_rope)}"))
        if any(d % 2 for d in self.axes_dims_rope):
            errors.append(("axes_dims_rope", "every axis needs an even number of dims"))
        if self.num_layers < 0 or self.num_single_layers < 0 or self.num_layers + self.num_single_layers == 0:
            errors.append(("num_layers", "need at least one block"))
        return errors


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    # -1 heads: under tensor parallelism a rank holds heads / tp of them.
    return x.unflatten(-1, (-1, head_dim))


class DoubleStreamBlock(nn.Module):
    """Separate weights for condition ("txt") and image streams, one joint attention."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.backend = cfg.attention_backend
        mlp = int(dim * cfg.mlp_ratio)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", linear(dim, 6 * dim, tp_fused_sizes=(dim,) * 6))
            setattr(self, f"{stream}_qkv", linear(dim, 3 * dim, tp_style="column", tp_fused_sizes=(dim,) * 3))
            setattr(self, f"{stream}_norm_q", RMSNorm(hd))
            setattr(self, f"{stream}_norm_k", RMSNorm(hd))
            setattr(self, f"{stream}_out", linear(dim, dim, tp_style="row"))
            setattr(self, f"{stream}_mlp", FeedForward(dim, mlp))

    def _qkv(self, stream: str, x: torch.Tensor, rope):
        """q and k normed and rotated (one fused kernel each on CUDA), v; rope: this stream's rows."""
        q, k, v = split_fused(getattr(self, f"{stream}_qkv")(x), (1, 1, 1))
        q = getattr(self, f"{stream}_norm_q")(_heads(q, self.head_dim), rope)
        k = getattr(self, f"{stream}_norm_k")(_heads(k, self.head_dim), rope)
        return q, k, _heads(v, self.head_dim)

    def forward(self, img, txt, temb, rope, mask):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(F.silu(temb)).chunk(6, -1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(F.silu(temb)).chunk(6, -1)

        # the joint sequence is [txt | img]: each stream is rotated with its own rows of the tables
        n_txt = txt.shape[1]
        txt_rope = tuple(t[..., :n_txt, :] for t in rope)
        img_rope = tuple(t[..., n_txt:, :] for t in rope)
        img_q, img_k, img_v = self._qkv("img", modulate(layer_norm_no_affine(img), img_shift1, img_scale1), img_rope)
        txt_q, txt_k, txt_v = self._qkv("txt", modulate(layer_norm_no_affine(txt), txt_shift1, txt_scale1), txt_rope)
        q = torch.cat([txt_q, img_q], 1)
        k = torch.cat([txt_k, img_k], 1)
        v = torch.cat([txt_v, img_v], 1)
        attn = attention(q, k, v, mask, self.backend).flatten(-2)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1.unsqueeze(1) * self.img_out(img_attn)
        img = img + img_gate2.unsqueeze(1) * self.img_mlp(modulate(layer_norm_no_affine(img), img_shift2, img_scale2))
        txt = txt + txt_gate1.unsqueeze(1) * self.txt_out(txt_attn)
        txt = txt + txt_gate2.unsqueeze(1) * self.txt_mlp(modulate(layer_norm_no_affine(txt), txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt | img]: attention and MLP in parallel, one fused input and one
    fused output projection (linear2 takes concat(attention, mlp))."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.backend = cfg.attention_backend
        self.mlp_hidden = int(dim * cfg.mlp_ratio)
        self.sizes = (dim, dim, dim, self.mlp_hidden)
        self.mod = linear(dim, 3 * dim, tp_fused_sizes=(dim,) * 3)
        self.linear1 = linear(dim, 3 * dim + self.mlp_hidden, tp_style="column", tp_fused_sizes=self.sizes)
        self.norm_q = RMSNorm(hd)
        self.norm_k = RMSNorm(hd)
        self.linear2 = linear(dim + self.mlp_hidden, dim, tp_style="row", tp_fused_sizes=(dim, self.mlp_hidden))

    def forward(self, x, temb, rope, mask):
        shift, scale, gate = self.mod(F.silu(temb)).chunk(3, -1)
        q, k, v, mlp = split_fused(self.linear1(modulate(layer_norm_no_affine(x), shift, scale)), self.sizes)
        q = self.norm_q(_heads(q, self.head_dim), rope)
        k = self.norm_k(_heads(k, self.head_dim), rope)
        attn = attention(q, k, _heads(v, self.head_dim), mask, self.backend).flatten(-2)
        return x + gate.unsqueeze(1) * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1))


class FluxMMDiT(nn.Module):
    # Modules that are not hidden matrices (optimizers such as Muon route them to AdamW).
    non_hidden_modules = ("x_embedder", "context_embedder", "time_embedder", "pooled_embedder",
                          "guidance_embedder", "norm_out_mod", "proj_out")
    modulation_suffixes = ("_mod", ".mod")

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        out_channels = cfg.out_channels or cfg.in_channels
        self.x_embedder = linear(cfg.in_channels, dim)
        self.context_embedder = linear(cfg.context_dim, dim)
        self.time_embedder = MLPEmbedder(256, dim)
        self.pooled_embedder = MLPEmbedder(cfg.pooled_dim, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if cfg.guidance_embeds else None
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.norm_out_mod = linear(dim, 2 * dim)
        self.proj_out = linear(dim, out_channels)

    def blocks(self) -> list[nn.Module]:
        """Every transformer block in execution order (for checkpointing and pipeline stages)."""
        return [*self.double_blocks, *self.single_blocks]

    # --- the token-level forward, argument for argument as diffusers' FluxTransformer2DModel ---
    def forward_tokens(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                       guidance=None, context_mask=None):
        """hidden_states [B, N, in_channels]; encoder_hidden_states [B, L, context_dim];
        timestep [B] in [0, 1]; img_ids [N, 3]; txt_ids [L, 3]; context_mask [B, L] bool (True = real)."""
        img = self.x_embedder(hidden_states)
        temb = self.time_embedder(timestep_embedding(timestep * 1000).to(img.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model was built with guidance_embeds=True: pass `guidance`")
            temb = temb + self.guidance_embedder(timestep_embedding(guidance * 1000).to(img.dtype))
        temb = temb + self.pooled_embedder(pooled_projections)
        txt = self.context_embedder(encoder_hidden_states)
        rope = rope_angles(torch.cat([txt_ids, img_ids], 0), self.cfg.axes_dims_rope, self.cfg.rope_theta)
        mask = None
        if context_mask is not None:
            mask = torch.cat([context_mask.bool(), context_mask.new_ones(img.shape[:2], dtype=torch.bool)], 1)
        mask = none_if_unpadded(mask)

        for block in self.double_blocks:
            img, txt = block(img, txt, temb, rope, mask)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, temb, rope, mask)
        img = x[:, txt.shape[1] :]
        scale, shift = self.norm_out_mod(F.silu(temb)).chunk(2, -1)
        return self.proj_out(modulate(layer_norm_no_affine(img), shift, scale))

    # --- the IOMM interface shared by every family ---
    def forward(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None):
        """latents [B, C, H, W] -> predicted velocity [B, C, H, W]. cond [B, L, context_dim] with
        cond_mask [B, L] (True = real token). The pooled vector is the masked mean of cond."""
        p = self.cfg.latent_patch
        tokens, img_ids = pack_latents(latents, p)
        txt_ids = torch.zeros(cond.shape[1], 3, device=cond.device)
        out = self.forward_tokens(tokens, cond, masked_mean(cond, cond_mask), t, img_ids, txt_ids, context_mask=cond_mask)
        return unpack_latents(out, latents.shape, p)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def pack_latents(latents: torch.Tensor, p: int = 2):
    """[B, C, H, W] -> tokens [B, (H/p)(W/p), C p p] (FLUX's channel order) and ids [N, 3]."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    tokens = x.reshape(b, (h // p) * (w // p), c * p * p)
    rows = torch.arange(h // p, device=latents.device).repeat_interleave(w // p)
    cols = torch.arange(w // p, device=latents.device).repeat(h // p)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).float()
    return tokens, ids


def unpack_latents(tokens: torch.Tensor, shape, p: int = 2) -> torch.Tensor:
    b, c, h, w = shape
    x = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)
