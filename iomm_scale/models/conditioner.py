"""The IOMM conditioner: frozen MLLM + auxiliary prompt + masked image modeling + RQA.

Per sample the condition sequence c is built in the MLLM's input-embedding space:

    image-only (self-conditioning)  c = [embed(aux prompt), mask_r(ViT(image))]
    text-image pair                 c = [embed(chat_template(caption))]
    dropped (for CFG)               c = [embed(aux prompt), zeros]   <- the null condition

then c <- [c, RQA(c)] and h = MLLM(c) with the MLLM frozen (no grad for its weights, but
gradients flow *through* it into the RQA). The DiT receives proj(h) at the query positions
(default, as MetaQuery / the paper's figure) or at all positions (`condition_positions:
all`), with a key-padding mask.

Masked image modeling: each image token is zeroed with probability r (Bernoulli per
token, values multiplied by 0, not dropped). The null condition is the limit r = 1: the
aux prompt followed by all-zero image tokens. It needs no extra forward pass, and the same
null condition serves image- and text-conditioned sampling.

Batches with different sequence lengths (mixed fine-tuning) are LEFT-padded so the RQA
queries sit at the same final positions; position ids restart at 0 at each sample's first
real token, so padding changes nothing for the real tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RMSNorm, linear
from .rqa import RQAConfig, ResidualQueryAdapter
from .tiny_mllm import TinyMLLMConfig, build_tiny_internvl

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


MLLM_KINDS = ("internvl", "qwen2_5_vl")


@dataclass
class MLLMConfig:
    kind: str = "internvl"  # InternVLForConditionalGeneration; "qwen2_5_vl" is counted but not trainable yet
    path: str | None = None  # local directory or hub id of an InternVL (transformers, "-hf" layout)
    random_init: bool = False  # build a tiny random InternVL instead (tests, tiny.yaml)
    tiny: TinyMLLMConfig = field(default_factory=TinyMLLMConfig)
    dtype: str = "float32"  # the frozen MLLM's weights; "bfloat16" halves its memory on GPU

    def validate(self) -> list[tuple[str, str]]:
        errors = [(f"tiny.{k}", m) for k, m in self.tiny.validate()] if self.random_init else []
        if self.kind not in MLLM_KINDS:
            errors.append(("kind", f"must be one of {MLLM_KINDS}, got {self.kind!r}"))
        elif self.kind != "internvl" and self.random_init:
            errors.append(("random_init", "the tiny random MLLM is an InternVL: use kind internvl"))
        if not self.random_init:
            if not self.path:
                errors.append(("path", "missing: set the MLLM path (local dir or hub id), or random_init: true"))
            elif _looks_local(self.path) and not os.path.isdir(os.path.expanduser(self.path)):
                errors.append(("path", f"directory does not exist: {self.path}"))
        if self.dtype not in ("float32", "bfloat16", "float16"):
            errors.append(("dtype", f"must be float32, bfloat16 or float16, got {self.dtype!r}"))
        return errors


def _looks_local(path: str) -> bool:
    # Hub ids are exactly "org/name"; anything else is a filesystem path.
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


@dataclass
class ConditionerConfig:
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    aux_prompt: str = "Generate an image that is identical to the reference image:"
    mask_ratio: float = 0.85
    rqa: RQAConfig = field(default_factory=RQAConfig)
    condition_positions: str = "queries"  # "queries" (outputs at the RQA positions) or "all"

    def validate(self) -> list[tuple[str, str]]:
        errors = [(f"mllm.{k}", m) for k, m in self.mllm.validate()]
        errors += [(f"rqa.{k}", m) for k, m in self.rqa.validate()]
        if not 0.0 <= self.mask_ratio < 1.0:
            errors.append(("mask_ratio", f"must be in [0, 1), got {self.mask_ratio}"))
        if self.condition_positions not in ("queries", "all"):
            errors.append(("condition_positions", f"must be 'queries' or 'all', got {self.condition_positions!r}"))
        if not self.aux_prompt.strip():
            errors.append(("aux_prompt", "must not be empty"))
        return errors


def load_mllm(cfg: MLLMConfig, seed: int = 0):
    """-> (InternVLForConditionalGeneration, tokenizer), frozen and in eval mode."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.kind != "internvl":
        raise NotImplementedError(
            f"model.conditioner.mllm.kind={cfg.kind!r}: only InternVL conditioners can be trained so far; the "
            "Qwen2.5-VL conditioner (for the Qwen-Image fine-tune) is not built yet. `iomm-params` counts it.")
    if cfg.random_init:
        mllm, tokenizer = build_tiny_internvl(cfg.tiny, seed=seed)
        mllm = mllm.to(dtype)
    else:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        mllm = InternVLForConditionalGeneration.from_pretrained(os.path.expanduser(cfg.path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.path))
    mllm.requires_grad_(False).eval()
    return mllm, tokenizer


class IOMMConditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig, mllm: nn.Module, tokenizer, condition_dim: int):
        super().__init__()
        self.cfg = cfg
        self.mllm = mllm
        self.tokenizer = tokenizer
        hidden = mllm.config.text_config.hidden_size
        self.hidden_size = hidden
        self.rqa = ResidualQueryAdapter(hidden, cfg.rqa)
        self.proj_norm = RMSNorm(hidden)
        self.proj = linear(hidden, condition_dim)
        aux = tokenizer(cfg.aux_prompt, add_special_tokens=False)["input_ids"]
        self.register_buffer("aux_ids", torch.tensor(aux, dtype=torch.long), persistent=False)
        size = mllm.config.vision_config.image_size
        self.vision_size = size[0] if isinstance(size, (list, tuple)) else size
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.mllm.eval()  # frozen: dropout and similar stay off
        return self

    @property
    def num_image_tokens(self) -> int:
        return self.mllm.config.image_seq_length

    # ---- pieces ------------------------------------------------------------------------
    @torch.no_grad()
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> image tokens [B, T, hidden] in the LLM's embedding
        space (after InternVL's vision projector), before masking. One 448 px tile per image
        for InternVL3 (256 tokens); no dynamic tiling."""
        x = (pixels.float() + 1) / 2
        if x.shape[-1] != self.vision_size or x.shape[-2] != self.vision_size:
            x = F.interpolate(x, size=(self.vision_size, self.vision_size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x - self.pixel_mean) / self.pixel_std).to(self.mllm.dtype)
        return self.mllm.model.get_image_features(pixel_values=x).pooler_output

    def draw_keep_mask(self, batch: int, num_tokens: int, ratio: float, device) -> torch.Tensor:
        """Bernoulli keep mask [B, T]: False (masked) with probability `ratio`."""
        return torch.rand(batch, num_tokens, device=device) >= ratio

    @torch.no_grad()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mllm.get_input_embeddings()(ids)

    def prompt_ids(self, caption: str) -> list[int]:
        out = self.tokenizer.apply_chat_template([{"role": "user", "content": caption}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)
        return list(out["input_ids"])

    # ---- the condition -------------------------------------------------------------------
    def forward(self, vision_features: torch.Tensor | None, captions: list[str | None] | None = None,
                drop: torch.Tensor | None = None, mask_ratio: float | None = None):
        """-> (cond [B, L, condition_dim], cond_mask [B, L] bool or None when nothing is padded).

        vision_features [B, T, hidden] (unmasked) are needed for image-only samples
        (caption None) and for dropped ones only as a shape; `drop` [B] bool selects samples
        that get the null condition. Random numbers are drawn in a fixed order (the keep mask
        for every sample), so runs are reproducible whatever the mixture.
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        b = len(captions) if captions is not None else vision_features.shape[0]
        captions = captions if captions is not None else [None] * b
        device = self.aux_ids.device
        aux = self.embed_ids(self.aux_ids)
        dtype = aux.dtype
        num_img = vision_features.shape[1] if vision_features is not None else self.num_image_tokens
        keep = self.draw_keep_mask(b, num_img, ratio, device)
        if drop is not None:
            keep = keep & ~drop.to(device)[:, None]

        sequences = []
        for i, caption in enumerate(captions):
            dropped = drop is not None and bool(drop[i])
            if caption is None or dropped:
                if vision_features is None:
                    img = torch.zeros(num_img, aux.shape[-1], device=device, dtype=dtype)
                else:
                    img = vision_features[i].to(dtype) * keep[i, :, None].to(dtype)
                sequences.append(torch.cat([aux, img], 0))
            else:
                ids = torch.tensor(self.prompt_ids(caption), device=device)
                sequences.append(self.embed_ids(ids))
        c, c_mask = left_pad(sequences)

        queries = self.rqa(c, c_mask).to(dtype)
        full = torch.cat([c, queries], 1)
        q_mask = None if c_mask is None else torch.cat([c_mask, c_mask.new_ones(b, queries.shape[1])], 1)
        h = self.run_mllm(full, q_mask)
        if self.cfg.condition_positions == "queries":
            h, out_mask = h[:, -queries.shape[1]:], None
        else:
            out_mask = q_mask
        return self.proj(self.proj_norm(h.to(self.proj.weight.dtype))), out_mask

    def run_mllm(self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The frozen LLM on input embeddings -> last hidden states. Not under no_grad: the RQA's
        gradient must flow through it."""
        if mask is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
            attn = None
        else:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            attn = mask.long()
        out = self.mllm.model.language_model(inputs_embeds=inputs_embeds.to(self.mllm.dtype), attention_mask=attn,
                                             position_ids=position_ids, use_cache=False)
        return out.last_hidden_state


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack [L_i, D] tensors into [B, L, D], left-padded with zeros; the mask is None when
    every sequence has the same length (the image-only pre-training case)."""
    lengths = [s.shape[0] for s in sequences]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.stack(sequences), None
    out = sequences[0].new_zeros(len(sequences), longest, sequences[0].shape[-1])
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool, device=out.device)
    for i, s in enumerate(sequences):
        out[i, longest - s.shape[0]:] = s
        mask[i, longest - s.shape[0]:] = True
    return out, mask
