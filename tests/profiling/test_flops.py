"""Analytic FLOPs (profiling/flops.py) against torch's FlopCounterMode.

Every generator family on two configs (a tiny one and a mid-size one whose attention is a
large share of the work), with conditions that do and do not need a gradient; the SDPA
path (CPU fused kernel counted with torch's own flash-kernel formula: backward 2.5x) and
the explicit `math` backend (plain matmuls: backward 2x). Then the whole IOMM step of
configs/tiny.yaml (pixel VAE and the tiny conv VAE), where the frozen MLLM's input-gradient
backward, the ViT, the RQA and the projection all enter.
"""

from __future__ import annotations

import pytest
import torch

from iomm_scale.models.flux_mmdit import FluxConfig
from iomm_scale.models.qwen_mmdit import QwenMMDiTConfig
from iomm_scale.models.registry import build_generator
from iomm_scale.models.s3dit import S3DiTConfig
from iomm_scale.profiling import flops as F

TOL = 0.05

GEN_CONFIGS = {
    "flux-tiny": ("flux", FluxConfig(in_channels=64, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16,
                                     context_dim=32, pooled_dim=32, axes_dims_rope=(4, 6, 6)), 8, 8),
    "flux-mid": ("flux", FluxConfig(in_channels=64, num_layers=2, num_single_layers=2, num_heads=4, head_dim=32,
                                    context_dim=48, pooled_dim=48, axes_dims_rope=(8, 12, 12)), 32, 24),
    "s3dit-tiny": ("s3dit", S3DiTConfig(in_channels=16, num_layers=2, num_refiner_layers=1, num_heads=2, head_dim=16,
                                        context_dim=32, axes_dims=(4, 6, 6), axes_lens=(256, 64, 64)), 8, 8),
    # 20 condition tokens -> padded to 32; 256 image tokens (a multiple of 32)
    "s3dit-mid": ("s3dit", S3DiTConfig(in_channels=16, num_layers=2, num_refiner_layers=1, num_heads=4, head_dim=32,
                                       context_dim=48, axes_dims=(8, 12, 12), axes_lens=(256, 64, 64)), 32, 20),
    "qwen-tiny": ("qwen_mmdit", QwenMMDiTConfig(in_channels=64, out_channels=16, num_layers=1, num_heads=2,
                                                head_dim=16, context_dim=32, axes_dims_rope=(4, 6, 6)), 8, 8),
    "qwen-mid": ("qwen_mmdit", QwenMMDiTConfig(in_channels=64, out_channels=16, num_layers=2, num_heads=4,
                                               head_dim=32, context_dim=48, axes_dims_rope=(8, 12, 12)), 32, 24),
}


def _counted(fn):
    with F.flop_counter() as counter:
        fn()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), counts


def _rel(a, b):
    return abs(a - b) / b


@pytest.mark.parametrize("name", sorted(GEN_CONFIGS))
@pytest.mark.parametrize("cond_grad", [False, True])
def test_generator_flops_match_flop_counter(name, cond_grad):
    family, cfg, latent, cond_len = GEN_CONFIGS[name]
    cfg.attention_backend = "sdpa"
    torch.manual_seed(0)
    gen = build_generator(family, cfg)
    b = 2
    latents = torch.randn(b, cfg.latent_channels, latent, latent)
    cond = torch.randn(b, cond_len, cfg.context_dim, requires_grad=cond_grad)
    t = torch.rand(b)

    def step():
        gen(latents, t, cond).pow(2).mean().backward()

    counted, ops = _counted(step)
    led = F.generator_flops(family, cfg, b, latent, cond_len, cond_grad=cond_grad,
                            attention_backward=F.COUNTER_ATTENTION_BACKWARD)
    attn = sum(v for k, v in ops.items() if "scaled_dot_product" in k)
    assert attn > 0, "the CPU attention kernel was not counted"
    assert _rel(led.attention, attn) < 1e-6, (led.attention, attn)  # the attention term, exactly
    assert _rel(led.total, counted) < TOL, (name, led.total, counted)


