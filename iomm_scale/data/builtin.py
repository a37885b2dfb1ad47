"""The built-in image set: real photos and captioned shapes, no download.

- Photos: scikit-image's bundled colour photos (astronaut, coffee, rocket, ...), each cut
  into `crops_per_photo` square crops at fixed positions and scales, resized to the
  training resolution. Image-only samples (caption None).
- Shapes: procedural images of coloured circles / squares / triangles on coloured
  backgrounds, each with a caption ("a red circle on a blue background"): the text-image
  pairs of a mixed fine-tuning demo.

The loader is deterministic and resumable: the global order of an epoch is a permutation
drawn from (seed, epoch); each step takes the next `global_batch` indices and each rank
takes its contiguous slice. The state is (epoch, position), independent of world size.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw

PHOTOS = ("astronaut", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry", "logo",
          "retina", "rocket")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
           "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@functools.lru_cache(maxsize=4)
def photo_crops(resolution: int, crops_per_photo: int) -> list[torch.Tensor]:
    """Decoded once per process (the large photos take seconds to decode)."""
    import skimage.data

    out = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr)
        if img.mode == "RGBA":  # the logo: composite on white
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.split()[-1])
            img = bg
        w, h = img.size
        for k in range(crops_per_photo):
            # crop k: the full centre square, then smaller squares at the four quadrants' centres
            side = min(w, h) if k == 0 else int(min(w, h) * 0.6)
            cx = w // 2 if k == 0 else (w // 4 if k % 2 else 3 * w // 4)
            cy = h // 2 if k == 0 else (h // 4 if (k // 2) % 2 else 3 * h // 4)
            left = min(max(cx - side // 2, 0), w - side)
            top = min(max(cy - side // 2, 0), h - side)
            crop = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
            out.append(_to_tensor(crop))
    return out


def shape_images(resolution: int, count: int, seed: int = 1234) -> list[tuple[torch.Tensor, str]]:
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out = []
    for _ in range(count):
        fg, bg = rng.choice(len(names), 2, replace=False)
        shape = SHAPES[rng.integers(len(SHAPES))]
        img = Image.new("RGB", (resolution, resolution), COLOURS[names[bg]])
        draw = ImageDraw.Draw(img)
        r = resolution * rng.uniform(0.2, 0.35)
        cx, cy = resolution * rng.uniform(0.35, 0.65, size=2)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[names[fg]])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[names[fg]])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[names[fg]])
        out.append((_to_tensor(img), f"a {names[fg]} {shape} on a {names[bg]} background"))
    return out


class BuiltinLoader:
    """Iterator of batches {"pixels": [B, 3, R, R] in [-1, 1], "captions": [str | None], "keys": [str]}."""

    def __init__(self, resolution: int, batch_size: int, image_only_fraction: float = 1.0, crops_per_photo: int = 4,
                 num_shapes: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1):
        photos = photo_crops(resolution, crops_per_photo)
        self.samples: list[tuple[torch.Tensor, str | None, str]] = [(p, None, f"photo{i}") for i, p in enumerate(photos)]
        if image_only_fraction < 1.0:
            shapes = shape_images(resolution, num_shapes)
            self.samples += [(img, cap, f"shape{i}") for i, (img, cap) in enumerate(shapes)]
        self.num_photos = len(photos)
        self.image_only_fraction = image_only_fraction
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        """One epoch's global order. With a mixture each slot is image-only with probability
        lambda, drawn from the image-only pool (the photos, and the shapes without their
        captions), else a captioned shape: the fraction of image-only samples is lambda, as
        for webdataset sources (the captionless photos used to enter on top of it)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.image_only_fraction >= 1.0:
            return torch.randperm(self.num_photos, generator=g).tolist()
        n = len(self.samples)
        pool = torch.randperm(n, generator=g).tolist()  # the image-only pool, in this epoch's order
        shapes = (self.num_photos + torch.randperm(n - self.num_photos, generator=g)).tolist()
        image_only = (torch.rand(n, generator=g) < self.image_only_fraction).tolist()
        order, a, b = [], 0, 0
        for k in range(n):  # encode "use without caption" as a negative index
            if image_only[k]:
                order.append(-1 - pool[a] if pool[a] >= self.num_photos else pool[a])
                a += 1
            else:
                order.append(shapes[b % len(shapes)])
                b += 1
        return order

    @property
    def epoch_size(self) -> int:
        """Samples in one epoch (over all ranks)."""
        return len(self._order(0))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        order = self._order(self.epoch)
        if self.position + self.global_batch > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order(self.epoch)
            if self.global_batch > len(order):
                raise ValueError(f"global batch {self.global_batch} is larger than the built-in set ({len(order)} images)")
        start = self.position + self.rank * self.batch_size
        picked = order[start : start + self.batch_size]
        self.position += self.global_batch
        pixels, captions, keys = [], [], []
        for code in picked:
            i = code if code >= 0 else -1 - code
            img, caption, key = self.samples[i]
            pixels.append(img)
            captions.append(caption if code >= 0 else None)
            keys.append(key)
        return {"pixels": torch.stack(pixels), "captions": captions, "keys": keys}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:  # strict: as the stream's (always exact here)
        if "epoch" not in state:
            raise ValueError("the saved data position is not the built-in source's (data.source changed?): "
                             "resume with the source that wrote it, or start over (train.resume=never)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def stats(self) -> dict:
        return {}
