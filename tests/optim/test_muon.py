"""One-device Muon: equality with torch.optim.Muon / torch.optim.AdamW, routing, fused
projections, Polar Express, resume. Tolerances are stated where a test is not bitwise."""

from __future__ import annotations

import inspect
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim._muon as torch_muon

from iomm_scale.models.flux_mmdit import FluxConfig, FluxMMDiT
from iomm_scale.optim.muon import (
    MuonWithAdamW, build_muon_param_groups, newton_schulz, orthogonalize, resolve_ns_schedule, routing_table,
)

TINY = FluxConfig(num_layers=1, num_single_layers=1, num_heads=2, head_dim=16, context_dim=32, pooled_dim=32,
                  axes_dims_rope=(4, 6, 6), in_channels=64)
SHAPES = [(48, 16), (16, 48), (24, 24), (7, 5)]  # tall, wide, square, odd


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def torch_muon_fp32(monkeypatch):
    """torch.optim.Muon with its Newton-Schulz in float32: torch's own source with the one
    bf16 cast replaced (torch hard-codes bf16)."""
    src = inspect.getsource(torch_muon._zeropower_via_newtonschulz)
    assert "grad.bfloat16()" in src, "torch's Newton-Schulz changed: update this fixture"
    namespace = dict(vars(torch_muon))
    exec(src.replace("grad.bfloat16()", "grad.float()"), namespace)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", namespace["_zeropower_via_newtonschulz"])


def run_pair(ours_kwargs, torch_kwargs, steps=5, seed=0):
    torch.manual_seed(seed)
    ours = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = MuonWithAdamW([{"params": ours, "use_muon": True}], **ours_kwargs)
    opt_ref = torch.optim.Muon(ref, **torch_kwargs)
    for _ in range(steps):
        for a, b in zip(ours, ref):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    return ours, ref, opt_ours, opt_ref


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_equals_torch_muon_bf16_bitwise(adjust_lr_fn, nesterov):
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, ref, opt_ours, opt_ref = run_pair(kw, kw)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)  # same ops in the same order: identical bits
        assert torch.equal(opt_ours.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"])


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_equals_torch_muon_fp32(torch_muon_fp32, adjust_lr_fn):
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    ours, ref, _, _ = run_pair(dict(kw, ns_dtype="float32"), kw)
    for a, b in zip(ours, ref):
        assert rel(a, b) <= 1e-6  # stated tolerance: 1e-6 relative (observed: bitwise)


def test_custom_coefficients_and_steps_match_torch():
    kw = dict(lr=0.05, ns_coefficients=(3.0, -3.2, 1.2), ns_steps=3, eps=1e-6)
    ours, ref, _, _ = run_pair(kw, kw)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_adamw_side_equals_torch_adamw_with_scheduler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    adam_kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    # Everything to AdamW (override), so the whole model is a pure AdamW comparison.
    groups = build_muon_param_groups(model, override=lambda n, p: "adamw")
    assert [g["use_muon"] for g in groups] == [False]
    ours = MuonWithAdamW(groups, adamw_lr=adam_kw["lr"], adamw_betas=adam_kw["betas"], adamw_eps=adam_kw["eps"],
                         adamw_weight_decay=adam_kw["weight_decay"])
    ref = torch.optim.AdamW(twin.parameters(), **adam_kw)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ours, ref)]
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(6):
        for m, o in ((model, ours), (twin, ref)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
        for s in sched:
            s.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_mixed_groups_each_side_matches_its_torch_optimizer():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    # No non_hidden_modules on a Sequential: only 2-D weights go to Muon, so plain tensors do too.
    ours = MuonWithAdamW(list(model.parameters()), lr=0.02, adamw_lr=1e-3)
    tw = dict(twin.named_parameters())
    t_muon = torch.optim.Muon([p for p in twin.parameters() if p.ndim == 2], lr=0.02)
    t_adam = torch.optim.AdamW([p for p in twin.parameters() if p.ndim != 2], lr=1e-3)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for _ in range(5):
        for opt in (ours, t_muon, t_adam):
            opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        F.mse_loss(twin(x), y).backward()
        ours.step()
        t_muon.step()
        t_adam.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, tw[n]), n