@pytest.mark.parametrize("name", ["flux-mid", "s3dit-mid", "qwen-mid"])
def test_generator_flops_math_backend(name):
    """The `math` backend is plain matmuls: FlopCounterMode then sees backward = 2x forward for
    attention too (the model-FLOPs convention, our default)."""
    family, cfg, latent, cond_len = GEN_CONFIGS[name]
    cfg = type(cfg)(**{**cfg.__dict__, "attention_backend": "math"})
    torch.manual_seed(0)
    gen = build_generator(family, cfg)
    latents = torch.randn(2, cfg.latent_channels, latent, latent)
    cond = torch.randn(2, cond_len, cfg.context_dim, requires_grad=True)
    counted, _ = _counted(lambda: gen(latents, torch.rand(2), cond).pow(2).mean().backward())
    led = F.generator_flops(family, cfg, 2, latent, cond_len)
    assert led.attention / led.total > 0.15  # attention matters here: a wrong term would show
    assert _rel(led.total, counted) < TOL, (name, led.total, counted)


def test_attention_share_is_large_enough_to_matter():
    for name in ("flux-mid", "s3dit-mid", "qwen-mid"):
        family, cfg, latent, cond_len = GEN_CONFIGS[name]
        led = F.generator_flops(family, cfg, 2, latent, cond_len, attention_backward=F.COUNTER_ATTENTION_BACKWARD)
        assert led.attention / led.total > 0.15, name


@pytest.mark.parametrize("name, cond_grad", [("flux-mid", False), ("flux-tiny", True), ("s3dit-mid", True),
                                             ("s3dit-tiny", False), ("qwen-tiny", True), ("qwen-mid", False)])
