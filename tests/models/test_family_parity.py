"""Our generator families against the real diffusers classes (tiny random configs, CPU, fp32).

For each family (FLUX, Z-Image / S3-DiT, Qwen-Image):
  * diffusers checkpoint (sharded) -> our load_diffusers -> same outputs and weight gradients
    at token level, and same outputs through the shared IOMM interface (padded and
    left-padded conditions, sign and time convention);
  * our model -> save_diffusers (sharded) -> diffusers from_pretrained -> same outputs, and
    strict keys both ways (a deleted or extra key is an error);
  * padded and unpadded conditions give the same outputs (sdpa and math attention);
  * a tiny diffusers pipeline gives the same image with our exported transformer, and with
    our model driving it, as with the original.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel, ZImagePipeline,
                       ZImageTransformer2DModel)
from iomm_scale.models.adapters import flux as flux_adapter
from iomm_scale.models.adapters import qwen_image as qwen_adapter
from iomm_scale.models.adapters import zimage as zimage_adapter
from iomm_scale.models.adapters.common import INDEX_NAME, AdapterError, convert_to_theirs
from iomm_scale.models.flux_mmdit import masked_mean, pack_latents, unpack_latents

TOL = 1e-5  # relative max error, diffusers vs ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def reinit_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (std 0.05): no zero-initialised gate or pad token hides a bug.
    RMSNorm gains are 1 + N(0, 0.05^2), as in a trained model: gains near 0 after the q/k norms
    would make attention nearly uniform, and RoPE or masking bugs would then go unseen."""
    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, RMSNorm) and m.weight is not None:
                m.weight.add_(1.0)
    return model.eval()


# --- the families: how to build each diffusers model and call it the way its pipeline does ---

@dataclass
class Family:
    name: str
    adapter: object
    build_ref: Callable[[], torch.nn.Module]
    ref_velocity: Callable  # (ref, latents, t, cond, mask) -> what our IOMM forward must return
    cond_dim: int
    latent_hw: tuple[int, int] = (8, 8)


def _compact(cond, mask):
    """The pipelines' layout: each sample's real tokens first, right-padded to the longest."""
    rows = [c[m] for c, m in zip(cond, mask)]
    n = max(len(r) for r in rows)
    out = torch.stack([torch.cat([r, r.new_zeros(n - len(r), r.shape[1])]) for r in rows])
    keep = torch.stack([torch.arange(n) < len(r) for r in rows])
    return rows, out, keep


def flux_ref_velocity(ref, latents, t, cond, mask):
    tokens, img_ids = pack_latents(latents, 2)
    full = torch.cat([mask, torch.ones(tokens.shape[:2], dtype=torch.bool)], 1)
    out = ref(tokens, cond, masked_mean(cond, mask), t, img_ids, torch.zeros(cond.shape[1], 3),
              joint_attention_kwargs={"attention_mask": full[:, None, None, :]}).sample
    return unpack_latents(out, latents.shape, 2)


