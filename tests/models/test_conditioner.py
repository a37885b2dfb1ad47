"""The frozen MLLM, masked image modeling and the RQA (tiny random InternVL, the real class)."""

import math

import pytest
import torch

from iomm_scale.iomm import build_iomm


@pytest.fixture
def model(tiny_cfg):
    return build_iomm(tiny_cfg())


def _batch(n=4, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.rand(n, 3, res, res, generator=g) * 2 - 1, "captions": [None] * n}


def test_mllm_frozen_rqa_and_dit_learn(model, tiny_cfg):
    from iomm_scale.optim.builder import build_optimizer

    mllm_before = {k: v.clone() for k, v in model.conditioner.mllm.state_dict().items()}
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    opt = build_optimizer(model, tiny_cfg())
    trainable = {id(p) for p in opt.param_groups[0]["params"]}
    assert not any(id(p) in trainable for p in model.conditioner.mllm.parameters())
    for step in range(3):
        loss = model.loss(_batch(seed=step))
        loss.backward()
        assert all(p.grad is None for p in model.conditioner.mllm.parameters())
        rqa_grads = [p.grad for p in model.conditioner.rqa.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in rqa_grads)
        assert all(p.grad is not None for p in model.generator.parameters())
        opt.step()
        opt.zero_grad()
    for k, v in model.conditioner.mllm.state_dict().items():
        assert torch.equal(v, mllm_before[k]), k
    for k, v in model.vae.state_dict().items():
        assert torch.equal(v, vae_before[k]), k


def test_rqa_gradient_flows_through_the_frozen_mllm(model):
    """With condition_positions=queries the DiT sees the RQA only through the MLLM, so a
    non-zero RQA gradient must have crossed it; and it is the right gradient: autograd
    equals a float64 central finite difference along a random direction."""
    model = model.double()
    model.cfg.flow.cond_dropout = 0.0
    batch = {"pixels": _batch()["pixels"].double(), "captions": [None] * 4}
    param = model.conditioner.rqa.queries
    direction = torch.randn_like(param)

    def loss_at(offset):
        if offset == 0.0:
            torch.manual_seed(7)
            return model.loss(batch)
        with torch.no_grad():
            param.add_(offset * direction)
        torch.manual_seed(7)
        value = model.loss(batch)
        with torch.no_grad():
            param.sub_(offset * direction)
        return value

    loss = loss_at(0.0)
    (grad,) = torch.autograd.grad(loss, param)
    assert grad.abs().sum() > 0
    eps = 1e-5
    fd = (loss_at(eps).item() - loss_at(-eps).item()) / (2 * eps)
    analytic = (grad * direction).sum().item()
    # 1e-5, not tighter: transformers' Qwen2RMSNorm computes in float32 even in a float64 model,
    # which puts ~1e-6 relative noise into the finite difference. A detached or wrong gradient is off by O(1).
    assert abs(fd - analytic) <= 1e-5 * max(1.0, abs(analytic)), (fd, analytic)
    # and detaching the MLLM output kills it: the test above would fail on a detached MLLM
    original = model.conditioner.run_mllm
    model.conditioner.run_mllm = lambda x, m: original(x.detach(), m)
    try:
        torch.manual_seed(7)
        loss = model.loss(batch)
        assert not loss.requires_grad or torch.autograd.grad(loss, param, allow_unused=True)[0] is None
    finally:
        model.conditioner.run_mllm = original


def _capture_rqa_input(model):
    seen = {}
    handle = model.conditioner.rqa.register_forward_hook(lambda mod, args, out: seen.setdefault("context", args[0].detach()))
    return seen, handle


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.85])
def test_masking_zeroes_a_binomial_fraction_exactly(model, ratio):
    torch.manual_seed(0)  # the keep masks come from the global generator
    cond = model.conditioner
    pixels = _batch(n=16)["pixels"]
    feats = cond.vision_features(pixels)
    seen, handle = _capture_rqa_input(model)
    try:
        cond(feats, [None] * 16, mask_ratio=ratio)
    finally:
        handle.remove()
    aux_len = cond.aux_ids.numel()
    img = seen["context"][:, aux_len:]
    assert torch.equal(seen["context"][:, :aux_len], cond.embed_ids(cond.aux_ids).expand(16, -1, -1))
    zero = (img == 0).all(-1)
    # every token is either untouched or exactly zero
    assert torch.equal(img[~zero], feats[~zero])
    if ratio == 0.0:
        assert torch.equal(img, feats)
        return
    n = zero.numel()
    frac = zero.float().mean().item()
    sigma = math.sqrt(ratio * (1 - ratio) / n)
    assert abs(frac - ratio) < 4 * sigma, (frac, ratio, sigma)
    assert not (zero == zero[0]).all()  # each sample draws its own mask


def test_sampling_does_not_mask_the_reference_by_default(model, tiny_cfg):
    torch.manual_seed(0)
    cond = model.conditioner
    pixels = _batch(n=2)["pixels"]
    feats = cond.vision_features(pixels)
    seen, handle = _capture_rqa_input(model)  # the first RQA call: the reference's condition
    try:
        model.sample(2, tiny_cfg().data.resolution, pixels=pixels, steps=1)
    finally:
        handle.remove()
    assert torch.equal(seen["context"][:, cond.aux_ids.numel():], feats)


def test_dropped_samples_get_the_null_condition(model):
    cond = model.conditioner
    feats = cond.vision_features(_batch(n=3)["pixels"])
    drop = torch.tensor([True, False, True])
    out, mask = cond(feats, [None] * 3, drop=drop)
    null, _ = model.null_condition(1)
    torch.testing.assert_close(out[0], null[0])
    torch.testing.assert_close(out[2], null[0])
    assert not torch.allclose(out[1], null[0])


def test_text_prompts_mixed_with_images_left_padding_changes_nothing(tiny_cfg):
    model = build_iomm(tiny_cfg("model.conditioner.condition_positions=all"))
    cond = model.conditioner
    feats = cond.vision_features(_batch(n=2)["pixels"])
    captions = [None, "a red circle on a blue background"]
    both, mask = cond(feats, captions, mask_ratio=0.0)
    alone_text, _ = cond(feats[1:], captions[1:], mask_ratio=0.0)
    alone_img, _ = cond(feats[:1], captions[:1], mask_ratio=0.0)
    assert mask is not None and mask[0].all() and not mask[1].all()
    real = mask[1]
    torch.testing.assert_close(both[1][real], alone_text[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[0], alone_img[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_condition_dropout_drops_a_binomial_fraction(tiny_cfg, rate):
    torch.manual_seed(0)
    model = build_iomm(tiny_cfg(f"flow.cond_dropout={rate}"))
    seen = []
    real = model.conditioner.forward

    def spy(feats, captions=None, drop=None, **kw):
        seen.append(drop.clone())
        return real(feats, captions, drop=drop, **kw)

    model.conditioner.forward = spy
    with torch.no_grad():
        for _ in range(4):
            model.prepare_generator_inputs(_batch(n=64))
    dropped = torch.cat(seen).sum().item()
    n = 4 * 64
    assert abs(dropped - rate * n) <= 4 * math.sqrt(n * rate * (1 - rate)) + 1e-9, dropped
    if rate:
        assert dropped > 0