def test_lora_flops_match_flop_counter(name, cond_grad):
    """LoRA through peft on the block linears (F.LORA_TARGETS), every base weight frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    family, cfg, latent, cond_len = GEN_CONFIGS[name]
    cfg = type(cfg)(**{**cfg.__dict__, "attention_backend": "sdpa"})
    torch.manual_seed(0)
    gen = build_generator(family, cfg)
    gen = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=F.LORA_TARGETS[family]), gen)
    for n, p in gen.named_parameters():
        p.requires_grad_("lora_" in n)
    assert any(p.requires_grad for p in gen.parameters())
    latents = torch.randn(2, cfg.latent_channels, latent, latent)
    cond = torch.randn(2, cond_len, cfg.context_dim, requires_grad=cond_grad)
    counted, _ = _counted(lambda: gen(latents, torch.rand(2), cond).pow(2).mean().backward())
    led = F.generator_flops(family, cfg, 2, latent, cond_len, cond_grad=cond_grad, lora_rank=4,
                            attention_backward=F.COUNTER_ATTENTION_BACKWARD)
    full = F.generator_flops(family, cfg, 2, latent, cond_len, cond_grad=cond_grad,
                             attention_backward=F.COUNTER_ATTENTION_BACKWARD)
    assert led.total < full.total
    assert _rel(led.total, counted) < TOL, (name, led.total, counted)


# a tiny MLLM large enough to be a third of the step, so an error in its formula would show
BIG_TINY_MLLM = ["model.conditioner.mllm.tiny.text_hidden=128", "model.conditioner.mllm.tiny.text_intermediate=512",
                 "model.conditioner.mllm.tiny.text_layers=3", "model.conditioner.mllm.tiny.vision_hidden=64",
                 "model.conditioner.mllm.tiny.image_size=64", "model.conditioner.rqa.num_queries=32"]


def test_conditioner_components_match_flop_counter(tiny_cfg):
    """ViT + projector (no grad), the frozen LLM (forward + input-gradient backward) and the RQA
    (forward + backward, condition without grad), each on its own."""
    from iomm_scale.iomm import build_iomm

    cfg = tiny_cfg(*BIG_TINY_MLLM)
    torch.manual_seed(0)
    cond = build_iomm(cfg).conditioner
    spec = F.mllm_spec(cfg.model.conditioner.mllm)
    b, res = 2, spec.image_size
    with torch.no_grad():
        counted, _ = _counted(lambda: cond.vision_features(torch.rand(b, 3, res, res) * 2 - 1))
    assert _rel(F.vision_flops(spec, b).total, counted) < 0.01

    seq = 40
    x = torch.randn(b, seq, spec.hidden, requires_grad=True)
    counted, _ = _counted(lambda: cond.run_mllm(x, None).pow(2).mean().backward())
    led = F.llm_flops(spec, b, seq, attention_backward=F.COUNTER_ATTENTION_BACKWARD)
    assert 0.99 < led.bwd / led.fwd < 1.01  # input gradients only: no weight gradients
    assert _rel(led.total, counted) < 0.02  # (transformers' RoPE table matmul is not in the formula)

    context = torch.randn(b, seq, spec.hidden)
    counted, _ = _counted(lambda: cond.rqa(context).pow(2).mean().backward())
    led = F.rqa_flops(cfg.model.conditioner.rqa, spec.hidden, b, seq, attention_backward=F.COUNTER_ATTENTION_BACKWARD)
    assert _rel(led.total, counted) < 1e-6


@pytest.mark.parametrize("vae", ["pixel", "tiny_kl"])
def test_full_iomm_step_matches_flop_counter(tiny_cfg, vae):
    from iomm_scale.iomm import build_iomm

    over = ["model.generator.attention_backend=sdpa"] + BIG_TINY_MLLM
    if vae == "tiny_kl":
        over += ["model.vae.type=autoencoder_kl", "model.vae.random_init=true", "model.generator.in_channels=64",
                 "data.resolution=64"]
    cfg = tiny_cfg(*over)
    torch.manual_seed(0)
    model = build_iomm(cfg).train()
    b = 2
    res = cfg.data.resolution
    batch = {"pixels": torch.rand(b, 3, res, res) * 2 - 1, "captions": [None] * b, "keys": ["a", "b"]}
    counted, ops = _counted(lambda: model.loss(batch).backward())
    report = F.flops_report(cfg, batch=b, attention_backward=F.COUNTER_ATTENTION_BACKWARD)
    total = sum(v.total for v in report.values())
    assert report["mllm"].total > 0.2 * total and report["rqa"].total > 0 and report["vision_encoder"].total > 0
    if vae == "tiny_kl":
        assert report["vae_encode"].total > 0
    assert _rel(total, counted) < TOL, (F.format_report(report), counted, ops)
    # the frozen MLLM's backward is input-gradients only: about 1x its forward matmuls
    m = report["mllm"]
    assert 0.99 < m.bwd / m.fwd < 1.01


def test_training_flops_dict_and_scaling(tiny_cfg):
    cfg = tiny_cfg()
    one = F.training_flops(cfg)
    four = F.training_flops(cfg, batch=4)
    assert set(one) == {"vae_encode", "vision_encoder", "rqa", "mllm", "condition_projection", "generator", "total"}
    assert abs(four["total"] / one["total"] - 4) < 1e-9
    big = F.training_flops(cfg, resolution=64)
    assert big["generator"] > 2 * one["generator"]  # 4x image tokens (the 16 condition tokens stay)
    assert big["mllm"] == one["mllm"]  # one 448 px (here: tiny) tile whatever the resolution


def test_known_mllm_specs_match_meta_builds():
    """The dims written out for offline use describe the real transformers models."""
    from iomm_scale.profiling.params import KNOWN_MLLMS

    specs = F.known_mllms()
    s = specs["OpenGVLab/InternVL3-2B-hf"]
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.image_tokens) == (1536, 28, 12, 2, 256)
    assert KNOWN_MLLMS["OpenGVLab/InternVL3-2B-hf"]["image_seq_length"] == s.image_tokens
    q = specs["Qwen/Qwen2.5-VL-7B-Instruct"]
    assert (q.hidden, q.layers, q.image_tokens) == (3584, 28, 256)
