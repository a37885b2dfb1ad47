"""S3DiT <-> diffusers ZImageTransformer2DModel (weights and config)."""

from __future__ import annotations

import os

import torch

from ..s3dit import S3DiT, S3DiTConfig
from .common import KeyMap, convert_to_theirs, expand, iter_diffusers_tensors, load_into, read_diffusers_config, save_diffusers_dir

DIFFUSERS_CLASS = "ZImageTransformer2DModel"


def _block_maps(o: str, t: str, cfg: S3DiTConfig, modulation: bool) -> list[KeyMap]:
    a = f"{t}.attention"
    maps = [
        KeyMap(f"{o}.qkv.weight", (f"{a}.to_q.weight", f"{a}.to_k.weight", f"{a}.to_v.weight")),
        KeyMap(f"{o}.out.weight", (f"{a}.to_out.0.weight",)),
        # SwiGLU: silu(w1 x) * w3 x, fused as w1 | w3
        KeyMap(f"{o}.w13.weight", (f"{t}.feed_forward.w1.weight", f"{t}.feed_forward.w3.weight")),
        KeyMap(f"{o}.w2.weight", (f"{t}.feed_forward.w2.weight",)),
    ]
    maps += [KeyMap(f"{o}.{n}.weight", (f"{t}.{n}.weight",))
             for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")]
    if cfg.qk_norm:
        maps += [KeyMap(f"{o}.norm_q.weight", (f"{a}.norm_q.weight",)), KeyMap(f"{o}.norm_k.weight", (f"{a}.norm_k.weight",))]
    if modulation:
        maps += expand([KeyMap(f"{o}.mod", (f"{t}.adaLN_modulation.0",))])
    return maps


def key_maps(cfg: S3DiTConfig) -> list[KeyMap]:
    patch = f"{cfg.patch_size}-{cfg.f_patch_size}"
    maps = expand([
        KeyMap("x_embedder", (f"all_x_embedder.{patch}",)),
        KeyMap("proj_out", (f"all_final_layer.{patch}.linear",)),
        KeyMap("norm_out_mod", (f"all_final_layer.{patch}.adaLN_modulation.1",)),
        KeyMap("t_embedder.linear_1", ("t_embedder.mlp.0",)),
        KeyMap("t_embedder.linear_2", ("t_embedder.mlp.2",)),
        KeyMap("cap_embedder", ("cap_embedder.1",)),
    ])
    maps += [KeyMap("cap_norm.weight", ("cap_embedder.0.weight",)),
             KeyMap("x_pad_token", ("x_pad_token",)), KeyMap("cap_pad_token", ("cap_pad_token",))]
    for i in range(cfg.num_refiner_layers):
        maps += _block_maps(f"noise_refiner.{i}", f"noise_refiner.{i}", cfg, modulation=True)
        maps += _block_maps(f"context_refiner.{i}", f"context_refiner.{i}", cfg, modulation=False)
    for i in range(cfg.num_layers):
        maps += _block_maps(f"layers.{i}", f"layers.{i}", cfg, modulation=True)
    return maps


def config_from_diffusers(d: dict, **overrides) -> S3DiTConfig:
    patches, f_patches = list(d.get("all_patch_size", (2,))), list(d.get("all_f_patch_size", (1,)))
    if len(patches) != 1 or len(f_patches) != 1:
        raise ValueError(f"S3DiT supports one patch size, got all_patch_size={patches}, all_f_patch_size={f_patches}")
    if d.get("siglip_feat_dim") is not None:
        raise ValueError("S3DiT does not implement Z-Image-Omni's SigLIP branch (siglip_feat_dim must be null)")
    dim, heads = d.get("dim", 3840), d.get("n_heads", 30)
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by n_heads={heads}")
    # n_kv_heads is ignored, as diffusers ignores it (its attention is plain multi-head).
    cfg = S3DiTConfig(
        in_channels=d.get("in_channels", 16), patch_size=patches[0], f_patch_size=f_patches[0],
        num_layers=d.get("n_layers", 30), num_refiner_layers=d.get("n_refiner_layers", 2),
        num_heads=heads, head_dim=dim // heads, context_dim=d.get("cap_feat_dim", 2560),
        norm_eps=d.get("norm_eps", 1e-5), qk_norm=d.get("qk_norm", True), rope_theta=d.get("rope_theta", 256.0),
        axes_dims=tuple(d.get("axes_dims", (32, 48, 48))), axes_lens=tuple(d.get("axes_lens", (1024, 512, 512))),
        t_scale=d.get("t_scale", 1000.0),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def config_to_diffusers(cfg: S3DiTConfig) -> dict:
    return {
        "_class_name": DIFFUSERS_CLASS, "all_patch_size": [cfg.patch_size], "all_f_patch_size": [cfg.f_patch_size],
        "in_channels": cfg.in_channels, "dim": cfg.hidden_size, "n_layers": cfg.num_layers,
        "n_refiner_layers": cfg.num_refiner_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_heads,
        "norm_eps": cfg.norm_eps, "qk_norm": cfg.qk_norm, "cap_feat_dim": cfg.context_dim, "siglip_feat_dim": None,
        "rope_theta": cfg.rope_theta, "t_scale": cfg.t_scale, "axes_dims": list(cfg.axes_dims),
        "axes_lens": list(cfg.axes_lens),
    }


def load_diffusers(path: str | os.PathLike, **config_overrides) -> S3DiT:
    """Build our model from a diffusers ZImageTransformer2DModel directory (streamed shard by shard)."""
    cfg = config_from_diffusers(read_diffusers_config(path, DIFFUSERS_CLASS), **config_overrides)
    with torch.device("meta"):
        model = S3DiT(cfg)
    model = model.to_empty(device="cpu")
    load_into(model, key_maps(cfg), iter_diffusers_tensors(path), source=str(path))
    return model


def save_diffusers(model: S3DiT, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, dtype=None):
    save_diffusers_dir(path, convert_to_theirs(model.state_dict(), key_maps(model.cfg)),
                       config_to_diffusers(model.cfg), max_shard_bytes, dtype)
