"""The whole IOMM model: frozen VAE + conditioner (frozen MLLM, trainable RQA and
projection) + generator (the DiT), and one training step's loss (Algorithm 1).

    x = VAE(image); z ~ N(0, I); t ~ p(t); x_t = (1 - t) x + t z
    c_img = ViT(image); mask c_img with ratio r; c = [c_aux, c_img]; c = [c, RQA(c)]
    h = MLLM(c) (frozen); loss = || F(x_t, t, proj(h)) - (z - x) ||^2
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flow
from .models.layers import upcast
from .models.conditioner import IOMMConditioner, load_mllm
from .models.registry import build_generator
from .models.vae import FrozenVAE
from .data.preprocess import unit_pixels


class IOMMModel(nn.Module):
    def __init__(self, cfg, generator: nn.Module, conditioner: IOMMConditioner, vae: FrozenVAE):
        super().__init__()
        self.cfg = cfg
        self.generator = generator
        self.conditioner = conditioner
        self.vae = vae

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"conditioner.mllm": self.conditioner.mllm, "vae": self.vae}

    def encode_batch(self, batch: dict):
        """Latents and unmasked vision features of a batch: computed from pixels, or taken
        from precomputed feature shards."""
        if "latents" in batch:
            return batch["latents"], batch["vision_features"]
        pixels = unit_pixels(batch["pixels"])
        return self.vae.encode(pixels), self.conditioner.vision_features(pixels)

    def prepare_generator_inputs(self, batch: dict, draws=None):
        """Everything before the generator: -> (x_t, t, cond, cond_mask, target). The pipeline
        runtime calls this on its first stage, so the two paths cannot drift apart.
        `draws(latents, num_image_tokens, mask_ratio) -> (t, noise, keep)` replaces the random
        draws and turns condition dropout off (held-out evaluation: train/evaluate.py)."""
        latents, feats = self.encode_batch(batch)
        # float32 (float64 in gradient checks; a trainable weight's: a LoRA base may be bfloat16)
        latents = latents.to(next((p for p in self.generator.parameters() if p.requires_grad),
                                  next(self.generator.parameters())).dtype)
        b = latents.shape[0]
        device = latents.device
        num_tokens = latents.shape[-2] * latents.shape[-1] // 4
        if draws is None:
            # Random numbers in a fixed order: t, noise, condition dropout, MIM mask (in the conditioner).
            t = flow.sample_timesteps(b, self.cfg.flow, num_tokens, device=device)
            noise = torch.randn_like(latents)
            drop, keep = torch.rand(b, device=device) < self.cfg.flow.cond_dropout, None
        else:
            t, noise, keep = draws(latents, feats.shape[1], self.conditioner.cfg.mask_ratio)
            drop = None
        cond, cond_mask = self.conditioner(feats, batch.get("captions"), drop=drop, keep=keep)
        return flow.interpolate(latents, noise, t), t, cond, cond_mask, flow.velocity_target(latents, noise)

    def loss(self, batch: dict) -> torch.Tensor:
        x_t, t, cond, cond_mask, target = self.prepare_generator_inputs(batch)
        return F.mse_loss(upcast(self.generator(x_t, t, cond, cond_mask)), target)

    def sample_losses(self, batch: dict, draws) -> torch.Tensor:
        """Each sample's loss [B] (float32) under the given draws (see prepare_generator_inputs)."""
        x_t, t, cond, cond_mask, target = self.prepare_generator_inputs(batch, draws)
        return flow.per_sample_loss(self.generator(x_t, t, cond, cond_mask), target)

    @torch.no_grad()
    def null_condition(self, batch_size: int):
        drop = torch.ones(batch_size, dtype=torch.bool, device=self.conditioner.aux_ids.device)
        return self.conditioner(None, [None] * batch_size, drop=drop)

    @torch.no_grad()
    def sample(self, batch_size: int, resolution: int, pixels: torch.Tensor | None = None,
               captions: list[str | None] | None = None, steps: int | None = None, cfg_scale: float | None = None,
               mask_ratio: float | None = None, generator: torch.Generator | None = None,
               vision_features: torch.Tensor | None = None, generator_fn: Callable | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Generate images [B, 3, H, W] in [-1, 1] conditioned on reference images (image-only
        mode; masked with `mask_ratio`, default 0 at sampling), on their precomputed vision
        features (`vision_features`, as in feature shards) or on captions. `generator_fn(x, t,
        cond, cond_mask)` replaces the generator's forward (a pipeline runs it over its stages).
        `noise`: the starting latents [B, C, h, w] (default: drawn from `generator`)."""
        fcfg = self.cfg.flow
        steps = steps or fcfg.sample_steps
        cfg_scale = fcfg.cfg_scale if cfg_scale is None else cfg_scale
        device = self.conditioner.aux_ids.device
        if vision_features is not None:
            feats = vision_features.to(device)
        else:
            feats = self.conditioner.vision_features(unit_pixels(pixels.to(device))) if pixels is not None else None
        cond = self.conditioner(feats, captions or [None] * batch_size, mask_ratio=0.0 if mask_ratio is None else mask_ratio)
        null = self.null_condition(batch_size)
        if cond[0].shape[1] != null[0].shape[1]:  # "all" positions with prompts of another length: no batching
            null = None
        f = self.cfg.model.vae.downsample_factor
        shape = (batch_size, self.vae.latent_channels, resolution // f, resolution // f)
        if noise is None:
            noise = torch.randn(shape, device=device, generator=generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {list(shape)}, got {list(noise.shape)}")
        noise = noise.to(device)
        shift = flow.effective_shift(fcfg, shape[-1] * shape[-2] // 4)

        generator_fn = generator_fn or self.generator

        def velocity(x, t, c):  # called `steps` times (CFG's two branches batched in one call)
            return generator_fn(x, t, c[0], c[1]).float()

        latents = flow.euler_sample(velocity, noise, steps, shift, cond, null, cfg_scale if null is not None else 1.0)
        return self.vae.decode(latents)


def build_iomm(cfg, device: str | torch.device = "cpu") -> IOMMModel:
    """Build the model a run config describes (frozen parts loaded or randomly initialised)."""
    seed = cfg.train.seed
    gen_cfg = cfg.model.generator.config
    # A private RNG stream: building the model leaves the training run's random numbers alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = FrozenVAE(cfg.model.vae, seed=seed + 2)
        check_shapes(cfg, vae)  # before the expensive parts are built
        family, gen_path = cfg.model.generator.family, cfg.model.generator.path
        if gen_path:
            from .models.pretrained import load_generator

            base_dtype = getattr(torch, cfg.model.lora.base_dtype) if cfg.model.lora is not None else torch.float32
            generator = load_generator(family, gen_cfg, gen_path, cfg.model.generator.subfolder, base_dtype)
        else:
            generator = build_generator(family, gen_cfg)
        if cfg.model.lora is not None:  # base frozen, adapters train (models/lora.py)
            from .models.lora import apply_lora

            generator = apply_lora(generator, cfg.model.lora, family)
        mllm, tokenizer = load_mllm(cfg.model.conditioner.mllm, seed=seed + 1)
        conditioner = IOMMConditioner(cfg.model.conditioner, mllm, tokenizer, condition_dim=gen_cfg.context_dim)
    return IOMMModel(cfg, generator, conditioner, vae).to(device)


def check_shapes(cfg, vae):
    gen = cfg.model.generator.config
    if gen.latent_channels != vae.latent_channels:
        raise ValueError(f"{cfg.source}: model.generator.in_channels: the VAE gives {vae.latent_channels} latent "
                         f"channels but the generator expects {gen.latent_channels} (in_channels={gen.in_channels})")
