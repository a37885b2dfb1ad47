"""LoRA on the Qwen-Image generator (configs/tiny_qwen_lora.yaml: tiny Qwen-Image MMDiT + tiny
random Qwen2.5-VL): what trains, frozen weights, resume, export to diffusers, config errors."""

import os

import pytest
import torch

from iomm_scale.config import ConfigError, load_config
from iomm_scale.iomm import build_iomm
from iomm_scale.models.lora import is_lora_param, lora_modules
from iomm_scale.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_qwen_lora.yaml")
FAST = ["data.batch_size=4", "train.progress_bar=false", "train.num_samples=0", "train.resume=never",
        "data.builtin.crops_per_photo=1", "train.log_every=1", "train.ckpt_every=0"]
EXPORT_TOL = 1e-5  # relative error of the diffusers model with the exported LoRA vs ours (float32; ~1e-7 seen)


def cfg_of(*overrides):
    return load_config(CONFIG, FAST + list(overrides))


def _is_new_module(name):  # the IOMM-new trainable modules of the conditioner
    return name.startswith(("conditioner.rqa.", "conditioner.proj_norm.", "conditioner.proj."))


def test_only_lora_rqa_and_projection_train():
    from iomm_scale.optim.builder import build_optimizer

    cfg = cfg_of()
    model = build_iomm(cfg)
    trainable = set(model.trainable_state_dict())
    assert trainable == {n for n, _ in model.named_parameters() if is_lora_param(n) or _is_new_module(n)}
    assert not any(p.requires_grad for n, p in model.generator.named_parameters() if not is_lora_param(n))
    # every attention and MLP linear of both blocks, not the AdaLN modulation or the embedders
    adapted = set(lora_modules(model.generator))
    per_block = {"img_qkv", "txt_qkv", "img_out", "txt_out", "img_mlp.fc1", "img_mlp.fc2", "txt_mlp.fc1", "txt_mlp.fc2"}
    assert adapted == {f"double_blocks.{i}.{m}" for i in range(2) for m in per_block}
    for optim in ("adamw", "muon"):  # the optimizer (and Muon's routing) sees exactly the trainable set
        opt = build_optimizer(model, cfg_of(f"optim.name={optim}"))
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        assert ids == {id(p) for n, p in model.named_parameters() if n in trainable}


def test_training_keeps_base_frozen_and_loss_falls(tmp_path):
    t = Trainer(cfg_of("train.steps=24", "data.batch_size=8"), run_dir=tmp_path)
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("generator.") for n in frozen) and any(".mllm." in n for n in frozen)
    lora_before = {n: p.detach().clone() for n, p in t.model.named_parameters() if is_lora_param(n)}
    for _ in range(24):
        t.train_step()
    losses = [loss for _, loss in t.history]
    assert sum(losses[-6:]) / 6 < 0.9 * sum(losses[:6]) / 6, losses
    params = dict(t.model.named_parameters())
    for n, v in frozen.items():
        assert torch.equal(params[n], v), n  # bit-identical
    unchanged = {n.split(".lora_")[0] for n, v in lora_before.items() if torch.equal(params[n], v)}
    # only the adapters whose output feeds nothing: the last block's condition-stream out / MLP (as in diffusers)
    assert unchanged == {f"generator.double_blocks.1.{m}" for m in ("txt_out", "txt_mlp.fc1", "txt_mlp.fc2")}


def test_resume_is_bitwise_identical_and_checks_the_base(tmp_path):
    opts = ["optim.ema_decay=0.9"]
    straight = Trainer(cfg_of("train.steps=4", *opts), run_dir=tmp_path / "a")
    for _ in range(4):
        straight.train_step()
    first = Trainer(cfg_of("train.steps=2", *opts), run_dir=tmp_path / "b")
    for _ in range(2):
        first.train_step()
    path = first.save()
    state = torch.load(path / "state.pt", weights_only=False)
    assert all(is_lora_param(n) or _is_new_module(n) for n in state["model"])  # the base is not saved ...
    assert state["lora_base"] == first._lora_base()  # ... its checksum is
    resumed = Trainer(cfg_of("train.steps=4", *opts, "train.resume=auto"), run_dir=tmp_path / "b")
    assert resumed.step == 2
    for _ in range(2):
        resumed.train_step()
    assert [l for _, l in straight.history] == [l for _, l in resumed.history]  # bitwise
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]) for k in a)

    other = build_iomm(cfg_of())
    with torch.no_grad():
        other.generator.double_blocks[0].img_qkv.base_layer.weight.add_(1e-3)
    with pytest.raises(ValueError, match="another base generator"):
        Trainer(cfg_of("train.resume=auto"), run_dir=tmp_path / "b", model=other)


def _tiny_diffusers_base(root):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(4, 6, 6))
    ref.save_pretrained(root / "transformer")
    return ref


BASE_SHAPE = ["model.generator.in_channels=64", "model.generator.out_channels=16", "model.generator.num_heads=2",
              "model.generator.head_dim=16", "model.generator.axes_dims_rope=[4,6,6]", "model.generator.context_dim=64",
              "model.vae={type: autoencoder_kl, random_init: true}"]


