"""Configuration of the webdataset streams (embedded in the run config as `data.webdataset`).

Resolution and batch size are not here: the trainer passes them to
`build_webdataset_loader`. Every field is a plain type so the run-config loader can fill
it from YAML; `validate()` reports impossible values as (field, message) pairs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .preprocess import RESIZE_FILTERS

# Aspect-ratio bucket spec: "W:H" with positive numbers, e.g. "4:3", "1:1", "9:16".
_BUCKET_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")


@dataclass
class WebDatasetConfig:
    # Shard specs: local paths, brace patterns ("data/img-{000000..000099}.tar"), "::"-joined
    # lists, "file:" or "pipe:" URLs (anything webdataset's gopen opens).
    image_shards: list[str] = field(default_factory=list)  # read as image-only (captions ignored)
    paired_shards: list[str] = field(default_factory=list)  # need a caption (.txt or .json)
    # lambda: probability that a drawn sample is image-only. With both lists it picks the
    # stream; with only paired shards the caption is withheld with this probability; with
    # only image shards every sample is image-only.
    image_only_fraction: float = 0.5
    features: bool = False  # the shards hold precomputed features (tools/precompute_features.py)
    # feature shards: refuse samples made by other encoders (VAE, vision tower) than this run's
    check_feature_encoders: bool = True

    # Order, split, epochs.
    shuffle_buffer: int = 1000  # samples per shuffled chunk (per worker); 1 = shard order
    epochs: Optional[int] = None  # None: loop forever (training); N: stop after N epochs
    resample: bool = False  # draw shards with replacement per worker instead of a permutation
    drop_last: bool = False  # at the end of a finite stream, drop the partial batches
    num_workers: int = 4  # DataLoader worker processes per rank (0 = in the main process)
    prefetch_factor: int = 2
    pin_memory: bool = True  # only applied when CUDA is available

    # Preprocessing: shorter side to the resolution, centre crop (or the nearest bucket).
    buckets: list[str] = field(default_factory=list)  # e.g. ["1:1", "4:3", "3:4"]; empty = square
    bucket_multiple: int = 64  # bucket sides are multiples of this (VAE factor x patch)
    min_size_fraction: float = 0.5  # reject images whose shorter side < fraction x resolution
    min_image_size: int = 0  # and whose shorter side < this many pixels
    max_image_pixels: int = 178_956_970  # reject larger images (decompression bombs)
    # Antialiased resampling of the crop: "bicubic" (sharper) or "bilinear" (the diffusers /
    # torchvision training scripts' choice); about the same cost with torch's uint8 kernel.
    resize_filter: str = "bicubic"

    # Bad data.
    error_budget: float = 0.05  # stop when (bad samples + bad shards) / seen exceeds this
    min_samples_before_budget: int = 1000  # ... but only after this many were seen (per rank)
    warn_first: int = 5  # log the first N bad samples of each reason, then
    warn_interval_s: float = 60.0  # at most one summary line per reason per interval

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        for name in ("image_shards", "paired_shards", "buckets"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
                errors.append((name, f"must be a list of non-empty strings, got {value!r}"))
        if not self.image_shards and not self.paired_shards:
            errors.append(("image_shards", "no shards: set image_shards and/or paired_shards"))
        if not 0.0 <= self.image_only_fraction <= 1.0:
            errors.append(("image_only_fraction", f"must be in [0, 1], got {self.image_only_fraction}"))
        if self.shuffle_buffer < 1:
            errors.append(("shuffle_buffer", f"must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}"))
        if self.epochs is not None and self.epochs < 1:
            errors.append(("epochs", f"must be >= 1 or null (loop forever), got {self.epochs}"))
        if self.num_workers < 0:
            errors.append(("num_workers", f"must be >= 0, got {self.num_workers}"))
        if self.prefetch_factor < 1:
            errors.append(("prefetch_factor", f"must be >= 1, got {self.prefetch_factor}"))
        if self.bucket_multiple < 1:
            errors.append(("bucket_multiple", f"must be >= 1, got {self.bucket_multiple}"))
        if isinstance(self.buckets, list):
            for spec in self.buckets:
                if isinstance(spec, str) and parse_bucket(spec) is None:
                    errors.append(("buckets", f"{spec!r} is not an aspect ratio 'W:H' with positive numbers"))
        if self.min_size_fraction < 0:
            errors.append(("min_size_fraction", f"must be >= 0, got {self.min_size_fraction}"))
        if self.min_image_size < 0:
            errors.append(("min_image_size", f"must be >= 0, got {self.min_image_size}"))
        if self.resize_filter not in RESIZE_FILTERS:
            errors.append(("resize_filter", f"must be one of {RESIZE_FILTERS}, got {self.resize_filter!r}"))
        if self.max_image_pixels < 1:
            errors.append(("max_image_pixels", f"must be >= 1, got {self.max_image_pixels}"))
        if not 0.0 <= self.error_budget <= 1.0:
            errors.append(("error_budget", f"must be a fraction in [0, 1], got {self.error_budget}"))
        if self.min_samples_before_budget < 0:
            errors.append(("min_samples_before_budget", f"must be >= 0, got {self.min_samples_before_budget}"))
        if self.warn_first < 0 or self.warn_interval_s < 0:
            errors.append(("warn_first", "warn_first and warn_interval_s must be >= 0"))
        return errors

    def missing_shards(self) -> list[tuple[str, str]]:
        """(field, message) for local shard paths that do not exist (URLs are not checked).
        Separate from validate() so configs can be checked where the data is not mounted."""
        from .shards import expand_shards, is_local

        errors = []
        for name in ("image_shards", "paired_shards"):
            urls = expand_shards(getattr(self, name))
            missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
            if missing:
                shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
                errors.append((name, f"{len(missing)} of {len(urls)} shards do not exist: {shown}"))
        return errors


def local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def parse_bucket(spec: str) -> Optional[float]:
    """'W:H' -> aspect ratio W/H, or None when malformed."""
    m = _BUCKET_RE.match(spec)
    if not m:
        return None
    w, h = float(m.group(1)), float(m.group(2))
    return w / h if w > 0 and h > 0 else None
