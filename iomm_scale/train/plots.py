"""PNG outputs of a run: the sample grid and the loss curve (PIL only, no plotting library)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path, pad: int = 2, min_cell: int = 96) -> None:
    """Each row a [B, 3, H, W] batch; cells upscaled (nearest) to at least `min_cell` px."""
    cols = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    scale = max(1, -(-min_cell // h))
    ch, cw = h * scale, w * scale
    grid = Image.new("RGB", (cols * (cw + pad) + pad, len(rows) * (ch + pad) + pad), (255, 255, 255))
    for r, batch in enumerate(rows):
        for c, arr in enumerate(to_uint8(batch)):
            cell = Image.fromarray(arr).resize((cw, ch), Image.NEAREST)
            grid.paste(cell, (pad + c * (cw + pad), pad + r * (ch + pad)))
    grid.save(path)


def save_loss_curve(steps: list[int], losses: list[float], path, eval_points=(), size=(640, 400)) -> None:
    """The training loss per step (blue) and, when given, the held-out loss as dots (orange)."""
    eval_points = [(s, v) for s, v in eval_points if steps and steps[0] <= s <= steps[-1]]
    width, height = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 20, 40
    draw.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    if len(steps) >= 2:
        lo, hi = min([*losses, *(v for _, v in eval_points)]), max([*losses, *(v for _, v in eval_points)])
        hi = hi if hi > lo else lo + 1e-6
        s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def xy(s, l):
            x = left + (s - s0) / (s1 - s0) * (width - left - right)
            y = bottom_y - (l - lo) / (hi - lo) * (bottom_y - top)
            return x, y

        bottom_y = height - bottom
        draw.line([xy(s, l) for s, l in zip(steps, losses)], fill=(30, 90, 200), width=2)
        for s, v in eval_points:
            x, y = xy(s, v)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(230, 120, 20))
        draw.text((4, top), f"{hi:.3f}", fill=(0, 0, 0))
        draw.text((4, bottom_y - 10), f"{lo:.3f}", fill=(0, 0, 0))
        draw.text((left, height - bottom + 8), f"step {s0}", fill=(0, 0, 0))
        draw.text((width - right - 80, height - bottom + 8), f"step {steps[-1]}", fill=(0, 0, 0))
    draw.text((left + 8, top + 4), "training loss", fill=(30, 90, 200))
    if eval_points:
        draw.text((left + 110, top + 4), "held-out loss", fill=(230, 120, 20))
    img.save(path)
