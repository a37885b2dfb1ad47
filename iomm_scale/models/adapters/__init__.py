"""Converters between our generator families and their diffusers models, one file per family:
`load_diffusers(path)` -> our model, `save_diffusers(model, path)` -> a diffusers folder."""

from __future__ import annotations

import importlib

# generator family -> adapter module, and the diffusers class its folders load into
ADAPTERS = {"flux": ("flux", "FluxTransformer2DModel"), "s3dit": ("zimage", "ZImageTransformer2DModel"),
            "qwen_mmdit": ("qwen_image", "QwenImageTransformer2DModel")}


def adapter_for(family: str):
    """The adapter module of a generator family."""
    if family not in ADAPTERS:
        raise ValueError(f"no diffusers adapter for generator family {family!r}; known: {sorted(ADAPTERS)}")
    return importlib.import_module(f"{__name__}.{ADAPTERS[family][0]}")