def test_export_loads_into_the_diffusers_pipeline(tmp_path):
    """A pretrained base from a diffusers directory (model.generator.path), LoRA with alpha != r,
    exported; QwenImagePipeline.load_lora_weights into a fresh QwenImageTransformer2DModel gives
    our LoRA model's outputs (relative error <= 1e-5, float32)."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from iomm_scale.models.lora import CONDITIONER_WEIGHTS_NAME, LORA_WEIGHTS_NAME, export_lora

    ref = _tiny_diffusers_base(tmp_path / "base")
    cfg = cfg_of(f"model.generator.path={tmp_path / 'base'}", "model.generator.subfolder=transformer", *BASE_SHAPE,
                 "model.lora.r=4", "model.lora.alpha=8")
    model = build_iomm(cfg).eval()
    with torch.no_grad():  # B = 0 at init: give the adapters something to carry
        for layer in lora_modules(model.generator).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    out = export_lora(model, tmp_path / "lora")
    assert {LORA_WEIGHTS_NAME, CONDITIONER_WEIGHTS_NAME} <= set(os.listdir(out))

    transformer = QwenImageTransformer2DModel.from_pretrained(tmp_path / "base" / "transformer").eval()
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.load_lora_weights(out)
    g = torch.Generator().manual_seed(2)
    x, c, t = torch.randn(2, 15, 64, generator=g), torch.randn(2, 7, 64, generator=g), torch.rand(2, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    kw = dict(hidden_states=x, encoder_hidden_states=c, encoder_hidden_states_mask=mask, timestep=t,
              img_shapes=[[(1, 3, 5)]] * 2)
    with torch.no_grad():
        theirs = pipe.transformer(**kw).sample
        base = ref.eval()(**kw).sample
        ours = model.generator.forward_tokens(x, c, mask, t, [[(1, 3, 5)]] * 2)
    assert ((theirs - ours).norm() / theirs.norm()).item() <= EXPORT_TOL
    assert ((theirs - base).norm() / theirs.norm()).item() > 1e-2  # the adapters did load


@pytest.mark.parametrize("override, message", [
    ("model.lora.r=0", r"model\.lora\.r: must be > 0"),
    ("model.lora.dropout=1.5", r"model\.lora\.dropout"),
    ("model.lora.init=pissa", r"model\.lora\.init"),
    ("model.lora.rank=8", r"model\.lora\.rank: unknown key"),
    ("model.lora.target_modules=[img_qkv,to_q]", r"model\.lora\.target_modules\[1\]: 'to_q' matches no linear layer"),
    ("model.lora.target_modules=img_norm_q", r"model\.lora\.target_modules: regex 'img_norm_q' matches no linear"),
    ("model.lora.target_modules=[img_norm_q]", r"model\.lora\.target_modules\[0\]: 'img_norm_q' matches no linear"),
    ("model.generator.path=/nonexistent/qwen", r"model\.generator\.path: directory does not exist"),
])
def test_bad_lora_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg_of(override)


def test_generator_path_shape_mismatch_names_the_field(tmp_path):
    _tiny_diffusers_base(tmp_path)
    shape = [o for o in BASE_SHAPE if "head_dim" not in o and "axes" not in o]
    message = r"model\.generator\.num_layers: the pretrained generator at .* has 2, the config says 3"
    with pytest.raises(ConfigError, match=message):
        cfg_of(f"model.generator.path={tmp_path}", "model.generator.subfolder=transformer", *shape,
               "model.generator.head_dim=16", "model.generator.axes_dims_rope=[4,6,6]", "model.generator.num_layers=3")


def test_flops_and_memory_planner_count_the_configured_lora():
    from iomm_scale.profiling.flops import training_flops
    from iomm_scale.profiling.memory import Layout, plan_memory
    from iomm_scale.profiling.params import count_config

    cfg = cfg_of()
    assert training_flops(cfg) == training_flops(cfg, lora_rank=16)
    full = load_config(CONFIG, FAST + ["model.lora=null"])
    assert full.model.lora is None
    assert training_flops(cfg)["generator"] < training_flops(full)["generator"]  # no base weight gradients
    plan = plan_memory(cfg, Layout(micro_batch=1), device="cpu")
    assert plan.component("frozen lora base") > 0
    counts = count_config(cfg)
    model = build_iomm(cfg)
    assert counts["trainable (total)"] == sum(p.numel() for p in model.trainable_parameters())


def test_bfloat16_base_runs_under_autocast_and_stays_frozen(tmp_path):
    """model.lora.base_dtype=bfloat16 (the Qwen-Image preset: 41 instead of 82 GB): the base is
    stored in bf16, the adapters in fp32, the generator runs under bf16 autocast (CPU here), its
    output within bf16 rounding of the fp32 base's, the base bit-identical after training."""
    fp32 = build_iomm(cfg_of())
    t = Trainer(cfg_of("model.lora.base_dtype=bfloat16", "train.steps=2"), run_dir=tmp_path)
    gen = t.model.generator
    assert {p.dtype for n, p in gen.named_parameters() if not is_lora_param(n)} == {torch.bfloat16}
    assert {p.dtype for n, p in gen.named_parameters() if is_lora_param(n)} == {torch.float32}
    g = torch.Generator().manual_seed(0)
    x, tt, c = torch.randn(2, 48, 8, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 16, 64, generator=g)
    with torch.no_grad():
        ours, ref = gen(x, tt, c).float(), fp32.generator(x, tt, c)
    assert ((ours - ref).norm() / ref.norm()).item() < 2e-2
    base = {n: p.detach().clone() for n, p in gen.named_parameters() if not is_lora_param(n)}
    for _ in range(2):
        t.train_step()
    assert all(torch.equal(p, base[n]) for n, p in gen.named_parameters() if not is_lora_param(n))
    from iomm_scale.profiling.memory import Layout, plan_memory

    small = plan_memory(t.cfg, Layout(micro_batch=1), device="cpu").component("frozen lora base")
    assert small == 0.5 * plan_memory(cfg_of(), Layout(micro_batch=1), device="cpu").component("frozen lora base")


