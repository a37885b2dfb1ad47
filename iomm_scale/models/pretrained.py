"""A pretrained generator from a diffusers transformer directory (`model.generator.path`).

    model:
      generator:
        family: qwen_mmdit
        path: /models/Qwen-Image        # local directory (or hub id "Qwen/Qwen-Image", fetched
        subfolder: transformer          #   with huggingface_hub into its cache at build time)
        num_layers: 60 ...              # must agree with config.json

The directory holds config.json + diffusion_pytorch_model*.safetensors; the family's adapter
(`models/adapters/`) streams the weights shard by shard into our model. The YAML keeps the
shape so that parameter counts, FLOPs and the memory planner work without the weights; for a
local directory validation reads config.json and names every field that disagrees (a hub id
is checked the same way once fetched, at build time).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn

RUNTIME_FIELDS = ("attention_backend",)  # ours only, not in a diffusers config


def _adapter(family: str):
    from .adapters import flux, qwen_image, zimage

    return {"flux": flux, "s3dit": zimage, "qwen_mmdit": qwen_image}[family]


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _is_hub_id(path: str) -> bool:  # exactly "org/name", as conditioner._looks_local decides
    return not path.startswith(("/", ".", "~")) and path.count("/") == 1 and not os.path.isdir(path)


def resolve(path: str, subfolder: str | None = None) -> str:
    """The local directory holding config.json: path[/subfolder], a hub id fetched first."""
    local = os.path.expanduser(path)
    if _is_hub_id(path):
        from huggingface_hub import snapshot_download

        local = snapshot_download(path, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    return os.path.join(local, subfolder) if subfolder else local


def path_errors(family: str, gen_cfg, path: str, subfolder: str | None = None) -> list[tuple[str, str]]:
    """(key under model.generator, message) for a local path that is not a diffusers directory of
    this family, or whose config.json disagrees with the YAML's shape. Hub ids: nothing (offline)."""
    from .adapters.common import AdapterError, read_diffusers_config

    if _is_hub_id(path):
        return []
    local = resolve(path, subfolder)
    if not os.path.isdir(local):
        return [("path", f"directory does not exist: {local} (a diffusers transformer directory: config.json + "
                         "diffusion_pytorch_model*.safetensors)")]
    adapter = _adapter(family)
    try:
        theirs = adapter.config_from_diffusers(read_diffusers_config(local, adapter.DIFFUSERS_CLASS))
    except (AdapterError, ValueError) as e:
        return [("path", str(e))]
    errors = []
    for f in dataclasses.fields(gen_cfg):
        if f.name in RUNTIME_FIELDS:
            continue
        ours, want = _norm(getattr(gen_cfg, f.name)), _norm(getattr(theirs, f.name))
        if ours != want:
            errors.append((f.name, f"the pretrained generator at {path} has {want}, the config says {ours}"))
    return errors


def load_generator(family: str, gen_cfg, path: str, subfolder: str | None = None,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our generator with the weights of a diffusers directory (strict keys), its shape checked
    against the config first. `dtype` other than float32: the weights are streamed into a model
    of that dtype (no float32 copy of a 20B model in host memory)."""
    from .adapters.common import iter_diffusers_tensors, load_into
    from .registry import build_generator

    local = resolve(path, subfolder)
    errors = path_errors(family, gen_cfg, local)
    if errors:
        raise ValueError("; ".join(f"model.generator.{k}: {m}" for k, m in errors))
    adapter = _adapter(family)
    if dtype == torch.float32:
        overrides = {k: getattr(gen_cfg, k) for k in RUNTIME_FIELDS if hasattr(gen_cfg, k)}
        return adapter.load_diffusers(local, **overrides)
    with torch.device("meta"):  # the adapter's load_diffusers, with the model built in `dtype`
        model = build_generator(family, gen_cfg)
    model = model.to_empty(device="cpu").to(dtype)
    load_into(model, adapter.key_maps(gen_cfg), iter_diffusers_tensors(local), source=local)
    return model
