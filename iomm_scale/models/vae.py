"""The frozen autoencoder: pixels <-> normalised latents.

    autoencoder_kl            diffusers AutoencoderKL (FLUX's 16-channel 8x VAE; Z-Image uses it too)
                              latent = (mean - shift_factor) * scaling_factor
    autoencoder_kl_qwenimage  diffusers AutoencoderKLQwenImage (Qwen-Image), per-channel
                              latents_mean / latents_std from its config
    pixel                     no network: an exact space-to-depth of the pixels by `pixel_factor`
                              (3 * f^2 channels). For CPU smoke runs whose samples should look like
                              images after minutes of training; not for real models.

The posterior mean is used by default (deterministic, and what feature shards store);
`sample_posterior: true` draws from the posterior instead. The generator sees latents
[B, C, H/8, W/8]; families pack them into tokens themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VAE_TYPES = ("autoencoder_kl", "autoencoder_kl_qwenimage", "pixel")


@dataclass
class VAEConfig:
    type: str = "autoencoder_kl"
    path: str | None = None  # diffusers model dir (or a pipeline dir with `subfolder: vae`)
    subfolder: str | None = None
    random_init: bool = False  # tiny random AutoencoderKL (tests); 8x down, 16 channels
    scaling_factor: float | None = None  # None: from the VAE's config
    shift_factor: float | None = None
    pixel_factor: int = 4
    sample_posterior: bool = False
    dtype: str = "float32"

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.type not in VAE_TYPES:
            errors.append(("type", f"must be one of {VAE_TYPES}, got {self.type!r}"))
        elif self.type != "pixel" and not self.random_init:
            if not self.path:
                errors.append(("path", "missing: set the VAE path, or random_init: true"))
            elif self.path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(self.path)):
                errors.append(("path", f"directory does not exist: {self.path}"))
        if self.type == "pixel" and self.pixel_factor < 1:
            errors.append(("pixel_factor", f"must be >= 1, got {self.pixel_factor}"))
        return errors

    @property
    def downsample_factor(self) -> int:
        return self.pixel_factor if self.type == "pixel" else 8


def tiny_autoencoder_kl(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16,
                             norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
                             use_quant_conv=False, use_post_quant_conv=False)


class FrozenVAE(nn.Module):
    def __init__(self, cfg: VAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.model = None
        if cfg.type == "pixel":
            self.latent_channels = 3 * cfg.pixel_factor ** 2
            self.scale, self.shift = cfg.scaling_factor or 1.0, cfg.shift_factor or 0.0
            return
        if cfg.random_init:
            if cfg.type != "autoencoder_kl":
                raise ValueError("vae.random_init builds a tiny AutoencoderKL only")
            self.model = tiny_autoencoder_kl(seed)
        else:
            import diffusers

            cls = diffusers.AutoencoderKL if cfg.type == "autoencoder_kl" else diffusers.AutoencoderKLQwenImage
            self.model = cls.from_pretrained(os.path.expanduser(cfg.path), subfolder=cfg.subfolder)
        self.model.to(getattr(torch, cfg.dtype)).requires_grad_(False).eval()
        conf = self.model.config
        if cfg.type == "autoencoder_kl":
            self.latent_channels = conf.latent_channels
            self.scale = cfg.scaling_factor if cfg.scaling_factor is not None else conf.scaling_factor
            self.shift = cfg.shift_factor if cfg.shift_factor is not None else (conf.shift_factor or 0.0)
        else:
            self.latent_channels = conf.z_dim
            self.register_buffer("latents_mean", torch.tensor(conf.latents_mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("latents_std", torch.tensor(conf.latents_std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        return self

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, H/f, W/f] (float32)."""
        if self.cfg.type == "pixel":
            return (F.pixel_unshuffle(pixels.float(), self.cfg.pixel_factor) - self.shift) * self.scale
        x = pixels.to(self.model.dtype)
        if self.cfg.type == "autoencoder_kl_qwenimage":
            dist = self.model.encode(x[:, :, None]).latent_dist  # video VAE: one frame
            z = (dist.sample() if self.cfg.sample_posterior else dist.mode())[:, :, 0].float()
            return (z - self.latents_mean) / self.latents_std
        dist = self.model.encode(x).latent_dist
        z = (dist.sample() if self.cfg.sample_posterior else dist.mode()).float()
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents -> pixels [B, 3, H, W] in [-1, 1]."""
        if self.cfg.type == "pixel":
            return F.pixel_shuffle(latents.float() / self.scale + self.shift, self.cfg.pixel_factor).clamp(-1, 1)
        if self.cfg.type == "autoencoder_kl_qwenimage":
            z = latents.float() * self.latents_std + self.latents_mean
            return self.model.decode(z[:, :, None].to(self.model.dtype)).sample[:, :, 0].float().clamp(-1, 1)
        z = latents.float() / self.scale + self.shift
        return self.model.decode(z.to(self.model.dtype)).sample.float().clamp(-1, 1)