def _randomise_and_save(generator, family, out):
    """B = 0 at init: give the adapters something to carry, then write them as the export does."""
    from iomm_scale.models.lora import save_diffusers_lora

    with torch.no_grad():
        for layer in lora_modules(generator).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    save_diffusers_lora(generator, family, out)


def test_flux_export_loads_into_the_diffusers_flux_transformer(tmp_path):
    """The FLUX family (IOMM-B / L): our fused q|k|v and single-block [q|k|v|mlp] projections
    split into diffusers' to_q / to_k / to_v / proj_mlp adapters; FluxPipeline.load_lora_weights
    into the diffusers twin of our base gives our LoRA model's outputs (<= 1e-5 relative)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from iomm_scale.models.adapters import flux as flux_adapter
    from iomm_scale.models.flux_mmdit import pack_latents
    from iomm_scale.models.lora import LoRAConfig, apply_lora, to_diffusers_lora

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                 axes_dims_rope=(4, 6, 6))
    ref.save_pretrained(tmp_path / "base")
    ours = apply_lora(flux_adapter.load_diffusers(tmp_path / "base"), LoRAConfig(r=4, alpha=8.0), "flux").eval()
    _randomise_and_save(ours, "flux", tmp_path / "lora")
    names = to_diffusers_lora(ours, "flux")[1]
    assert {"single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.attn.to_q"} <= set(names)
    theirs = FluxTransformer2DModel.from_pretrained(tmp_path / "base").eval()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=theirs)
    pipe.load_lora_weights(tmp_path / "lora")

    g = torch.Generator().manual_seed(2)
    x, c, pooled, t = (torch.randn(2, 16, 64, generator=g), torch.randn(2, 7, 32, generator=g),
                       torch.randn(2, 32, generator=g), torch.rand(2, generator=g))
    _, img_ids = pack_latents(torch.zeros(1, 16, 8, 8))
    txt_ids = torch.zeros(7, 3)
    with torch.no_grad():
        got = ours.forward_tokens(x, c, pooled, t, img_ids, txt_ids)
        want = pipe.transformer(hidden_states=x, encoder_hidden_states=c, pooled_projections=pooled, timestep=t,
                                img_ids=img_ids, txt_ids=txt_ids).sample
        base = ref.eval()(hidden_states=x, encoder_hidden_states=c, pooled_projections=pooled, timestep=t,
                          img_ids=img_ids, txt_ids=txt_ids).sample
    assert ((want - got).norm() / want.norm()).item() <= EXPORT_TOL
    assert ((want - base).norm() / want.norm()).item() > 1e-2  # the adapters did load


def test_zimage_export_loads_into_the_diffusers_zimage_transformer(tmp_path):
    """The Z-Image S3-DiT family (IOMM-XL): ZImagePipeline.load_lora_weights into the diffusers
    twin of our base gives our LoRA model's outputs (<= 1e-5 relative), images of different
    sizes and condition lengths in one batch."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from iomm_scale.models.adapters import zimage as zimage_adapter
    from iomm_scale.models.lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                   n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                   axes_lens=[256, 64, 64])
    ref.save_pretrained(tmp_path / "base")
    ours = apply_lora(zimage_adapter.load_diffusers(tmp_path / "base"), LoRAConfig(r=4, alpha=8.0), "s3dit").eval()
    _randomise_and_save(ours, "s3dit", tmp_path / "lora")
    theirs = ZImageTransformer2DModel.from_pretrained(tmp_path / "base").eval()
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=theirs)
    pipe.load_lora_weights(tmp_path / "lora")

    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 6, 10, generator=g)]
    caps = [torch.randn(n, 32, generator=g) for n in (5, 40)]
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        got = torch.cat([o.flatten() for o in ours.forward_tokens(xs, t, caps)])
        want = torch.cat([o.flatten() for o in pipe.transformer(xs, t, caps, return_dict=False)[0]])
        base = torch.cat([o.flatten() for o in ref.eval()(xs, t, caps, return_dict=False)[0]])
    assert ((want - got).norm() / want.norm()).item() <= EXPORT_TOL
    assert ((want - base).norm() / want.norm()).item() > 1e-2  # the adapters did load
