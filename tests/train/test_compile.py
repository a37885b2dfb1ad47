"""train.compile: torch.compile'd generator blocks train exactly as eager ones (aot_eager on CPU:
dynamo's traced forward / backward graphs; inductor's kernels are run by the GPU check), the
layouts it is not proved under are refused by name, and no block breaks its graph."""

import pytest
import torch

from iomm_scale.config import validate
from iomm_scale.train.compile import frozen_mllm_layers
from iomm_scale.train.trainer import Trainer


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_trainer_matches_eager(tiny_cfg, tmp_path):
    import torch._dynamo

    opts = ["train.steps=3", "parallel.activation_checkpointing=full"]
    eager = Trainer(tiny_cfg(*opts), run_dir=tmp_path / "eager")
    init = {n: p.detach().clone() for n, p in eager.model.trainable_state_dict().items()}
    for _ in range(3):  # one trainer after the other: both draw noise from the global generator
        eager.train_step()
    torch._dynamo.reset()
    before = _graphs()
    compiled = Trainer(tiny_cfg(*opts, "train.compile=true", "train.compile_backend=aot_eager", "train.compile_mllm=true"),
                       run_dir=tmp_path / "compiled")
    layers = frozen_mllm_layers(compiled.model.conditioner)
    assert layers and all(l._compiled_call_impl is not None for l in layers)  # the frozen LLM's too
    for _ in range(3):
        compiled.train_step()
    assert _graphs() >= before + 3  # dynamo traced double, single and LLM layers (no silent eager fallback)
    a, b = [l for _, l in eager.history], [l for _, l in compiled.history]
    assert a == pytest.approx(b, rel=1e-5, abs=0)
    pa, pb = eager.model.trainable_state_dict(), compiled.model.trainable_state_dict()
    assert pa.keys() == pb.keys()
    # the measures of tests/parallel: weights relative to the largest weight, and each tensor's
    # update relative to the largest entry of that update (floor lr / 100). Adam's normalised
    # update turns float-rounding differences of near-zero gradients into ~1e-6 of a weight; a
    # zero-initialised bias is all update (its error relative to itself reached 1.2e-5 with
    # transformers 5.24's InternVL, which compiles to other roundings than before)
    with torch.no_grad():
        scale = max(float(p.abs().max()) for p in pa.values())
        param_rel = max(float((pa[n] - pb[n]).abs().max()) for n in pa) / scale
        floor = eager.cfg.optim.lr / 100
        update_rel = max(float((pa[n] - pb[n]).abs().max()) / max(float((pa[n] - init[n]).abs().max()), floor)
                         for n in pa)
    assert param_rel <= 1e-5 and update_rel <= 2e-3, (param_rel, update_rel)
    torch._dynamo.reset()


def test_padded_mask_does_not_break_a_compiled_block():
    """The all-True mask check lives in the model's forward (once), not in attention() inside
    each block, where it cost a host sync per block and split a compiled block in two."""
    import torch._dynamo

    from iomm_scale.models.attention import rope_angles
    from iomm_scale.models.flux_mmdit import DoubleStreamBlock, FluxConfig

    cfg = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16, context_dim=32,
                     pooled_dim=32, axes_dims_rope=(4, 6, 6), attention_backend="sdpa")
    block = DoubleStreamBlock(cfg)
    b, n_img, n_txt, d = 2, 16, 8, cfg.hidden_size
    ids = torch.cat([torch.zeros(n_txt, 3), torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4,
                                                         torch.arange(n_img) % 4], -1)])
    mask = torch.ones(b, n_txt + n_img, dtype=torch.bool)
    mask[1, 5:n_txt] = False  # sample 1: 3 padded condition tokens
    args = (torch.randn(b, n_img, d), torch.randn(b, n_txt, d), torch.randn(b, d), rope_angles(ids, (4, 6, 6), 10000.0),
            mask)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_compile_settings_are_checked(tiny_cfg):
    from iomm_scale.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.compile_backend: must be one of .* got 'tensorrt'"):
        tiny_cfg("train.compile_backend=tensorrt")
    # tensor / pipeline parallel are proved (tests/parallel); ZeRO-3 is refused, naming the key and why
    with pytest.raises(ConfigError, match=r"parallel.zero_stage: train.compile with zero_stage=3: ZeRO-3's parameter "
                                          r"gathering splits each compiled block"):
        tiny_cfg("train.compile=true", "parallel.tp=2", "parallel.zero_stage=3")
    for ok in (["parallel.zero_stage=2"], ["parallel.tp=2"],
               ["parallel.pp=2", "parallel.zero_stage=1", "parallel.num_microbatches=2"]):
        assert not validate(tiny_cfg("train.compile=true", *ok))
    with pytest.raises(ConfigError, match=r"train.compile_mllm: .*only together with train.compile: true"):
        tiny_cfg("train.compile_mllm=true")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_compiled_trainer_matches_eager_on_cuda(tiny_cfg, tmp_path):
    """inductor's generated kernels (Triton) under bf16 autocast, with checkpointing: the losses of
    3 steps within bf16 rounding of the eager run's."""
    import torch._dynamo

    opts = ["train.steps=3", "train.device=cuda", "train.precision=bf16", "parallel.activation_checkpointing=full"]
    eager = Trainer(tiny_cfg(*opts), run_dir=tmp_path / "eager")
    for _ in range(3):
        eager.train_step()
    torch._dynamo.reset()
    before = _graphs()
    compiled = Trainer(tiny_cfg(*opts, "train.compile=true", "train.compile_mllm=true"), run_dir=tmp_path / "compiled")
    for _ in range(3):
        compiled.train_step()
    assert _graphs() > before
    assert [l for _, l in eager.history] == pytest.approx([l for _, l in compiled.history], rel=2e-2)
    torch._dynamo.reset()


