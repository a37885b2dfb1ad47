"""Z-Image's single-stream DiT ("S3-DiT"), the IOMM-XL family.

Plain single-device PyTorch. The computation is diffusers' ZImageTransformer2DModel's
(basic text-to-image mode) exactly; weights are fused where that is cheaper and what tensor
parallelism wants (q|k|v in one projection, SwiGLU's w1|w3 in one projection).
`adapters/zimage.py` maps them to and from diffusers.

Data flow, per sample:
    image patches -> x_embedder -> noise refiner blocks (modulated by t)
    condition     -> RMSNorm + cap_embedder -> context refiner blocks (no modulation)
    [image | condition] -> main blocks (modulated) -> final adaLN + proj_out on image tokens
Each of the two parts is padded to a multiple of 32 tokens with a learned pad token
(x_pad_token / cap_pad_token); those pad tokens are real keys in attention (as in
diffusers), so a sample's output depends on its own lengths only, never on the batch.
Tokens past a sample's padded lengths (batch padding) are masked out.

3-axis RoPE ids (frame, row, col), as diffusers builds them:
    condition token j (pads included)   (1 + j, 0, 0)
    image patch (f, h, w)               (cap_padded_len + 1 + f, h, w)
    image pad tokens                    (0, 0, 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import apply_complex_rope, attention, none_if_unpadded
from .layers import MLPEmbedder, RMSNorm, layer_norm_no_affine, linear, split_fused, timestep_embedding

SEQ_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: both parts padded to a multiple of this
QK_NORM_EPS = 1e-5  # diffusers fixes the q/k RMSNorm eps at 1e-5, whatever norm_eps is
T_EMBED_HIDDEN = 1024  # width of the timestep MLP's hidden layer (fixed in diffusers)


@dataclass
class S3DiTConfig:
    in_channels: int = 16  # latent channels (FLUX VAE); patchified inside the model
    patch_size: int = 2
    f_patch_size: int = 1  # frame patch (images: 1)
    num_layers: int = 30
    num_refiner_layers: int = 2  # each of the noise and the context refiner
    num_heads: int = 30
    head_dim: int = 128
    context_dim: int = 2560  # width of the condition tokens (diffusers: cap_feat_dim; IOMM: the MLLM width)
    norm_eps: float = 1e-5
    qk_norm: bool = True
    rope_theta: float = 256.0
    axes_dims: tuple[int, int, int] = (32, 48, 48)
    axes_lens: tuple[int, int, int] = (1024, 512, 512)  # largest id per axis (diffusers' table sizes)
    t_scale: float = 1000.0
    attention_backend: str = "auto"

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.hidden_size / 3 * 8)  # SwiGLU width, fixed by diffusers

    @property
    def adaln_dim(self) -> int:
        return min(self.hidden_size, 256)  # width of the timestep embedding fed to adaLN

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def latent_patch(self) -> int:  # latent pixels per token side
        return self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size**2 * self.in_channels

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if sum(self.axes_dims) != self.head_dim:
            errors.append(("axes_dims", f"must sum to head_dim={self.head_dim}, got {list(self.axes_dims)}"))
        if any(d % 2 for d in self.axes_dims):
            errors.append(("axes_dims", "every axis needs an even number of dims"))
        if len(self.axes_lens) != len(self.axes_dims):
            errors.append(("axes_lens", "needs one entry per RoPE axis"))
        if self.num_layers < 1:
            errors.append(("num_layers", "need at least one main block"))
        if self.num_refiner_layers < 0:
            errors.append(("num_refiner_layers", "must be >= 0"))
        if self.patch_size < 1 or self.f_patch_size < 1:
            errors.append(("patch_size", "patch sizes must be >= 1"))
        return errors


class S3DiTBlock(nn.Module):
    """Pre- and post-normed attention + SwiGLU, each scaled by (1 + scale) and gated by
    tanh(gate) from the timestep when `modulation` (refiners of the condition have none)."""

    def __init__(self, cfg: S3DiTConfig, modulation: bool = True):
        super().__init__()
        dim, hd, ffn = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
        self.head_dim = hd
        self.backend = cfg.attention_backend
        self.qkv = linear(dim, 3 * dim, bias=False, tp_style="column", tp_fused_sizes=(dim,) * 3)
        self.norm_q = RMSNorm(hd, eps=QK_NORM_EPS) if cfg.qk_norm else None
        self.norm_k = RMSNorm(hd, eps=QK_NORM_EPS) if cfg.qk_norm else None
        self.out = linear(dim, dim, bias=False, tp_style="row")
        self.w13 = linear(dim, 2 * ffn, bias=False, tp_style="column", tp_fused_sizes=(ffn, ffn))
        self.w2 = linear(ffn, dim, bias=False, tp_style="row")
        self.attention_norm1 = RMSNorm(dim, eps=cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=cfg.norm_eps)
        self.mod = linear(cfg.adaln_dim, 4 * dim, tp_fused_sizes=(dim,) * 4) if modulation else None

    def attn(self, x, rope, mask):
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in split_fused(self.qkv(x), (1, 1, 1)))
        if self.norm_q is not None:  # normed and rotated (one fused kernel each on CUDA)
            q, k = self.norm_q(q, rope), self.norm_k(k, rope)
        else:
            freqs = rope.unsqueeze(2)  # [B, S, 1, D/2]
            q, k = apply_complex_rope(q, freqs), apply_complex_rope(k, freqs)
        return self.out(attention(q, k, v, mask, self.backend).flatten(-2))

    def ffn(self, x):
        x1, x3 = split_fused(self.w13(x), (1, 1))
        return self.w2(F.silu(x1) * x3)

    def forward(self, x, rope, mask, temb=None):
        if self.mod is None:
            x = x + self.attention_norm2(self.attn(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.ffn(self.ffn_norm1(x)))
        # temb enters adaLN without an activation (unlike FLUX)
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.mod(temb).unsqueeze(1).chunk(4, -1)
        attn = self.attn(self.attention_norm1(x) * (1 + scale_msa), rope, mask)
        x = torch.addcmul(x, gate_msa.tanh(), self.attention_norm2(attn))
        return torch.addcmul(x, gate_mlp.tanh(), self.ffn_norm2(self.ffn(self.ffn_norm1(x) * (1 + scale_mlp))))


def rope_tables(positions: torch.Tensor, axes_dims, theta: float) -> torch.Tensor:
    """positions [..., 3] (integers) -> complex rotations [..., sum(axes_dims) / 2]. As diffusers'
    Z-Image: angles in float64, rounded to float32, then cos/sin in float32 (the weights were
    trained with these tables)."""
    parts = []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
        angles = (positions[..., i].to(torch.float64)[..., None] * freqs).float()
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, -1)


def _round_up(n: torch.Tensor) -> torch.Tensor:
    return (n + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE


class S3DiT(nn.Module):
    # Modules / parameters that are not hidden matrices (optimizers such as Muon route them to AdamW).
    non_hidden_modules = ("x_embedder", "cap_norm", "cap_embedder", "t_embedder", "x_pad_token", "cap_pad_token",
                          "norm_out_mod", "proj_out")
    modulation_suffixes = ("_mod", ".mod")

    def __init__(self, cfg: S3DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.x_embedder = linear(cfg.patch_dim, dim)
        self.t_embedder = MLPEmbedder(256, T_EMBED_HIDDEN, cfg.adaln_dim)
        self.cap_norm = RMSNorm(cfg.context_dim, eps=cfg.norm_eps)
        self.cap_embedder = linear(cfg.context_dim, dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.noise_refiner = nn.ModuleList([S3DiTBlock(cfg) for _ in range(cfg.num_refiner_layers)])
        self.context_refiner = nn.ModuleList([S3DiTBlock(cfg, modulation=False) for _ in range(cfg.num_refiner_layers)])
        self.layers = nn.ModuleList([S3DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out_mod = linear(cfg.adaln_dim, dim)  # final adaLN: scale only
        self.proj_out = linear(dim, cfg.patch_dim)

    def blocks(self) -> list[nn.Module]:
        """Every transformer block in execution order (for checkpointing and pipeline stages)."""
        return [*self.noise_refiner, *self.context_refiner, *self.layers]

    # --- core: batched, padded tensors ---
    def _forward_padded(self, patches, grids, cap, cap_lens, t):
        """patches [B, Sx, patch_dim] (sample i's first F*H*W rows real, in (f, h, w) order);
        grids: per sample (F, H, W) in patches; cap [B, Sc, context_dim] with sample i's first
        cap_lens[i] rows real; t [B] the diffusers timestep (1 = clean image).
        Returns [B, Sx, patch_dim] for the image tokens."""
        dev, b = patches.device, patches.shape[0]
        cfg = self.cfg
        temb = self.t_embedder(timestep_embedding(t * cfg.t_scale).to(patches.dtype))

        # condition: real tokens, then cap_pad_token up to a multiple of 32, then batch padding
        cap_lens = torch.as_tensor(cap_lens, device=dev)
        cap_pad = _round_up(cap_lens)
        sc = int(cap_pad.max())
        cap = cap[:, :sc]
        if cap.shape[1] < sc:
            cap = F.pad(cap, (0, 0, 0, sc - cap.shape[1]))
        j = torch.arange(sc, device=dev)
        cap_real, cap_keep = j < cap_lens[:, None], j < cap_pad[:, None]
        cap = torch.where(cap_real[..., None], self.cap_embedder(self.cap_norm(cap)), self.cap_pad_token.to(cap.dtype))
        cap_ids = torch.stack([j + 1, torch.zeros_like(j), torch.zeros_like(j)], -1).expand(b, sc, 3)

        # image: real patches, then x_pad_token up to a multiple of 32, then batch padding
        img_lens = torch.tensor([f * h * w for f, h, w in grids], device=dev)
        img_pad = _round_up(img_lens)
        sx = int(img_pad.max())
        if patches.shape[1] < sx:
            patches = F.pad(patches, (0, 0, 0, sx - patches.shape[1]))
        patches = patches[:, :sx]
        k = torch.arange(sx, device=dev)
        img_real, img_keep = k < img_lens[:, None], k < img_pad[:, None]
        x = torch.where(img_real[..., None], self.x_embedder(patches), self.x_pad_token.to(patches.dtype))
        img_ids = torch.zeros(b, sx, 3, dtype=torch.long, device=dev)
        for i, grid in enumerate(grids if len(set(grids)) > 1 else grids[:1]):
            rows = slice(i, i + 1) if len(set(grids)) > 1 else slice(None)
            img_ids[rows, : grid[0] * grid[1] * grid[2]] = _grid_ids(grid, dev)
        img_ids[..., 0] += torch.where(img_real, cap_pad[:, None] + 1, 0)

        x_rope = rope_tables(img_ids, cfg.axes_dims, cfg.rope_theta)
        cap_rope = rope_tables(cap_ids, cfg.axes_dims, cfg.rope_theta)
        # A sample with an empty condition would have a fully masked context-refiner row (NaN);
        # let it attend to its (discarded) batch padding instead.
        cap_refine_keep = cap_keep | (cap_pad == 0)[:, None]
        img_keep_or_none, cap_refine_keep = none_if_unpadded(img_keep), none_if_unpadded(cap_refine_keep)
        for block in self.noise_refiner:
            x = block(x, x_rope, img_keep_or_none, temb)
        for block in self.context_refiner if sc else ():
            cap = block(cap, cap_rope, cap_refine_keep)

        # main blocks over [image | condition] per sample
        if bool((img_pad == sx).all()):  # the usual case: every image has the same padded length
            h = torch.cat([x, cap], 1)
            rope = torch.cat([x_rope, cap_rope], 1)
            keep = torch.cat([img_keep, cap_keep], 1)
        else:  # images of different sizes: move each sample's condition right after its image
            src = torch.cat([k.expand(b, sx), sx + j.expand(b, sc)], 1)
            order = torch.sort((~torch.cat([img_keep, cap_keep], 1)).to(torch.int8), dim=1, stable=True).indices
            idx = torch.gather(src, 1, order)
            keep = torch.gather(torch.cat([img_keep, cap_keep], 1), 1, order)

            def take(a, c):
                return torch.gather(torch.cat([a, c], 1), 1, idx[..., None].expand(-1, -1, a.shape[-1]))

            h, rope = take(x, cap), take(x_rope, cap_rope)
        keep = none_if_unpadded(keep)
        for block in self.layers:
            h = block(h, rope, keep, temb)

        # every sample's image tokens come first
        h = h[:, :sx]
        scale = self.norm_out_mod(F.silu(temb)).unsqueeze(1)
        return self.proj_out(layer_norm_no_affine(h) * (1 + scale))

    # --- the token-level forward, argument for argument as diffusers' ZImageTransformer2DModel ---
    def forward_tokens(self, x: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor],
                       patch_size: int | None = None, f_patch_size: int | None = None) -> list[torch.Tensor]:
        """x: per sample latents [C, F, H, W]; t [B] (diffusers' convention: 0 = pure noise,
        1 = clean); cap_feats: per sample condition [L_i, context_dim], real tokens only.
        Returns per sample [C, F, H, W], the diffusers model's output (x0 - noise)."""
        cfg = self.cfg
        if patch_size not in (None, cfg.patch_size) or f_patch_size not in (None, cfg.f_patch_size):
            raise ValueError(f"this model was built for patch_size={cfg.patch_size}, f_patch_size={cfg.f_patch_size}")
        patched = [patchify(img, cfg.patch_size, cfg.f_patch_size) for img in x]
        grids = [g for _, g in patched]
        patches = nn.utils.rnn.pad_sequence([p for p, _ in patched], batch_first=True)
        cap = nn.utils.rnn.pad_sequence(list(cap_feats), batch_first=True)
        out = self._forward_padded(patches, grids, cap, [len(c) for c in cap_feats], t)
        return [unpatchify(out[i], grid, cfg.patch_size, cfg.f_patch_size) for i, grid in enumerate(grids)]

    # --- the IOMM interface shared by every family ---
    def forward(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None):
        """latents [B, C, H, W], t [B] in [0, 1] with t = 1 pure noise, cond [B, L, context_dim],
        cond_mask [B, L] bool (True = real) -> velocity v = noise - x0 [B, C, H, W].

        Z-Image's own convention is reversed: its pipeline feeds (1000 - sigma * 1000) / 1000 =
        1 - sigma and steps the scheduler with the negated output (the model predicts x0 - noise).
        So we feed 1 - t and negate, and every family shares one sign and time convention."""
        cfg = self.cfg
        b, c, hgt, wid = latents.shape
        p = cfg.patch_size
        if cfg.f_patch_size != 1:
            raise ValueError("the image interface needs f_patch_size=1")
        # [B, C, H, W] -> [B, (H/p)(W/p), p*p*C]: (ph, pw, c) inner order, as diffusers patchifies
        patches = latents.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        cond, lens = real_tokens_first(cond, cond_mask)
        out = self._forward_padded(patches, [(1, hgt // p, wid // p)] * b, cond, lens, 1 - t)
        out = out[:, : patches.shape[1]].reshape(b, hgt // p, wid // p, p, p, c)
        return -out.permute(0, 5, 1, 3, 2, 4).reshape(b, c, hgt, wid)


def real_tokens_first(cond: torch.Tensor, mask: torch.Tensor | None):
    """Move each sample's real tokens to the front (order kept): the model reads a condition as
    its real tokens only, as diffusers' pipeline passes it. Returns (cond, lengths [B])."""
    if mask is None:
        return cond, torch.full((cond.shape[0],), cond.shape[1], device=cond.device)
    mask = mask.bool()
    lens = mask.sum(1)
    prefix = torch.arange(cond.shape[1], device=cond.device) < lens[:, None]
    if not bool((mask == prefix).all()):
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        cond = torch.gather(cond, 1, order[..., None].expand_as(cond))
    return cond, lens


def _grid_ids(grid, device) -> torch.Tensor:
    f, h, w = grid
    axes = torch.meshgrid(*(torch.arange(n, device=device) for n in (f, h, w)), indexing="ij")
    return torch.stack(axes, -1).reshape(-1, 3)


def patchify(img: torch.Tensor, p: int, pf: int):
    """[C, F, H, W] -> ([F/pf * H/p * W/p, pf*p*p*C], (F/pf, H/p, W/p)), diffusers' order."""
    c, f, h, w = img.shape
    x = img.reshape(c, f // pf, pf, h // p, p, w // p, p).permute(1, 3, 5, 2, 4, 6, 0)
    return x.reshape(-1, pf * p * p * c), (f // pf, h // p, w // p)


def unpatchify(tokens: torch.Tensor, grid, p: int, pf: int) -> torch.Tensor:
    ft, ht, wt = grid
    n = ft * ht * wt
    x = tokens[:n].reshape(ft, ht, wt, pf, p, p, -1).permute(6, 0, 3, 1, 4, 2, 5)
    return x.reshape(x.shape[0], ft * pf, ht * p, wt * p)
