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

Two MLLM kinds, one class; they differ in three places only:

    internvl     InternVL3: one 448 px tile through the ViT + projector (256 tokens);
                 c_img = the image tokens; sequential position ids
    qwen2_5_vl   Qwen2.5-VL (Qwen-Image's text encoder): one fixed-resolution image
                 (`mllm.image_size`, 448 px -> 32 x 32 patches of 14 px -> 16 x 16 merged =
                 256 tokens) as flattened 2-frame patches + image_grid_thw through the
                 windowed ViT and patch merger; c_img = [<|vision_start|>, image tokens,
                 <|vision_end|>] (the layout the model was trained on; only the image tokens
                 are masked); 3-D M-RoPE position ids: image tokens get the (t, h, w) ids of
                 transformers' `get_rope_index`, text / aux / query tokens sequential ones
                 (`mrope_positions`)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RMSNorm, linear
from .rqa import RQAConfig, ResidualQueryAdapter
from .tiny_mllm import TinyMLLMConfig, build_tiny_mllm

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternVL
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2.5-VL (its image processor's OPENAI_CLIP_MEAN / STD)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN_IMAGE_SIZE = 448  # default fixed resolution for Qwen2.5-VL: 16 x 16 merged = 256 tokens, as InternVL's tile
QWEN_PATCH_FACTOR = 28  # Qwen2.5-VL: 14 px patches, 2 x 2 spatial merge


MLLM_KINDS = ("internvl", "qwen2_5_vl")


@dataclass
class MLLMConfig:
    kind: str = "internvl"  # "internvl" (InternVLForConditionalGeneration) | "qwen2_5_vl" (Qwen2_5_VLFor...)
    path: str | None = None  # local directory or hub id (transformers layout; InternVL: the "-hf" one)
    random_init: bool = False  # build a tiny random MLLM of `kind` instead (tests, tiny.yaml)
    tiny: TinyMLLMConfig = field(default_factory=TinyMLLMConfig)
    dtype: str = "float32"  # the frozen MLLM's weights; "bfloat16" halves its memory on GPU
    # qwen2_5_vl only: side of the one fixed-resolution image (a multiple of patch x merge = 28;
    # default 448 -> 256 tokens; tiny: tiny.image_size). InternVL's tile size is fixed by its ViT.
    image_size: int | None = None

    def validate(self) -> list[tuple[str, str]]:
        errors = [(f"tiny.{k}", m) for k, m in self.tiny.validate()] if self.random_init else []
        if self.kind not in MLLM_KINDS:
            errors.append(("kind", f"must be one of {MLLM_KINDS}, got {self.kind!r}"))
        elif self.kind == "qwen2_5_vl":
            if self.random_init:
                t = self.tiny
                if (t.image_size // t.vision_patch) % 4:
                    errors.append(("tiny.image_size", "image_size / vision_patch must be a multiple of 4 for Qwen2.5-VL "
                                                      "(2x2 merge, windows of half the image side)"))
                if t.vision_hidden % (4 * t.vision_heads):
                    errors.append(("tiny.vision_heads", "vision_hidden / vision_heads must be a multiple of 4 (2-D RoPE)"))
                if t.text_hidden % t.text_heads == 0 and (t.text_hidden // t.text_heads) < 8:
                    errors.append(("tiny.text_heads", "text head size must be >= 8 for the 3 M-RoPE sections"))
            if self.image_size is not None:
                factor = 2 * self.tiny.vision_patch if self.random_init else QWEN_PATCH_FACTOR
                if self.image_size <= 0 or self.image_size % factor:
                    errors.append(("image_size", f"must be a positive multiple of patch x merge = {factor}, "
                                                 f"got {self.image_size}"))
        elif self.image_size is not None:
            errors.append(("image_size", "only for kind qwen2_5_vl (InternVL's tile size is fixed by its ViT)"))
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
    """-> (InternVLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration, tokenizer),
    frozen and in eval mode."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.random_init:
        mllm, tokenizer = build_tiny_mllm(cfg.kind, cfg.tiny, seed=seed)
        mllm = mllm.to(dtype)
    else:
        import transformers

        path = os.path.expanduser(cfg.path)
        cls = (transformers.Qwen2_5_VLForConditionalGeneration if cfg.kind == "qwen2_5_vl"
               else transformers.InternVLForConditionalGeneration)
        mllm = cls.from_pretrained(path, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if cfg.kind == "qwen2_5_vl":
            check_qwen_processor(path, mllm.config, tokenizer)
    mllm.requires_grad_(False).eval()
    return mllm, tokenizer


def check_qwen_processor(path: str, config, tokenizer) -> None:
    """The conditioner does the Qwen2.5-VL image processor's job itself (resize, normalise,
    patchify: its processor needs torchvision): check that the checkpoint's processor
    settings (preprocessor_config.json, when present) and special tokens are the ones it
    implements, so a different model fails loudly instead of conditioning on wrong inputs."""
    import json

    file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(file):
        conf = json.load(open(file))
        vc = config.vision_config
        expected = {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "patch_size": vc.patch_size,
                    "merge_size": vc.spatial_merge_size, "temporal_patch_size": vc.temporal_patch_size}
        for key, want in expected.items():
            got = conf.get(key, want)
            if isinstance(want, list) and any(abs(a - b) > 1e-6 for a, b in zip(got, want)) or \
                    not isinstance(want, list) and got != want:
                raise ValueError(f"model.conditioner.mllm.path: {file}: {key} is {got}, the Qwen2.5-VL conditioner "
                                 f"implements {want}")
    for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
        token_id = getattr(config, name)
        if token_id is None or token_id >= len(tokenizer):
            raise ValueError(f"model.conditioner.mllm.path: {path}: config {name}={token_id} is not in the tokenizer")


def qwen_patchify(x: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """Images [B, C, H, W] -> flattened patches [B * (H/p) * (W/p), C * temporal * p * p] in
    Qwen2-VL's image processor order (merge windows of merge x merge patches contiguous, the
    still image repeated over `temporal` frames): what Qwen2.5-VL's visual tower takes."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def mrope_positions(segments, device=None) -> torch.Tensor:
    """3-D M-RoPE position ids [L, 3] (t, h, w) of one sequence of text runs ("text", n) and
    images ("image", gh, gw) (merged-token grid), as transformers' Qwen2_5_VLModel.get_rope_index:
    a text token gets (p, p, p) and advances p by 1; an image starting at p gets (p, p + row,
    p + col) row-major and advances p by max(gh, gw). Text after an image therefore starts at
    max(previous ids) + 1."""
    out, p = [], 0
    for seg in segments:
        if seg[0] == "text":
            n = seg[1]
            out.append((p + torch.arange(n, device=device))[:, None].expand(n, 3))
            p += n
        else:
            _, gh, gw = seg
            rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
            out.append(torch.stack([torch.full_like(rows, p), p + rows, p + cols], -1).reshape(-1, 3))
            p += max(gh, gw)
    return torch.cat(out)


class IOMMConditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig, mllm: nn.Module, tokenizer, condition_dim: int):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.mllm.kind
        self.mllm = mllm
        self.tokenizer = tokenizer
        hidden = mllm.config.text_config.hidden_size
        self.hidden_size = hidden
        self.rqa = ResidualQueryAdapter(hidden, cfg.rqa)
        self.proj_norm = RMSNorm(hidden)
        self.proj = linear(hidden, condition_dim)
        aux = tokenizer(cfg.aux_prompt, add_special_tokens=False)["input_ids"]
        self.register_buffer("aux_ids", torch.tensor(aux, dtype=torch.long), persistent=False)
        if self.kind == "qwen2_5_vl":
            vc = mllm.config.vision_config
            self.patch, self.merge, self.temporal_patch = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
            m = cfg.mllm
            self.vision_size = m.image_size or (m.tiny.image_size if m.random_init else QWEN_IMAGE_SIZE)
            if self.vision_size % (self.patch * self.merge):
                raise ValueError(f"model.conditioner.mllm.image_size: {self.vision_size} is not a multiple of patch x "
                                 f"merge = {self.patch * self.merge}")
            self.vision_grid = self.vision_size // (self.patch * self.merge)  # merged tokens per side
            ids = [mllm.config.vision_start_token_id, mllm.config.vision_end_token_id]
            self.register_buffer("vision_delims", torch.tensor(ids, dtype=torch.long), persistent=False)
            mean, std = CLIP_MEAN, CLIP_STD
        else:
            size = mllm.config.vision_config.image_size
            self.vision_size = size[0] if isinstance(size, (list, tuple)) else size
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.mllm.eval()  # frozen: dropout and similar stay off
        return self

    @property
    def num_image_tokens(self) -> int:
        if self.kind == "qwen2_5_vl":
            return self.vision_grid**2
        return self.mllm.config.image_seq_length

    # ---- pieces ------------------------------------------------------------------------
    def vision_inputs(self, pixels: torch.Tensor) -> dict:
        """pixels [B, 3, H, W] in [-1, 1] -> the visual tower's inputs: resized to the fixed
        resolution (bicubic, antialiased) and normalised; for Qwen2.5-VL also flattened into
        patches with their image_grid_thw (what its image processor returns)."""
        x = (pixels.float() + 1) / 2
        if x.shape[-1] != self.vision_size or x.shape[-2] != self.vision_size:
            x = F.interpolate(x, size=(self.vision_size, self.vision_size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x - self.pixel_mean) / self.pixel_std).to(self.mllm.dtype)
        if self.kind != "qwen2_5_vl":
            return {"pixel_values": x}
        g = self.vision_size // self.patch
        thw = torch.tensor([[1, g, g]] * x.shape[0], dtype=torch.long, device=x.device)
        return {"pixel_values": qwen_patchify(x, self.patch, self.merge, self.temporal_patch), "image_grid_thw": thw}

    @torch.no_grad()
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> image tokens [B, T, hidden] in the LLM's embedding
        space, before masking: InternVL3, one 448 px tile through the ViT + projector (256
        tokens, no dynamic tiling); Qwen2.5-VL, one `vision_size` image through the ViT + patch
        merger (T = (vision_size / 28)^2)."""
        out = self.mllm.model.get_image_features(**self.vision_inputs(pixels)).pooler_output
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

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
                drop: torch.Tensor | None = None, mask_ratio: float | None = None, keep: torch.Tensor | None = None):
        """-> (cond [B, L, condition_dim], cond_mask [B, L] bool or None when nothing is padded).

        vision_features [B, T, hidden] (unmasked) are needed for image-only samples
        (caption None) and for dropped ones only as a shape; `drop` [B] bool selects samples
        that get the null condition. Random numbers are drawn in a fixed order (the keep mask
        for every sample), so runs are reproducible whatever the mixture. `keep` [B, T] bool:
        this MIM keep mask instead of a drawn one (held-out evaluation).
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        b = len(captions) if captions is not None else vision_features.shape[0]
        captions = captions if captions is not None else [None] * b
        device = self.aux_ids.device
        qwen = self.kind == "qwen2_5_vl"
        # the prompts' token ids (None: image-only or dropped), then every id of the batch embedded
        # in one call: the embedding runs once per forward whatever the mixture. (ZeRO-3 gathers a
        # module's weights collectively on each call: a call per caption deadlocked data-parallel
        # ranks whose batches held different numbers of captions.)
        prompts = [None if caption is None or (drop is not None and bool(drop[i])) else self.prompt_ids(caption)
                   for i, caption in enumerate(captions)]
        pieces = [self.aux_ids, *([self.vision_delims] if qwen else []),
                  *(torch.tensor(ids, device=device, dtype=self.aux_ids.dtype) for ids in prompts if ids is not None)]
        embedded = list(self.embed_ids(torch.cat(pieces)).split([len(p) for p in pieces]))
        aux = embedded.pop(0)
        dtype = aux.dtype
        num_img = vision_features.shape[1] if vision_features is not None else self.num_image_tokens
        keep = self.draw_keep_mask(b, num_img, ratio, device) if keep is None else keep.to(device)
        if drop is not None:
            keep = keep & ~drop.to(device)[:, None]

        if qwen:
            start, end = embedded.pop(0)[:, None]
            image_segments = [("text", aux.shape[0] + 1), ("image", self.vision_grid, self.vision_grid), ("text", 1)]
        sequences, positions = [], []
        for i, ids in enumerate(prompts):
            if ids is None:
                if vision_features is None:
                    img = torch.zeros(num_img, aux.shape[-1], device=device, dtype=dtype)
                else:
                    img = vision_features[i].to(dtype) * keep[i, :, None].to(dtype)
                sequences.append(torch.cat([aux, start, img, end] if qwen else [aux, img], 0))
                if qwen:
                    positions.append(mrope_positions(image_segments, device))
            else:
                sequences.append(embedded.pop(0))
                if qwen:
                    positions.append(mrope_positions([("text", len(ids))], device))
        c, c_mask = left_pad(sequences)

        queries = self.rqa(c, c_mask).to(dtype)
        full = torch.cat([c, queries], 1)
        q_mask = None if c_mask is None else torch.cat([c_mask, c_mask.new_ones(b, queries.shape[1])], 1)
        if qwen:  # queries continue the sequence: max id + 1, ... (padding holds 0, never the max)
            pos, _ = left_pad(positions)
            nxt = pos.amax(dim=(1, 2)) + 1
            q_pos = (nxt[:, None] + torch.arange(queries.shape[1], device=device))[..., None].expand(-1, -1, 3)
            h = self.run_mllm(full, q_mask, torch.cat([pos, q_pos], 1).permute(2, 0, 1))
        else:
            h = self.run_mllm(full, q_mask)
        if self.cfg.condition_positions == "queries":
            h, out_mask = h[:, -queries.shape[1]:], None
        else:
            out_mask = q_mask
        return self.proj(self.proj_norm(h.to(self.proj.weight.dtype))), out_mask

    def run_mllm(self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen LLM on input embeddings -> last hidden states. Not under no_grad: the RQA's
        gradient must flow through it. position_ids: Qwen2.5-VL's [3, B, L] M-RoPE ids; None:
        sequential ids from each sample's first real token."""
        if position_ids is not None:
            attn = None if mask is None else mask.long()
        elif mask is None:
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
