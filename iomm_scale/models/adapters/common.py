"""Machinery shared by the per-family diffusers adapters.

A family adapter is a list of `KeyMap(ours, theirs)`: one of our tensors is the
concatenation along dim 0 (the order given) of one or more diffusers tensors. That covers
renames (one key) and fused projections (q|k|v, or FLUX's q|k|v|mlp_in). Row-parallel
fusions along dim 1 are given with `dim=1`.

Loading streams a diffusers directory shard by shard and copies each finished tensor
into the model at once; a fused tensor waits only for its own pieces. So at most one
shard plus a few pending pieces are in memory beside the model: never two full copies.
Saving writes shards of bounded size the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class AdapterError(ValueError):
    pass


@dataclass(frozen=True)
class KeyMap:
    ours: str
    theirs: tuple[str, ...]
    dim: int = 0


def expand(maps: Iterable[KeyMap], params: Iterable[str] = ("weight", "bias")) -> list[KeyMap]:
    """KeyMaps given for module prefixes -> one KeyMap per parameter suffix."""
    out = []
    for m in maps:
        for p in params:
            out.append(KeyMap(f"{m.ours}.{p}", tuple(f"{t}.{p}" for t in m.theirs), m.dim))
    return out


def read_diffusers_config(path: str | os.PathLike, expected_class: str) -> dict:
    """config.json of a diffusers model directory, checked to be of the expected class."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise AdapterError(f"{path}: not a diffusers model directory (no config.json)")
    config = json.loads(file.read_text())
    found = config.get("_class_name")
    if found is not None and found != expected_class:
        raise AdapterError(f"{path}: holds a {found}, expected a {expected_class}")
    return config


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / WEIGHTS_NAME
    if single.exists():
        return [single]
    raise AdapterError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def iter_diffusers_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a diffusers weights folder once. With a shard index, a key the weight_map
    places in another shard (a stale shard left from an earlier save), or a key in two shards, is
    an error, not a silent last-shard-wins; keys the index does not list are yielded (the caller
    names them as unexpected)."""
    path = Path(path)
    index = path / INDEX_NAME
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    seen: dict[str, str] = {}
    for file in _shard_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in seen:
                    raise AdapterError(f"{path}: {key} is in both {seen[key]} and {file.name}")
                if weight_map is not None and weight_map.get(key, file.name) != file.name:
                    raise AdapterError(f"{path}: {key} is in {file.name}, but {INDEX_NAME} maps it to "
                                       f"{weight_map[key]} (a stale shard?)")
                seen[key] = file.name
                yield key, f.get_tensor(key)


def load_into(model: torch.nn.Module, maps: list[KeyMap], tensors: Iterable[tuple[str, torch.Tensor]], source: str = "checkpoint"):
    """Copy mapped tensors into `model` (strict: every model tensor is filled, no source key is unused)."""
    ours = dict(model.state_dict(keep_vars=True))
    by_their_key = {t: m for m in maps for t in m.theirs}
    wanted = {m.ours for m in maps}
    missing_model_keys = sorted(set(ours) - wanted)
    if missing_model_keys:
        raise AdapterError(f"adapter does not cover model keys: {missing_model_keys[:8]}")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    filled, unexpected = set(), []
    for key, tensor in tensors:
        m = by_their_key.get(key)
        if m is None:
            unexpected.append(key)
            continue
        parts = pending.setdefault(m.ours, {})
        parts[key] = tensor
        if len(parts) == len(m.theirs):
            full = torch.cat([parts[t] for t in m.theirs], dim=m.dim) if len(m.theirs) > 1 else parts[m.theirs[0]]
            target = ours[m.ours]
            if tuple(full.shape) != tuple(target.shape):
                raise AdapterError(f"{source}: {m.theirs} -> {m.ours}: shape {tuple(full.shape)} != model {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(full)
            filled.add(m.ours)
            del pending[m.ours]
    missing = sorted(wanted - filled)
    if unexpected or missing:
        # of a fused tensor (q | k | v) name only the pieces that did not come
        absent = [k for m in maps if m.ours in missing for k in m.theirs if k not in pending.get(m.ours, {})]
        raise AdapterError(f"{source}: unexpected keys {unexpected[:8]}; missing keys {absent[:8]}")


def convert_to_theirs(state_dict: dict[str, torch.Tensor], maps: list[KeyMap]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (diffusers key, tensor) pairs, splitting fused tensors."""
    covered = {m.ours for m in maps}
    extra = sorted(set(state_dict) - covered)
    if extra:
        raise AdapterError(f"adapter does not cover model keys: {extra[:8]}")
    for m in maps:
        tensor = state_dict[m.ours]
        if len(m.theirs) == 1:
            yield m.theirs[0], tensor
            continue
        sizes = _fused_sizes(m, tensor)
        for key, piece in zip(m.theirs, torch.split(tensor, sizes, dim=m.dim)):
            yield key, piece


def _fused_sizes(m: KeyMap, tensor: torch.Tensor) -> list[int]:
    sizes = getattr(m, "_sizes", None)
    if sizes:
        return sizes
    n = len(m.theirs)
    if tensor.shape[m.dim] % n:
        raise AdapterError(f"{m.ours}: cannot split {tensor.shape[m.dim]} evenly into {n}")
    return [tensor.shape[m.dim] // n] * n


@dataclass(frozen=True)
class SizedKeyMap(KeyMap):
    """A fused KeyMap whose pieces are not equal (FLUX single block: q|k|v|mlp_in)."""

    sizes: tuple[int, ...] = ()

    @property
    def _sizes(self):
        return list(self.sizes)


def save_diffusers_dir(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], config: dict,
                       max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None):
    """Write config.json and the weights (one file, or shards + index when over max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    current, size = {}, 0
    files = []

    def flush():
        nonlocal current, size
        if current:
            name = f"_shard_{len(files)}.tmp"
            save_file(current, str(path / name), metadata={"format": "pt"})
            files.append((name, list(current)))
            current, size = {}, 0

    for key, tensor in tensors:
        t = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
        t = t.contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[key] = t
        size += nbytes
    flush()
    for stale in list(path.glob("diffusion_pytorch_model*.safetensors")) + [path / INDEX_NAME]:
        if stale.exists():
            stale.unlink()
    if len(files) == 1:
        os.replace(path / files[0][0], path / WEIGHTS_NAME)
        return
    weight_map, total = {}, 0
    for i, (tmp, keys) in enumerate(files):
        final = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(path / tmp, path / final)
        for k in keys:
            weight_map[k] = final
        total += (path / final).stat().st_size
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