# ----------------------------------------------------------------------------------------------
MUON_NAMES = {f"double_blocks.0.{s}_{m}.weight" for s in ("img", "txt") for m in ("qkv", "out")} | {
    f"double_blocks.0.{s}_mlp.{fc}.weight" for s in ("img", "txt") for fc in ("fc1", "fc2")} | {
    "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight"}
MOD_NAMES = {"double_blocks.0.img_mod.weight", "double_blocks.0.txt_mod.weight", "single_blocks.0.mod.weight"}


def test_routing_flux_tiny():
    model = FluxMMDiT(TINY)
    all_names = {n for n, _ in model.named_parameters()}
    groups = build_muon_param_groups(model)
    muon, adamw = groups
    assert muon["use_muon"] and not adamw["use_muon"]
    assert set(muon["param_names"]) == MUON_NAMES
    assert set(adamw["param_names"]) == all_names - MUON_NAMES
    by_reason = dict(zip(adamw["param_names"], adamw["reasons"]))
    assert all(by_reason[n] == "modulation" for n in MOD_NAMES)
    assert by_reason["proj_out.weight"] == by_reason["x_embedder.weight"] == "non_hidden"
    assert by_reason["norm_out_mod.weight"] == "non_hidden"  # non-hidden wins over the _mod suffix
    assert by_reason["single_blocks.0.norm_q.weight"] == "norm"
    assert by_reason["double_blocks.0.img_qkv.bias"] == "bias"
    layouts = dict(zip(muon["param_names"], muon["layouts"]))
    assert layouts["double_blocks.0.img_qkv.weight"]["segments"] == [32, 32, 32]
    assert layouts["single_blocks.0.linear1.weight"]["segments"] == [32, 32, 32, 128]
    assert layouts["single_blocks.0.linear2.weight"] == {"dim": 1, "segments": [32, 128], "blocks": None, "tp_dim": 1}
    assert layouts["double_blocks.0.img_out.weight"] == {"dim": 1, "segments": None, "blocks": None, "tp_dim": 1}

    # Modulation to Muon, split per AdaLN chunk; per-head q|k|v blocks; a frozen module.
    model.time_embedder.requires_grad_(False)
    muon, adamw = build_muon_param_groups(model, modulation="muon", per_head=True)
    assert set(muon["param_names"]) == MUON_NAMES | MOD_NAMES
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & (set(muon["param_names"]) | set(adamw["param_names"]))
    layouts = dict(zip(muon["param_names"], muon["layouts"]))
    assert layouts["double_blocks.0.img_mod.weight"]["segments"] == [32] * 6
    assert layouts["single_blocks.0.linear1.weight"]["blocks"] == [16, 16, 16, None]
    table = routing_table([muon, adamw], model)
    assert f"muon: {len(muon['params'])} tensors" in table
    assert f"[frozen] not optimised: {len(frozen)} tensors" in table
    assert "single_blocks.0.linear1.weight" in table and "32/16|32/16|32/16|128" in table


class RQA(nn.Module):
    def __init__(self):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(4, 8))
        self.proj = nn.Linear(8, 8)


class Generic(nn.Module):
    """No non_hidden_modules / modulation_suffixes: name and shape rules apply."""

    def __init__(self):
        super().__init__()
        self.tok_embed = nn.Embedding(10, 8)
        self.table = nn.Embedding(10, 8)
        self.rqa = RQA()
        self.conv = nn.Conv2d(3, 8, 3)
        self.mlp = nn.Linear(8, 8)
        self.adaLN_modulation = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(()))
        self.lm_head = nn.Linear(8, 10, bias=False)


