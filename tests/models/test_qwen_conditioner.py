"""The Qwen2.5-VL conditioner (tiny random Qwen2_5_VLForConditionalGeneration, the real class)
against the model's own image path: its image processor's patches, `get_image_features`,
`get_rope_index` and the forward on input_ids + pixel_values."""

import os

import numpy as np
import pytest
import torch

from iomm_scale.config import ConfigError, load_config
from iomm_scale.iomm import build_iomm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_qwen_lora.yaml")
FAST = ["data.batch_size=4", "train.progress_bar=false", "train.num_samples=0", "train.resume=never",
        "data.builtin.crops_per_photo=1"]
TOL = 1e-5  # relative, float32 (the same computation in another order: ~1e-7 seen)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_iomm(load_config(CONFIG, FAST + ["model.conditioner.condition_positions=all"]))


def _uint8_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _pixels(images):  # what the data pipeline gives: [B, 3, H, W] in [-1, 1]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _reference_inputs(cond, images):
    """input_ids [aux | <|vision_start|> | <|image_pad|> x T | <|vision_end|>] as the Qwen2.5-VL
    processor lays out an image after a prompt, and the processor's pixel_values."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    mc = cond.mllm.config
    proc = Qwen2VLImageProcessorPil(patch_size=mc.vision_config.patch_size, merge_size=mc.vision_config.spatial_merge_size,
                                    temporal_patch_size=mc.vision_config.temporal_patch_size, do_resize=False)
    px = proc(images=list(images), return_tensors="pt")
    t = cond.num_image_tokens
    image = [mc.vision_start_token_id] + [mc.image_token_id] * t + [mc.vision_end_token_id]
    ids = torch.cat([cond.aux_ids, torch.tensor(image)])
    ids = ids[None].expand(len(images), -1)
    return ids, (ids == mc.image_token_id).int(), px["pixel_values"], px["image_grid_thw"]


def test_vision_features_equal_the_models_image_path(model):
    """Our resize-free preprocessing + patchify = Qwen2VLImageProcessor's pixel_values, and the
    features = Qwen2_5_VLModel.get_image_features on them (one fixed-resolution image each)."""
    cond = model.conditioner
    images = _uint8_images(3)
    _, _, pixel_values, grid = _reference_inputs(cond, images)
    ours = cond.vision_inputs(_pixels(images))
    assert torch.equal(ours["image_grid_thw"], grid)
    assert (ours["pixel_values"] - pixel_values).abs().max() < 1e-5  # u/255 vs (u/127.5 - 1 + 1)/2: rounding only
    out = cond.mllm.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid).pooler_output
    expected = torch.stack(list(out))
    got = cond.vision_features(_pixels(images))
    assert got.shape == (3, cond.num_image_tokens, cond.hidden_size) == (3, 16, 64)
    assert rel_err(got, expected) <= TOL


def _record_positions(cond, monkeypatch):
    seen = {}
    original = cond.run_mllm

    def spy(x, mask, position_ids=None):
        seen["positions"], seen["mask"] = position_ids, mask
        return original(x, mask, position_ids)

    monkeypatch.setattr(cond, "run_mllm", spy)
    return seen


@torch.no_grad()
def test_condition_equals_the_models_forward_on_input_ids(model, monkeypatch):
    """Image-only samples, mask ratio 0, condition at all positions: the MLLM outputs at the
    [aux | vision_start | image | vision_end] positions equal Qwen2_5_VLModel's forward on
    input_ids + pixel_values (causal attention: the appended queries cannot change them), and
    every position id, the RQA queries' included, equals get_rope_index's for the same layout
    with the queries as text."""
    cond = model.conditioner
    images = _uint8_images(2, seed=1)
    ids, types, pixel_values, grid = _reference_inputs(cond, images)
    seen = _record_positions(cond, monkeypatch)
    out, mask = cond(cond.vision_features(_pixels(images)), [None, None], mask_ratio=0.0)
    assert mask is None
    n = ids.shape[1]
    h = cond.mllm.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=types,
                        use_cache=False).last_hidden_state
    expected = cond.proj(cond.proj_norm(h))
    assert rel_err(out[:, :n], expected) <= TOL

    q = cond.cfg.rqa.num_queries
    ids_q = torch.cat([ids, ids.new_zeros(2, q)], 1)  # queries stand where text tokens would
    ref_pos, _ = cond.mllm.model.get_rope_index(ids_q, torch.cat([types, types.new_zeros(2, q)], 1), image_grid_thw=grid)
    assert torch.equal(seen["positions"], ref_pos)
    img = ref_pos[:, 0, :n][:, ids[0] == cond.mllm.config.image_token_id]  # (t, h, w) of a 4 x 4 grid after the prefix
    start = len(cond.aux_ids) + 1
    assert img[0].unique().tolist() == [start] and img[1].max() == img[2].max() == start + 3


@torch.no_grad()
def test_left_padded_image_sample_is_unchanged(model, monkeypatch):
    """In a mixed batch the image-only sample is left-padded behind a long caption: its real
    tokens get the unpadded sample's position ids and hidden states; the padding gets mask 0.
    The caption's ids are sequential (t = h = w), continued by its queries."""
    cond = model.conditioner
    images = _uint8_images(2, seed=2)
    feats = cond.vision_features(_pixels(images))
    caption = " ".join(["a red circle on a blue background"] * 6)
    seen = _record_positions(cond, monkeypatch)
    alone, _ = cond(feats[:1], [None], mask_ratio=0.0)
    alone_pos = seen["positions"]
    mixed, mixed_mask = cond(feats, [None, caption], mask_ratio=0.0)
    pos, mask = seen["positions"], seen["mask"]
    real = mask[0]
    assert (~real).sum() > 0, "the caption should be longer than the image sample"
    assert torch.equal(pos[:, 0, real], alone_pos[:, 0])
    assert rel_err(mixed[0][mixed_mask[0]], alone[0]) <= TOL
    cap = pos[:, 1]
    assert torch.equal(cap[0], cap[1]) and torch.equal(cap[0], cap[2])
    assert torch.equal(cap[0], torch.arange(cap.shape[1]))


def test_frozen_mllm_unchanged_and_rqa_learns_through_it():
    from iomm_scale.optim.builder import build_optimizer

    cfg = load_config(CONFIG, FAST)
    model = build_iomm(cfg)
    mllm_before = {k: v.clone() for k, v in model.conditioner.mllm.state_dict().items()}
    opt = build_optimizer(model, cfg)
    images = _pixels(_uint8_images(4, seed=3))
    for step in range(2):
        torch.manual_seed(step)
        model.loss({"pixels": images, "captions": [None, "a cup of coffee on a table", None, None]}).backward()
        assert all(p.grad is None for p in model.conditioner.mllm.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.conditioner.rqa.parameters())
        opt.step()
        opt.zero_grad()
    for k, v in model.conditioner.mllm.state_dict().items():
        assert torch.equal(v, mllm_before[k]), k


@pytest.mark.parametrize("override, key", [
    ("model.conditioner.mllm.image_size=30", "model.conditioner.mllm.image_size"),  # not a multiple of 2 x 4
    ("model.conditioner.mllm.kind=llava", "model.conditioner.mllm.kind"),
])
def test_bad_qwen_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, [override])


def test_internvl_rejects_image_size(tiny_cfg):
    with pytest.raises(ConfigError, match=r"model\.conditioner\.mllm\.image_size: only for kind qwen2_5_vl"):
        tiny_cfg("model.conditioner.mllm.image_size=448")
