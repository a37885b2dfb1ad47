"""Parallel pieces that need no process group: activation checkpointing gives identical
gradients, pipeline adapters reproduce every family's forward, TP shard maths round-trips."""

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _worker as W  # noqa: E402

from iomm_scale.parallel import checkpointing  # noqa: E402
from iomm_scale.parallel.pipeline import get_adapter, stage_range  # noqa: E402
from iomm_scale.parallel.tensor_parallel import shard_index, shard_tensor, unshard_tensors  # noqa: E402

FAMILIES = ["flux", "s3dit", "qwen_mmdit"]


def grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(batch["x_t"], batch["t"], batch["cond"], batch["cond_mask"]),
                                        batch["target"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,k", [("full", 1), ("every_k", 2)])
def test_activation_checkpointing_identical_gradients(family, mode, k):
    gen = W.build_generator(family)
    batch = W.generator_batch(gen, 0, 3)
    loss0, g0 = grads(gen, batch)
    ckpt = copy.deepcopy(gen)
    chosen = checkpointing.apply_activation_checkpointing(ckpt, mode, k)
    n = len(gen.blocks())
    assert chosen == list(range(0, n - 1, k))  # the last block is never recomputed
    assert [getattr(b, "_iomm_checkpointed", False) for b in ckpt.blocks()] == [i in chosen for i in range(n)]
    assert list(ckpt.state_dict()) == list(gen.state_dict())  # names untouched
    loss1, g1 = grads(ckpt, batch)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n  # recompute is bit-identical on CPU
    checkpointing.apply_activation_checkpointing(ckpt, "none")
    assert not any(getattr(b, "_iomm_checkpointed", False) for b in ckpt.blocks())


def test_checkpoint_mllm_identical_rqa_gradients(tiny_cfg):
    from iomm_scale.iomm import build_iomm

    model = build_iomm(tiny_cfg("data.resolution=16"))
    batch = W.iomm_batch(model, 0, 2)

    def run(m):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        m.loss(batch).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and "rqa" in n}

    g0 = run(model)
    ck = copy.deepcopy(model)
    done = checkpointing.apply_to_model(ck, "full", checkpoint_mllm=True)
    assert done["mllm"] and done["blocks"]
    g1 = run(ck)
    assert g0 and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_adapter_reproduces_forward(family):
    gen = W.build_generator(family)
    b = W.generator_batch(gen, 0, 3)
    ref = gen(b["x_t"], b["t"], b["cond"], b["cond_mask"])
    ad = get_adapter(gen)
    n = len(gen.blocks())
    st = ad.embed(gen, b["x_t"], b["t"], b["cond"], b["cond_mask"])
    for s in range(2):
        st = ad.run_blocks(gen, *stage_range(n, 2, s), st)
    out = ad.head(gen, st)
    assert torch.equal(out, ref)
    assert all(t.is_floating_point() for t in st)  # only floats cross stage boundaries


def test_shard_maths_fused_segments():
    full = torch.arange(2 * (4 + 4 + 4 + 8)).float().reshape(20, 2)
    sizes = (4, 4, 4, 8)
    assert shard_index(20, sizes, 2, 1).tolist() == [2, 3, 6, 7, 10, 11, 16, 17, 18, 19]
    shards = [shard_tensor(full, 0, sizes, 2, r) for r in range(2)]
    assert torch.equal(unshard_tensors(shards, 0, sizes), full)
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        shard_index(20, sizes, 3, 0)


def test_checkpoint_mllm_really_drops_the_llm_activations(tiny_cfg):
    """checkpoint_mllm must change what autograd keeps (per decoder layer), not only leave the
    gradients alone: count the bytes saved for backward in the frozen LLM's forward."""
    import torch

    from iomm_scale.iomm import build_iomm
    from iomm_scale.parallel import checkpointing

    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        feats = torch.randn(2, model.conditioner.num_image_tokens, model.conditioner.hidden_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.conditioner(feats, [None, None])
        return total[0]

    plain = build_iomm(tiny_cfg())
    ck = build_iomm(tiny_cfg())
    checkpointing.apply_to_model(ck, "none", checkpoint_mllm=True)
    layers = checkpointing.mllm_decoder_layers(ck.conditioner.mllm)
    assert layers and all(getattr(layer, "_iomm_checkpointed", False) for layer in layers)
    assert saved_bytes(ck) < 0.6 * saved_bytes(plain)
