"""QwenMMDiT <-> diffusers QwenImageTransformer2DModel (weights and config)."""

from __future__ import annotations

import os

import torch

from ..qwen_mmdit import QwenMMDiT, QwenMMDiTConfig
from .common import KeyMap, convert_to_theirs, expand, iter_diffusers_tensors, load_into, read_diffusers_config, save_diffusers_dir

DIFFUSERS_CLASS = "QwenImageTransformer2DModel"


def key_maps(cfg: QwenMMDiTConfig) -> list[KeyMap]:
    maps = [
        KeyMap("img_in", ("img_in",)),
        KeyMap("txt_in", ("txt_in",)),
        KeyMap("time_embedder.linear_1", ("time_text_embed.timestep_embedder.linear_1",)),
        KeyMap("time_embedder.linear_2", ("time_text_embed.timestep_embedder.linear_2",)),
        KeyMap("norm_out_mod", ("norm_out.linear",)),
        KeyMap("proj_out", ("proj_out",)),
    ]
    norms = [KeyMap("txt_norm", ("txt_norm",))]
    for i in range(cfg.num_layers):
        o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        maps += [
            KeyMap(f"{o}.img_mod", (f"{t}.img_mod.1",)),
            KeyMap(f"{o}.txt_mod", (f"{t}.txt_mod.1",)),
            KeyMap(f"{o}.img_qkv", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")),
            KeyMap(f"{o}.txt_qkv", (f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")),
            KeyMap(f"{o}.img_out", (f"{t}.attn.to_out.0",)),
            KeyMap(f"{o}.txt_out", (f"{t}.attn.to_add_out",)),
            KeyMap(f"{o}.img_mlp.fc1", (f"{t}.img_mlp.net.0.proj",)),
            KeyMap(f"{o}.img_mlp.fc2", (f"{t}.img_mlp.net.2",)),
            KeyMap(f"{o}.txt_mlp.fc1", (f"{t}.txt_mlp.net.0.proj",)),
            KeyMap(f"{o}.txt_mlp.fc2", (f"{t}.txt_mlp.net.2",)),
        ]
        norms += [
            KeyMap(f"{o}.img_norm_q", (f"{t}.attn.norm_q",)), KeyMap(f"{o}.img_norm_k", (f"{t}.attn.norm_k",)),
            KeyMap(f"{o}.txt_norm_q", (f"{t}.attn.norm_added_q",)), KeyMap(f"{o}.txt_norm_k", (f"{t}.attn.norm_added_k",)),
        ]
    return expand(maps) + expand(norms, ("weight",))


_UNSUPPORTED = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


def config_from_diffusers(d: dict, **overrides) -> QwenMMDiTConfig:
    on = [k for k in _UNSUPPORTED if d.get(k)]
    if on:
        raise ValueError(f"QwenMMDiT implements the base Qwen-Image model only; these options are set: {on}")
    cfg = QwenMMDiTConfig(
        in_channels=d.get("in_channels", 64), out_channels=d.get("out_channels", 16), patch_size=d.get("patch_size", 2),
        num_layers=d.get("num_layers", 60), num_heads=d.get("num_attention_heads", 24),
        head_dim=d.get("attention_head_dim", 128), context_dim=d.get("joint_attention_dim", 3584),
        axes_dims_rope=tuple(d.get("axes_dims_rope", (16, 56, 56))),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def config_to_diffusers(cfg: QwenMMDiTConfig) -> dict:
    if cfg.mlp_ratio != 4.0 or cfg.rope_theta != 10000.0:
        raise ValueError("diffusers' QwenImageTransformer2DModel fixes mlp_ratio=4 and rope theta=10000")
    return {
        "_class_name": DIFFUSERS_CLASS, "patch_size": cfg.patch_size, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.num_layers, "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.context_dim, "guidance_embeds": False,
        "axes_dims_rope": list(cfg.axes_dims_rope), "zero_cond_t": False, "use_additional_t_cond": False,
        "use_layer3d_rope": False,
    }


def load_diffusers(path: str | os.PathLike, **config_overrides) -> QwenMMDiT:
    """Build our model from a diffusers QwenImageTransformer2DModel directory (streamed shard by shard)."""
    cfg = config_from_diffusers(read_diffusers_config(path, DIFFUSERS_CLASS), **config_overrides)
    with torch.device("meta"):
        model = QwenMMDiT(cfg)
    model = model.to_empty(device="cpu")
    load_into(model, key_maps(cfg), iter_diffusers_tensors(path), source=str(path))
    return model


def save_diffusers(model: QwenMMDiT, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, dtype=None):
    save_diffusers_dir(path, convert_to_theirs(model.state_dict(), key_maps(model.cfg)),
                       config_to_diffusers(model.cfg), max_shard_bytes, dtype)
