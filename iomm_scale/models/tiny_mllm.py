"""A tiny random-weight InternVL (the real transformers class) and an offline tokenizer.

No hub is reachable from tests or from the CPU smoke run, so `configs/tiny.yaml` and the
tests build the MLLM from a small config with random weights, and train a byte-level BPE
tokenizer on a fixed corpus in a fraction of a second. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN = "<IMG_CONTEXT>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", IMAGE_TOKEN]
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


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=SPECIAL_TOKENS, show_progress=False,
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
