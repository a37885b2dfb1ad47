"""Small CPU training configs for the memory-planner check: the three generator families,
hidden 192, the tiny MLLM, the pixel VAE at 128 px (256 image tokens), micro-batch 4."""

from __future__ import annotations

import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

GENERATORS = {
    "flux": dict(family="flux", in_channels=192, num_layers=2, num_single_layers=2, num_heads=4, head_dim=48,
                 context_dim=64, pooled_dim=64, axes_dims_rope=[8, 20, 20], attention_backend="sdpa"),
    "s3dit": dict(family="s3dit", in_channels=48, patch_size=2, num_layers=3, num_refiner_layers=1, num_heads=4,
                  head_dim=48, context_dim=64, axes_dims=[8, 20, 20], axes_lens=[256, 64, 64], attention_backend="sdpa"),
    "qwen_mmdit": dict(family="qwen_mmdit", in_channels=192, out_channels=48, patch_size=2, num_layers=3, num_heads=4,
                       head_dim=48, context_dim=64, axes_dims_rope=[8, 20, 20], attention_backend="sdpa"),
}


def make_cfg(family: str, batch: int = 4, resolution: int = 128):
    from iomm_scale.config import from_dict

    raw = yaml.safe_load(open(TINY))
    raw["model"]["generator"] = dict(GENERATORS[family])
    raw["data"].update(batch_size=batch, resolution=resolution, builtin={"crops_per_photo": 1, "num_shapes": 1})
    raw["train"].update(progress_bar=False, num_samples=0, resume="never", log_every=1)
    return from_dict(raw, f"tiny.yaml with a {family} generator")
