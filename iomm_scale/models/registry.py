"""Generator families: name -> (config dataclass, model class).

Every generator takes the same IOMM call, `model(latents [B,C,H,W], t [B], cond [B,L,D],
cond_mask [B,L] bool) -> velocity [B,C,H,W]`, and exposes `blocks()` (its transformer
blocks in execution order), `non_hidden_modules` and `modulation_suffixes` (for optimizer
routing). Adding a family = one config dataclass + one model file + one adapter + one
entry here.
"""

from __future__ import annotations

from .flux_mmdit import FluxConfig, FluxMMDiT
from .qwen_mmdit import QwenMMDiT, QwenMMDiTConfig
from .s3dit import S3DiT, S3DiTConfig

FAMILIES: dict[str, tuple[type, type]] = {
    "flux": (FluxConfig, FluxMMDiT),
    "s3dit": (S3DiTConfig, S3DiT),  # Z-Image (IOMM-XL)
    "qwen_mmdit": (QwenMMDiTConfig, QwenMMDiT),  # Qwen-Image
}


def build_generator(family: str, cfg):
    if family not in FAMILIES:
        raise ValueError(f"unknown generator family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family][1](cfg)
