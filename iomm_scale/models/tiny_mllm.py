"""Tiny random-weight MLLMs (the real transformers classes) and an offline tokenizer.

No hub is reachable from tests or from the CPU smoke run, so `configs/tiny.yaml` and the
tests build the MLLM from a small config with random weights, and train a byte-level BPE
tokenizer on a fixed corpus in a fraction of a second. Deterministic for a seed.

Two kinds, from the same `TinyMLLMConfig`:
    internvl     InternVLForConditionalGeneration (IOMM-B / L / XL's InternVL3)
    qwen2_5_vl   Qwen2_5_VLForConditionalGeneration (Qwen-Image's text encoder): windowed
                 ViT over flattened patches + 2x2 patch merger, M-RoPE language model; the
                 tokenizer carries <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN = "<IMG_CONTEXT>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", IMAGE_TOKEN]
# Qwen2.5-VL's own special tokens (same names as the released tokenizer).
QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE_PAD, QWEN_VIDEO_PAD = (
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", QWEN_VISION_START, QWEN_VISION_END,
                       QWEN_IMAGE_PAD, QWEN_VIDEO_PAD]
TINY_KINDS = ("internvl", "qwen2_5_vl")
# Qwen2.5's chat format, which InternVL3 uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Generate an image that is identical to the reference image:",
    "The same as:",
    "a photo of a cat sitting on a sofa", "an astronaut in a white suit", "a cup of coffee on a table",
    "a red circle on a blue background", "a green square and a yellow triangle", "the rocket on the launch pad",
    "a colourful wheel of hues", "stars and galaxies in deep space", "a close-up of stained tissue",
    "user assistant system image picture drawing painting render scene large small left right top bottom",
    "0 1 2 3 4 5 6 7 8 9 one two three four five six seven eight nine ten",
]


@dataclass
class TinyMLLMConfig:
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 32
    vision_patch: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 512

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.image_size % self.vision_patch:
            errors.append(("image_size", f"must be divisible by vision_patch={self.vision_patch}"))
        elif (self.image_size // self.vision_patch) % 2:
            errors.append(("image_size", "image_size / vision_patch must be even (InternVL's 0.5 pixel shuffle)"))
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            errors.append(("text_heads", "text_hidden % text_heads and text_heads % text_kv_heads must be 0"))
        return errors


def build_tokenizer(vocab_size: int = 512, kind: str = "internvl"):
    """Byte-level BPE with the kind's special tokens. The number of merges does not depend on
    the kind, so a text tokenizes to the same number of tokens for both (ids differ)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = QWEN_SPECIAL_TOKENS if kind == "qwen2_5_vl" else SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    size = vocab_size - 16 + len(specials) - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_internvl_config(cfg: TinyMLLMConfig) -> dict:
    """InternVLConfig keyword arguments (all but the image token id, which the tokenizer fixes)."""
    return dict(
        vision_config=dict(hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                           num_attention_heads=cfg.vision_heads, intermediate_size=2 * cfg.vision_hidden,
                           image_size=[cfg.image_size, cfg.image_size], patch_size=[cfg.vision_patch, cfg.vision_patch]),
        text_config=dict(model_type="qwen2", vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden,
                         intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
                         max_position_embeddings=1024, tie_word_embeddings=True),
        image_seq_length=(cfg.image_size // cfg.vision_patch) ** 2 // 4, downsample_ratio=0.5,
    )


def build_tiny_internvl(cfg: TinyMLLMConfig, seed: int = 0):
    """-> (InternVLForConditionalGeneration with random weights, tokenizer)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    tokenizer = build_tokenizer(cfg.vocab_size)
    config = InternVLConfig(**tiny_internvl_config(cfg), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    # A private RNG stream: building the MLLM must not shift the training run's random numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    return model, tokenizer


def tiny_qwen2_5_vl_config(cfg: TinyMLLMConfig) -> dict:
    """Qwen2_5_VLConfig keyword arguments (all but the special token ids, which the tokenizer
    fixes). The ViT has Qwen2.5-VL's structure at toy size: windowed attention in every
    layer but the last (window = half the image side, so a 4 x 4 merged grid has 4 windows),
    2x2 spatial merge, 2-frame temporal patches; M-RoPE sections in Qwen2.5-VL's 1 : 1.5 : 1.5
    ratio (16, 24, 24 of 64 for the 7B model)."""
    head_dim = cfg.text_hidden // cfg.text_heads
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    return dict(
        vision_config=dict(depth=cfg.vision_layers, hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                           num_heads=cfg.vision_heads, out_hidden_size=cfg.text_hidden, patch_size=cfg.vision_patch,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=cfg.image_size // 2,
                           fullatt_block_indexes=[cfg.vision_layers - 1]),
        text_config=dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         num_key_value_heads=cfg.text_kv_heads, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [t_sec, h_sec, half - t_sec - h_sec]}),
        tie_word_embeddings=True,
    )


def build_tiny_qwen2_5_vl(cfg: TinyMLLMConfig, seed: int = 0):
    """-> (Qwen2_5_VLForConditionalGeneration with random weights, tokenizer)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(cfg.vocab_size, kind="qwen2_5_vl")
    ids = tokenizer.convert_tokens_to_ids
    conf = tiny_qwen2_5_vl_config(cfg)
    special = dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    conf["text_config"].update(special)
    config = Qwen2_5_VLConfig(**conf, image_token_id=ids(QWEN_IMAGE_PAD), video_token_id=ids(QWEN_VIDEO_PAD),
                              vision_start_token_id=ids(QWEN_VISION_START), vision_end_token_id=ids(QWEN_VISION_END))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model, tokenizer


def build_tiny_mllm(kind: str, cfg: TinyMLLMConfig, seed: int = 0):
    """-> (tiny random MLLM of `kind`, its offline tokenizer)."""
    if kind == "qwen2_5_vl":
        return build_tiny_qwen2_5_vl(cfg, seed)
    return build_tiny_internvl(cfg, seed)
