"""Analytic training FLOPs of one IOMM step, per component, for every generator family.

    from iomm_scale.profiling.flops import training_flops
    training_flops(cfg)                 # {component: FLOPs per sample at data.resolution}
    training_flops(cfg, resolution=1024, batch=4)

Counting conventions (those of `torch.utils.flop_counter.FlopCounterMode`, so the formulas
are checked against it in tests/profiling):

- a matmul [M, K] x [K, N] costs 2 M K N; biases, norms, activations, RoPE, softmax and
  the loss are not counted (they are memory-bound and small);
- backward of a linear layer = weight gradient (2 M K N, when the weight trains) + input
  gradient (2 M K N, when the input needs a gradient). So a trainable layer deep in the
  network costs 3x its forward, the first layer of the DiT (its input, x_t, needs no
  gradient) 2x, and a *frozen* layer that gradients flow through (the MLLM) 2x;
- attention of S_q queries over S_k keys, H heads of width d: forward 4 B H S_q S_k d
  (QK^T and PV), always the full S_q x S_k even under a causal or padding mask (the
  frozen LLM is causal: a flash kernel skips about half of that work; we still count it
  in full, as FlopCounterMode does). Backward: `attention_backward` x the forward, 2.0 by
  default (the 4 matmuls of dQ, dK, dV, dP: the usual *model FLOPs* convention, what MFU
  is reported in) or 2.5 = `COUNTER_ATTENTION_BACKWARD` (FlopCounterMode's count for the
  fused flash / memory-efficient kernels, which recompute QK^T in backward).
- activation-checkpointing recompute is not counted (model FLOPs, not hardware FLOPs).

Components of one training step (per `batch` samples):

    vae_encode            the frozen VAE encoder (no grad). The conv VAE is counted with
                          FlopCounterMode on the meta device, once per shape (cached);
                          the pixel VAE costs nothing; 0 with precomputed features
    vision_encoder        the frozen ViT + projector (no grad, one tile); 0 with
                          precomputed features
    rqa                   the Residual Query Adapter, forward + backward (weights train)
    mllm                  the frozen LLM over [c | RQA(c)], forward + the backward that
                          carries the gradient to the RQA (input gradients only)
    condition_projection  RMSNorm + Linear to the generator's condition width (fwd + bwd)
    generator             the DiT forward + backward (the family formula below)

The optimizer step (AdamW / Muon Newton-Schulz) is not counted.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace

import torch

MODEL_ATTENTION_BACKWARD = 2.0
COUNTER_ATTENTION_BACKWARD = 2.5  # torch FlopCounterMode's sdpa_backward_flop_count (recomputes QK^T)
SEQ_MULTIPLE_S3DIT = 32


# ------------------------------------------------------------------------------------------
# the ledger: matmul and attention FLOPs, forward and backward, kept apart
# ------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    attention_backward: float = MODEL_ATTENTION_BACKWARD
    lora_rank: int | None = None  # LoRA on the "block" linears: base weights frozen, adapters train
    fwd: float = 0.0
    bwd: float = 0.0
    attn_fwd: float = 0.0
    attn_bwd: float = 0.0

    @property
    def forward(self) -> float:
        return self.fwd + self.attn_fwd

    @property
    def backward(self) -> float:
        return self.bwd + self.attn_bwd

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def attention(self) -> float:
        return self.attn_fwd + self.attn_bwd

    def linear(self, tokens: float, k: int, n: int, *, w_grad: bool = True, x_grad: bool = True,
               grad: bool = True, lora: bool = False) -> None:
        """tokens x [k -> n]. `grad`: is a backward run through this layer at all.
        `lora`: this layer gets a LoRA adapter when the ledger has a lora_rank."""
        f = 2.0 * tokens * k * n
        self.fwd += f
        if lora and self.lora_rank:
            r = self.lora_rank
            w_grad = False  # the base weight is frozen
            self.fwd += 2.0 * tokens * r * (k + n)  # A: k -> r, B: r -> n
            if grad:  # A: weight grad (+ input grad if x needs it); B: weight and input grads
                self.bwd += 2.0 * tokens * k * r * (1 + x_grad) + 2.0 * tokens * r * n * 2
        if grad:
            self.bwd += f * (int(w_grad) + int(x_grad))

    def attend(self, batch: int, heads: int, sq: int, sk: int, head_dim: int, *, grad: bool = True) -> None:
        f = 4.0 * batch * heads * sq * sk * head_dim
        self.attn_fwd += f
        if grad:
            self.attn_bwd += self.attention_backward * f

    def __add__(self, other: "Ledger") -> "Ledger":
        return replace(self, fwd=self.fwd + other.fwd, bwd=self.bwd + other.bwd, attn_fwd=self.attn_fwd + other.attn_fwd,
                       attn_bwd=self.attn_bwd + other.attn_bwd)


def _ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _hw(latent_hw) -> tuple[int, int]:
    if isinstance(latent_hw, int):
        return latent_hw, latent_hw
    return int(latent_hw[0]), int(latent_hw[1])


# ------------------------------------------------------------------------------------------
# generator families: forward + backward of one call generator(x_t [B, C, h, w], t, cond [B, L, ctx])
# ------------------------------------------------------------------------------------------
# Which linears get a LoRA adapter (all transformer-block linears except the AdaLN
# modulation), as regexes over module names; the memory planner and the peft check in
# tests/profiling use the same lists.
LORA_TARGETS = {
    "flux": r"(double_blocks|single_blocks)\.\d+\.(img_qkv|txt_qkv|img_out|txt_out|img_mlp\.fc1|img_mlp\.fc2|"
            r"txt_mlp\.fc1|txt_mlp\.fc2|linear1|linear2)",
    "qwen_mmdit": r"double_blocks\.\d+\.(img_qkv|txt_qkv|img_out|txt_out|img_mlp\.fc1|img_mlp\.fc2|txt_mlp\.fc1|"
                  r"txt_mlp\.fc2)",
    "s3dit": r"(noise_refiner|context_refiner|layers)\.\d+\.(qkv|out|w13|w2)",
}


class _Grad:
    """Which tensors need a gradient, as autograd will decide it. Full training: every
    weight trains, so everything downstream of a weight needs grad. LoRA: base weights are
    frozen, so a stream needs grad only once an adapter (or a condition that needs grad) has
    entered it; layers none of whose inputs need grad get no backward at all."""

    def __init__(self, train: bool, lora: bool):
        self.train, self.lora = train, lora
        self.w = train and not lora  # base weights train

    def after_weight(self, x_grad: bool) -> bool:
        """Does the output of a base linear need grad?"""
        return self.train and (self.w or x_grad)


def _double_block(led: Ledger, gr: _Grad, b, n, L, d, mlp, heads, hd, img_g: bool, txt_g: bool, temb_g: bool,
                  last: bool) -> None:
    """One double-stream block (FLUX / Qwen-Image) over n image and L condition tokens. In
    the last block of a model that ends there, the condition stream's output is discarded:
    autograd never runs the backward of its out projection and MLP."""
    t = gr.train
    mod_out = gr.after_weight(temb_g)
    qkv_out = {}
    for stream, tokens, xg in (("img", n, img_g), ("txt", L, txt_g)):
        led.linear(b, d, 6 * d, w_grad=gr.w, x_grad=temb_g, grad=t)  # *_mod
        # modulate(norm(x), shift, scale) needs grad if x or the modulation does
        xin = xg or mod_out
        led.linear(b * tokens, d, 3 * d, w_grad=gr.w, x_grad=xin, grad=t, lora=True)  # *_qkv
        qkv_out[stream] = t and (gr.w or xin or gr.lora)
    attn_g = any(qkv_out.values())
    led.attend(b, heads, n + L, n + L, hd, grad=attn_g)
    for stream, tokens, dead in (("img", n, False), ("txt", L, last)):
        g = t and not dead
        led.linear(b * tokens, d, d, w_grad=gr.w, x_grad=attn_g, grad=g, lora=True)  # *_out
        led.linear(b * tokens, d, mlp, w_grad=gr.w, x_grad=True, grad=g, lora=True)  # *_mlp.fc1
        led.linear(b * tokens, mlp, d, w_grad=gr.w, x_grad=True, grad=g, lora=True)  # *_mlp.fc2


def flux_flops(cfg, batch: int, latent_hw, cond_len: int, *, cond_grad: bool = True, train: bool = True,
               attention_backward: float = MODEL_ATTENTION_BACKWARD, lora_rank: int | None = None) -> Ledger:
    """FluxMMDiT (models/flux_mmdit.py): embedders, double-stream blocks over [cond | image]
    with per-stream weights, single-stream blocks with fused linear1 / linear2, final layer."""
    led = Ledger(attention_backward, lora_rank)
    gr = _Grad(train, bool(lora_rank))
    h, w = _hw(latent_hw)
    p = cfg.latent_patch
    n = (h // p) * (w // p)
    b, L, d = batch, cond_len, cfg.hidden_size
    s = n + L
    heads, hd = cfg.num_heads, cfg.head_dim
    mlp = int(d * cfg.mlp_ratio)
    out = cfg.out_channels or cfg.in_channels
    t, tw = train, gr.w
    cond_grad = cond_grad and train
    led.linear(b * n, cfg.in_channels, d, w_grad=tw, x_grad=False, grad=t)  # x_embedder: x_t needs no grad
    led.linear(b * L, cfg.context_dim, d, w_grad=tw, x_grad=cond_grad, grad=t)  # context_embedder
    led.linear(b, 256, d, w_grad=tw, x_grad=False, grad=t)  # time_embedder (sinusoidal input)
    led.linear(b, d, d, w_grad=tw, x_grad=tw, grad=t)
    led.linear(b, cfg.pooled_dim, d, w_grad=tw, x_grad=cond_grad, grad=t)  # pooled_embedder (mean of cond)
    led.linear(b, d, d, w_grad=tw, x_grad=gr.after_weight(cond_grad), grad=t)
    if cfg.guidance_embeds:
        led.linear(b, 256, d, w_grad=tw, x_grad=False, grad=t)
        led.linear(b, d, d, w_grad=tw, x_grad=tw, grad=t)
    temb_g = gr.after_weight(cond_grad)
    img_g, txt_g = gr.after_weight(False), gr.after_weight(cond_grad)
    for i in range(cfg.num_layers):  # double-stream
        _double_block(led, gr, b, n, L, d, mlp, heads, hd, img_g, txt_g, temb_g,
                      last=i == cfg.num_layers - 1 and not cfg.num_single_layers)
        img_g = txt_g = t  # every stream needs grad after the first block's attention output
    x_g = img_g or txt_g
    for _ in range(cfg.num_single_layers):
        led.linear(b, d, 3 * d, w_grad=tw, x_grad=temb_g, grad=t)  # mod
        led.linear(b * s, d, 3 * d + mlp, w_grad=tw, x_grad=x_g or gr.after_weight(temb_g), grad=t, lora=True)
        led.attend(b, heads, s, s, hd, grad=t)
        led.linear(b * s, d + mlp, d, w_grad=tw, x_grad=t, grad=t, lora=True)  # linear2
        x_g = t
    led.linear(b, d, 2 * d, w_grad=tw, x_grad=temb_g, grad=t)  # norm_out_mod
    led.linear(b * n, d, out, w_grad=tw, x_grad=t, grad=t)  # proj_out
    return led


def qwen_mmdit_flops(cfg, batch: int, latent_hw, cond_len: int, *, cond_grad: bool = True, train: bool = True,
                     attention_backward: float = MODEL_ATTENTION_BACKWARD, lora_rank: int | None = None) -> Ledger:
    """QwenMMDiT (models/qwen_mmdit.py): double-stream blocks only. The condition goes
    through an RMSNorm with a weight first, so txt_in's input needs grad whenever that weight
    trains (full training) or the condition needs grad."""
    led = Ledger(attention_backward, lora_rank)
    gr = _Grad(train, bool(lora_rank))
    h, w = _hw(latent_hw)
    p = cfg.patch_size
    n = (h // p) * (w // p)
    b, L, d = batch, cond_len, cfg.hidden_size
    mlp = int(d * cfg.mlp_ratio)
    t, tw = train, gr.w
    cond_grad = cond_grad and train
    led.linear(b * n, cfg.in_channels, d, w_grad=tw, x_grad=False, grad=t)  # img_in
    led.linear(b * L, cfg.context_dim, d, w_grad=tw, x_grad=tw or cond_grad, grad=t)  # txt_in after txt_norm
    led.linear(b, 256, d, w_grad=tw, x_grad=False, grad=t)  # time_embedder
    led.linear(b, d, d, w_grad=tw, x_grad=tw, grad=t)
    temb_g = gr.after_weight(False)
    img_g, txt_g = gr.after_weight(False), gr.after_weight(cond_grad)
    for i in range(cfg.num_layers):
        _double_block(led, gr, b, n, L, d, mlp, cfg.num_heads, cfg.head_dim, img_g, txt_g, temb_g,
                      last=i == cfg.num_layers - 1)
        img_g = txt_g = t
    led.linear(b, d, 2 * d, w_grad=tw, x_grad=temb_g, grad=t)  # norm_out_mod
    led.linear(b * n, d, cfg.out_dim, w_grad=tw, x_grad=t, grad=t)  # proj_out
    return led


def s3dit_flops(cfg, batch: int, latent_hw, cond_len: int, *, cond_grad: bool = True, train: bool = True,
                attention_backward: float = MODEL_ATTENTION_BACKWARD, lora_rank: int | None = None) -> Ledger:
    """S3DiT (models/s3dit.py): image and condition each padded to a multiple of 32 tokens
    (the pad tokens are real keys and are computed on); noise refiner over the image,
    context refiner over the condition, main single-stream layers over both; SwiGLU FFN.
    The condition passes an RMSNorm with a weight first (see qwen_mmdit_flops)."""
    led = Ledger(attention_backward, lora_rank)
    gr = _Grad(train, bool(lora_rank))
    h, w = _hw(latent_hw)
    p = cfg.patch_size
    n = (h // p) * (w // p)
    sx, sc = _ceil_to(n, SEQ_MULTIPLE_S3DIT), _ceil_to(cond_len, SEQ_MULTIPLE_S3DIT)
    b, d, ffn, ada = batch, cfg.hidden_size, cfg.ffn_hidden_size, cfg.adaln_dim
    t, tw = train, gr.w
    cond_grad = cond_grad and train
    from ..models.s3dit import T_EMBED_HIDDEN

    led.linear(b, 256, T_EMBED_HIDDEN, w_grad=tw, x_grad=False, grad=t)  # t_embedder
    led.linear(b, T_EMBED_HIDDEN, ada, w_grad=tw, x_grad=tw, grad=t)
    led.linear(b * sc, cfg.context_dim, d, w_grad=tw, x_grad=tw or cond_grad, grad=t)  # cap_embedder
    led.linear(b * sx, cfg.patch_dim, d, w_grad=tw, x_grad=False, grad=t)  # x_embedder
    temb_g = gr.after_weight(False)

    def block(tokens: int, modulated: bool, x_g: bool) -> None:
        if modulated:
            led.linear(b, ada, 4 * d, w_grad=tw, x_grad=temb_g, grad=t)
        xin = x_g or (modulated and gr.after_weight(temb_g)) or (tw and t)  # the RMSNorm weights
        led.linear(b * tokens, d, 3 * d, w_grad=tw, x_grad=xin, grad=t, lora=True)  # qkv
        led.attend(b, cfg.num_heads, tokens, tokens, cfg.head_dim, grad=t and (tw or xin or gr.lora))
        led.linear(b * tokens, d, d, w_grad=tw, x_grad=t, grad=t, lora=True)  # out
        led.linear(b * tokens, d, 2 * ffn, w_grad=tw, x_grad=t, grad=t, lora=True)  # w1 | w3
        led.linear(b * tokens, ffn, d, w_grad=tw, x_grad=t, grad=t, lora=True)  # w2

    x_g, c_g = gr.after_weight(False), gr.after_weight(cond_grad)
    for _ in range(cfg.num_refiner_layers):
        block(sx, True, x_g)  # noise refiner
        x_g = t
    if sc:
        for _ in range(cfg.num_refiner_layers):
            block(sc, False, c_g)  # context refiner
            c_g = t
    for _ in range(cfg.num_layers):
        block(sx + sc, True, x_g or c_g)
        x_g = c_g = t
    led.linear(b, ada, d, w_grad=tw, x_grad=gr.after_weight(False), grad=t)  # norm_out_mod (silu(temb))
    led.linear(b * sx, d, cfg.patch_dim, w_grad=tw, x_grad=t, grad=t)  # proj_out
    return led


def flux_block_flops(cfg, kind: str, batch: int, n_img: int, n_cond: int, *, train: bool = True,
                     attention_backward: float = MODEL_ATTENTION_BACKWARD) -> Ledger:
    """One FLUX block ("double" or "single") in the middle of the network (every input needs
    grad), forward + backward: what benchmarks time block by block."""
    led = Ledger(attention_backward)
    gr = _Grad(train, False)
    d, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    b, s = batch, n_img + n_cond
    if kind == "double":
        _double_block(led, gr, b, n_img, n_cond, d, mlp, cfg.num_heads, cfg.head_dim, train, train, train, last=False)
    elif kind == "single":
        led.linear(b, d, 3 * d, grad=train)
        led.linear(b * s, d, 3 * d + mlp, grad=train)
        led.attend(b, cfg.num_heads, s, s, cfg.head_dim, grad=train)
        led.linear(b * s, d + mlp, d, grad=train)
    else:
        raise ValueError(f"kind must be 'double' or 'single', got {kind!r}")
    return led


GENERATOR_FLOPS = {"flux": flux_flops, "qwen_mmdit": qwen_mmdit_flops, "s3dit": s3dit_flops}


def generator_flops(family: str, cfg, batch: int, latent_hw, cond_len: int, **kw) -> Ledger:
    if family not in GENERATOR_FLOPS:
        raise ValueError(f"no FLOPs formula for generator family {family!r}; known: {sorted(GENERATOR_FLOPS)} "
                         "(add one to iomm_scale/profiling/flops.py)")
    return GENERATOR_FLOPS[family](cfg, batch, latent_hw, cond_len, **kw)


# ------------------------------------------------------------------------------------------
# the frozen MLLM: dims, from the run config or a table of known models (offline)
# ------------------------------------------------------------------------------------------
@dataclass
class MLLMSpec:
    """What FLOPs and memory need to know about the frozen MLLM."""

    name: str
    kind: str  # "internvl" or "qwen2_5_vl" (how the model is built on the meta device)
    hf_config: dict = field(repr=False, default_factory=dict)
    # language model
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    # vision tower + projector (one tile / image)
    vision_hidden: int = 0
    vision_layers: int = 0
    vision_heads: int = 0
    vision_intermediate: int = 0
    vision_mlp_mats: int = 2  # 2: fc1/fc2 (InternViT); 3: SwiGLU (Qwen2.5-VL)
    image_size: int = 448
    patch: int = 14
    temporal_patch: int = 1  # Qwen2.5-VL embeds 2 frames (an image is repeated)
    merge: int = 2  # tokens merged per side before the projector (pixel shuffle / spatial merge)
    cls_token: bool = True
    projector_hidden: int = 0  # width of the projector's first linear's output

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def image_tokens(self) -> int:
        return self.patches // (self.merge ** 2)


def _internvl_spec(name: str, conf: dict) -> MLLMSpec:
    v, t = conf["vision_config"], conf["text_config"]
    size = v.get("image_size", 448)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = v.get("patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    ratio = conf.get("downsample_ratio", 0.5)
    return MLLMSpec(
        name=name, kind="internvl", hf_config=conf, hidden=t["hidden_size"], layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"], kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
        intermediate=t["intermediate_size"], vocab=t["vocab_size"], vision_hidden=v["hidden_size"],
        vision_layers=v["num_hidden_layers"], vision_heads=v["num_attention_heads"],
        vision_intermediate=v["intermediate_size"], image_size=size, patch=patch, merge=round(1 / ratio),
        cls_token=True, projector_hidden=t["hidden_size"])


def _qwen2_5_vl_spec(name: str, conf: dict, image_size: int = 448) -> MLLMSpec:
    v, t = conf["vision_config"], conf["text_config"]
    merge = v.get("spatial_merge_size", 2)
    return MLLMSpec(
        name=name, kind="qwen2_5_vl", hf_config=conf, hidden=t["hidden_size"], layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"], intermediate=t["intermediate_size"],
        vocab=t["vocab_size"], vision_hidden=v["hidden_size"], vision_layers=v["depth"], vision_heads=v["num_heads"],
        vision_intermediate=v["intermediate_size"], vision_mlp_mats=3, image_size=image_size, patch=v["patch_size"],
        temporal_patch=v.get("temporal_patch_size", 2), merge=merge, cls_token=False,
        projector_hidden=v["hidden_size"] * merge * merge)


def _spec_from_conf(name: str, conf: dict) -> MLLMSpec:
    if conf.get("model_type") == "qwen2_5_vl" or "depth" in conf.get("vision_config", {}):
        return _qwen2_5_vl_spec(name, conf)
    return _internvl_spec(name, conf)


def known_mllms() -> dict[str, MLLMSpec]:
    """Hub ids this module can describe offline (profiling/params.py's KNOWN_MLLMS: InternVL3-2B
    and Qwen2.5-VL-7B, Qwen-Image's text encoder). A Qwen2.5-VL image is assumed resized to one 448 px tile (256 tokens); the paper does
    not say."""
    from .params import KNOWN_MLLMS

    return {name: _spec_from_conf(name, conf) for name, conf in KNOWN_MLLMS.items()}


def tiny_mllm_spec(tiny, kind: str = "internvl", image_size: int | None = None) -> MLLMSpec:
    """The spec of models/tiny_mllm.build_tiny_mllm(kind, tiny) (same config it builds)."""
    from ..models.tiny_mllm import tiny_internvl_config, tiny_qwen2_5_vl_config

    if kind == "qwen2_5_vl":
        return _qwen2_5_vl_spec("tiny-qwen2_5_vl", tiny_qwen2_5_vl_config(tiny), image_size or tiny.image_size)
    conf = tiny_internvl_config(tiny)
    return _internvl_spec("tiny-internvl", conf)


def mllm_spec(mcfg) -> MLLMSpec:
    """The frozen MLLM of a conditioner config (`cfg.model.conditioner.mllm`)."""
    image_size = getattr(mcfg, "image_size", None)  # Qwen2.5-VL's fixed resolution (None: 448)
    if mcfg.random_init:
        return tiny_mllm_spec(mcfg.tiny, mcfg.kind, image_size)
    specs = known_mllms()
    if mcfg.path in specs:
        spec = specs[mcfg.path]
        return replace(spec, image_size=image_size) if image_size and spec.kind == "qwen2_5_vl" else spec
    path = os.path.expanduser(mcfg.path)
    conf_file = os.path.join(path, "config.json")
    if os.path.isfile(conf_file):
        import json

        conf = json.load(open(conf_file))
        spec = _spec_from_conf(mcfg.path, conf)
        return replace(spec, image_size=image_size) if image_size and spec.kind == "qwen2_5_vl" else spec
    raise ValueError(f"cannot describe the MLLM {mcfg.path!r} offline: not a local directory with config.json and not "
                     f"one of {sorted(specs)}")


def vision_flops(spec: MLLMSpec, batch: int) -> Ledger:
    """ViT + projector forward (no grad), one tile per image. Qwen2.5-VL's windowed
    attention layers are counted as full attention over the tile (an upper bound; at one
    448 px tile the window covers a quarter of it)."""
    led = Ledger()
    s = spec.patches + int(spec.cls_token)
    dv = spec.vision_hidden
    led.linear(batch * spec.patches, 3 * spec.patch * spec.patch * spec.temporal_patch, dv, grad=False)  # patch conv
    for _ in range(spec.vision_layers):
        led.linear(batch * s, dv, 3 * dv, grad=False)  # q, k, v
        led.attend(batch, spec.vision_heads, s, s, dv // spec.vision_heads, grad=False)
        led.linear(batch * s, dv, dv, grad=False)  # attention output projection
        for _ in range(spec.vision_mlp_mats):
            led.linear(batch * s, dv, spec.vision_intermediate, grad=False)
    t = spec.image_tokens
    merged = dv * spec.merge * spec.merge
    led.linear(batch * t, merged, spec.projector_hidden, grad=False)
    led.linear(batch * t, spec.projector_hidden, spec.hidden, grad=False)
    return led


def llm_flops(spec: MLLMSpec, batch: int, seq: int, *, attention_backward: float = MODEL_ATTENTION_BACKWARD,
              input_grad: bool = True) -> Ledger:
    """The frozen LLM over `seq` input embeddings: forward, and (input_grad) the backward that
    carries the gradient to its inputs: one input-gradient matmul per linear, no weight
    gradients, and the full attention backward (q, k and v all depend on the input). The LM
    head is never run (the conditioner reads the last hidden states)."""
    led = Ledger(attention_backward)
    hd = spec.head_dim
    kv = spec.kv_heads * hd
    for _ in range(spec.layers):
        for n_out in (spec.hidden, kv, kv):  # q, k, v
            led.linear(batch * seq, spec.hidden, n_out, w_grad=False, grad=input_grad)
        led.attend(batch, spec.heads, seq, seq, hd, grad=input_grad)
        led.linear(batch * seq, spec.hidden, spec.hidden, w_grad=False, grad=input_grad)  # o
        led.linear(batch * seq, spec.hidden, spec.intermediate, w_grad=False, grad=input_grad)  # gate
        led.linear(batch * seq, spec.hidden, spec.intermediate, w_grad=False, grad=input_grad)  # up
        led.linear(batch * seq, spec.intermediate, spec.hidden, w_grad=False, grad=input_grad)  # down
    return led


def rqa_flops(rqa_cfg, dim: int, batch: int, context_len: int, *,
              attention_backward: float = MODEL_ATTENTION_BACKWARD) -> Ledger:
    """models/rqa.py: per layer, queries -> q, condition -> k|v, cross-attention, output
    projection, MLP. The condition itself needs no grad, but k|v read norm_kv(c), a LayerNorm
    whose affine weights train, so k|v gets an input gradient too: every linear is 3x."""
    led = Ledger(attention_backward)
    q = rqa_cfg.num_queries
    hidden = int(dim * rqa_cfg.mlp_ratio)
    for _ in range(rqa_cfg.num_layers):
        led.linear(batch * q, dim, dim)
        led.linear(batch * context_len, dim, 2 * dim)  # input = norm_kv(c): needs grad (LayerNorm weights)
        led.attend(batch, rqa_cfg.num_heads, q, context_len, dim // rqa_cfg.num_heads)
        led.linear(batch * q, dim, dim)
        led.linear(batch * q, dim, hidden)
        led.linear(batch * q, hidden, dim)
    return led


# ------------------------------------------------------------------------------------------
# the VAE encoder: counted by FlopCounterMode on the meta device, once per shape
# ------------------------------------------------------------------------------------------
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
KNOWN_VAES = {  # (type, path) -> diffusers config, for offline counting
    ("autoencoder_kl", "black-forest-labs/FLUX.1-dev"): FLUX_VAE,
    ("autoencoder_kl", "black-forest-labs/FLUX.1-schnell"): FLUX_VAE,
    ("autoencoder_kl", "Tongyi-MAI/Z-Image-Turbo"): FLUX_VAE,
    ("autoencoder_kl_qwenimage", "Qwen/Qwen-Image"): QWEN_IMAGE_VAE,
}


def _vae_model_on_meta(vcfg):
    import diffusers

    from ..models.vae import tiny_autoencoder_kl

    if vcfg.random_init:
        return _meta_build(diffusers.AutoencoderKL, dict(tiny_autoencoder_kl(0).config))
    cls = diffusers.AutoencoderKL if vcfg.type == "autoencoder_kl" else diffusers.AutoencoderKLQwenImage
    key = (vcfg.type, vcfg.path)
    if key in KNOWN_VAES:
        return _meta_build(cls, KNOWN_VAES[key])
    path = os.path.expanduser(vcfg.path)
    conf = cls.load_config(path, subfolder=vcfg.subfolder)
    return _meta_build(cls, dict(conf))


def _meta_build(cls, conf: dict):
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls.from_config(conf)


@functools.lru_cache(maxsize=64)
def _vae_encode_flops_cached(vtype, path, subfolder, random_init, height, width) -> float:
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    vcfg = SimpleNamespace(type=vtype, path=path, subfolder=subfolder, random_init=random_init)
    model = _vae_model_on_meta(vcfg)
    x = torch.empty(1, 3, height, width, device="meta")
    if vtype == "autoencoder_kl_qwenimage":
        x = x[:, :, None]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(x)
    return float(counter.get_total_flops())


def vae_encode_flops(vcfg, resolution, batch: int = 1) -> float:
    """Forward FLOPs of the frozen VAE encoder for `batch` images (0 for the pixel VAE)."""
    if vcfg.type == "pixel":
        return 0.0
    h, w = _hw(resolution)
    return batch * _vae_encode_flops_cached(vcfg.type, vcfg.path, vcfg.subfolder, bool(vcfg.random_init), h, w)


# ------------------------------------------------------------------------------------------
# the whole step
# ------------------------------------------------------------------------------------------
def aux_prompt_length(cfg) -> int:
    """Token count of the auxiliary prompt: the tiny tokenizer exactly; a local MLLM
    directory's tokenizer exactly; otherwise an estimate for Qwen's byte-level BPE (one
    token per word and per punctuation mark; exact for the paper's prompts)."""
    ccfg = cfg.model.conditioner
    return _aux_len(ccfg.aux_prompt, bool(ccfg.mllm.random_init), ccfg.mllm.tiny.vocab_size if ccfg.mllm.random_init
                    else 0, ccfg.mllm.path)


@functools.lru_cache(maxsize=16)
def _aux_len(prompt: str, tiny: bool, vocab: int, path) -> int:
    if tiny:
        from ..models.tiny_mllm import build_tokenizer

        return len(build_tokenizer(vocab)(prompt, add_special_tokens=False)["input_ids"])
    if path and os.path.isdir(os.path.expanduser(path)):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
            return len(tok(prompt, add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: BLE001 - fall back to the estimate
            pass
    import re

    return len(re.findall(r"\w+|[^\w\s]", prompt))


def condition_lengths(cfg, mllm_len: int | None = None) -> dict[str, int]:
    """Sequence lengths of an image-only sample: the condition c = [aux | image tokens], the
    MLLM input [c | queries] and what the generator receives."""
    ccfg = cfg.model.conditioner
    spec = mllm_spec(ccfg.mllm)
    q = ccfg.rqa.num_queries
    context = aux_prompt_length(cfg) + spec.image_tokens if mllm_len is None else mllm_len - q
    total = context + q
    return {"context": context, "mllm": total, "generator": q if ccfg.condition_positions == "queries" else total}


def latent_hw(cfg, resolution=None) -> tuple[int, int]:
    h, w = _hw(resolution if resolution is not None else cfg.data.resolution)
    f = cfg.model.vae.downsample_factor
    return h // f, w // f


def image_tokens(cfg, resolution=None) -> int:
    """Image tokens the generator sees per sample (before any padding)."""
    h, w = latent_hw(cfg, resolution)
    p = cfg.generator.latent_patch
    return (h // p) * (w // p)


def features_precomputed(cfg) -> bool:
    wds = cfg.data.webdataset
    return bool(cfg.data.source == "webdataset" and wds is not None and getattr(wds, "features", False))


def flops_report(cfg, resolution=None, batch: int = 1, *, mllm_len: int | None = None,
                 attention_backward: float = MODEL_ATTENTION_BACKWARD, precomputed: bool | None = None,
                 lora_rank: int | None = None, include_vae: bool = True) -> dict[str, Ledger]:
    """Per-component ledgers (forward / backward, matmul / attention) of one training step."""
    res = resolution if resolution is not None else cfg.data.resolution
    precomputed = features_precomputed(cfg) if precomputed is None else precomputed
    if lora_rank is None:  # the run's LoRA (model.lora; counted on the default targets, LORA_TARGETS)
        lora_rank = getattr(getattr(cfg.model, "lora", None), "r", None)
    ccfg = cfg.model.conditioner
    spec = mllm_spec(ccfg.mllm)
    lens = condition_lengths(cfg, mllm_len)
    gen_cfg = cfg.generator
    out: dict[str, Ledger] = {}
    vae = Ledger()
    if include_vae and not precomputed:
        vae.fwd = vae_encode_flops(cfg.model.vae, res, batch)
    out["vae_encode"] = vae
    out["vision_encoder"] = Ledger() if precomputed else vision_flops(spec, batch)
    out["rqa"] = rqa_flops(ccfg.rqa, spec.hidden, batch, lens["context"], attention_backward=attention_backward)
    out["mllm"] = llm_flops(spec, batch, lens["mllm"], attention_backward=attention_backward)
    proj = Ledger(attention_backward)
    proj.linear(batch * lens["generator"], spec.hidden, gen_cfg.context_dim)
    out["condition_projection"] = proj
    out["generator"] = generator_flops(cfg.model.generator.family, gen_cfg, batch, latent_hw(cfg, res),
                                       lens["generator"], cond_grad=True, attention_backward=attention_backward,
                                       lora_rank=lora_rank)
    return out


def training_flops(cfg, resolution=None, batch: int = 1, **kw) -> dict[str, float]:
    """{component: FLOPs} of one training step over `batch` samples at `resolution`
    (default: data.resolution), image-only samples, plus "total". Keyword options: see
    `flops_report` (mllm_len for text prompts of another length, attention_backward=2.5 for
    FlopCounterMode's convention, precomputed=True for feature shards, lora_rank)."""
    report = flops_report(cfg, resolution, batch, **kw)
    out = {k: v.total for k, v in report.items()}
    out["total"] = sum(out.values())
    return out


def format_report(report: dict[str, Ledger]) -> str:
    total = sum(v.total for v in report.values())
    lines = [f"{'component':<22s} {'forward':>12s} {'backward':>12s} {'attention':>12s} {'total':>12s} {'share':>7s}"]
    for k, v in report.items():
        lines.append(f"{k:<22s} {v.forward / 1e9:>11.2f}G {v.backward / 1e9:>11.2f}G {v.attention / 1e9:>11.2f}G "
                     f"{v.total / 1e9:>11.2f}G {100 * v.total / max(total, 1):>6.1f}%")
    lines.append(f"{'total':<22s} {'':>12s} {'':>12s} {'':>12s} {total / 1e9:>11.2f}G")
    return "\n".join(lines)


def flop_counter(**kw):
    """`FlopCounterMode` that also counts the CPU fused attention kernels
    (`_scaled_dot_product_flash_attention_for_cpu` and its backward, which torch leaves
    uncounted) with torch's own formulas for the CUDA flash kernels: so a CPU run counts
    attention the way a GPU run does."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    fwd._get_raw = bwd._get_raw = True
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}
    mapping.update(kw.pop("custom_mapping", {}) or {})
    return fc.FlopCounterMode(display=kw.pop("display", False), custom_mapping=mapping, **kw)


def ideal_step_time(flops: float, peak_tflops: float) -> float:
    return flops / (peak_tflops * 1e12) if peak_tflops else math.inf