def zimage_ref_velocity(ref, latents, t, cond, mask):
    # ZImagePipeline: timestep (1000 - sigma * 1000) / 1000, per-sample lists, negated output
    rows, _, _ = _compact(cond, mask)
    out = ref(list(latents.unsqueeze(2)), 1 - t, rows, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def qwen_ref_velocity(ref, latents, t, cond, mask):
    _, cond, keep = _compact(cond, mask)
    tokens, _ = pack_latents(latents, 2)
    shapes = [[(1, latents.shape[2] // 2, latents.shape[3] // 2)]] * latents.shape[0]
    out = ref(tokens, cond, keep, t, shapes, return_dict=False)[0]
    return unpack_latents(out, latents.shape, 2)


FAMILIES = {
    "flux": Family("flux", flux_adapter, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        flux_ref_velocity, cond_dim=32),
    "s3dit": Family("s3dit", zimage_adapter, lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64]),
        zimage_ref_velocity, cond_dim=32, latent_hw=(6, 10)),
    "qwen_mmdit": Family("qwen_mmdit", qwen_adapter, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(4, 6, 6)),
        qwen_ref_velocity, cond_dim=64, latent_hw=(6, 10)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, diffusers model, its sharded checkpoint directory)."""
    fam = FAMILIES[request.param]
    torch.manual_seed(0)
    ref = reinit_(fam.build_ref())
    path = tmp_path_factory.mktemp(f"{fam.name}_ref")
    ref.save_pretrained(path, max_shard_size="60KB")
    assert (path / INDEX_NAME).exists(), "the reference checkpoint should be sharded"
    return fam, ref, path


def iomm_inputs(fam: Family, seed: int = 1):
    """3 samples; conditions of 5, 37 and 40 real tokens in 45 slots (one left-padded), with
    garbage in the padding: lengths straddle Z-Image's multiple of 32."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, 16, *fam.latent_hw, generator=g)
    t = torch.rand(3, generator=g)
    cond = torch.randn(3, 45, fam.cond_dim, generator=g)
    mask = torch.zeros(3, 45, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 8:] = True  # left padding
    mask[2, :40] = True
    cond = torch.where(mask[..., None], cond, 100.0)
    return latents, t, cond, mask


def token_inputs(name: str, seed: int = 2):
    """Inputs to forward_tokens, exactly as diffusers' forward takes them."""
    g = torch.Generator().manual_seed(seed)
    if name == "flux":
        x, c = torch.randn(2, 16, 64, generator=g), torch.randn(2, 7, 32, generator=g)
        _, img_ids = pack_latents(torch.zeros(1, 16, 8, 8))
        return (x, c, torch.randn(2, 32, generator=g), torch.rand(2, generator=g), img_ids, torch.zeros(7, 3)), {}
    if name == "s3dit":  # images of different sizes and condition lengths in one batch
        xs = [torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 6, 10, generator=g), torch.randn(16, 1, 4, 4, generator=g)]
        caps = [torch.randn(n, 32, generator=g) for n in (5, 40, 32)]
        return (xs, torch.rand(3, generator=g), caps), {}
    x, c = torch.randn(2, 15, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    return (x, c, mask, torch.rand(2, generator=g), [[(1, 3, 5)]] * 2), {}  # odd sides: RoPE centring matters


def outputs(out) -> list[torch.Tensor]:
    if hasattr(out, "sample"):
        out = out.sample
    if isinstance(out, tuple):
        out = out[0]
    return list(out) if isinstance(out, list) else [out]


# --- diffusers -> ours ---

def test_load_matches_diffusers_tokens(family):
    """Outputs, and the gradients of every weight (mapped to diffusers' layout), match."""
    fam, ref, path = family
    ours = fam.adapter.load_diffusers(path).eval()
    args, kwargs = token_inputs(fam.name)
    expected = outputs(ref(*args, **kwargs))
    got = outputs(ours.forward_tokens(*args, **kwargs))
    for e, o in zip(expected, got, strict=True):
        assert e.shape == o.shape
        assert rel_err(e, o) <= TOL

    g = torch.Generator().manual_seed(3)
    probes = [torch.randn(e.shape, generator=g) for e in expected]

    def grads(outs, params):  # the last block's condition-stream MLP gets none: it feeds nothing
        gs = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, probes)), list(params.values()), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), gs)]

    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    ref_grads, our_grads = grads(expected, ref_params), grads(got, our_params)
    ours_as_theirs = dict(convert_to_theirs(dict(zip(our_params, our_grads)), fam.adapter.key_maps(ours.cfg)))
    assert set(ours_as_theirs) == set(ref_params)
    scale = max(gr.abs().max() for gr in ref_grads)
    for key, gr in zip(ref_params, ref_grads):
        assert (gr - ours_as_theirs[key]).abs().max() <= TOL * scale, key


def test_iomm_forward_matches_pipeline_convention(family):
    """Our `forward(latents, t, cond, mask)` = the diffusers model called as its pipeline calls it,
    turned into v = noise - x0 with t = 1 pure noise; padded, left-padded conditions included."""
    fam, ref, path = family
    ours = fam.adapter.load_diffusers(path).eval()
    latents, t, cond, mask = iomm_inputs(fam)
    with torch.no_grad():
        expected = fam.ref_velocity(ref, latents, t, cond, mask)
        got = ours(latents, t, cond, mask)
    assert got.shape == latents.shape
    assert rel_err(expected, got) <= TOL


# --- ours -> diffusers, and strict keys ---

