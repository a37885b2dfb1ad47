"""FluxMMDiT <-> diffusers FluxTransformer2DModel (weights and config)."""

from __future__ import annotations

import os

import torch

from ..flux_mmdit import FluxConfig, FluxMMDiT
from .common import KeyMap, read_diffusers_config, SizedKeyMap, expand, convert_to_theirs, iter_diffusers_tensors, load_into, save_diffusers_dir

DIFFUSERS_CLASS = "FluxTransformer2DModel"


def key_maps(cfg: FluxConfig) -> list[KeyMap]:
    dim = cfg.hidden_size
    mlp = int(dim * cfg.mlp_ratio)
    maps = [
        KeyMap("x_embedder", ("x_embedder",)),
        KeyMap("context_embedder", ("context_embedder",)),
        KeyMap("time_embedder.linear_1", ("time_text_embed.timestep_embedder.linear_1",)),
        KeyMap("time_embedder.linear_2", ("time_text_embed.timestep_embedder.linear_2",)),
        KeyMap("pooled_embedder.linear_1", ("time_text_embed.text_embedder.linear_1",)),
        KeyMap("pooled_embedder.linear_2", ("time_text_embed.text_embedder.linear_2",)),
        KeyMap("norm_out_mod", ("norm_out.linear",)),
        KeyMap("proj_out", ("proj_out",)),
    ]
    if cfg.guidance_embeds:
        maps += [KeyMap("guidance_embedder.linear_1", ("time_text_embed.guidance_embedder.linear_1",)),
                 KeyMap("guidance_embedder.linear_2", ("time_text_embed.guidance_embedder.linear_2",))]
    norms = []
    for i in range(cfg.num_layers):
        o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        maps += [
            KeyMap(f"{o}.img_mod", (f"{t}.norm1.linear",)),
            KeyMap(f"{o}.txt_mod", (f"{t}.norm1_context.linear",)),
            KeyMap(f"{o}.img_qkv", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")),
            KeyMap(f"{o}.txt_qkv", (f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")),
            KeyMap(f"{o}.img_out", (f"{t}.attn.to_out.0",)),
            KeyMap(f"{o}.txt_out", (f"{t}.attn.to_add_out",)),
            KeyMap(f"{o}.img_mlp.fc1", (f"{t}.ff.net.0.proj",)),
            KeyMap(f"{o}.img_mlp.fc2", (f"{t}.ff.net.2",)),
            KeyMap(f"{o}.txt_mlp.fc1", (f"{t}.ff_context.net.0.proj",)),
            KeyMap(f"{o}.txt_mlp.fc2", (f"{t}.ff_context.net.2",)),
        ]
        norms += [
            KeyMap(f"{o}.img_norm_q", (f"{t}.attn.norm_q",)), KeyMap(f"{o}.img_norm_k", (f"{t}.attn.norm_k",)),
            KeyMap(f"{o}.txt_norm_q", (f"{t}.attn.norm_added_q",)), KeyMap(f"{o}.txt_norm_k", (f"{t}.attn.norm_added_k",)),
        ]
    maps = expand(maps)
    for i in range(cfg.num_single_layers):
        o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        maps += expand([KeyMap(f"{o}.mod", (f"{t}.norm.linear",)), KeyMap(f"{o}.linear2", (f"{t}.proj_out",))])
        pieces = (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp")
        for p in ("weight", "bias"):
            maps.append(SizedKeyMap(f"{o}.linear1.{p}", tuple(f"{x}.{p}" for x in pieces), 0, (dim, dim, dim, mlp)))
        norms += [KeyMap(f"{o}.norm_q", (f"{t}.attn.norm_q",)), KeyMap(f"{o}.norm_k", (f"{t}.attn.norm_k",))]
    return maps + expand(norms, ("weight",))


def config_from_diffusers(d: dict, **overrides) -> FluxConfig:
    if d.get("patch_size", 1) != 1:
        raise ValueError(f"FLUX adapter expects patch_size 1 (2x2 packing happens outside the model), got {d['patch_size']}")
    cfg = FluxConfig(
        in_channels=d.get("in_channels", 64), out_channels=d.get("out_channels"),
        num_layers=d.get("num_layers", 19), num_single_layers=d.get("num_single_layers", 38),
        num_heads=d.get("num_attention_heads", 24), head_dim=d.get("attention_head_dim", 128),
        context_dim=d.get("joint_attention_dim", 4096), pooled_dim=d.get("pooled_projection_dim", 768),
        guidance_embeds=d.get("guidance_embeds", False), axes_dims_rope=tuple(d.get("axes_dims_rope", (16, 56, 56))),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def config_to_diffusers(cfg: FluxConfig) -> dict:
    if cfg.mlp_ratio != 4.0 or cfg.rope_theta != 10000.0:
        raise ValueError("diffusers' FluxTransformer2DModel fixes mlp_ratio=4 and rope theta=10000")
    return {
        "_class_name": DIFFUSERS_CLASS, "patch_size": 1, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.num_layers, "num_single_layers": cfg.num_single_layers,
        "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim, "pooled_projection_dim": cfg.pooled_dim,
        "guidance_embeds": cfg.guidance_embeds, "axes_dims_rope": list(cfg.axes_dims_rope),
    }


def load_diffusers(path: str | os.PathLike, **config_overrides) -> FluxMMDiT:
    """Build our model from a diffusers FluxTransformer2DModel directory (streamed shard by shard)."""
    d = read_diffusers_config(path, DIFFUSERS_CLASS)
    cfg = config_from_diffusers(d, **config_overrides)
    with torch.device("meta"):
        model = FluxMMDiT(cfg)
    model = model.to_empty(device="cpu")
    load_into(model, key_maps(cfg), iter_diffusers_tensors(path), source=str(path))
    return model


def save_diffusers(model: FluxMMDiT, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, dtype=None):
    save_diffusers_dir(path, convert_to_theirs(model.state_dict(), key_maps(model.cfg)),
                       config_to_diffusers(model.cfg), max_shard_bytes, dtype)
