"""Exact parameter counts of a run config, built on the meta device (no memory, no download).

The frozen MLLM is built from its config: a local path's config.json when it exists, else
the reference configuration of the known hub ids below (written out from the published
configs, so counting works offline).
"""

from __future__ import annotations

import os

import torch

# InternVL3-2B (transformers "-hf" layout): InternViT-300M + Qwen2.5-1.5B.
KNOWN_MLLMS = {
    "OpenGVLab/InternVL3-2B-hf": dict(
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           image_size=[448, 448], patch_size=[14, 14], use_qk_norm=False, layer_scale_init_value=0.1),
        text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True),
        image_token_id=151667, image_seq_length=256, downsample_ratio=0.5,
    ),
    # Qwen2.5-VL-7B-Instruct (Qwen-Image's text encoder): 32-layer ViT (1280 wide) + Qwen2.5-7B.
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    ),
}


def _mllm_on_meta(mcfg):
    from transformers import AutoConfig, AutoModelForImageTextToText, InternVLConfig, InternVLForConditionalGeneration

    if mcfg.random_init:
        from ..models.tiny_mllm import build_tiny_mllm

        return build_tiny_mllm(mcfg.kind, mcfg.tiny)[0]
    path = os.path.expanduser(mcfg.path)
    if os.path.isdir(path):
        config = AutoConfig.from_pretrained(path)
    elif mcfg.path in KNOWN_MLLMS and mcfg.kind == "internvl":
        config = InternVLConfig(**KNOWN_MLLMS[mcfg.path])
    elif mcfg.path in KNOWN_MLLMS and mcfg.kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        config = Qwen2_5_VLConfig(**KNOWN_MLLMS[mcfg.path])
    else:
        raise ValueError(f"cannot count the MLLM {mcfg.path!r}: not a local directory and not one of {sorted(KNOWN_MLLMS)}")
    with torch.device("meta"):
        if mcfg.kind == "internvl":
            return InternVLForConditionalGeneration(config)
        return AutoModelForImageTextToText.from_config(config)


def count_config(cfg) -> dict[str, int]:
    from ..models.layers import RMSNorm, linear
    from ..models.registry import build_generator
    from ..models.rqa import ResidualQueryAdapter

    gen_cfg = cfg.model.generator.config
    mllm = _mllm_on_meta(cfg.model.conditioner.mllm)
    hidden = mllm.config.text_config.hidden_size
    with torch.device("meta"):
        generator = build_generator(cfg.model.generator.family, gen_cfg)
        rqa = ResidualQueryAdapter(hidden, cfg.model.conditioner.rqa)
        projection = [RMSNorm(hidden), linear(hidden, gen_cfg.context_dim)]  # as IOMMConditioner builds it
        lora = getattr(cfg.model, "lora", None)
        if lora is not None:  # as build_iomm applies it: base frozen, adapters train
            from ..models.lora import apply_lora

            generator = apply_lora(generator, lora, cfg.model.generator.family)

    def n(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    def base(m):  # without LoRA factors
        return sum(p.numel() for k, p in m.named_parameters() if ".lora_" not in k)

    counts = {f"generator.{name}": base(child) for name, child in generator.named_children() if base(child)}
    counts["generator (total)"] = base(generator)
    counts["rqa"] = n(rqa)
    counts["condition projection"] = n(*projection)
    trained_gen = counts["generator (total)"]
    if lora is not None:
        trained_gen = counts["generator LoRA (r={})".format(lora.r)] = n(generator) - base(generator)
    counts["trainable (total)"] = trained_gen + counts["rqa"] + counts["condition projection"]
    counts["mllm (frozen)"] = n(mllm)
    return counts


def format_counts(cfg, counts: dict[str, int]) -> str:
    lines = [f"{cfg.source}: family {cfg.model.generator.family}"]
    for k, v in counts.items():
        lines.append(f"  {k:<40s} {v:>16,d}  ({v / 1e9:.3f} B)")
    return "\n".join(lines)
