"""Generation from a checkpoint: image-conditioned (reconstruction / variation, editing
from image-only pre-training) or text-conditioned."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .iomm import build_iomm
from .train.checkpoint import apply_init_weights, init_source
from .train.plots import save_grid


def load_image(path: str, resolution: int) -> torch.Tensor:
    """Shorter side to `resolution`, centre crop, [-1, 1] (the training preprocessing)."""
    img = Image.open(path)
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def load_trained(cfg, checkpoint: str, use_ema: bool = True, device="cpu"):
    """The model of `cfg` with a checkpoint's weights (its EMA when `use_ema` and it has one):
    a `step_N/` dir or its state.pt, a run dir (its newest checkpoint), a launcher run's EMA
    export (`<run_dir>/ema`) or a layout-free copy (`<run_dir>/full`)."""
    init_source(checkpoint, "--checkpoint")  # a wrong path fails before the model is built
    model = build_iomm(cfg, device)
    apply_init_weights(model, checkpoint, use_ema, "--checkpoint")  # strict: names, shapes, LoRA base
    return model.eval()


def sample_from_checkpoint(cfg, checkpoint, images, prompts, out, steps=None, cfg_scale=None, seed=0, use_ema=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_trained(cfg, checkpoint, use_ema, device)
    res = cfg.data.resolution
    g = torch.Generator(device=device).manual_seed(seed)
    rows = []
    if images:
        refs = torch.stack([load_image(p, res) for p in images]).to(device)
        rows += [refs.cpu(), model.sample(len(images), res, pixels=refs, steps=steps, cfg_scale=cfg_scale, generator=g).cpu()]
    if prompts:
        rows.append(model.sample(len(prompts), res, captions=list(prompts), steps=steps, cfg_scale=cfg_scale, generator=g).cpu())
    save_grid(rows, out)