def test_save_roundtrip_through_diffusers(family, tmp_path):
    fam, ref, path = family
    ours = fam.adapter.load_diffusers(path).eval()
    with torch.no_grad():  # make it ours: the export must carry our weights, not the original's
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    fam.adapter.save_diffusers(ours, tmp_path, max_shard_bytes=80_000)
    assert (tmp_path / INDEX_NAME).exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    back, info = type(ref).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(back.state_dict()) == set(ref.state_dict())
    args, kwargs = token_inputs(fam.name)
    with torch.no_grad():
        for e, o in zip(outputs(back.eval()(*args, **kwargs)), outputs(ours.forward_tokens(*args, **kwargs)), strict=True):
            assert rel_err(e, o) <= TOL
    # and back into ours, bit for bit, from the shards and from one file
    single = tmp_path / "single"
    fam.adapter.save_diffusers(ours, single)
    assert [f.name for f in single.glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    for again in (fam.adapter.load_diffusers(tmp_path), fam.adapter.load_diffusers(single)):
        for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), k


def _edit_first_shard(src, dst, edit):
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_NAME).read_text())
    shard = dst / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(shard)
    key = edit(tensors)
    save_file(tensors, shard)
    return key


def _drop_one(tensors: dict) -> str:
    key = sorted(tensors)[0]
    del tensors[key]
    return key


def _add_one(tensors: dict) -> str:
    tensors["extra_block.weight"] = torch.zeros(2)
    return "extra_block.weight"


def test_missing_key_is_an_error(family, tmp_path):
    fam, _, path = family
    key = _edit_first_shard(path, tmp_path / "ckpt", _drop_one)
    with pytest.raises(AdapterError, match="missing keys.*" + key.replace(".", r"\.")):
        fam.adapter.load_diffusers(tmp_path / "ckpt")


def test_unexpected_key_is_an_error(family, tmp_path):
    fam, _, path = family
    _edit_first_shard(path, tmp_path / "ckpt", _add_one)
    with pytest.raises(AdapterError, match=r"unexpected keys.*extra_block\.weight"):
        fam.adapter.load_diffusers(tmp_path / "ckpt")