def test_routing_generic_module():
    groups = build_muon_param_groups(Generic())
    names = {g["name"]: dict(zip(g["param_names"], g["reasons"])) for g in groups}
    assert names["muon"] == {"rqa.proj.weight": "hidden", "mlp.weight": "hidden"}
    adam = names["adamw"]
    assert adam["tok_embed.weight"] == adam["lm_head.weight"] == adam["table.weight"] == "non_hidden"
    assert adam["rqa.queries"] == "queries"
    assert adam["conv.weight"] == "4-D" and adam["scale"] == "vector" and adam["norm.weight"] == "norm"
    assert adam["adaLN_modulation.weight"] == "modulation"
    opt = MuonWithAdamW(groups)
    assert len(opt.param_groups) == 2


def test_validation():
    with pytest.raises(ValueError, match="2-D"):
        MuonWithAdamW([{"params": [nn.Parameter(torch.ones(3))], "use_muon": True}])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        MuonWithAdamW([nn.Parameter(torch.ones(3, 3))], adjust_lr_fn="bogus")
    with pytest.raises(ValueError, match="ns_coefficients"):
        MuonWithAdamW([nn.Parameter(torch.ones(3, 3))], ns_coefficients="nope")
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAdamW([{"params": [nn.Parameter(torch.ones(3, 3))]}])


# ----------------------------------------------------------------------------------------------
def test_fused_qkv_orthogonalised_per_segment(torch_muon_fp32):
    """A fused q|k|v step equals three separate matrices under torch.optim.Muon (fp32 NS,
    1e-6 relative), and differs from orthogonalising the fused matrix as one."""
    torch.manual_seed(0)
    dim = 32
    lin = nn.Linear(dim, 3 * dim)
    lin.tp_style, lin.tp_fused_sizes = "column", (dim,) * 3
    wrapper = nn.ModuleDict({"qkv": lin})
    separate = [nn.Parameter(w.detach().clone()) for w in lin.weight.split(dim)]
    whole = nn.Parameter(lin.weight.detach().clone())
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours = MuonWithAdamW([build_muon_param_groups(wrapper)[0]], ns_dtype="float32", **kw)
    ref = torch.optim.Muon(separate, **kw)
    one = MuonWithAdamW([{"params": [whole], "use_muon": True}], ns_dtype="float32", **kw)
    for _ in range(3):
        g = torch.randn(3 * dim, dim)
        lin.weight.grad, whole.grad = g.clone(), g.clone()
        for p, gs in zip(separate, g.split(dim)):
            p.grad = gs.clone()
        for o in (ours, ref, one):
            o.step()
    assert rel(lin.weight.detach(), torch.cat([p.detach() for p in separate])) <= 1e-6
    assert rel(lin.weight.detach(), whole.detach()) > 1e-2


def test_per_head_blocks_and_row_segments():
    torch.manual_seed(0)
    group = dict(ns_coefficients="keller", ns_steps=5, ns_norm_scale=None, ns_dtype="float32", eps=1e-7,
                 adjust_lr_fn=None)
    sched, _ = resolve_ns_schedule("keller", 5)
    U = torch.randn(96, 32)
    seg = {"dim": 0, "segments": [32, 32, 32], "blocks": None, "tp_dim": 0}
    head = dict(seg, blocks=[16, 16, 16])
    o_seg, blocks_seg = orthogonalize(U, seg, group)
    o_head, blocks_head = orthogonalize(U, head, group)
    assert len(blocks_seg) == 3 and len(blocks_head) == 6
    for k in range(6):  # each head block is its own Newton-Schulz (batched: 1e-6 relative)
        assert rel(o_head[16 * k:16 * (k + 1)], newton_schulz(U[16 * k:16 * (k + 1)], sched, dtype=torch.float32)) <= 1e-6
    assert rel(o_head, o_seg) > 1e-2
    # Row-fused (FLUX single-block linear2): segments along the input dim.
    V = torch.randn(32, 160)
    o_row, blocks = orthogonalize(V, {"dim": 1, "segments": [32, 128], "blocks": None, "tp_dim": 1}, group)
    assert [b[:2] for b in blocks] == [(0, 32), (32, 128)]
    assert rel(o_row[:, 32:], newton_schulz(V[:, 32:], sched, dtype=torch.float32)) <= 1e-6