def _tiny_generator(family):
    """(a tiny generator of `family`, its latent channels)."""
    from iomm_scale.models.flux_mmdit import FluxConfig, FluxMMDiT
    from iomm_scale.models.qwen_mmdit import QwenMMDiT, QwenMMDiTConfig
    from iomm_scale.models.s3dit import S3DiT, S3DiTConfig

    torch.manual_seed(0)
    if family == "flux":
        return FluxMMDiT(FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16,
                                    context_dim=32, pooled_dim=32, axes_dims_rope=(4, 6, 6), attention_backend="sdpa")), 4
    if family == "s3dit":
        return S3DiT(S3DiTConfig(in_channels=4, num_layers=1, num_refiner_layers=1, num_heads=2, head_dim=16,
                                 context_dim=32, axes_dims=(4, 6, 6), attention_backend="sdpa")), 4
    return QwenMMDiT(QwenMMDiTConfig(in_channels=16, out_channels=4, num_layers=1, num_heads=2, head_dim=16,
                                     context_dim=32, axes_dims_rope=(4, 6, 6), attention_backend="sdpa")), 4


@pytest.mark.parametrize("family", ["flux", "s3dit", "qwen_mmdit"])
def test_compiled_blocks_rotate_without_complex_ops(family):
    """Inductor generates no code for complex ops: a complex-multiply RoPE inside a compiled block
    runs as separate eager kernels. Compiled blocks take the real form (attention.rotate_pairs):
    no op of their traced graphs computes a complex tensor, and forward and gradients equal the
    eager (complex) model's within 1e-5."""
    import copy

    import torch._dynamo

    generator, c = _tiny_generator(family)
    compiled = copy.deepcopy(generator)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for block in compiled.blocks():
        block.compile(backend=capture, dynamic=False)
    g = torch.Generator().manual_seed(1)
    latents, t = torch.randn(2, c, 8, 8, generator=g), torch.rand(2, generator=g)
    cond = torch.randn(2, 6, 32, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    outs = []
    for model in (generator, compiled):
        out = model(latents, t, cond, mask)
        out.square().mean().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert graphs, "dynamo traced nothing"
    def complex_result(n):  # views of the complex table (unsqueeze, slicing) cost no kernel
        v = n.meta.get("example_value")
        return isinstance(v, torch.Tensor) and v.is_complex() and not v._is_view()

    complex_ops = [f"{n.target}" for gm in graphs for n in gm.graph.nodes if n.op != "placeholder" and complex_result(n)]
    assert not complex_ops, complex_ops
    (ea, eg), (ca, cg) = outs
    torch.testing.assert_close(ca, ea, rtol=1e-5, atol=1e-6)
    for n in eg:
        torch.testing.assert_close(cg[n], eg[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    torch._dynamo.reset()


def test_rotate_pairs_equals_the_complex_multiply():
    from iomm_scale.models.attention import apply_complex_rope, apply_rope, rope_angles, rotate_pairs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, 16, generator=g)
    ids = torch.randint(0, 7, (10, 3)).float()
    cos, sin = rope_angles(ids, (4, 6, 6), 10000.0)
    ref = apply_rope(x, cos, sin)
    real = rotate_pairs(x, cos[None, :, None, ::2], sin[None, :, None, ::2])
    torch.testing.assert_close(real, ref, rtol=1e-6, atol=1e-6)
    freqs = torch.polar(torch.ones_like(cos[:, ::2]), torch.atan2(sin[:, ::2], cos[:, ::2]))
    torch.testing.assert_close(apply_complex_rope(x, freqs[:, None]), ref, rtol=1e-5, atol=1e-6)
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16