def test_key_in_a_stale_shard_is_an_error(family, tmp_path):
    """A key the index places in one shard but also present in another (a stale file left by an
    earlier save) must not load whichever shard sorts last."""
    fam, _, path = family
    index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    first, last = sorted(set(index.values()))[0], sorted(set(index.values()))[-1]
    assert first != last, "the fixture should be sharded"
    key = next(k for k, f in sorted(index.items()) if f == first)

    def plant(tensors: dict) -> str:  # a stale copy of `key` into the last shard
        tensors[key] = torch.full_like(load_file(path / first)[key], 7.0)
        return key

    shutil.copytree(path, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / last
    tensors = load_file(shard)
    plant(tensors)
    save_file(tensors, shard)
    with pytest.raises(AdapterError, match=re.escape(key) + " is in both"):
        fam.adapter.load_diffusers(tmp_path / "ckpt")


def test_missing_piece_of_a_fused_tensor_is_named_alone(family, tmp_path):
    """Dropping one of q / k / v names that one, not all three pieces of the fused tensor."""
    fam, _, path = family
    index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    key = next(k for k in sorted(index) if k.endswith("to_k.weight"))
    sibling = key.replace("to_k.weight", "to_q.weight")
    shutil.copytree(path, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / index[key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    with pytest.raises(AdapterError, match="missing keys") as err:
        fam.adapter.load_diffusers(tmp_path / "ckpt")
    assert key in str(err.value) and sibling not in str(err.value.args[0].split("missing keys")[1])


def test_export_of_unmapped_weight_is_an_error(family, tmp_path):
    fam, _, path = family
    ours = fam.adapter.load_diffusers(path)
    ours.register_parameter("stray", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(AdapterError, match="stray"):
        fam.adapter.save_diffusers(ours, tmp_path)


# --- padding invariance ---

@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_padded_conditions_change_nothing(family, backend):
    """Each sample alone with only its real tokens = the same sample in a padded batch."""
    fam, _, path = family
    ours = fam.adapter.load_diffusers(path, attention_backend=backend).eval()
    latents, t, cond, mask = iomm_inputs(fam)
    with torch.no_grad():
        batched = ours(latents, t, cond, mask)
        for i in range(3):
            alone = ours(latents[i : i + 1], t[i : i + 1], cond[i : i + 1, mask[i]])
            assert rel_err(alone[0], batched[i]) <= 2e-6, f"sample {i}"  # fp32 rounding; a mask bug is >= 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_empty_condition_is_finite(family, backend):
    """A sample whose condition is all padding (e.g. dropped for classifier-free guidance)
    gives finite outputs and gradients, and leaves the other samples unchanged."""
    fam, _, path = family
    ours = fam.adapter.load_diffusers(path, attention_backend=backend).eval()
    latents, t, cond, mask = iomm_inputs(fam)
    mask = mask.clone()
    mask[1] = False
    out = ours(latents, t, cond, mask)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    with torch.no_grad():
        alone = ours(latents[:1], t[:1], cond[:1, mask[0]])
    assert rel_err(alone[0], out[0].detach()) <= 2e-6


# --- whole diffusers pipelines ---

def tiny_tokenizer(max_length: int):
    """A byte-level BPE trained in milliseconds, wrapped as Qwen2Tokenizer (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["a photo of a cat", "a red cube on a table", "describe the image in detail"] * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token=None)
    tok.model_max_length = max_length
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def tiny_flux_vae():
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()


def build_pipeline(name: str, transformer):
    from transformers import (CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen3Config, Qwen3Model, T5Config, T5EncoderModel)

    torch.manual_seed(0)
    tok = tiny_tokenizer(16)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "flux":
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=16, projection_dim=32, **ids))
        t5 = T5EncoderModel(T5Config(vocab_size=300, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, **ids))
        return FluxPipeline(FlowMatchEulerDiscreteScheduler(), tiny_flux_vae(), clip.eval(), tok, t5.eval(), tok, transformer)
    if name == "s3dit":
        qwen3 = Qwen3Model(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, **ids))
        return ZImagePipeline(FlowMatchEulerDiscreteScheduler(), tiny_flux_vae(), qwen3.eval(), tok, transformer)
    vl = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, rope_scaling={"mrope_section": [4, 6, 6], "rope_type": "default"}, **ids),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=64),
        vocab_size=320, image_token_id=310, video_token_id=311, vision_start_token_id=312, vision_end_token_id=313))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    return QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), vae.eval(), vl.eval(), tok, transformer)


def drive_with(ours, name: str):
    """A diffusers transformer's forward replaced by our model's forward_tokens."""
    if name == "flux":
        return lambda **kw: (ours.forward_tokens(kw["hidden_states"], kw["encoder_hidden_states"], kw["pooled_projections"],
                                                 kw["timestep"], kw["img_ids"], kw["txt_ids"]),)
    if name == "s3dit":
        return lambda x, t, caps, **kw: (ours.forward_tokens(x, t, caps),)
    return lambda **kw: (ours.forward_tokens(kw["hidden_states"], kw["encoder_hidden_states"],
                                             kw["encoder_hidden_states_mask"], kw["timestep"], kw["img_shapes"]),)


def test_pipeline_same_image(family, tmp_path):
    fam, ref, path = family
    ours = fam.adapter.load_diffusers(path).eval()
    fam.adapter.save_diffusers(ours, tmp_path, max_shard_bytes=80_000)
    exported = type(ref).from_pretrained(tmp_path).eval()
    # Two prompts of different lengths: padded conditions (and for Z-Image, CFG with an empty
    # negative prompt doubles the batch).
    call = dict(prompt=["a photo of a cat", "a red cube"], num_inference_steps=2, output_type="pt", max_sequence_length=16)
    call.update(dict(height=64, width=64) if fam.name != "qwen_mmdit" else dict(height=32, width=32))

    images = {}
    for label, transformer in (("original", ref), ("exported", exported), ("ours", exported)):
        pipe = build_pipeline(fam.name, transformer)
        pipe.set_progress_bar_config(disable=True)
        if label == "ours":
            pipe.transformer.forward = drive_with(ours, fam.name)
        with torch.no_grad():
            images[label] = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert images["original"].shape[-2:] == (call["height"], call["width"])
    assert images["original"].std() > 1e-3  # a real image, not a constant
    assert (images["exported"] - images["original"]).abs().max() <= 1e-5
    assert (images["ours"] - images["original"]).abs().max() <= 1e-5