def test_polar_express_schedule():
    sched, scale = resolve_ns_schedule("polar_express", 5)
    assert len(set(sched)) == 5 and scale == 1.02
    longer, _ = resolve_ns_schedule("polar_express", 7)
    assert longer[5] == longer[6] == sched[4]  # the last polynomial repeats
    torch.manual_seed(0)
    G = torch.randn(64, 32)
    keller = torch.linalg.svdvals(newton_schulz(G, resolve_ns_schedule("keller", 5)[0], dtype=torch.float32))
    polar = torch.linalg.svdvals(newton_schulz(G, sched, dtype=torch.float32, norm_scale=scale))
    # Polar Express pushes the small singular values much closer to 1 in the same 5 steps.
    assert polar.min() > keller.min() + 0.1 and polar.max() < 1.2
    opt = MuonWithAdamW([nn.Parameter(torch.randn(8, 4))], ns_coefficients="polar_express")
    opt.param_groups[0]["params"][0].grad = torch.randn(8, 4)
    opt.step()


# ----------------------------------------------------------------------------------------------
def _flux_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 3, 32, generator=g),
            torch.randn(2, 16, 4, 4, generator=g))


def _train(model, opt, steps):
    losses = []
    for s in steps:
        x, t, cond, target = _flux_batch(s)
        opt.zero_grad()
        loss = F.mse_loss(model(x, t, cond), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = FluxMMDiT(TINY)
    opt = MuonWithAdamW(build_muon_param_groups(model, modulation="muon", per_head=True), lr=0.02,
                        adjust_lr_fn="match_rms_adamw", ns_coefficients="polar_express")
    return model, opt


def test_resume_mid_run_is_bitwise():
    straight_model, straight_opt = _fresh()
    straight = _train(straight_model, straight_opt, range(6))

    model, opt = _fresh()
    first = _train(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain tensors and containers only
    resumed_model, resumed_opt = _fresh(seed=123)  # different init: everything must come from the file
    resumed_model.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["optim"])
    for p_new, p_old in zip(resumed_opt.param_groups[0]["params"], opt.param_groups[0]["params"]):
        assert torch.equal(resumed_opt.state[p_new]["momentum_buffer"], opt.state[p_old]["momentum_buffer"])
    second = _train(resumed_model, resumed_opt, range(3, 6))
    assert first + second == straight
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)
    # The inner AdamW follows the loaded groups and state (schedulers act on both halves).
    assert resumed_opt._adamw.param_groups[0] is resumed_opt.param_groups[1]
    assert resumed_opt._adamw.state is resumed_opt.state


def test_frozen_and_gradless_params_untouched():
    torch.manual_seed(0)
    model = FluxMMDiT(TINY)
    model.x_embedder.requires_grad_(False)
    before = model.x_embedder.weight.detach().clone()
    opt = MuonWithAdamW(build_muon_param_groups(model))
    x, t, cond, target = _flux_batch(0)
    F.mse_loss(model(x, t, cond), target).backward()
    model.x_embedder.weight.grad = torch.ones_like(model.x_embedder.weight)  # even with a stray grad
    untouched = model.double_blocks[0].img_qkv.weight
    untouched.grad = None
    kept = untouched.detach().clone()
    opt.step()
    assert torch.equal(model.x_embedder.weight, before)
    assert torch.equal(untouched, kept) and "momentum_buffer" not in opt.state[untouched]


def test_build_from_run_config():
    from iomm_scale.config import RunConfig
    from iomm_scale.optim.muon import build_muon_optimizer

    cfg = RunConfig()
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay = "muon", 3e-4, 0.01
    model = FluxMMDiT(TINY)
    opt = build_muon_optimizer(model, cfg)
    muon, adamw = opt.param_groups
    assert muon["lr"] == adamw["lr"] == 3e-4 and muon["adjust_lr_fn"] == cfg.optim.muon.scaling
    assert adamw["betas"] == tuple(cfg.optim.betas) and adamw["eps"] == cfg.optim.eps
    assert (set(muon["param_names"]) >= MOD_NAMES) == (cfg.optim.muon.modulation == "muon")
    assert "muon:" in opt.routing_table and "adamw:" in opt.routing_table
